"""Scoring a pruned model whose tables are spread over the ranks by TorchRec's engine.

Under torchrun, `--shard-tables` (or a model larger than one rank's device) puts each pruned
model into TorchRec's `DistributedModelParallel`:
- the tables become one `EmbeddingBagCollection`, which TorchRec's planner shards table-wise,
  or column-wise where a table is larger than one rank's memory, its shards placed so that
  the rank holding the most bytes holds as few as it can (placement.py);
- the suite's own bottom MLP, interaction and top MLP stay around it, the same on every rank,
  so dlrm's models and TorchRec's DLRM and DLRM_DCN all go through this one path;
- each rank copies only its shards from the checkpoint, FILL_BYTES of rows at a time from a
  memory map (a pruned zip is inflated once per machine into a file beside it, which goes once
  every rank has mapped it), so no rank holds the model;
- the ranks score whole batches of the run's size, rank r the batches r, r + W, ...: each
  sample is scored in the same batch as by one process, so its score is the same bits, and
  rank 0 computes the metrics of the gathered scores with the suite's lean metric code
  (evaluation.quality_of_batches), equal to one process's to float64 rounding.
On CPUs the ranks talk over gloo, on GPUs over nccl; the code is the same.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dlrm_sparsity.checkpoints import (
    CheckpointTables,
    inflate_member,
    load_dlrm_state_dict,
    member_of,
    shapes_for_tables,
)
from dlrm_sparsity.criteo.data import Batch, CriteoSplit
from dlrm_sparsity.criteo.npy import NpySplit
from dlrm_sparsity.disk import physical_memory
from dlrm_sparsity.errors import CheckpointError, StopRun, UserInputError
from dlrm_sparsity.evaluation import quality_of_batches
from dlrm_sparsity.layouts import read_layout
from dlrm_sparsity.model import DLRMConfig, DLRMNet
from dlrm_sparsity.runner.distributed import DistContext
from dlrm_sparsity.timing import drop_mapped_pages

WEIGHT_BYTES = 4  # the collection's weights are float32
RESERVED_SHARE = 0.1  # of a rank's memory, kept by the planner for all but the tables
# a rank copies its shards this much at a time: the mapped pages read sit beside its tables
# until given back (the 64 MiB that the disk step streams added 4% to a rank's peak on the
# Kaggle-size model; each chunk costs 2 ms in drop_mapped_pages)
FILL_BYTES = 8 * 2**20


def table_name(k: int) -> str:
    return f"table_{k}"


def feature_name(k: int) -> str:
    return f"feature_{k}"


def _torchrec() -> SimpleNamespace:
    """TorchRec's parts used here (TorchRec is optional: requirements-torchrec.txt)."""
    # fbgemm's imports warn about its own modules' deprecations, and TorchRec's first sharded
    # forward about torch.fx's tracing test: nothing a user of the suite can act on
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchrec.distributed import embeddingbag, model_parallel
            from torchrec.distributed.planner import planners, storage_reservations, types
            from torchrec.modules import embedding_configs, embedding_modules
            from torchrec.sparse import jagged_tensor

            from dlrm_sparsity.placement import LeastLargestPartitioner
    except ImportError:
        raise UserInputError("sharding the tables needs TorchRec: pip install --no-deps -r "
                             "requirements-torchrec.txt (see the README)") from None
    return SimpleNamespace(
        DMP=model_parallel.DistributedModelParallel,
        Sharder=embeddingbag.EmbeddingBagCollectionSharder,
        Planner=planners.EmbeddingShardingPlanner, PlannerError=types.PlannerError,
        Partitioner=LeastLargestPartitioner,
        Reservation=storage_reservations.FixedPercentageStorageReservation,
        Constraints=types.ParameterConstraints, TopologyFactory=types.TopologyFactory,
        TrainerConfig=types.TrainerConfig, KernelConfig=types.KernelConfig,
        TableConfig=embedding_configs.EmbeddingBagConfig,
        Collection=embedding_modules.EmbeddingBagCollection,
        KJT=jagged_tensor.KeyedJaggedTensor)


class TablesAround(nn.Module):
    """A DLRMNet's dense stages around its tables as one EmbeddingBagCollection (on the meta
    device, for DistributedModelParallel to shard); the forward is DLRMNet's, stage by stage."""

    def __init__(self, net: DLRMNet):
        super().__init__()
        tr, cfg = _torchrec(), net.config
        net.emb_l = nn.ModuleList()  # the tables live in self.tables
        self.net = net
        self.tables = tr.Collection(tables=[
            tr.TableConfig(name=table_name(k), embedding_dim=cfg.embedding_dim,
                           num_embeddings=rows, feature_names=[feature_name(k)])
            for k, rows in enumerate(cfg.table_sizes)], device=torch.device("meta"))

    def forward(self, dense: torch.Tensor, features) -> torch.Tensor:
        x = self.net.bottom(dense)
        pooled = self.tables(features).to_dict()  # sharded, its keys come in the shards' order
        ly = [pooled[feature_name(k)] for k in range(len(self.net.config.table_sizes))]
        return self.net.top_l(self.net.interact(x, ly))


def features_of(batch: Batch):
    """A batch's ids as TorchRec's KeyedJaggedTensor: one key per table, a length per bag."""
    if isinstance(batch.indices, torch.Tensor):  # (K, B): one id per bag
        values = batch.indices.reshape(-1)
        lengths = torch.ones(values.numel(), dtype=torch.int32, device=values.device)
    else:  # K lists of bags
        values = torch.cat(list(batch.indices))
        lengths = torch.cat([torch.diff(o, append=o.new_tensor([len(i)]))
                             for o, i in zip(batch.offsets, batch.indices, strict=True)]).int()
    return _torchrec().KJT.from_lengths_sync(
        keys=[feature_name(k) for k in range(len(batch.offsets))], values=values,
        lengths=lengths)


def rank_memory(device: torch.device, local_world_size: int) -> int:
    """What a rank may give its tables by default: its GPU's memory, or on CPUs its share of
    the machine's (or its cgroup's) memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory() // max(1, local_world_size)


def model_bytes(path: str) -> int:
    """How large a checkpoint's model is: a zip's inflated member, else the file or folder."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    try:
        with zipfile.ZipFile(p) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (OSError, zipfile.BadZipFile):
        return p.stat().st_size if p.is_file() else 0


def _column_width(rows: int, dim: int, capacity: int) -> int:
    """The widest column shard (a multiple of 4 columns) of a table that fits a rank."""
    pieces = -(-rows * dim * WEIGHT_BYTES // max(capacity, 1))
    return max(4, dim // pieces // 4 * 4)


class Sharding:
    """Models whose tables are sharded over ctx's ranks, each with `capacity` bytes for the
    model, scored in batches of batch_size. The plan of a set of tables is made once (every
    model of a grid has the same) and described on rank 0."""

    def __init__(self, ctx: DistContext, device: torch.device, capacity: int, batch_size: int):
        self.ctx, self.device, self.capacity, self.batch_size = ctx, device, capacity, batch_size
        self.plans: dict[DLRMConfig, object] = {}

    def model(self, state_dict: Mapping[str, torch.Tensor], path: str):
        """A mapped checkpoint's model in DistributedModelParallel, this rank holding its
        shards and the (small) dense stages. Tables that the folder at path stores in several
        shards (meta in the state dict) are read piece by piece where this rank's shards
        meet them, never put together."""
        layout = read_layout(state_dict)
        shapes = shapes_for_tables(state_dict, set(layout.tables))
        model = TablesAround(DLRMNet.from_state_dict(shapes))
        model.net.to(self.device)
        tr = _torchrec()
        dmp = tr.DMP(model, device=self.device, plan=self.plan(model), sharders=[tr.Sharder()],
                     init_data_parallel=False)
        stored = (CheckpointTables(path) if any(state_dict[n].is_meta for n in layout.tables)
                  else None)

        def pieces(name: str) -> list[tuple[list[int], torch.Tensor]]:
            if state_dict[name].is_meta:
                return stored.pieces(name)
            return [([0, 0], state_dict[name])]

        # agreed: a piece that one rank alone cannot read stops every rank's model
        self.ctx.agreed(lambda: _fill_shards(dmp, pieces, layout.tables))
        return dmp.eval()

    def plan(self, model: TablesAround):
        """TorchRec's plan for the model's tables, made on rank 0 and sent to all: table-wise,
        column-wise for a table larger than a rank's memory. A StopRun on every rank where
        the planner cannot place them (every model of the run has these tables)."""
        cfg = model.net.config
        if cfg not in self.plans:
            self.plans[cfg] = self.ctx.on_main(lambda: self._plan(model))
            if self.ctx.is_main:
                print(describe_plan(self.plans[cfg], cfg), flush=True)
        return self.plans[cfg]

    def _plan(self, model: TablesAround):
        tr, cfg, capacity = _torchrec(), model.net.config, self.capacity
        constraints = {
            table_name(k): tr.Constraints(sharding_types=["table_wise"])
            if rows * cfg.embedding_dim * WEIGHT_BYTES <= capacity else
            tr.Constraints(sharding_types=["column_wise"], min_partition=_column_width(
                rows, cfg.embedding_dim, capacity))
            for k, rows in enumerate(cfg.table_sizes)}
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.ctx.world_size))
        memory = "hbm" if self.device.type == "cuda" else "ddr"
        topology = tr.TopologyFactory.create_topology(
            tr.TrainerConfig(world_size=self.ctx.world_size, local_world_size=local,
                             **{f"{memory}_cap_bytes": capacity}),
            kernel_config=tr.KernelConfig(compute_device=self.device.type))
        planner = tr.Planner(topology=topology, constraints=constraints,
                             batch_size=self.batch_size, debug=False,
                             storage_reservation=tr.Reservation(RESERVED_SHARE),
                             partitioner=tr.Partitioner(memory))
        try:
            return planner.plan(model, [tr.Sharder()])
        except tr.PlannerError:
            largest = max(cfg.table_sizes) * cfg.embedding_dim * WEIGHT_BYTES
            raise StopRun(
                f"TorchRec's planner cannot place the tables ({size_text(tables_bytes(cfg))}, "
                f"the largest {size_text(largest)}) on {self.ctx.world_size} ranks with "
                f"{size_text(capacity)} each: run more ranks, or give each more memory "
                "(--rank-memory)") from None

    def score(self, model, split: CriteoSplit | NpySplit) -> dict[str, float]:
        """The quality metrics of a sharded model on the split, on every rank (score_sharded)."""
        return score_sharded(model, split, self.batch_size, self.ctx)


def rank_bytes(plan, config: DLRMConfig) -> dict[int, int]:
    """The bytes of tables a plan puts on each rank."""
    per_rank: dict[int, int] = {}
    for k in range(len(config.table_sizes)):
        for shard in plan.plan["tables"][table_name(k)].sharding_spec.shards:
            rank = shard.placement.rank()
            per_rank[rank] = (per_rank.get(rank, 0)
                              + WEIGHT_BYTES * int(np.prod(shard.shard_sizes)))
    return per_rank


def describe_plan(plan, config: DLRMConfig) -> str:
    """One line: how the tables were sharded, and the bytes of tables on each rank."""
    kinds: dict[str, int] = {}
    for k in range(len(config.table_sizes)):
        kind = plan.plan["tables"][table_name(k)].sharding_type
        kinds[kind] = kinds.get(kind, 0) + 1
    how = ", ".join(f"{n} {kind.replace('_', '-')}" for kind, n in sorted(kinds.items()))
    held = ", ".join(f"rank {r}: {size_text(b)}"
                     for r, b in sorted(rank_bytes(plan, config).items()))
    return f"tables sharded by TorchRec's planner: {how} ({held})"


def size_text(n: float) -> str:
    """Bytes in the largest decimal unit with a digit before the point."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def tables_bytes(config: DLRMConfig) -> int:
    return sum(config.table_sizes) * config.embedding_dim * WEIGHT_BYTES


def open_mapped(path: str, ctx: DistContext) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors through a memory map, nothing read yet. A pruned zip's member is
    inflated once per machine (by its local rank 0) into a file beside the zip, removed once
    every rank has mapped it (the maps keep it until they go)."""
    member = member_of(path)
    if member is None:  # a plain torch.save file or a checkpoint folder: mapped where it is
        # (a folder's tables stored in several shards only their shapes: Sharding.model)
        return ctx.agreed(lambda: load_dlrm_state_dict(path, mmap=True))
    # one name on every rank of a machine (its host and rank 0's process), none on two
    tag = f"{socket.gethostname()}.{ctx.on_main(os.getpid)}"
    where = str(Path(path).parent / f".{Path(path).name}.{tag}.inflated.tmp")
    local_main = int(os.environ.get("LOCAL_RANK", ctx.rank)) == 0
    failure = None
    if local_main:
        try:
            with zipfile.ZipFile(path) as zf:
                inflate_member(zf, member, where)
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            failure = CheckpointError(f"{path}: cannot inflate the zip ({exc})")
    ctx.barrier()  # the copy is complete (or failed) before any rank of the machine maps it

    def mapped() -> dict[str, torch.Tensor]:
        if failure is not None:
            raise failure
        return load_dlrm_state_dict(where, mmap=True)

    try:
        return ctx.agreed(mapped)  # every rank has mapped it once this returns
    finally:
        if local_main:
            Path(where).unlink(missing_ok=True)


def _fill_shards(dmp, pieces: Callable[[str], list[tuple[list[int], torch.Tensor]]],
                 names: list[str]) -> None:
    """Copy this rank's shards from the tables' stored pieces (pieces(name): each at its
    offsets, mapped where it lies), where each shard meets each piece, FILL_BYTES of rows at
    a time (a shard's tensor is a view of the sharded collection's own weights); the pages
    read go back after each."""
    state = dmp.state_dict()
    for k, name in enumerate(names):
        shards = state[f"tables.embedding_bags.{table_name(k)}.weight"].local_shards()
        if not shards:
            continue
        for (p0, q0), piece in pieces(name):
            step = max(1, FILL_BYTES // max(1, piece[:1].nbytes))
            for shard in shards:
                (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                top, bottom = max(r0, p0), min(r0 + rows, p0 + piece.shape[0])
                left, right = max(c0, q0), min(c0 + cols, q0 + piece.shape[1])
                for a in range(top, bottom, step):
                    b = min(bottom, a + step)
                    part = piece[a - p0:b - p0, left - q0:right - q0]
                    shard.tensor[a - r0:b - r0, left - c0:right - c0].copy_(part)
                    drop_mapped_pages(part)


def _own_batches(split: CriteoSplit | NpySplit, batch_size: int, ctx: DistContext
                 ) -> Iterator[tuple[int | None, Batch]]:
    """This rank's batches with their index, then (None, a filler) until every rank has made
    as many forward passes (each pass is collective)."""
    n_batches = -(-len(split) // batch_size)
    rounds = -(-n_batches // ctx.world_size)
    own = split.batches(batch_size, share=(ctx.rank, ctx.world_size))
    for i in range(rounds):
        index = ctx.rank + i * ctx.world_size
        if index < n_batches:
            yield index, next(own)
        else:
            yield None, next(split.batches(batch_size))


@torch.no_grad()  # not inference mode: TorchRec's fused lookup reaches its CPU kernel
def score_sharded(model, split: CriteoSplit | NpySplit, batch_size: int, ctx: DistContext
                  ) -> dict[str, float]:
    """The quality metrics of a sharded model on the split, on every rank: computed on rank 0
    from the gathered scores by the suite's lean metric code (quality_of_batches, 4 bytes a
    sample), which one process uses for streamed splits. Where one process scores a split
    held in memory with scikit-learn, the two agree to float64 rounding; scikit-learn would
    add 75 MiB of imports and 40 bytes a sample to rank 0 beside its tables (3.6 GB for
    Criteo 1TB's 89 M test samples)."""
    scored = []
    for index, batch in _own_batches(split, batch_size, ctx):
        p = model(batch.dense, features_of(batch)).view(-1).cpu().numpy()
        if index is not None:
            scored.append((index, p, batch.labels.cpu().numpy() > 0.5))
    parts: list | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(scored, parts, dst=0, group=ctx._objects_group)

    def metrics() -> dict[str, float]:
        ordered = sorted((s for part in parts for s in part), key=lambda s: s[0])
        return quality_of_batches(((p, y) for _, p, y in ordered), len(split))

    return ctx.on_main(metrics)
