"""Where torch.sort puts tied values, without torch.sort's memory.

The stock DataNormSparsifier zeroes the first k blocks of torch.sort's order of the block
averages. Where equal averages straddle the k-th place, which of them are zeroed is decided by
how that sort, which is not stable, moves them. torch.sort of n float32 values holds 20 bytes
a value at its peak (the values, its int64 order, and the int64 arange it fills the order
from): for the largest table of a Kaggle-size model at 1x1 blocks, 3 GiB. The order of the
ties, though, depends on the values alone, since the sort compares nothing else.

torch's CPU sort of a float tensor is libstdc++'s std::sort (introsort) over the values and
their indices. This module runs the same algorithm on the values alone, in place, and follows
only the values it is asked about, each carried in its own slot as a negative number: 4 bytes
a value. torch offers no sort that keeps its tie order with less memory, nor one over a numpy
array in place, so the algorithm is written here (introsort.py, compiled with numba), step for
step as libstdc++'s:
  - __introsort_loop: while a range holds more than 16 values, move the median of its second,
    middle and last values to its front and partition the rest around it (unguarded), then
    loop on the left part and recurse on the right;
  - after 2 * floor(log2(n)) levels a range is heap-sorted (std::partial_sort) instead; that
    step is not followed here and the caller falls back to torch.sort;
  - __final_insertion_sort: an insertion sort of the first 16 values, then an unguarded one
    of the rest.
Every other build (another C++ library, or a future torch that sorts floats another way)
may order ties differently, so `matches_torch_sort()` checks the algorithm against torch.sort
on tie-heavy values once per process, and the mask engine uses it only where it agrees.
"""

from __future__ import annotations

import functools
import mmap
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

# At most this many values are followed: each is written as -(j + 1) while it is sorted, exact
# in float32 up to 2**24. Beyond it, the caller falls back to torch.sort.
MAX_FOLLOWED = 2**24
# Values resident at once where they lie in a file: a range larger than this is partitioned
# a window of steps at a time, the pages it has passed given back after each.
WINDOW = 16 * 2**20  # 64 MiB of float32


class _Keys:
    """The values being sorted, in memory or in an unlinked file of `folder`, mapped; there,
    give_back(start, stop) hands the pages wholly inside those values back to the system
    (a shared map: what was written stays in the file)."""

    def __init__(self, count: int, folder: Path | None):
        self._map = None
        if folder is None or count == 0:
            self.array = np.empty(count, dtype=np.float32)
            return
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".tie-order-")
        self._file.truncate(4 * count)
        self._map = mmap.mmap(self._file.fileno(), 4 * count)
        self.array = np.frombuffer(self._map, dtype=np.float32)

    def give_back(self, start: int, stop: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
            return
        begin, end = -(-4 * start // mmap.PAGESIZE), 4 * stop // mmap.PAGESIZE
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, begin * mmap.PAGESIZE,
                              (end - begin) * mmap.PAGESIZE)

    def close(self) -> None:
        del self.array  # the map's only export: it closes once it is gone
        if self._map is not None:
            self._map.close()
            self._file.close()


def sorted_places(chunks: Iterable[np.ndarray], count: int, wanted: np.ndarray,
                  followed: int, folder: Path | None = None, window: int = WINDOW
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Sort `count` float32 values, given in order as chunks, as torch.sort sorts them, and
    return for the `followed` values equal to one of `wanted`, in the order of their indices:
    those indices, their values, and their places in the sorted order (torch.sort's inverse
    permutation there). The values are held in memory, or with `folder` in a file there, of
    which a window of values is resident at a time. None where this module cannot say: a
    NaN or negative value (torch.sort's NaN rule is not followed), more than MAX_FOLLOWED
    followed, or a range that libstdc++ would heap-sort. ValueError where the chunks hold
    other than `count` values or other than `followed` equal to one of `wanted`."""
    wanted = np.unique(np.asarray(wanted, dtype=np.float32))
    if len(wanted) == 0 or np.isnan(wanted).any():
        raise ValueError("wanted must hold at least one value, none of them NaN")
    if followed > MAX_FOLLOWED:
        return None
    from dlrm_sparsity import introsort as algo  # numba: imported by the runs that need it

    table = np.empty(followed, dtype=np.float32)
    indices = np.empty(followed, dtype=np.int64)
    keys = _Keys(count, folder)
    try:
        written = _write(keys, chunks, wanted, table, indices, algo)
        if written is None:
            return None
        if written != (count, followed):
            raise ValueError(f"the chunks hold {written[0]} values of {count}, {written[1]} "
                             f"followed of {followed}")
        places = np.full(followed, -1, dtype=np.int64)
        if not _introsort(keys, table, window, algo, places):
            return None
        return indices, table, places
    finally:
        keys.close()


def _write(keys: _Keys, chunks: Iterable[np.ndarray], wanted: np.ndarray, table: np.ndarray,
           indices: np.ndarray, algo) -> tuple[int, int] | None:
    """The chunks written into keys, the followed values tagged (introsort.tag): how many
    values and how many followed; None at a NaN or negative value."""
    at, tagged = 0, 0
    for part in chunks:
        if at + len(part) > len(keys.array):
            raise ValueError(f"the chunks hold more than {len(keys.array)} values")
        if not (part >= 0).all():
            return None
        keys.array[at:at + len(part)] = part
        tagged = algo.tag(keys.array[at:at + len(part)], wanted, table, indices, tagged, at)
        if tagged < 0:
            raise ValueError(f"more than {len(table)} values equal one of {wanted}")
        keys.give_back(at, at + len(part))
        at += len(part)
    return at, tagged


def _introsort(keys: _Keys, table: np.ndarray, window: int, algo, places: np.ndarray) -> bool:
    """std::sort of keys.array as far as it moves the followed values, whose places it
    writes: ranges larger than the window are partitioned here in steps, a window at a time,
    smaller ones sorted by introsort_range; a range without a followed value is left alone
    (introsort.py). The order ranges are taken in changes nothing."""
    values, count = keys.array, len(keys.array)
    window = max(window, 2 * algo.THRESHOLD)
    ranges = [(0, count, 2 * (count.bit_length() - 1) if count else 0, len(table))]
    while ranges:
        first, last, depth, inside = ranges.pop()
        while inside:
            if last - first <= window:
                if not algo.introsort_range(values, table, first, last, depth, inside, places):
                    return False
                keys.give_back(first, last)
                break
            if depth == 0:
                return False  # libstdc++ heap-sorts this range: not followed here
            depth -= 1
            algo.median_to_first(values, table, first, last)
            pivot = algo.value_at(values, table, first)
            lo, hi, scanning_hi, cut = first + 1, last, False, -1
            while cut < 0:
                was_lo, was_hi = lo, hi
                lo, hi, scanning_hi, cut = algo.partition_steps(values, table, lo, hi,
                                                                scanning_hi, pivot, window)
                keys.give_back(was_lo, lo)
                keys.give_back(hi + 1, was_hi)
            left = 0
            for start in range(first, cut, window):
                left += algo.count_followed(values, start, min(cut, start + window))
                keys.give_back(start, min(cut, start + window))
            if inside > left:
                ranges.append((cut, last, depth, inside - left))
            last, inside = cut, left
    return True


@functools.lru_cache(maxsize=1)
def matches_torch_sort() -> bool:
    """Whether sorted_places agrees with this torch's torch.sort, checked on tie-heavy values
    (sizes on both sides of the insertion-sort threshold, ties followed through partitions
    and through both insertion sorts). False where numba is missing or cannot compile."""
    try:
        return _agrees_on_ties()
    except Exception:  # numba missing, or unable to compile (or cache) here:
        return False  # torch.sort then orders the ties, as the stock sparsifier does


def _agrees_on_ties() -> bool:
    rng = np.random.default_rng(20261206)
    for n, distinct in ((5, 2), (17, 3), (40, 5), (1000, 30), (200_000, 4000)):
        values = (rng.integers(0, distinct, n) / 7).astype(np.float32)
        wanted = values[rng.integers(0, n, 3)]
        _, order = torch.sort(torch.from_numpy(values).view(1, 1, -1), dim=2)
        places = np.argsort(order.view(-1).numpy(), kind="stable")
        followed = np.flatnonzero(np.isin(values, wanted))
        got = sorted_places([values], n, wanted, len(followed), window=64)
        if got is None or not (np.array_equal(got[0], followed)
                               and np.array_equal(got[1], values[followed])
                               and np.array_equal(got[2], places[followed])):
            return False
    return True
