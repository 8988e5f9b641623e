import numpy as np
import pytest

from conftest import random_raw_rows, write_raw_lines
from dlrm_sparsity.criteo.data import day_count_path, fea_count_path, load_split
from dlrm_sparsity.criteo.preprocess import preprocess_raw
from dlrm_sparsity.errors import DataError


def naive_dlrm_processing(rows):
    """dlrm's semantics, one line at a time: 0 for empty, clip negatives, first-seen ids."""
    ids = [{} for _ in range(26)]
    y, x_int, x_cat = [], [], []
    for r in rows:
        y.append(int(r[0]))
        x_int.append([max(int(v), 0) if v else 0 for v in r[1:14]])
        raw = [int(v, 16) if v else 0 for v in r[14:]]
        x_cat.append([ids[c].setdefault(v, len(ids[c])) for c, v in enumerate(raw)])
    return np.array(y), np.array(x_int), np.array(x_cat), np.array([len(d) for d in ids])


@pytest.mark.parametrize("chunk_bytes", [700, 1 << 20])  # many chunks, and one
def test_processed_file_matches_dlrms_semantics(tmp_path, chunk_bytes):
    rows = random_raw_rows(101, seed=1)
    raw = tmp_path / "train.txt"
    write_raw_lines(raw, rows)
    report = preprocess_raw(raw, tmp_path / "p.npz", chunk_bytes=chunk_bytes,
                            show_progress=False)
    y, x_int, x_cat, counts = naive_dlrm_processing(rows)
    with np.load(tmp_path / "p.npz") as f:
        np.testing.assert_array_equal(f["y"], y)
        np.testing.assert_array_equal(f["X_int"], x_int)
        np.testing.assert_array_equal(f["X_cat"], x_cat)
        np.testing.assert_array_equal(f["counts"], counts)
    with np.load(day_count_path(raw)) as f:  # 101 = 7 * 14 + 3: first three days get 15
        np.testing.assert_array_equal(f["total_per_file"], [15, 15, 15, 14, 14, 14, 14])
    with np.load(fea_count_path(raw)) as f:
        np.testing.assert_array_equal(f["counts"], counts)
    assert report.num_samples == 101 and report.skipped_lines == 0


def test_first_appearance_ids_and_large_hash_values(tmp_path):
    base = ["0"] + ["1"] * 13 + ["00000001"] * 26
    rows = [list(base) for _ in range(4)]
    rows[0][14], rows[1][14], rows[2][14], rows[3][14] = "ffffffff", "", "80000000", "ffffffff"
    rows[1][2] = "-3"
    write_raw_lines(tmp_path / "t.txt", rows)
    preprocess_raw(tmp_path / "t.txt", tmp_path / "p.npz", show_progress=False)
    with np.load(tmp_path / "p.npz") as f:
        assert f["X_cat"][:, 0].tolist() == [0, 1, 2, 0]  # 0xffffffff, 0 (empty), 0x80000000
        assert f["X_int"][1, 1] == 0 and f["counts"][0] == 3


def test_test_split_is_first_half_of_last_day_in_file_order(tmp_path):
    rows = random_raw_rows(30, seed=2)  # days of 5,5,4,4,4,4,4: last day rows 26..29
    for i, r in enumerate(rows):
        r[1] = str(i)  # I1 numbers the lines
    write_raw_lines(tmp_path / "train.txt", rows)
    preprocess_raw(tmp_path / "train.txt", tmp_path / "p.npz", show_progress=False)
    test = load_split(tmp_path / "p.npz", tmp_path / "train.txt", "test")
    val = load_split(tmp_path / "p.npz", tmp_path / "train.txt", "val")
    def line_of(split):
        return np.expm1(split.dense[:, 0].double().numpy()).round().tolist()

    assert line_of(test) == [26.0, 27.0] and line_of(val) == [28.0, 29.0]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop(), ":3: expected 40 tab-separated fields, found 39"),
    (lambda r: r.__setitem__(18, "xyz00000"), ":3: malformed field C5"),
    (lambda r: r.__setitem__(3, "1x"), ":3: malformed field I3"),
    (lambda r: r.__setitem__(0, "2"), ":3: malformed field label"),
    (lambda r: r.__setitem__(20, "123456789"), ":3: malformed field C7"),
])
def test_malformed_line_stops_with_line_and_field(tmp_path, edit, message):
    rows = random_raw_rows(5, seed=3)
    edit(rows[2])
    write_raw_lines(tmp_path / "t.txt", rows)
    with pytest.raises(DataError, match=message):
        preprocess_raw(tmp_path / "t.txt", tmp_path / "p.npz", show_progress=False)
    assert not (tmp_path / "p.npz").exists()


def test_skip_bad_lines_drops_and_counts_them(tmp_path):
    rows = random_raw_rows(20, seed=4)
    rows[3].pop()
    rows[9][30] = "nothex!!"
    write_raw_lines(tmp_path / "t.txt", rows)
    report = preprocess_raw(tmp_path / "t.txt", tmp_path / "p.npz", skip_bad_lines=True,
                            show_progress=False)
    good = [r for i, r in enumerate(rows) if i not in (3, 9)]
    y, x_int, x_cat, _ = naive_dlrm_processing(good)
    assert report.skipped_lines == 2 and report.num_samples == 18
    with np.load(tmp_path / "p.npz") as f:
        np.testing.assert_array_equal(f["X_cat"], x_cat)
        np.testing.assert_array_equal(f["X_int"], x_int)


def test_missing_final_newline_is_accepted(tmp_path):
    rows = random_raw_rows(8, seed=5)
    (tmp_path / "t.txt").write_text("\n".join("\t".join(r) for r in rows))
    assert preprocess_raw(tmp_path / "t.txt", tmp_path / "p.npz",
                          show_progress=False).num_samples == 8
