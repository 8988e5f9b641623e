"""The stock DataNormSparsifier's masks at every level of a grid, from one sort per table.

For a table, a norm and a block shape, the stock sparsifier (torch.ao.pruning's
DataNormSparsifier with its default zeros_per_block, every value of a chosen block zeroed)
  1. takes |x| (L1) or x*x (L2) of the table,
  2. averages it over blocks with avg_pool2d (ceil_mode: partial blocks at the edges),
  3. sorts the block averages with torch.sort,
  4. zeroes the first round(level * num_blocks) blocks of that order,
and the squashed weight is mask * x. Only step 4 depends on the level, yet the stock sparsifier
does all four at every level, with temporaries about nine times the table. This engine does
steps 1-3 once, with the same calls on the same values, so the order (ties included) is the
stock one; sorting the (1, 1, n) tensor rather than the stock (1, block size, n) repeat of it
changes nothing, since every row of that repeat holds the same values and torch sorts each row
alone. The sort's int64 order is reduced at once to what the grid needs: for each block, the
index of the first grid level that zeroes it (uint8, one byte a block: a quarter of a float32
table at 1x1 blocks, where the order itself, even as int32, would weigh as much as the table).
Where no two equal averages straddle a level's cut, the blocks it zeroes are those at most
the cut's value, found by one numpy.partition for every level (first_levels_by_threshold),
with a fraction of the sort's memory. Where ties do straddle a cut, only the sort knows their
order (torch.sort is not stable), and it runs: float32 averages of millions of small weights
repeat often enough that the Kaggle-size model's largest table needs it at 1x1 and at 1x4.
The stock check covers both ways.
A level's mask is then one comparison, and the weight the same product mask * x, so -0.0 for
pruned negative values, as the stock sparsifier leaves them. A level that zeroes no block
(level 0) has the all-ones mask and needs no order: a grid's first point is pruned at once,
and the sort waits for the first level that uses it.

Where the table is not a matrix the stock sparsifier squeezes (a table of one row or one
column), the engine defers to it for that table.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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


def first_levels_by_threshold(norms: torch.Tensor, levels: Sequence[float]
                              ) -> torch.Tensor | None:
    """first_levels without the order, where the order does not matter: None where it does.

    A level zeroes the round(level * n) blocks that come first in torch.sort's order. Where
    exactly that many blocks have an average at most the k-th smallest average t, they are
    the k smallest whatever the sort does with ties, and so the stock ones: blocks <= t. Only
    where equal averages straddle the k-th place (or t is NaN, which torch.sort puts last)
    does the order of ties decide, and then None sends the caller to torch.sort. The k-th
    smallest values come from one numpy.partition of a copy of the averages, for every level
    at once: the averages and one copy held, where the sort holds them and four times that
    beside them. On a GPU, None (the sort runs there, in the device's memory)."""
    count = len(norms)
    first = _none_zeroed(count, levels, torch.device("cpu"))
    zeroed = sorted({round(level * count) for level in levels} - {0})
    if not zeroed:
        return first
    if norms.device.type != "cpu":
        return None
    values = norms.numpy()
    smallest = np.partition(values, [k - 1 for k in zeroed])
    thresholds = {k: smallest[k - 1] for k in zeroed}
    del smallest
    for i, level in enumerate(levels):
        k = round(level * count)
        if k == 0:
            continue
        if k == count:  # every block, NaN ones included
            first[first == len(levels)] = i
            continue
        if np.isnan(thresholds[k]):
            return None
        chosen = norms <= float(thresholds[k])
        if int(chosen.sum()) != k:
            return None  # ties across the k-th place: torch.sort's order decides
        first[chosen & (first == len(levels))] = i
    return first


def block_grid(shape: tuple[int, int], block_shape: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of blocks over a table, partial blocks at the edges included
    (avg_pool2d's ceil_mode)."""
    return -(-shape[0] // block_shape[0]), -(-shape[1] // block_shape[1])


def is_matrix(table: torch.Tensor) -> bool:
    """The stock sparsifier squeezes its input: a (1, n) or (n, 1) table becomes 1-D there."""
    return table.dim() == 2 and table.shape[0] > 1 and table.shape[1] > 1


def keep_mask(first: torch.Tensor, level_index: int, shape: tuple[int, int],
              block_shape: tuple[int, int], first_row: int = 0,
              rows: int | None = None) -> torch.Tensor:
    """The level's keep mask over the table's values (or over `rows` of them from first_row,
    a multiple of the block height), as a bool tensor that broadcasts to those rows viewed as
    (rows, block columns, block width) when blocks are one row high and tile the width, else
    as the full (rows, width) mask."""
    rows = shape[0] - first_row if rows is None else rows
    width = shape[1]
    bh, bw = block_shape
    block_rows = slice(first_row // bh, -(-(first_row + rows) // bh))
    kept = (first.view(*block_grid(shape, block_shape))[block_rows] > level_index)
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


class SortOnceMasks:
    """One config's (norm, block shape) masks over the grid's levels, for many tables.

    `pruned(name, table, level)` gives an original table pruned at a level, as a new tensor.
    The first call for a table sorts it; later levels reuse the per-block first levels.
    Thread-safe: the disk sweep's workers prune points of one config side by side.
    """

    def __init__(self, norm: str, block_shape: tuple[int, int], levels: Sequence[float]):
        self.norm, self.block_shape = norm, tuple(block_shape)
        self.levels = sorted(set(float(x) for x in levels))
        self._first: dict[str, torch.Tensor] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def knows(self, name: str) -> bool:
        return name in self._first

    def first_levels_of(self, name: str,
                        read: Callable[[], torch.Tensor | Iterable[torch.Tensor]],
                        shape: tuple[int, int] | None = None) -> torch.Tensor:
        """The table's per-block first levels, sorted on first use. read() gives the table,
        or (with its shape) its rows in chunks of whole block rows: where nothing else holds
        them, they are freed once their block averages are taken. The first levels then come
        from thresholds (a copy of the averages beside them), or where ties straddle a cut
        from the sort, which holds 4x the averages beside them, its int64 order and as much
        again in temporaries (measured; at 1x1 blocks, 4x the table)."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._first:
                if shape is None:
                    norms = block_norms(read(), self.norm, self.block_shape)
                else:
                    norms = chunked_block_norms(read(), shape, self.norm, self.block_shape)
                first = first_levels_by_threshold(norms, self.levels)
                if first is None:
                    trim_heap()  # what the averaging freed goes back before the sort's peak
                    order = sort_blocks(norms)
                    del norms
                    first = first_levels(order, self.levels)
                self._first[name] = first
            return self._first[name]

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
        keep = keep_mask(self._first[name], self.levels.index(level), shape,
                         self.block_shape, first_row, rows.shape[0])
        return apply_mask(rows, keep, self.block_shape)
