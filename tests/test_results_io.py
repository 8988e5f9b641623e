import math

import pandas as pd

from results_io import read_metadata, reusable


def test_reusable_compares_as_csv_text_with_empty_cells_equal():
    wanted = {"n_samples": 500, "sha": "ab", "limit": None}
    assert reusable({"n_samples": "500", "sha": "ab", "limit": math.nan}, wanted,
                    ["n_samples", "sha", "limit"])
    assert not reusable({"n_samples": 499, "sha": "ab"}, wanted, ["n_samples"])
    assert not reusable({"n_samples": 500, "limit": 7}, wanted, ["limit"])
    assert not reusable({"n_samples": 500, "error": "gone"}, wanted, ["n_samples"])
    assert not reusable(None, wanted, ["n_samples"])


def test_metadata_paths_resolve_against_the_csv_folder(tmp_path):
    pd.DataFrame({"norm": ["L1", "L1"], "sparse_block_shape": ["(1, 4)"] * 2,
                  "sparsity_level": [0.0, 0.5],
                  "path": ["zips/a.zip", str(tmp_path / "abs.zip")]}).to_csv(
        tmp_path / "meta.csv", index=False)
    meta = read_metadata(tmp_path / "meta.csv")
    assert meta["checkpoint"].tolist() == [str(tmp_path / "zips/a.zip"), str(tmp_path / "abs.zip")]
