"""Pruning with the sort-once mask engine, checked against the stock sparsifier.

Per config (norm, block shape) the engine finds once, for each table, where every level cuts
the block norms that the stock DataNormSparsifier sorts, and which ties at a cut that sort puts
first, and reads every level's mask from those (mask_engine.py).
At one point per config the stock sparsifier also prunes, and the two must agree bit for bit;
a difference stops the run.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from dlrm_sparsity.errors import StopRun
from dlrm_sparsity.grid import GridPoint
from dlrm_sparsity.mask_engine import NAME as MASK_ENGINE
from dlrm_sparsity.mask_engine import SortOnceMasks, is_matrix
from dlrm_sparsity.model import embedding_names
from dlrm_sparsity.pruning import (
    CHUNK_BYTES,
    Model,
    Pruning,
    Streamed,
    same_bits,
    sparsify_table,
    synchronize,
)

# The stock check holds a table's copy and, while the stock sparsifier steps and squashes,
# 8x the table in temporaries (measured for both norms and any block shape); a slice's check
# also holds the slice itself: 10x what it checks, at most.
STOCK_CHECK_COPIES = 10
# A table's rows are read this much at a time for its block averages: a chunk's |x| and its
# averages sit beside the whole table's averages, so the chunk stays small beside them.
AVERAGES_CHUNK_BYTES = 16 * 2**20


class GridEngines:
    """A sort-once mask engine per config (norm, block shape) of the grid, over its levels.

    keep_one: only the config being pruned keeps its engine (a large model's per-block levels
    weigh a quarter of its tables at 1x1 blocks); the grid's order prunes config by config.
    spill_to: a folder where the engines keep those levels, in unlinked files, rather than
    in memory.
    """

    def __init__(self, points: Iterable[GridPoint], keep_one: bool,
                 spill_to: Path | None = None):
        self.levels: dict[tuple, list[float]] = {}
        for p in points:
            self.levels.setdefault((p.norm, p.block_shape), []).append(p.level)
        self.keep_one, self.spill_to = keep_one, spill_to
        self.engines: dict[tuple, SortOnceMasks] = {}
        self._lock = threading.Lock()

    def __call__(self, point: GridPoint) -> SortOnceMasks:
        key = (point.norm, point.block_shape)
        with self._lock:
            if key not in self.engines:
                if self.keep_one:
                    self.engines.clear()
                self.engines[key] = SortOnceMasks(point.norm, point.block_shape,
                                                  self.levels[key], self.spill_to)
            return self.engines[key]


def prune_with_engine(table: torch.Tensor, point: GridPoint, name: str, device: torch.device,
                      engine: SortOnceMasks) -> tuple[torch.Tensor, float]:
    """The table pruned by the sort-once engine into a new tensor (the table untouched: it
    may be the original itself); returned on the CPU, with the engine's seconds."""
    synchronize(device)
    start = time.perf_counter()
    pruned = engine.pruned(name, table, point.level)
    synchronize(device)
    return pruned.cpu(), time.perf_counter() - start


def stock_check_rows(table: torch.Tensor, budget: int | None) -> int:
    """Rows of a table the stock check prunes: all of them when the check's copies fit in
    budget bytes (or without a budget), else the leading rows that fit (two at least)."""
    rows = table.shape[0]
    if budget is None:
        return rows
    row_bytes = STOCK_CHECK_COPIES * table.element_size() * (table.numel() // max(1, rows))
    return min(rows, max(2, budget // max(1, row_bytes)))


def stock_check_fraction(state_dict: Mapping[str, torch.Tensor], budget: int | None) -> float:
    """The share of the embedding weights the stock check prunes and compares (tables the
    engine defers to the stock sparsifier count as checked: stock pruned them)."""
    names = embedding_names(state_dict)
    checked = sum(state_dict[n].numel() if not is_matrix(state_dict[n]) else
                  stock_check_rows(state_dict[n], budget) * state_dict[n].shape[1]
                  for n in names)
    return checked / max(1, sum(state_dict[n].numel() for n in names))


def stock_check_points(points: Iterable[GridPoint]) -> set[GridPoint]:
    """Per config, the point the stock sparsifier also prunes, to check the engine: the first
    strictly between levels 0 and 1 (at 0 and 1 the order of the blocks does not matter, so
    there a check would prove little), or the config's first point if it has none."""
    chosen: dict[str, GridPoint] = {}
    for p in points:
        current = chosen.get(p.config)
        if current is None or (current.level in (0.0, 1.0) and 0.0 < p.level < 1.0):
            chosen[p.config] = p
    return set(chosen.values())


def check_table(model: Model, point: GridPoint, name: str, device: torch.device,
                engine: SortOnceMasks, rows: int | None = None) -> float:
    """Prune a copy of the table with the stock sparsifier, then the table as it lies with the
    engine, and compare them bit for bit (StopRun on a difference); the stock step's seconds.
    With rows, only the table's leading rows are checked (only they are copied), by a fresh
    engine of the same config sorting them, so that the check's copies stay within a budget."""
    what, part = name, None
    if rows is not None:  # the caller passes rows only when they are fewer than the table's
        part = model.original(name, device, copy=False)[:rows].clone()
        what = f"the first {rows} rows of {name}"
        engine = SortOnceMasks(engine.norm, engine.block_shape, [point.level])

    def table(copy: bool) -> torch.Tensor:
        if part is None:
            return model.original(name, device, copy=copy)
        return part.clone() if copy else part

    reference, stock_s = sparsify_table(table(copy=True), point, name, device)
    ours, _ = prune_with_engine(table(copy=False), point, name, device, engine)
    if not same_bits(ours, reference):
        raise StopRun(f"mask engine {MASK_ENGINE} disagrees with the stock DataNormSparsifier "
                      f"on {what} at {point.config} level {point.level:g}; rerun with "
                      f"--mask-engine stock")
    return stock_s


@dataclass(frozen=True)
class StockCheck:
    """The stock sparsifier also prunes every table, and must agree: whole tables when budget
    is None, else the leading rows of each table whose check fits in budget bytes."""

    budget: int | None = None


def _rows(model: Model, name: str, device: torch.device, multiple: int,
          chunk_bytes: int | None) -> Iterator[torch.Tensor]:
    return (rows for _, rows in model.row_chunks(name, device, multiple, chunk_bytes))


def stream_sort_once(model: Model, point: GridPoint, device: torch.device,
                     engine: SortOnceMasks, check: StockCheck | None = None,
                     positive_zeros: bool = False, chunk_bytes: int | None = CHUNK_BYTES
                     ) -> Streamed:
    """Every table sorted (where the point needs its order) and, with a check, pruned by the
    stock sparsifier too (StopRun where they differ), now; the engine's pruned tables then
    made when called, chunk_bytes of rows at a time (MLP tensors shared)."""
    names = embedding_names(model.state_dict)
    start = time.perf_counter()  # every table sorted before any pruned table is held: the
    for name in names:  # sort's temporaries never meet the pruned tables
        table = model.state_dict[name]
        if (not engine.knows(name) and is_matrix(table)
                and engine.needs_order(tuple(table.shape), point.level)):
            # read for it alone, a chunk at a time: freed before the sort
            averages_chunk = None if chunk_bytes is None else min(chunk_bytes,
                                                                  AVERAGES_CHUNK_BYTES)
            engine.first_levels_of(name, partial(_rows, model, name, device,
                                                 engine.block_shape[0], averages_chunk),
                                   tuple(table.shape))
    synchronize(device)
    streamed = Streamed(model.state_dict, engine_s=time.perf_counter() - start,
                        positive_zeros=positive_zeros)
    if check is not None:  # the check first, each table's results then dropped: the
        start = time.perf_counter()  # stock sparsifier's temporaries (about 9x a table)
        for name in names:  # never meet a pruned table
            table = model.state_dict[name]
            if is_matrix(table):
                rows = stock_check_rows(table, check.budget)
                streamed.add_stock(check_table(model, point, name, device, engine,
                                               rows if rows < table.shape[0] else None))
        streamed.stock_s = 0.0 if math.isnan(streamed.stock_s) else streamed.stock_s
        streamed.check_s = time.perf_counter() - start - streamed.stock_s

    def make(name: str) -> Iterator[torch.Tensor]:
        shape = tuple(model.state_dict[name].shape)
        if not is_matrix(model.state_dict[name]):  # a table the stock sparsifier squeezes
            table, seconds = sparsify_table(model.original(name, device), point, name, device)
            streamed.engine_s += seconds  # is its own
            if check is not None:
                streamed.add_stock(seconds)
            yield streamed.made(table)
            return
        for first_row, rows in model.row_chunks(name, device, engine.block_shape[0],
                                                chunk_bytes):
            # read where it lies (on a GPU, copied there): the engine writes new rows
            synchronize(device)
            begin = time.perf_counter()
            pruned = engine.pruned_rows(name, rows, first_row, shape, point.level)
            synchronize(device)
            streamed.engine_s += time.perf_counter() - begin
            yield streamed.made(pruned.cpu())

    streamed.tables = {name: (lambda n=name: make(n)) for name in names}
    return streamed


def prune_sort_once(model: Model, point: GridPoint, device: torch.device,
                    engine: SortOnceMasks, check: StockCheck | None = None) -> Pruning:
    """Every embedding table pruned by the engine (MLP tensors shared), one table at a time,
    and with a check, by the stock sparsifier too (StopRun where they differ)."""
    return stream_sort_once(model, point, device, engine, check, chunk_bytes=None
                            ).materialized()
