"""Pruning a DLRM's embedding tables with PyTorch's stock DataNormSparsifier, and the model a
sweep prunes.

Every `emb_l.*.weight` is pruned at one grid point with the stock sparsifier: add the table,
step once, squash the mask. Only embedding weights are copied; the MLP tensors are shared with
the source state dict. The sort-once engine that makes the same masks faster is in sort_once.py.
A pruning can also be Streamed: each table made, in chunks of rows where the engine allows, only
as the disk step writes it (archive.py), so that no pruned model is ever held whole.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, NamedTuple

import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

from dlrm_sparsity.checkpoints import CheckpointTables, is_torch_archive, shapes_for_tables
from dlrm_sparsity.grid import GridPoint
from dlrm_sparsity.model import embedding_names
from dlrm_sparsity.timing import drop_mapped_pages

LARGE_MODEL_BYTES = 2**30  # above this, memory comes before overlap
CHUNK_BYTES = 64 * 2**20  # a streamed table is read, pruned and written this much at a time


def synchronize(device: torch.device) -> None:
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
    synchronize(device)
    start = time.perf_counter()
    sparsifier.step()
    synchronize(device)
    step_s = time.perf_counter() - start
    sparsifier.squash_mask()  # writes the masked values into `table` in place
    return table.cpu(), step_s


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit: -0.0 is not 0.0 here, and a NaN equals the same NaN."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


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


@dataclass(frozen=True)
class Model:
    """The model a sweep prunes: its tensors, and a reader when its tables stay in the file.

    read_table(name, copy) gives one original table, a fresh copy or (copy False) a view of
    the checkpoint file; the state dict's tables are then only shapes, on the meta device.
    """

    state_dict: dict
    read_table: Callable[[str, bool], torch.Tensor] | None = None
    dense_bytes: int = 0

    def original(self, name: str, device: torch.device, copy: bool = True) -> torch.Tensor:
        """An original table on device: a copy the caller may prune in place, or (copy False)
        the table where it lies, to be read only."""
        if self.read_table is None:
            return self.state_dict[name].to(device, copy=copy)
        return self.read_table(name, copy).to(device)

    def row_chunks(self, name: str, device: torch.device, rows_multiple: int = 1,
                   chunk_bytes: int | None = CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """An original table where it lies, as (first row, rows) about chunk_bytes at a time
        (a multiple of rows_multiple; the whole table when chunk_bytes is None), to be read
        only. Rows read from the checkpoint file are given back to the system after their
        chunk, so the process holds one chunk of the original, not the table."""
        table = self.original(name, device, copy=False)
        rows = table.shape[0]
        row_bytes = max(1, table[:1].nbytes)
        step = rows if chunk_bytes is None else max(1, chunk_bytes // row_bytes)
        step = max(rows_multiple, step // rows_multiple * rows_multiple, 1)
        from_file = self.read_table is not None and table.device.type == "cpu"
        for start in range(0, max(rows, 1), step):
            part = table[start:start + step]
            yield start, part
            if from_file:
                drop_mapped_pages(part)


@dataclass
class Streamed:
    """A model pruned at a grid point whose tables are made when called, in chunks of rows:
    state_dict holds the MLP tensors and each table's shape (any device, meta included);
    tables[name]() yields that table's pruned rows in order. The seconds of the stock
    sparsifier and of the engine, and the zeros, add up as the tables are made."""

    state_dict: dict
    tables: dict[str, Callable[[], Iterator[torch.Tensor]]] = field(default_factory=dict)
    stock_s: float = math.nan  # nan until the stock sparsifier runs
    engine_s: float = math.nan  # nan when no engine runs
    check_s: float = math.nan
    positive_zeros: bool = False
    zeros: int = 0
    values: int = 0

    def add_stock(self, seconds: float) -> None:
        self.stock_s = seconds if math.isnan(self.stock_s) else self.stock_s + seconds

    def made(self, chunk: torch.Tensor) -> torch.Tensor:
        """A pruned chunk, its zeros counted (and made +0.0 when asked)."""
        if self.positive_zeros:
            positive_zeros_(chunk)
        self.values += chunk.numel()
        self.zeros += chunk.numel() - int(torch.count_nonzero(chunk))
        return chunk

    def zero_fraction(self) -> float:
        """Of every embedding weight made so far, the fraction exactly zero."""
        return self.zeros / max(1, self.values)

    def materialized(self) -> Pruning:
        """Every table made now and held, whole."""
        weights = dict(self.state_dict)
        for name, make in self.tables.items():
            chunks = list(make())
            weights[name] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        self.tables = {name: (lambda t=weights[name]: iter([t])) for name in self.tables}
        self.state_dict = weights
        return Pruning(weights, self.stock_s, self.engine_s, self.check_s)


def stream_stock(model: Model, point: GridPoint, device: torch.device,
                 positive_zeros: bool = False) -> Streamed:
    """Every embedding table pruned by the stock sparsifier when it is made (the sparsifier
    takes a whole table: one chunk), MLP tensors shared."""
    streamed = Streamed(model.state_dict, positive_zeros=positive_zeros)

    def make(name: str) -> Iterator[torch.Tensor]:
        table, seconds = sparsify_table(model.original(name, device), point, name, device)
        streamed.add_stock(seconds)
        yield streamed.made(table)

    streamed.tables = {name: (lambda n=name: make(n)) for name in
                       embedding_names(model.state_dict)}
    return streamed


def sparsify_embeddings(model: Model | Mapping[str, torch.Tensor], point: GridPoint,
                        device: torch.device) -> Pruning:
    """Every embedding table pruned by the stock sparsifier, one table at a time (so its
    temporaries exist for one table at once), MLP tensors shared; with the steps' seconds."""
    if not isinstance(model, Model):
        model = Model(dict(model))
    pruning = stream_stock(model, point, device).materialized()
    return pruning._replace(stock_s=0.0 if math.isnan(pruning.stock_s) else pruning.stock_s)


def hold_model(mapped: dict, model_path: str, workers: int) -> Model:
    """What the sweep keeps in memory.

    Workers need the original tables at hand, so they are read in. Without them, the
    tables stay in the checkpoint file (a plain torch.save file, or a torchsnapshot or DCP
    folder) and each grid point reads them a chunk at a time: the process then holds a chunk
    and one table's sort (or the stock sparsifier's temporaries), not the model.
    """
    dense_bytes = tensor_bytes(mapped)
    if not (is_torch_archive(model_path) or os.path.isdir(model_path)):  # a zip or legacy
        # file: already read into memory
        return Model(mapped, None, dense_bytes)
    if workers == 0:
        held = shapes_for_tables(mapped, set(embedding_names(mapped)))
        return Model(held, CheckpointTables(model_path).read, dense_bytes)
    unread = [k for k, v in mapped.items() if v.is_meta]  # a folder's sharded tables
    tables = CheckpointTables(model_path) if unread else None
    return Model({k: tables.read(k) if k in unread else v.clone() for k, v in mapped.items()},
                 None, dense_bytes)


def make_zeros_positive(state_dict: dict[str, torch.Tensor]) -> None:
    """Turn the -0.0 left by the sparsifier's mask multiply into +0.0, in place.

    -0.0 == 0.0 in every computation the model does, but the sign bits survive compression.
    """
    for name in embedding_names(state_dict):
        positive_zeros_(state_dict[name])


def positive_zeros_(tensor: torch.Tensor) -> torch.Tensor:
    """-0.0 made +0.0 in place (the sign of a pruned negative weight)."""
    return tensor.masked_fill_(tensor == 0, 0.0)


def zero_fraction(state_dict: Mapping[str, torch.Tensor]) -> float:
    """Fraction of exactly-zero values over all embedding weights."""
    names = embedding_names(state_dict)  # count_nonzero: no boolean copy of each table
    zeros = sum(state_dict[n].numel() - int(torch.count_nonzero(state_dict[n])) for n in names)
    return zeros / sum(state_dict[n].numel() for n in names)


def tensor_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())
