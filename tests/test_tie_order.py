"""tie_order's replica of torch's CPU sort against torch.sort itself, ties included."""

import sys

import numpy as np
import pytest
import torch

import dlrm_sparsity
from dlrm_sparsity import tie_order


def torch_places(values: np.ndarray) -> np.ndarray:
    """Where torch.sort (as the stock sparsifier calls it) puts each value."""
    _, order = torch.sort(torch.from_numpy(values).view(1, 1, -1), dim=2)
    return np.argsort(order.view(-1).numpy(), kind="stable")


def test_this_torch_sorts_floats_as_the_replica_does():
    """On the pinned torch the engine uses the replica; were it False the engine would fall
    back to torch.sort, so a torch that sorts another way must fail here, not silently."""
    assert tie_order.matches_torch_sort()


@pytest.mark.parametrize("where", ["memory", "file"])
def test_followed_values_land_where_torch_sort_puts_them(where, tmp_path):
    """Tie-heavy values of many sizes, given in chunks; in a file with windows small enough
    that large ranges are partitioned in steps and given back as the sort goes."""
    rng = np.random.default_rng(0)
    folder = tmp_path if where == "file" else None
    for trial in range(60):
        n = int(rng.integers(1, 2000)) if trial < 40 else int(rng.integers(20_000, 300_000))
        values = (rng.integers(0, int(rng.integers(1, 3000)), n) / 7).astype(np.float32)
        wanted = np.unique(values[rng.integers(0, n, int(rng.integers(1, 4)))])
        followed = np.flatnonzero(np.isin(values, wanted))
        chunks = np.array_split(values, int(rng.integers(1, 5)))
        window = int(rng.choice([40, 1000, 10**9]))
        blocks, got, places = tie_order.sorted_places(chunks, n, wanted, len(followed),
                                                      folder, window)
        assert np.array_equal(blocks, followed) and np.array_equal(got, values[followed])
        assert np.array_equal(places, torch_places(values)[followed]), (trial, n, window)
    assert list(tmp_path.iterdir()) == []  # the sort's file is gone with it


def test_what_it_cannot_follow_is_none_and_wrong_counts_raise(monkeypatch):
    values = np.array([3.0, 1.0, 1.0, 2.0], dtype=np.float32)
    for bad in (float("nan"), -1.0):
        with_bad = values.copy()
        with_bad[0] = bad
        assert tie_order.sorted_places([with_bad], 4, [1.0], 2) is None
    monkeypatch.setattr(tie_order, "MAX_FOLLOWED", 1)
    assert tie_order.sorted_places([values], 4, [1.0], 2) is None
    monkeypatch.undo()
    assert tie_order.sorted_places([values], 4, [1.0], 2)[2].tolist() == [0, 1]
    with pytest.raises(ValueError, match="hold 4 values of 5"):
        tie_order.sorted_places([values], 5, [1.0], 2)
    with pytest.raises(ValueError, match="more than 1 values equal"):
        tie_order.sorted_places([values], 4, [1.0], 1)
    with pytest.raises(ValueError, match="at least one value"):
        tie_order.sorted_places([values], 4, [], 0)


def test_without_numba_the_engine_is_sent_to_torch_sort(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "dlrm_sparsity.introsort", raising=False)
    monkeypatch.delattr(dlrm_sparsity, "introsort", raising=False)  # imported anew, so fails
    tie_order.matches_torch_sort.cache_clear()
    try:
        assert tie_order.matches_torch_sort() is False
    finally:
        tie_order.matches_torch_sort.cache_clear()
