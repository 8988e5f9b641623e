"""The sparsity grid, and pruning a DLRM's embedding tables with PyTorch's DataNormSparsifier.

Also what a sweep over the grid needs to know about pruning: which points share their pruned
weights, how the model to prune is held in memory, and each step's share of the threads.

Every `emb_l.*.weight` is pruned at one (sparsity level, block shape, norm) grid point with the
stock sparsifier: add the table, step once, squash the mask. Only embedding weights are cloned;
the MLP tensors are shared with the source state dict, never copied.
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

from dlrm_sparsity.checkpoints import CheckpointTables, is_torch_archive
from dlrm_sparsity.errors import StopRun, UserInputError
from dlrm_sparsity.mask_engine import NAME as MASK_ENGINE
from dlrm_sparsity.mask_engine import SortOnceMasks, is_matrix
from dlrm_sparsity.model import embedding_names

SEED_LEVELS = tuple([i / 10 for i in range(10)] + [round(0.9 + i / 100, 2) for i in range(1, 10)]
                    + [1.0])
SEED_BLOCK_SHAPES = ((1, 1), (1, 4))
SEED_NORMS = ("L1", "L2")
NORMS = ("L1", "L2")
LARGE_MODEL_BYTES = 2**30  # above this, memory comes before overlap


@dataclass(frozen=True)
class GridPoint:
    norm: str
    block_shape: tuple[int, int]
    level: float

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.norm, block_label(self.block_shape), self.level)

    @property
    def config(self) -> str:
        return f"{self.norm} {block_label(self.block_shape)}"

    def zip_relpath(self) -> Path:
        r, c = self.block_shape
        return (Path(self.norm) / f"config_{r}x{c}"
                / f"criteo_model_norm={self.norm}_sl={self.level:g}.zip")


def block_label(shape: Sequence[int]) -> str:
    """The seed's spelling in CSVs: "(1, 4)"."""
    return f"({shape[0]}, {shape[1]})"


def parse_block_shape(text: str) -> tuple[int, int]:
    """'1x4', '1,4' or '(1, 4)' -> (1, 4); both sides positive integers."""
    match = re.fullmatch(r"\(?\s*(\d+)\s*[x,X ]\s*(\d+)\s*\)?", text.strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise UserInputError(f"block shape {text!r}: expected RxC with positive R and C, "
                             "for example 1x4")
    return int(match.group(1)), int(match.group(2))


def parse_level(text: str | float) -> float:
    try:
        level = float(text)
    except ValueError:
        raise UserInputError(f"sparsity level {text!r} is not a number") from None
    if not 0.0 <= level <= 1.0:
        raise UserInputError(f"sparsity level {text} is outside [0, 1]")
    return level


def parse_norm(text: str) -> str:
    norm = text.upper()
    if norm not in NORMS:
        raise UserInputError(f"unknown norm {text!r}: expected one of {', '.join(NORMS)}")
    return norm


def build_grid(levels: Iterable[float], norms: Iterable[str],
               block_shapes: Iterable[tuple[int, int]], keep_l2_1x1: bool = False
               ) -> tuple[list[GridPoint], list[str]]:
    """The grid in the seed's order (norm, block shape, level) and the configs left out.

    L2 with 1x1 blocks ranks single weights by x*x, which orders them as |x| does, so its masks
    are exactly L1 1x1's; like the seed, it is left out unless asked for.
    """
    points, skipped = [], []
    for norm in dict.fromkeys(norms):
        for shape in dict.fromkeys(block_shapes):
            if norm == "L2" and shape == (1, 1) and not keep_l2_1x1:
                skipped.append(f"L2 {block_label(shape)}")
                continue
            points += [GridPoint(norm, shape, level) for level in dict.fromkeys(levels)]
    return points, skipped


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: the step is asynchronous on a GPU


def sparsify_table(table: torch.Tensor, point: GridPoint, name: str,
                   device: torch.device) -> tuple[torch.Tensor, float]:
    """Prune `table` (a copy the caller gives up, on `device`) in place.

    Returns it on the CPU, with the seconds of the sparsifier's step.
    """
    sparsifier = DataNormSparsifier(sparsity_level=point.level,
                                    sparse_block_shape=point.block_shape, norm=point.norm)
    sparsifier.add_data(name.replace(".", "_"), table)  # the sparsifier refuses dots
    _synchronize(device)
    start = time.perf_counter()
    sparsifier.step()
    _synchronize(device)
    step_s = time.perf_counter() - start
    sparsifier.squash_mask()  # writes the masked values into `table` in place
    return table.cpu(), step_s


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit: -0.0 is not 0.0 here, and a NaN equals the same NaN."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def prune_with_engine(table: torch.Tensor, point: GridPoint, name: str, device: torch.device,
                      engine: SortOnceMasks) -> tuple[torch.Tensor, float]:
    """The table pruned by the sort-once engine into a new tensor (the table untouched: it
    may be the original itself); returned on the CPU, with the engine's seconds."""
    _synchronize(device)
    start = time.perf_counter()
    pruned = engine.pruned(name, table, point.level)
    _synchronize(device)
    return pruned.cpu(), time.perf_counter() - start


# The stock check holds a table's copy and, while the stock sparsifier steps and squashes,
# 8x the table in temporaries (measured for both norms and any block shape); a slice's check
# also holds the slice itself: 10x what it checks, at most.
STOCK_CHECK_COPIES = 10


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


class Pruning(NamedTuple):
    """A model pruned at a grid point, and where the time went (nan where a part did not run).

    stock_s: the stock sparsifier's steps; engine_s: the sort-once engine's sorts and masks;
    check_s: the rest of the stock check (its copies, the engine on the checked rows, with a
    sort of its own where only leading rows are checked, and the comparison).
    """

    weights: dict[str, torch.Tensor]
    stock_s: float
    engine_s: float
    check_s: float


def check_engine(original: Callable[..., torch.Tensor], point: GridPoint, name: str,
                 device: torch.device, engine: SortOnceMasks, rows: int | None = None
                 ) -> float:
    """Prune a copy of the table with the stock sparsifier, then the table as it lies with the
    engine (which writes a new tensor), and compare them bit for bit (StopRun on a
    difference); the stock step's seconds. Nothing else of the table is held while the stock
    sparsifier runs. With rows, only the table's leading rows are checked (only they are
    copied), by a fresh engine of the same config sorting them, so that the check's copies
    stay within a budget: the same code on the table's own values, at a fraction of the stock
    sparsifier's temporaries."""
    what, part = name, None
    if rows is not None:  # the caller passes rows only when they are fewer than the table's
        part = original(name, copy=False)[:rows].clone()
        what = f"the first {rows} rows of {name}"
        engine = SortOnceMasks(engine.norm, engine.block_shape, [point.level])

    def table(copy: bool) -> torch.Tensor:
        if part is None:
            return original(name, copy=copy)
        return part.clone() if copy else part

    reference, stock_s = sparsify_table(table(copy=True), point, name, device)
    ours, _ = prune_with_engine(table(copy=False), point, name, device, engine)
    if not same_bits(ours, reference):
        raise StopRun(f"mask engine {MASK_ENGINE} disagrees with the stock DataNormSparsifier "
                      f"on {what} at {point.config} level {point.level:g}; rerun with "
                      f"--mask-engine stock")
    return stock_s


def sparsify_embeddings(state_dict: Mapping[str, torch.Tensor], point: GridPoint,
                        device: torch.device,
                        read_table: Callable[[str, bool], torch.Tensor] | None = None,
                        engine: SortOnceMasks | None = None, check: bool = False,
                        check_budget: int | None = None) -> Pruning:
    """State dict with every embedding table pruned (MLP tensors shared), with the seconds
    of the stock steps, of the engine and of the rest of the check (see Pruning).

    Tables are pruned one at a time, so the temporaries (the stock sparsifier's mask and sort
    indices, the engine's sort) exist for one table at once, not for the whole model.
    `read_table(name, copy)`, when given, supplies each original table, a fresh copy or (copy
    False) a view of the checkpoint file (state_dict's tables are then only shapes, for
    instance on the meta device); otherwise each table comes from state_dict. The engine
    reads the originals without a copy; the stock sparsifier prunes a copy. With an engine
    (SortOnceMasks of the point's config), it makes the masks, and check also runs the stock
    sparsifier and compares (StopRun on a difference), on whole tables, or on the leading rows
    of those whose check would not fit in check_budget bytes (stock_check_rows).
    """
    pruned = dict(state_dict)
    stock_s, engine_s = 0.0, 0.0
    stock_everywhere = engine is None or check

    def original(name: str, copy: bool = True) -> torch.Tensor:
        return (state_dict[name].to(device, copy=copy) if read_table is None
                else read_table(name, copy).to(device))

    if engine is not None:  # sort every table first, before any pruned table is held:
        start = time.perf_counter()  # the sort's temporaries never meet the pruned model
        for name in embedding_names(state_dict):
            table = state_dict[name]
            if (not engine.knows(name) and is_matrix(table)
                    and engine.needs_order(tuple(table.shape), point.level)):
                # read for it alone: the copy is freed before the sort
                engine.first_levels_of(name, partial(original, name, copy=False))
        _synchronize(device)
        engine_s += time.perf_counter() - start
    check_s = float("nan")
    if engine is not None and check:  # the check first, each table's results then dropped:
        start, checked_stock_s = time.perf_counter(), 0.0  # the stock sparsifier's
        for name in embedding_names(state_dict):  # temporaries (about 9x a table) never
            if is_matrix(state_dict[name]):  # meet the pruned model
                rows = stock_check_rows(state_dict[name], check_budget)
                checked_stock_s += check_engine(
                    original, point, name, device, engine,
                    rows if rows < state_dict[name].shape[0] else None)
        check_s = time.perf_counter() - start - checked_stock_s
        stock_s += checked_stock_s
    for name in embedding_names(state_dict):
        if engine is None or not is_matrix(state_dict[name]):  # a table the stock sparsifier
            pruned[name], seconds = sparsify_table(original(name), point, name, device)
            stock_s += seconds  # squeezes is its own
            engine_s += seconds if engine is not None else 0.0
        else:  # read where it lies (on a GPU, copied there): the engine writes a new tensor
            pruned[name], own = prune_with_engine(original(name, copy=False), point, name,
                                                  device, engine)
            engine_s += own
    return Pruning(pruned, stock_s if stock_everywhere else float("nan"),
                   engine_s if engine is not None else float("nan"), check_s)


class GridEngines:
    """A sort-once mask engine per config (norm, block shape) of the grid, over its levels.

    keep_one: only the config being pruned keeps its engine (a large model's per-block levels
    weigh a quarter of its tables at 1x1 blocks); the grid's order prunes config by config.
    """

    def __init__(self, points: Iterable[GridPoint], keep_one: bool):
        self.levels: dict[tuple, list[float]] = {}
        for p in points:
            self.levels.setdefault((p.norm, p.block_shape), []).append(p.level)
        self.keep_one = keep_one
        self.engines: dict[tuple, SortOnceMasks] = {}
        self._lock = threading.Lock()

    def __call__(self, point: GridPoint) -> SortOnceMasks:
        key = (point.norm, point.block_shape)
        with self._lock:
            if key not in self.engines:
                if self.keep_one:
                    self.engines.clear()
                self.engines[key] = SortOnceMasks(point.norm, point.block_shape,
                                                  self.levels[key])
            return self.engines[key]


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


def make_zeros_positive(state_dict: dict[str, torch.Tensor]) -> None:
    """Turn the -0.0 left by the sparsifier's mask multiply into +0.0, in place.

    -0.0 == 0.0 in every computation the model does, but the sign bits survive compression:
    a fully pruned demo model zips to 0.86 MB with them and 0.11 MB without.
    """
    for name in embedding_names(state_dict):
        table = state_dict[name]
        table.masked_fill_(table == 0, 0.0)


def zero_fraction(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Fraction of exactly-zero values over all embedding weights."""
    names = embedding_names(state_dict)  # count_nonzero: no boolean copy of each table
    zeros = sum(state_dict[n].numel() - int(torch.count_nonzero(state_dict[n])) for n in names)
    return zeros / sum(state_dict[n].numel() for n in names)


def tensor_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def shared_weights(points: list[GridPoint]) -> dict[GridPoint, GridPoint]:
    """Points whose pruned weights equal an earlier point's, mapped to that point.

    Level 0 prunes nothing and level 1 prunes everything, whatever the norm and block shape.
    """
    first: dict[float, GridPoint] = {}
    copies = {}
    for point in points:
        if point.level in (0.0, 1.0):
            copies.update({point: first[point.level]} if point.level in first else {})
            first.setdefault(point.level, point)
    return copies


@dataclass(frozen=True)
class Model:
    """The model a sweep prunes: its tensors, and a reader when its tables stay in the file."""

    state_dict: dict
    read_table: object = None  # (name, copy) -> that original table (CheckpointTables.read)
    dense_bytes: int = 0


def hold_model(mapped: dict, model_path: str, workers: int) -> Model:
    """What the sweep keeps in memory.

    Workers need the original tables at hand, so they are read in. Without them, a large
    model's tables stay in the checkpoint file and each grid point reads them one at a time:
    the process then holds one pruned model and one table with the sparsifier's temporaries
    (several times that table), not the model twice.
    """
    dense_bytes = tensor_bytes(mapped)
    if not is_torch_archive(model_path):  # a zip or legacy file: already read into memory
        return Model(mapped, None, dense_bytes)
    if workers == 0 and dense_bytes > LARGE_MODEL_BYTES:
        tables = set(embedding_names(mapped))
        held = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if k in tables
                else v.clone() for k, v in mapped.items()}
        return Model(held, CheckpointTables(model_path).read, dense_bytes)
    return Model({k: v.clone() for k, v in mapped.items()}, None, dense_bytes)


def step_threads(on_workers: bool, workers: int) -> int:
    """When workers prune side by side, each step gets an equal share of torch's threads."""
    threads = torch.get_num_threads()
    return max(1, threads // workers) if on_workers and workers > 1 else threads


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
