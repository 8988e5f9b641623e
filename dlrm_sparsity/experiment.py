"""One setup for the experiments that read the pruned models of sparse_model_metadata.csv.

    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        exp = Experiment(run, args)          # data, metadata, test split, timed batch
        items = exp.items(exp.metadata, flags={...})
        result = run.sweep(items, compute, tables=[TABLE], label="scoring")

A timed experiment plans its TimingBudget from the sweep's start hook (`plan_timing`) and times
each point with `time_point` (paired rounds sized by the budget, under the drift guard).

It resolves the inputs (the demo's when none are given, its metadata made by the disk grid in
the same session), reads the metadata and the test split onto the device, takes the timed
batch (the first test batch, as the seed), sets the steady CPU allocator for the experiments
that time, and builds every row's provenance and every item's determinants the same way.
"""

from __future__ import annotations

import argparse
import gc
import os
import zipfile
from dataclasses import replace
from functools import cached_property, lru_cache
from typing import Callable, Mapping, Sequence, TypeVar

import torch

from dlrm_sparsity.budget import TimingBudget
from dlrm_sparsity.checkpoints import load_dlrm_state_dict, sha256_of_file
from dlrm_sparsity.criteo.data import tensors_fingerprint
from dlrm_sparsity.criteo.npy import NpySplit, check_table_count, is_npy_data
from dlrm_sparsity.criteo.splits import open_split
from dlrm_sparsity.disk import ensure_demo_metadata, physical_memory
from dlrm_sparsity.drift import DriftGuard
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.evaluation import quality_metrics, score_split, streamed_quality
from dlrm_sparsity.inputs import checkpoint_sha256, resolve_inputs
from dlrm_sparsity.model import DLRMConfig, DLRMNet
from dlrm_sparsity.runner.outputs import KEY_COLUMNS, read_metadata
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Item
from dlrm_sparsity.sharded import Sharding, model_bytes, open_mapped, rank_memory, size_text
from dlrm_sparsity.timing import Paired, Timing, measure_paired, steady_cpu_allocator
from dlrm_sparsity.variants import Dense

WARMUP_S = 0.1  # the longest warm-up of one variant in a measurement
# A pruned zip whose model is larger than this, or than a quarter of the memory, is inflated
# into a file and mapped rather than read: at the Kaggle size (2 GB) reading it held two
# copies while it loaded and took longer than the map (benchmarks/bench_kaggle_size.py).
MAP_FROM_BYTES = 256 * 2**20
LARGE_SHARE_OF_MEMORY = 4
T = TypeVar("T")


class Experiment:
    """The inputs of one experiment run: args needs the data and metadata flags, batch_size,
    and for a timed experiment add_timing_args' flags (and optionally steady_malloc)."""

    def __init__(self, run: Session, args: argparse.Namespace, test_limit: int | None = None):
        self.run, self.args = run, args
        self._last_model: tuple[tuple, dict] | None = None  # state_dict's
        self.timed = hasattr(args, "min_run_time")
        if self.timed:
            torch.set_num_threads(args.threads)
        self.steady_malloc = (self.timed and run.device.type == "cpu"
                              and getattr(args, "steady_malloc", True) and steady_cpu_allocator())
        self.inputs = resolve_inputs(args.raw_data_file, args.processed_data_file, args.metadata,
                                     run.output_dir, args.skip_bad_lines, run.ctx)
        self.npy = is_npy_data(self.inputs.processed)  # torchrec's files
        if self.inputs.demo_model is not None:
            ensure_demo_metadata(run, self.inputs.metadata)
        self.metadata = read_metadata(self.inputs.metadata).to_dict("records")
        self.sharded = self._shards_tables()
        test = open_split(self.inputs.processed, self.inputs.raw, "test", test_limit,
                          self.table_sizes(), args.test_half)
        self.test = test.to(run.device)
        self.batch = next(self.test.batches(args.batch_size))
        self.data = {"test": test.fingerprint(), "batch_size": args.batch_size,
                     "device": self.provenance()["device"]}
        if self.timed:
            self.data.update(timed_batch=tensors_fingerprint(self.batch.dense,
                                                             self.batch.indices),
                             threads=args.threads, min_run_time=args.min_run_time,
                             rounds=args.rounds, steady_malloc=self.steady_malloc,
                             time_budget=args.time_budget, guard_share=args.guard_share,
                             min_effect=args.min_effect)

    def table_sizes(self) -> tuple[int, ...] | None:
        """The rows of the pruned models' tables, which torchrec's files take their ids
        modulo (read off the first model's shapes); None for dlrm's data, whose ids are
        checked instead."""
        if not self.npy:
            return None
        first_error = None
        for meta in self.metadata:  # the first model that loads (the others' rows say why)
            try:
                sizes = DLRMConfig.from_state_dict(self.model_state(meta)).table_sizes
            except UserInputError as exc:
                first_error = first_error or exc
                continue
            check_table_count(sizes, meta["checkpoint"])
            return sizes
        raise first_error

    def _shards_tables(self) -> bool:
        """Whether each model's tables are spread over torchrun's ranks (sharded.py): asked
        for by --shard-tables, or needed because a model is larger than one rank's device."""
        asked, ctx = getattr(self.args, "shard_tables", None), self.run.ctx
        if asked is None:  # an experiment that holds whole models
            return False
        if asked and not ctx.enabled:
            raise UserInputError("--shard-tables spreads the tables over torchrun's ranks: "
                                 "run under torchrun with 2 or more processes")
        one_gpu = not ctx.enabled and self.run.device.type == "cuda"
        if asked or not (ctx.enabled or one_gpu):
            return bool(asked)  # one process on CPUs maps a model larger than memory
        largest = max((model_bytes(m["checkpoint"]) for m in self.metadata), default=0)
        if largest <= self.rank_capacity:
            return False
        if one_gpu:
            raise UserInputError(
                f"the largest model ({size_text(largest)}) does not fit the GPU "
                f"({size_text(self.rank_capacity)}): run under torchrun on several GPUs, which "
                "shards its tables, or with --device cpu")
        if ctx.is_main:
            print(f"note: the largest model ({size_text(largest)}) does not fit one rank "
                  f"({size_text(self.rank_capacity)}): its tables are sharded over the "
                  f"{ctx.world_size} ranks (--shard-tables)")
        return True

    @cached_property
    def sharding(self) -> Sharding:
        """How models are sharded over the ranks (when self.sharded)."""
        return Sharding(self.run.ctx, self.run.device, self.rank_capacity,
                        len(self.batch.labels))

    @cached_property
    def rank_capacity(self) -> int:
        """The bytes of tables a rank may hold: --rank-memory, or its device's memory."""
        given = getattr(self.args, "rank_memory", None)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.run.ctx.world_size))
        return int(given * 1e9) if given else rank_memory(self.run.device, local)

    def score(self, model: torch.nn.Module) -> dict:
        """A model's quality metrics on the whole test split, in batches of the timed one's
        size (torchrec's files streamed, in a few bytes per sample)."""
        if self.sharded:
            return self.sharding.score(model, self.test)
        if isinstance(self.test, NpySplit):
            return streamed_quality(model, self.test, len(self.batch.labels))
        return quality_metrics(self.test.labels.cpu().numpy(),
                               score_split(model, self.test, len(self.batch.labels)))

    def quality(self, meta: dict) -> dict:
        """The quality metrics of a metadata row's model (score). A sharded model is let go
        before this returns: TorchRec's sharded modules refer to one another, so only the
        garbage collector frees their tables, and held until it runs, they would sit beside
        the next model's while its zip is inflated and its shards filled."""
        model = self.model(meta)
        try:
            return self.score(model)
        finally:
            del model
            if self.sharded:
                gc.collect()

    @cached_property
    def budget(self) -> TimingBudget:
        """The run's timing budget (--time-budget), planned by plan_timing."""
        return TimingBudget(self.args.time_budget, self.args.guard_share)

    @property
    def timing(self) -> Timing:
        """A point's first rounds: --min-run-time, shortened alike for all if the budget says;
        each variant warmed up for one block (two calls at least)."""
        run_time = self.args.min_run_time * self.budget.scale
        return Timing(self.args.threads, run_time, warmup_s=self._warmup_s(run_time))

    def _warmup_s(self, run_time: float) -> float:
        """A variant's warm-up: one block of its first rounds, WARMUP_S at most."""
        return min(WARMUP_S, run_time / self.args.rounds)

    def first_rounds_s(self, variants: int, run_time_factor: float = 1.0) -> float:
        """What the first rounds of a measurement of that many variants take at the requested
        --min-run-time (times run_time_factor): per variant a warm-up and the timed calls."""
        run_time = self.args.min_run_time * run_time_factor
        return variants * (run_time + self._warmup_s(run_time))

    def timed_unit(self, planned_s: float, measure: Callable[[float], T],
                   first_rounds_s: Callable[[T], float] | None = None) -> T:
        """One unit of measurement on the budget: measure(max_s), given the most seconds it may
        take, booked as timing; its first rounds' seconds (first_rounds_s(result), or all it
        took) tell the budget the pace of the rest."""
        max_s = self.budget.take_unit(planned_s)
        start = self.budget.clock()
        with self.budget.measuring():
            result = measure(max_s)
        took = first_rounds_s(result) if first_rounds_s else self.budget.clock() - start
        self.budget.record(planned_s, took)
        return result

    def plan_timing(self, units_of: Callable[[Item], Sequence[float]]
                    ) -> Callable[[Sequence[Item]], None]:
        """The sweep's start hook: plans the budget over the items left to compute, where
        units_of(item) gives the first_rounds_s of each of an item's measurements."""
        def start(todo: Sequence[Item]) -> None:
            self.budget.plan([s for item in todo for s in units_of(item)])
            if todo and self.run.is_main:
                print(self.budget.plan_note())
        return start

    def paired(self, calls: Mapping[str, Callable[[], object]], base: str | None,
               called: int = 0) -> Paired:
        """One measurement: the calls in paired rounds of the budget's length (fewer rounds
        where the budget would overrun otherwise), rounds added while a ratio to base is
        undecided and the budget allows."""
        rounds = self.budget.rounds_for(self.args.rounds)
        timing = self.timing  # fewer rounds, each of a full round's blocks
        timing = replace(timing, min_run_time=timing.min_run_time * rounds / self.args.rounds)
        return self.timed_unit(
            self.first_rounds_s(len(calls)),
            lambda max_s: measure_paired(calls, timing, rounds, called, base=base,
                                         max_s=max_s, min_effect=self.args.min_effect),
            # the pace of a unit with all its rounds, which the next units' rounds are set by
            lambda paired: paired.first_rounds_s * self.args.rounds / rounds)

    def time_point(self, calls: Mapping[str, Callable[[], object]], base: str | None,
                   called: int = 0) -> tuple[Paired, dict]:
        """paired() under the drift guard: the measurement and the guard's columns."""
        return self.guard.guarded(lambda: self.paired(calls, base, called))

    @cached_property
    def guard(self) -> DriftGuard:
        """The run's drift guard, its reference the unpruned model's dense forward on the
        timed batch (the metadata's first level-0 model, else its first); its readings as
        long as a block of a point's first rounds."""
        base = self.level0_row() or self.metadata[0]
        try:
            reference = Dense(self.unpruned_model(base)).on(self.batch)
        except UserInputError as exc:  # that model's own row will say so too
            print(f"note: timings are not guarded against drift (its reference: {exc})")
            reference = None
        return DriftGuard(reference, self.budget, self.timing,
                          self.timing.min_run_time / self.args.rounds, self.args.drift_margin,
                          self.args.drift_retries)

    def timing_summary(self) -> str:
        """The run's noise, guard and budget, for the end of a timed run."""
        if self.budget.units == 0:
            return "timing: nothing left to time (every row kept from an earlier run)"
        return f"{self.guard.summary()}\n{self.budget.summary()}"

    def provenance(self) -> dict:
        """Where, with what and how every row was made (the same columns in every CSV)."""
        threads = self.args.threads if self.timed else None
        timing = ({"time_budget_s": self.args.time_budget, "guard_share": self.args.guard_share,
                   "min_effect": self.args.min_effect} if self.timed else {})
        return {**self.run.provenance(threads=threads, batch_size=self.args.batch_size),
                "steady_malloc": self.steady_malloc, **timing,
                "processed_data_file": self.inputs.processed,
                **({"test_half": self.args.test_half} if self.npy else {})}

    def items(self, metadata: list[dict], flags: dict | None = None, **fields) -> list[Item]:
        """A sweep item per pruned model: its rows depend on the model's content (its sha256),
        the data, the timing settings and the flags; every row names the checkpoint."""
        flags = flags or {}
        shared = {**self.provenance(), **flags, **fields}
        found = []
        for meta in metadata:
            sha = checkpoint_sha256(meta)
            found.append(Item({**{c: meta[c] for c in KEY_COLUMNS}, "checkpoint": meta["path"],
                               "checkpoint_sha256": sha, **shared},
                              {"checkpoint_sha256": sha, **self.data, **flags, **fields},
                              payload=meta))
        return found

    def state_dict(self, path: str, recorded_sha256: str | None) -> dict:
        """A pruned model's tensors, read once its file is checked to be the one the metadata
        describes (a missing file is the loader's one-line error). The last model read is
        kept (the items of a model are adjacent), and let go before the next is read: held
        while the next loads, it would add a model to the peak."""
        key = (path, recorded_sha256)
        if self._last_model is not None and self._last_model[0] == key:
            return self._last_model[1]
        self._last_model = None
        state_dict = self._read_state_dict(path, recorded_sha256)
        self._last_model = (key, state_dict)
        return state_dict

    def _read_state_dict(self, path: str, recorded_sha256: str | None) -> dict:
        def check() -> None:
            actual = sha256_of_file(path)
            if actual != recorded_sha256:
                raise UserInputError(
                    f"{path}: sha256 {actual} differs from the {recorded_sha256} that "
                    f"{self.inputs.metadata} records; the file changed after the disk-savings "
                    "run (rerun evaluate_disk_savings.py)")

        if recorded_sha256 and os.path.isfile(path):
            self.run.ctx.on_main(check) if self.sharded else check()
        if self.sharded:  # mapped: each rank reads its shards alone
            return open_mapped(path, self.run.ctx)
        return load_dlrm_state_dict(path, mmap=too_large_to_read(path))

    def model_state(self, meta: dict) -> dict:
        """The state dict of a metadata row's pruned model."""
        recorded = meta.get("sha256") if isinstance(meta.get("sha256"), str) else None
        return self.state_dict(meta["checkpoint"], recorded)

    def level0_row(self) -> dict | None:
        """The metadata's first level-0 row: the unpruned model (None where the grid has none)."""
        return next((m for m in self.metadata if float(m["sparsity_level"]) == 0.0), None)

    def unpruned_model(self, meta: dict) -> DLRMNet:
        """A level-0 row's model, read through a memory map from the checkpoint the disk step
        pruned, where that file is still there and unchanged (a deflated zip is read whole and
        then unpickled: twice the model at the peak); else from the row's own zip. One model
        for the run: the guard's reference and the compression front share it."""
        source, sha = meta.get("model_path"), meta.get("model_sha256")
        if not (isinstance(source, str) and isinstance(sha, str) and os.path.isfile(source)):
            return self.model(meta)
        return self._mapped_model(source, sha) or self.model(meta)

    @lru_cache(maxsize=1)  # noqa: B019 (one Experiment per run)
    def _mapped_model(self, source: str, sha: str) -> DLRMNet | None:
        if sha256_of_file(source) != sha:
            return None
        model = DLRMNet.from_state_dict(load_dlrm_state_dict(source, mmap=True))
        self.test.check_fits(model.config.table_sizes, source)
        model.mapped = self.run.device.type == "cpu"  # its tensors are the file's private map
        return model.to(self.run.device).eval()

    def model(self, meta: dict) -> DLRMNet:
        """The pruned model of a metadata row on the device, in eval mode, checked to fit the
        data (sharded: this rank's part of it in DistributedModelParallel)."""
        state_dict = self.model_state(meta)
        if self.sharded:
            self.test.check_fits(DLRMConfig.from_state_dict(state_dict).table_sizes,
                                 meta["checkpoint"])
            return self.sharding.model(state_dict, meta["checkpoint"])
        model = DLRMNet.from_state_dict(state_dict)
        self.test.check_fits(model.config.table_sizes, meta["checkpoint"])
        return model.to(self.run.device).eval()


def too_large_to_read(path: str) -> bool:
    """A pruned zip whose model is larger than MAP_FROM_BYTES or than a quarter of the memory
    the process may use: mapped from an inflated file (its pages the system's to drop, only
    those the lookups touch ever read in) rather than read."""
    if not zipfile.is_zipfile(path):
        return False  # not a zip: the loader reads it and says what is wrong
    memory = physical_memory()
    limit = min(MAP_FROM_BYTES, memory // LARGE_SHARE_OF_MEMORY) if memory else MAP_FROM_BYTES
    return model_bytes(path) > limit


def against_dense(exp: Experiment, what: str, calls: Mapping[str, Callable[[], object]],
                  name: str) -> dict:
    """Served tables' calls against the dense tables' (calls keyed "dense" and name), in
    alternating rounds (hundreds of short measurements: a warm-up as long as the timing
    itself); name's median, IQR and ratio to dense, as what_* columns."""
    calls = {v: calls[v] for v in dict.fromkeys(["dense", name])}
    base = "dense" if name != "dense" else None
    columns = exp.paired(calls, base).columns(name, base)
    keep = ("time_median_s", "time_iqr_s", "ratio", "ratio_low", "ratio_high",
            "ratio_verdict")
    return {f"{what}_{k.replace('time_', '')}": v for k, v in columns.items() if k in keep}
