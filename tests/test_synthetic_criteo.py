import numpy as np

from dlrm_sparsity.criteo.synthetic import write_synthetic_raw


def test_same_seed_same_bytes_and_kaggle_format(tmp_path):
    a = write_synthetic_raw(tmp_path / "a.txt", 3000, seed=7, show_progress=False)
    b = write_synthetic_raw(tmp_path / "b.txt", 3000, seed=7, show_progress=False)
    c = write_synthetic_raw(tmp_path / "c.txt", 3000, seed=8, show_progress=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    rows = [line.split("\t") for line in a.read_text().splitlines()]
    assert len(rows) == 3000 and {len(r) for r in rows} == {40}
    assert {r[0] for r in rows} == {"0", "1"}
    ints = [r[1:14] for r in rows]
    assert any(v == "" for r in ints for v in r)
    assert any(r[1].startswith("-") for r in ints)  # I2 dips below zero
    cats = [v for r in rows for v in r[14:]]
    assert any(v == "" for v in cats)
    filled = [v for v in cats if v]
    assert {len(v) for v in filled} == {8}
    values = np.array([int(v, 16) for v in filled])
    assert values.max() > 0x7FFFFFFF and values.min() < 0x7FFFFFFF


def test_cardinality_cap_and_skew(tmp_path):
    path = write_synthetic_raw(tmp_path / "t.txt", 20000, seed=1, max_cardinality=300,
                               show_progress=False)
    col = [line.split("\t")[14 + 2] for line in path.read_text().splitlines()]
    values, counts = np.unique([v for v in col if v], return_counts=True)
    assert len(values) <= 300
    assert counts.max() > 20 * np.median(counts)  # Zipf: a few values dominate


def test_hex8_matches_pythons_formatting():
    from dlrm_sparsity.criteo.synthetic import hex8
    values = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF], dtype=np.int64)
    assert hex8(values).tolist() == [f"{v:08x}" for v in values]
