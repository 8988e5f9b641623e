"""One rule for reusing earlier rows: same key and same signature, from CSVs or the log."""

import numpy as np
import pandas as pd

from dlrm_sparsity.runner.resume import SIGNATURE, Resume, key_of, signature_of

KEYS = ["norm", "sparsity_level"]


def test_signature_changes_with_any_determinant_and_not_with_order():
    base = {"checkpoint_sha256": "ab", "data": "f00d", "batch_size": 16384}
    assert signature_of(base) == signature_of(dict(reversed(list(base.items()))))
    for change in ({"checkpoint_sha256": "ac"}, {"data": "f00e"}, {"batch_size": 8192}):
        assert signature_of({**base, **change}) != signature_of(base)


def test_keys_compare_as_csvs_give_them_back():
    assert key_of({"norm": "L1", "sparsity_level": np.float32(0.5)}, KEYS) == ("L1", 0.5)
    assert key_of({"norm": "L1", "sparsity_level": 1}, KEYS) == ("L1", 1.0)


def test_rows_are_kept_only_for_the_same_key_and_signature(tmp_path):
    csv = tmp_path / "out.csv"
    pd.DataFrame([{"norm": "L1", "sparsity_level": 0.5, "auc": 0.8, SIGNATURE: "s1"},
                  {"norm": "L1", "sparsity_level": 0.9, "error": "gone", SIGNATURE: "s1"},
                  {"norm": "L2", "sparsity_level": 0.5, "auc": 0.7}]).to_csv(csv, index=False)
    resume = Resume([csv], KEYS, rank=0, overwrite=False)
    assert resume.lookup(("L1", 0.5), "s1")[0][0]["auc"] == 0.8
    assert resume.lookup(("L1", 0.5), "s2") is None  # something that determines it changed
    assert resume.lookup(("L1", 0.9), "s1") is None  # an error row is redone
    assert resume.lookup(("L2", 0.5), "s1") is None  # no signature: an older CSV, redone
    assert Resume([csv], KEYS, rank=0, overwrite=True).lookup(("L1", 0.5), "s1") is None


def test_the_progress_log_of_a_killed_run_holds_every_table_of_an_item(tmp_path):
    csvs = [tmp_path / "times.csv", tmp_path / "stages.csv"]
    Resume(csvs, KEYS, rank=0, overwrite=False).record(
        ("L1", 0.5), "s1", [[{"t": 1}], [{"stage": "top"}, {"stage": "bottom"}]])
    again = Resume(csvs, KEYS, rank=1, overwrite=False)  # another world size reads it too
    assert again.lookup(("L1", 0.5), "s1") == [[{"t": 1}], [{"stage": "top"}, {"stage": "bottom"}]]
    again.close()
    assert Resume(csvs, KEYS, rank=0, overwrite=False).lookup(("L1", 0.5), "s1") is None
