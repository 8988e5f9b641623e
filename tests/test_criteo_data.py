import numpy as np
import pytest
import torch

from dlrm_sparsity.criteo.data import day_sizes, load_split, split_bounds
from dlrm_sparsity.errors import DataError


def write_dlrm_style(tmp_path, n, seed=0):
    """A processed file as dlrm writes it: savez_compressed, X_cat as float64."""
    rng = np.random.default_rng(seed)
    x_int = rng.integers(0, 100, size=(n, 13)).astype(np.int32)
    x_cat = rng.integers(0, 50, size=(n, 26)).astype(np.float64)
    y = rng.integers(0, 2, size=n).astype(np.int32)
    np.savez_compressed(tmp_path / "proc.npz", X_int=x_int, X_cat=x_cat, y=y,
                        counts=np.full(26, 50))
    np.savez_compressed(tmp_path / "train_day_count.npz", total_per_file=day_sizes(n))
    return x_int, x_cat, y


@pytest.mark.parametrize("n", [7, 50, 1001, 45840617])
def test_split_bounds_follow_dlrms_array_split(n):
    sizes = day_sizes(n)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
    days = np.array_split(np.arange(min(n, 2000)), np.cumsum(sizes)[:-1]) if n < 2000 else None
    start, stop = split_bounds(sizes, "test")
    last = sizes[-1]
    assert start == n - last and stop - start == -(-last // 2)
    assert split_bounds(sizes, "val") == (stop, n)
    assert split_bounds(sizes, "train") == (0, start)
    if days is not None:  # exactly np.array_split(last_day, 2)[0], as dlrm does
        test_idx = np.array_split(days[-1], 2)[0]
        assert (start, stop) == (test_idx[0], test_idx[-1] + 1)


def test_load_split_reads_dlrms_compressed_file(tmp_path):
    x_int, x_cat, y = write_dlrm_style(tmp_path, 100)
    split = load_split(tmp_path / "proc.npz", tmp_path / "train.txt", "test")
    start, stop = split_bounds(day_sizes(100), "test")
    assert len(split) == stop - start
    expected = torch.log(torch.tensor(x_int[start:stop], dtype=torch.float) + 1)  # dlrm's
    assert torch.equal(split.dense, expected)
    assert split.sparse_t.dtype == torch.int64
    assert split.sparse_t.T.tolist() == x_cat[start:stop].astype(np.int64).tolist()
    assert split.labels.tolist() == y[start:stop].astype(float).tolist()
    limited = load_split(tmp_path / "proc.npz", tmp_path / "train.txt", "test", limit=3)
    assert len(limited) == 3


def test_batches_cover_the_split_with_one_id_per_bag(tmp_path):
    write_dlrm_style(tmp_path, 200)
    split = load_split(tmp_path / "proc.npz", tmp_path / "train.txt", "train")
    batches = list(split.batches(64))
    assert sum(b.labels.shape[0] for b in batches) == len(split)
    last = batches[-1]
    assert last.indices.shape == last.offsets.shape == (26, last.labels.shape[0])
    assert last.offsets[3].tolist() == list(range(last.labels.shape[0]))
    assert all(last.indices[k].is_contiguous() for k in range(26))


def test_missing_day_count_file_is_named(tmp_path):
    write_dlrm_style(tmp_path, 30)
    with pytest.raises(DataError, match=r"other_day_count\.npz: day-count file not found"):
        load_split(tmp_path / "proc.npz", tmp_path / "other.txt", "test")


def test_ids_beyond_a_table_are_named(tmp_path):
    write_dlrm_style(tmp_path, 70)
    split = load_split(tmp_path / "proc.npz", tmp_path / "train.txt", "test")
    sizes = [50] * 26
    split.check_fits(tuple(sizes), "model.zip")
    sizes[4] = int(split.sparse_t[4].max())
    with pytest.raises(DataError, match=rf"model.zip: table 4 \(C5\) has {sizes[4]} rows but "
                                        rf"the data holds id {sizes[4]}"):
        split.check_fits(tuple(sizes), "model.zip")
