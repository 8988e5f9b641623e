import pandas as pd

from dlrm_sparsity.runner.outputs import earlier_rows, read_metadata, write_csv


def test_metadata_paths_resolve_against_the_csv_folder(tmp_path):
    pd.DataFrame({"norm": ["L1", "L1"], "sparse_block_shape": ["(1, 4)"] * 2,
                  "sparsity_level": [0.0, 0.5],
                  "path": ["zips/a.zip", str(tmp_path / "abs.zip")]}).to_csv(
        tmp_path / "meta.csv", index=False)
    meta = read_metadata(tmp_path / "meta.csv")
    assert meta["checkpoint"].tolist() == [str(tmp_path / "zips/a.zip"), str(tmp_path / "abs.zip")]


def test_csv_puts_the_named_columns_first_and_earlier_rows_read_it_back(tmp_path):
    rows = [{"x": 1, "sparsity_level": 0.5, "norm": "L1", "sparse_block_shape": "(1, 4)"}]
    write_csv(rows, tmp_path / "a.csv", ["norm", "sparse_block_shape", "sparsity_level"])
    assert list(pd.read_csv(tmp_path / "a.csv").columns) == ["norm", "sparse_block_shape",
                                                            "sparsity_level", "x"]
    assert earlier_rows(tmp_path / "a.csv", ["norm"]) == [{**rows[0]}]
    assert earlier_rows(tmp_path / "a.csv", ["stage"]) == []  # not a CSV of that sweep
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe garbage")
    assert earlier_rows(tmp_path / "b.csv", ["norm"]) == []
    assert earlier_rows(tmp_path / "missing.csv", ["norm"]) == []
