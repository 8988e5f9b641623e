"""The stock DataNormSparsifier's masks at every level of a grid, from one pass per table.

For a table, a norm and a block shape, the stock sparsifier (torch.ao.pruning's
DataNormSparsifier with its default zeros_per_block, every value of a chosen block zeroed)
  1. takes |x| (L1) or x*x (L2) of the table,
  2. averages it over blocks with avg_pool2d (ceil_mode: partial blocks at the edges),
  3. sorts the block averages with torch.sort,
  4. zeroes the first round(level * num_blocks) blocks of that order,
and the squashed weight is mask * x. Only step 4 depends on the level, yet the stock sparsifier
does all four at every level, with temporaries about nine times the table. This engine takes
the block averages with the same calls on the same values and finds, once for every level,
each block's first level: the index of the first grid level that zeroes it (uint8, one byte
a block). For that it needs no order but each level's cut, the k-th smallest average, found
by a radix selection over the averages a chunk at a time (level_cuts): a level zeroes the
blocks below its cut and those equal to it. Only where equal averages straddle the k-th place
does the sort's order of ties decide which are zeroed: float32 averages of millions of small
weights repeat often enough that the Kaggle-size model's largest table has such ties at 1x1
and at 1x4. torch.sort is not stable, so tie_order replays torch's CPU sort on the averages
alone, in memory or in a file a window at a time, and says where it puts those ties; where
it cannot (another build of torch, a GPU, a NaN at a cut), torch.sort of the averages runs
and its int64 order gives the first levels. The stock check covers every way.
A level's mask is then one comparison, and the weight the same product mask * x, so -0.0 for
pruned negative values, as the stock sparsifier leaves them. A level that zeroes no block
(level 0) has the all-ones mask and needs no order: a grid's first point is pruned at once,
and the cuts wait for the first level that uses them.

Where the table is not a matrix the stock sparsifier squeezes (a table of one row or one
column), the engine defers to it for that table.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dlrm_sparsity import tie_order
from dlrm_sparsity.timing import trim_heap

NAME = "sort-once"
STOCK = "stock"
ENGINES = (NAME, STOCK)


def block_norms(table: torch.Tensor, norm: str, block_shape: tuple[int, int]) -> torch.Tensor:
    """The stock sparsifier's block averages of |x| or x*x, flattened row-major: (num_blocks,)."""
    data_norm = table.abs() if norm == "L1" else table * table
    pooled = F.avg_pool2d(data_norm[None, None], kernel_size=block_shape, stride=block_shape,
                          ceil_mode=True)
    return pooled.flatten()


def chunked_block_norms(chunks: Iterable[torch.Tensor], shape: tuple[int, int], norm: str,
                        block_shape: tuple[int, int]) -> torch.Tensor:
    """block_norms of a table of `shape` read as chunks of whole block rows, in order, into
    one tensor: each block lies in one chunk and is averaged alone, so the values are the
    same, with one chunk's |x| at a time instead of the table's."""
    out, at = None, 0
    for rows in chunks:
        part = block_norms(rows, norm, block_shape)
        if out is None:
            out = torch.empty(math.prod(block_grid(shape, block_shape)), dtype=part.dtype,
                              device=part.device)
        out[at:at + len(part)] = part
        at += len(part)
    if out is None or at != len(out):
        raise ValueError(f"the chunks hold {at} blocks of a table of {shape}")
    return out


def smallest_index_dtype(count: int) -> torch.dtype:
    """The narrowest signed integer type that holds 0 .. count - 1."""
    for dtype in (torch.int16, torch.int32):
        if count - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def sort_blocks(norms: torch.Tensor) -> torch.Tensor:
    """The blocks in the stock sparsifier's pruning order (torch.sort of the block averages,
    ascending), kept in the smallest integer type that holds the block count. The averages are
    sorted in place (torch.sort's values written over its input): the same call on the same
    values, so the same order, without a sorted copy beside them (at 1x1 blocks, the size of
    the table less at the sort's peak)."""
    flat = norms.view(1, 1, -1)
    order = torch.empty(flat.shape, dtype=torch.long, device=norms.device)
    torch.sort(flat, dim=2, out=(flat, order))
    order = order.view(-1)
    return order.to(smallest_index_dtype(len(norms))) if len(norms) else order


def _none_zeroed(count: int, levels: Sequence[float], device: torch.device) -> torch.Tensor:
    """The first levels of `count` blocks before any level is applied: len(levels), one byte
    a block (so at most 255 levels)."""
    if len(levels) > 255:
        raise ValueError("at most 255 levels in one engine (one byte a block)")
    return torch.full((count,), len(levels), dtype=torch.uint8, device=device)


def first_levels(order: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """For each block, the index in `levels` (ascending) of the first level that zeroes it;
    len(levels) for a block that no level zeroes."""
    count = len(order)
    first = _none_zeroed(count, levels, order.device)
    done = 0
    for i, level in enumerate(levels):
        k = round(level * count)  # the stock sparsifier's count of blocks to zero
        if k > done:
            first[order[done:k].long()] = i
            done = k
    return first


@dataclass
class LevelCuts:
    """Where each level cuts a table's block averages: count blocks; for each count k of
    blocks a level zeroes (0 < k < count), the k-th smallest average and whether equal
    averages straddle the k-th place; for each value that straddles, how many equal it."""

    count: int
    cuts: dict[int, tuple[np.float32, bool]]
    ties: dict[np.float32, int]


def level_cuts(averages: Callable[[], Iterable[torch.Tensor]], levels: Sequence[float]
               ) -> LevelCuts | None:
    """The levels' cuts over block averages given in order, a chunk at a time, by two
    passes (averages() is called twice) of a radix selection: the averages are >= 0, so
    their float32 bits order as they do; the first pass counts them by their top 16 bits,
    the second, within each bucket that holds a cut, by their low 16 bits. Nothing is held
    beside a chunk but those counts. None where the order decides more than ties at a cut:
    a cut that is NaN (torch.sort's NaN rule), a negative average, a GPU's averages.

    A level zeroes the round(level * n) blocks that come first in torch.sort's order. Where
    exactly that many blocks have an average at most t, the k-th smallest, they are the k
    smallest whatever the sort does with ties, and so the stock ones: blocks <= t. Where
    equal averages straddle the k-th place, the sort's order of ties decides which of them
    are zeroed (tie_order.py)."""
    top, count = np.zeros(2**16, dtype=np.int64), 0
    for part in averages():
        if part.device.type != "cpu":
            return None
        top += np.bincount(part.numpy().view(np.uint32) >> 16, minlength=2**16)
        count += len(part)
    if top[2**15:].any():  # a sign bit: negative, or a NaN with one
        return None
    ks = sorted({round(level * count) for level in levels} - {0, count})
    below = np.cumsum(top)  # below[b]: the averages whose top bits are at most b
    bucket = {k: int(np.searchsorted(below, k)) for k in ks}  # the bucket of the k-th
    held = sorted(set(bucket.values()))
    low = np.zeros((len(held), 2**16), dtype=np.int64)
    row_of = np.full(2**16, -1, dtype=np.int64)  # a bucket's row in low, -1 if none
    row_of[held] = np.arange(len(held))
    if ks:
        for part in averages():
            bits = part.numpy().view(np.uint32)
            rows = row_of[bits >> 16]
            inside = rows >= 0
            low += np.bincount(rows[inside] << 16 | (bits[inside] & 0xFFFF),
                               minlength=low.size).reshape(low.shape)
    cuts, ties = {}, {}
    for k in ks:
        b = bucket[k]
        before = int(below[b - 1]) if b else 0
        counts = low[row_of[b]]
        within = np.cumsum(counts)
        bits = int(np.searchsorted(within, k - before))
        cut = np.array([b << 16 | bits], dtype=np.uint32).view(np.float32)[0]
        if np.isnan(cut):
            return None
        less = before + (int(within[bits - 1]) if bits else 0)
        straddled = less + int(counts[bits]) > k
        cuts[k] = (cut, straddled)
        if straddled:
            ties[cut] = int(counts[bits])
    return LevelCuts(count, cuts, ties)


def first_levels_from_cuts(chunks: Iterable[torch.Tensor], count: int,
                           levels: Sequence[float], cuts: dict[int, tuple[np.float32, bool]],
                           tied: dict[int, np.ndarray]) -> torch.Tensor:
    """first_levels from level_cuts, over the block averages given again in order, a chunk
    of blocks at a time: a level of k blocks zeroes the blocks below its cut t and, of those
    equal to t, all of them or, where ties straddle the k-th place, those in tied[k] (block
    indices, the ones torch.sort puts first)."""
    first = _none_zeroed(count, levels, torch.device("cpu"))
    # A block's first level is the first whose bound it does not exceed: the cut itself, or
    # where ties straddle it the float just below it (the ties it zeroes are set after).
    # Bounds rise with the levels, so one search a block finds it; a level that zeroes no
    # block never matches, one that zeroes every block matches all, NaN included.
    bounds = np.full(len(levels), -np.inf, dtype=np.float32)
    every = len(levels)
    for i, level in enumerate(levels):
        k = round(level * count)
        if k == count and count:
            every = min(every, i)
            bounds[i] = np.inf
        elif k:
            cut, straddled = cuts[k]
            bounds[i] = np.nextafter(cut, np.float32(-np.inf)) if straddled else cut
    bounds, at = torch.from_numpy(bounds), 0
    for part in chunks:
        found = torch.searchsorted(bounds, part, out_int32=True)  # the first bound >= it
        found[part.isnan()] = every
        first[at:at + len(part)] = found
        at += len(part)
    if at != count:
        raise ValueError(f"the chunks hold {at} blocks of {count}")
    for i, level in reversed(list(enumerate(levels))):  # the earliest level wins
        k = round(level * count)
        if k in tied:
            chosen = torch.from_numpy(tied[k])
            first[chosen] = torch.minimum(first[chosen], torch.tensor(i, dtype=torch.uint8))
    return first


def block_grid(shape: tuple[int, int], block_shape: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of blocks over a table, partial blocks at the edges included
    (avg_pool2d's ceil_mode)."""
    return -(-shape[0] // block_shape[0]), -(-shape[1] // block_shape[1])


def is_matrix(table: torch.Tensor) -> bool:
    """The stock sparsifier squeezes its input: a (1, n) or (n, 1) table becomes 1-D there."""
    return table.dim() == 2 and table.shape[0] > 1 and table.shape[1] > 1


def keep_mask(first: torch.Tensor, level_index: int, shape: tuple[int, int],
              block_shape: tuple[int, int]) -> torch.Tensor:
    """The level's keep mask over a table of `shape` (or over so many of its rows from a
    block row on), from the first levels of its blocks, as a bool tensor that broadcasts to
    those rows viewed as (rows, block columns, block width) when blocks are one row high and
    tile the width, else as the full (rows, width) mask."""
    rows, width = shape
    bh, bw = block_shape
    kept = first.view(*block_grid(shape, block_shape)) > level_index
    if bh == 1 and width % bw == 0:
        return kept[:, :, None]  # no copy: broadcast over each block's values
    full = kept.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return full[:rows, :width]


def apply_mask(table: torch.Tensor, keep: torch.Tensor, block_shape: tuple[int, int]
               ) -> torch.Tensor:
    """mask * table as a new tensor, the table untouched (so it may be a view of the
    checkpoint file): the stock sparsifier's squashed weight, bit for bit. One pass that reads
    the table and writes the result, where a copy pruned in place takes two."""
    rows, width = table.shape
    if keep.dim() == 3:
        blocks = table.view(rows, width // block_shape[1], block_shape[1])
        return (blocks * keep).view(rows, width)
    return table * keep


class _Spilled:
    """Tables' first levels written to an unlinked file (a byte a block), read back a few
    block rows at a time: the process holds none of them between points."""

    def __init__(self, folder: Path):
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".first-levels-")
        weakref.finalize(self, self.file.close)  # closed with its engine
        self.at: dict[str, int] = {}  # name -> where its first levels start
        self._end = 0
        self._lock = threading.Lock()

    def write(self, name: str, first: torch.Tensor) -> None:
        with self._lock:
            self.file.seek(self._end)
            self.file.write(memoryview(first.numpy()))  # no copy of the bytes
            self.file.flush()
            self.at[name], self._end = self._end, self._end + len(first)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        data = os.pread(self.file.fileno(), stop - start, self.at[name] + start)  # thread-safe
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class SortOnceMasks:
    """One config's (norm, block shape) masks over the grid's levels, for many tables.

    `pruned(name, table, level)` gives an original table pruned at a level, as a new tensor.
    The first call for a table sorts it; later levels reuse the per-block first levels, held
    in memory or, with spill_to (a folder), in a file there, read back a chunk at a time.
    Thread-safe: the disk sweep's workers prune points of one config side by side.
    """

    def __init__(self, norm: str, block_shape: tuple[int, int], levels: Sequence[float],
                 spill_to: Path | None = None):
        self.norm, self.block_shape = norm, tuple(block_shape)
        self.levels = sorted(set(float(x) for x in levels))
        self._first: dict[str, torch.Tensor] = {}
        self._spilled = _Spilled(spill_to) if spill_to is not None else None
        self._folder = spill_to  # where tie_order sorts a table's averages, if anywhere
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def knows(self, name: str) -> bool:
        return name in self._first or (self._spilled is not None and name in self._spilled.at)

    def first_levels_of(self, name: str,
                        read: Callable[[], torch.Tensor | Iterable[torch.Tensor]],
                        shape: tuple[int, int] | None = None) -> None:
        """The table's per-block first levels, found on first use. read() gives the table,
        or (with its shape) its rows in chunks of whole block rows; it is called again for
        each pass over the block averages, so that on the CPU a chunk's averages are held and
        never the table's: two passes for the cuts (level_cuts), one where ties straddle a
        cut to order them (tie_order, in the spill folder when there is one), one for the
        first levels. Where the order decides otherwise, and on a GPU, torch.sort of the
        averages does, holding 4x them beside them (its int64 order, its temporaries)."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if not self.knows(name):
                first = self._find_first_levels(read, shape)
                if self._spilled is not None and first.device.type == "cpu":
                    self._spilled.write(name, first)
                else:
                    self._first[name] = first

    def _find_first_levels(self, read: Callable, shape: tuple[int, int] | None
                           ) -> torch.Tensor:
        def averages() -> Iterator[torch.Tensor]:  # the block averages, in order, a chunk
            if shape is None:  # of block rows at a time
                yield block_norms(read(), self.norm, self.block_shape)
            else:
                yield from (block_norms(rows, self.norm, self.block_shape) for rows in read())

        found = level_cuts(averages, self.levels)
        placed = None
        if found is not None and found.ties and tie_order.matches_torch_sort():
            placed = tie_order.sorted_places(
                (part.numpy() for part in averages()), found.count,
                np.array(list(found.ties), dtype=np.float32), sum(found.ties.values()),
                self._folder)
        trim_heap()  # what the passes freed goes back before the first levels are made
        if found is None or (found.ties and placed is None):  # torch.sort decides
            norms = next(averages()) if shape is None else chunked_block_norms(
                read(), shape, self.norm, self.block_shape)
            return first_levels(sort_blocks(norms), self.levels)
        tied = {}
        if placed is not None:
            blocks, values, places = placed
            tied = {k: blocks[(values == cut) & (places < k)]
                    for k, (cut, straddled) in found.cuts.items() if straddled}
        return first_levels_from_cuts(averages(), found.count, self.levels, found.cuts, tied)

    def _first_rows(self, name: str, shape: tuple[int, int], first_row: int, rows: int
                    ) -> torch.Tensor:
        """The first levels of the block rows that hold `rows` rows from first_row."""
        bh = self.block_shape[0]
        columns = block_grid(shape, self.block_shape)[1]
        start, stop = first_row // bh * columns, -(-(first_row + rows) // bh) * columns
        if name in self._first:
            return self._first[name][start:stop]
        return self._spilled.read(name, start, stop)

    def needs_order(self, shape: tuple[int, int], level: float) -> bool:
        """Whether the level zeroes any block of such a table (level 0 zeroes none: its mask
        is all ones, and the table need not be sorted for it)."""
        grid_rows, grid_cols = block_grid(shape, self.block_shape)
        return round(level * grid_rows * grid_cols) > 0

    def pruned(self, name: str, table: torch.Tensor, level: float) -> torch.Tensor:
        if level in self.levels and self.needs_order(tuple(table.shape), level):
            self.first_levels_of(name, lambda: table)
        return self.pruned_rows(name, table, 0, tuple(table.shape), level)

    def pruned_rows(self, name: str, rows: torch.Tensor, first_row: int,
                    shape: tuple[int, int], level: float) -> torch.Tensor:
        """Rows of a table of `shape` from first_row (a multiple of the block height) pruned
        at a level, as a new tensor; the table must have been sorted (first_levels_of)
        where the level needs its order."""
        if level not in self.levels:
            raise KeyError(f"level {level} is not one of this engine's levels")
        if not self.needs_order(shape, level):
            return rows * True  # the stock all-ones mask times the rows, as a new tensor
        if first_row % self.block_shape[0]:
            raise ValueError(f"rows from {first_row} cut a block of {self.block_shape}")
        first = self._first_rows(name, shape, first_row, rows.shape[0])
        keep = keep_mask(first.to(rows.device), self.levels.index(level),
                         (rows.shape[0], shape[1]), self.block_shape)
        return apply_mask(rows, keep, self.block_shape)
