"""Experiment 1's body, the disk grid: prune every embedding table at every grid point and
stream each pruned model into a deflated zip; one metadata row per point.

Points that share their weights (level 0 and 1 of every config) are pruned once and copied.
With the sort-once engine one point per config is also pruned by the stock sparsifier and
compared bit for bit. How many points are in flight, and on how many threads, is decided here
from the model's size and the machine (docs/usage.md explains the policy).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dlrm_sparsity.checkpoints import (
    compressor_label,
    copy_zip_renamed,
    load_dlrm_state_dict,
    save_state_dict_zip,
    sha256_of_file,
)
from dlrm_sparsity.demo import ensure_demo
from dlrm_sparsity.grid import (
    SEED_BLOCK_SHAPES,
    SEED_LEVELS,
    SEED_NORMS,
    GridPoint,
    block_label,
    build_grid,
    shared_weights,
)
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.mask_engine import NAME as MASK_ENGINE
from dlrm_sparsity.plots import plot_disk_savings
from dlrm_sparsity.pruning import (
    LARGE_MODEL_BYTES,
    Streamed,
    hold_model,
    stream_stock,
    tensor_bytes,
)
from dlrm_sparsity.runner.atomic import remove_stale_temporaries
from dlrm_sparsity.runner.outputs import METADATA_COLUMNS, METADATA_CSV
from dlrm_sparsity.runner.session import Session, ensure_writable
from dlrm_sparsity.runner.sweep import Figure, Item, SweepResult, Table
from dlrm_sparsity.sort_once import (
    GridEngines,
    StockCheck,
    stock_check_fraction,
    stock_check_points,
    stream_sort_once,
)

METADATA = Table(METADATA_CSV, METADATA_COLUMNS)
MB = 2**20  # the seed's MB
PARALLEL_DEFLATE_BYTES = 64 * 2**20
LARGE_MODEL_WORKERS_FROM_CPUS = 8
# A point pruned apart from its zipping (a GPU feeding workers) holds a pruned copy of the
# model; a streamed one a chunk, one table's sort or the stock sparsifier's temporaries; with
# workers the original model is held too. Twice the model per point in flight, and twice the
# model held, leave room for the first and for the stock step on the largest tables.
MODEL_COPIES_PER_WORKER = 2
# The stock check's copies fit in a quarter of the model, or 256 MiB if that is more, and in
# an eighth of the memory: a streamed point holds a few chunks, the tables' first levels and
# one table's sort (at 1x4 blocks, the Kaggle model's largest takes a third of the model), so
# the check, were it given the model's size, would set the peak.
STOCK_CHECK_SHARE = 4
STOCK_CHECK_MEMORY_SHARE = 8
STOCK_CHECK_FLOOR = 256 * 2**20


@dataclass(frozen=True)
class GridSettings:
    """What the disk grid's flags decide (the defaults are the seed's grid)."""

    model_path: str | None = None  # None: the demo model
    dump_dir: str | None = None  # None: OUTPUT_DIR/sparsified_models
    levels: tuple[float, ...] = SEED_LEVELS
    norms: tuple[str, ...] = SEED_NORMS
    block_shapes: tuple[tuple[int, int], ...] = SEED_BLOCK_SHAPES
    keep_l2_1x1: bool = False
    workers: int | None = None  # None: default_workers
    compressor: str = "zlib-ng"
    deflate_threads: int | None = None  # None: deflate_threads
    compress_level: int = 6
    mask_engine: str = MASK_ENGINE
    stock_check: bool = True
    whole_stock_check: bool = False
    positive_zeros: bool = False


def usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


def physical_memory() -> int:
    """The memory this process may use, in bytes: the machine's RAM, or its cgroup's limit
    (v1 or v2) where that is lower (0 where the system says neither)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = 0
    limit = cgroup_memory_limit()
    return min(ram, limit) if ram and limit else ram or limit


def cgroup_memory_limit() -> int:
    """The memory limit of this process's cgroup in bytes (0: none, or not Linux)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2
            where = Path("/sys/fs/cgroup") / group.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            where = (Path("/sys/fs/cgroup/memory") / group.lstrip("/")
                     / "memory.limit_in_bytes")
        else:
            continue
        try:
            value = where.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:  # v1 writes a huge number for none
            return int(value)
    return 0


def check_budget(dense_bytes: int, memory_bytes: int) -> int:
    """Bytes the stock check's copies may take (see STOCK_CHECK_SHARE)."""
    budget = max(dense_bytes // STOCK_CHECK_SHARE, STOCK_CHECK_FLOOR)
    return min(budget, memory_bytes // STOCK_CHECK_MEMORY_SHARE) if memory_bytes else budget


def default_workers(dense_bytes: int, cpus: int, ram_bytes: int) -> int:
    """Points in flight when --workers is not given. A model under 1 GiB: min(4, CPUs). A
    larger one, from 8 CPUs: two, and one per 16 CPUs beyond 32, up to 4 (all feed one pool
    of deflate threads, so one zip's serial parts run while another's chunks are deflated);
    none below 8 CPUs, where memory comes first and each point reads its tables from the
    file. Either way, as many as the memory holds (none for a model larger than it)."""
    if dense_bytes <= LARGE_MODEL_BYTES:
        workers = min(4, cpus)
    else:
        workers = min(4, max(2, cpus // 16)) if cpus >= LARGE_MODEL_WORKERS_FROM_CPUS else 0
    if not ram_bytes:  # unknown: a large model is kept to one point
        return workers if dense_bytes <= LARGE_MODEL_BYTES else 0
    while workers and (workers + 1) * MODEL_COPIES_PER_WORKER * dense_bytes > ram_bytes:
        workers -= 1
    return workers


def deflate_threads(asked: int | None, dense_bytes: int) -> int:
    """Deflate threads, shared by the zips in flight: as asked, else every CPU for a model
    whose zips are worth cutting into chunks."""
    if asked is not None:
        return asked
    return 1 if dense_bytes < PARALLEL_DEFLATE_BYTES else usable_cpus()


def prunes_on_workers(device: torch.device, workers: int) -> bool:
    """On a GPU with workers, the calling thread prunes (one step at a time on the device)
    and the workers only zip. On a CPU the workers take whole points."""
    return device.type != "cuda" or workers == 0


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


class DiskGrid:
    """The grid of one model in one session: its items, and what is done with each."""

    def __init__(self, run: Session, settings: GridSettings):
        self.run, self.settings = run, settings
        self.points, self.left_out = build_grid(settings.levels, settings.norms,
                                                settings.block_shapes, settings.keep_l2_1x1)
        self.dump_dir = ensure_writable(Path(settings.dump_dir) if settings.dump_dir
                                        else run.output_dir / "sparsified_models", "dump folder")
        run.lock(self.dump_dir)  # a no-op inside the output folder, whose lock is held
        self.model_path = settings.model_path or str(ensure_demo().model)
        mapped = load_dlrm_state_dict(self.model_path, mmap=True)  # nothing read yet
        self.workers = (settings.workers if settings.workers is not None
                        else default_workers(tensor_bytes(mapped), usable_cpus(),
                                             physical_memory()))
        self.model = hold_model(mapped, self.model_path, self.workers)
        del mapped  # with it goes the map of the file
        self.threads = deflate_threads(settings.deflate_threads, self.model.dense_bytes)
        self.on_workers = prunes_on_workers(run.device, self.workers)
        self.copies = shared_weights(self.points)
        self.pruned_points = [p for p in self.points if p not in self.copies]
        sort_once = settings.mask_engine == MASK_ENGINE
        self.engines = GridEngines(self.pruned_points, self.model.dense_bytes >
                                   LARGE_MODEL_BYTES, spill_to=self.dump_dir
                                   ) if sort_once else None
        self.checked = (stock_check_points(self.pruned_points)
                        if sort_once and settings.stock_check else set())
        self.check = StockCheck(None if settings.whole_stock_check else
                                check_budget(self.model.dense_bytes, physical_memory()))
        self.setup = {"model_sha256": sha256_of_file(self.model_path),
                      "compressor": compressor_label(settings.compressor),
                      "compress_level": settings.compress_level,
                      "positive_zeros": settings.positive_zeros, "deflate_threads": self.threads,
                      "mask_engine": settings.mask_engine,
                      "stock_check": sort_once and settings.stock_check,
                      "whole_stock_check": settings.stock_check and settings.whole_stock_check}

    def item(self, point: GridPoint) -> Item:
        key = {"norm": point.norm, "sparse_block_shape": block_label(point.block_shape),
               "sparsity_level": point.level}
        threads = step_threads(self.on_workers, self.workers)
        fields = {**key, "model_path": os.path.abspath(self.model_path), **self.setup,
                  **self.run.provenance(threads=threads), "workers": self.workers}
        determinants = {**self.setup,
                        "dump_dir": os.path.relpath(self.dump_dir, self.run.output_dir)}
        return Item(fields, determinants, payload=point)

    def intact(self, _item: Item, tables: list[list[dict]]) -> bool:
        """A kept row needs its zip as it was."""
        row = tables[0][0]
        zip_path = self.run.output_dir / str(row["path"])
        return zip_path.is_file() and sha256_of_file(zip_path) == row["sha256"]

    def prune(self, item: Item) -> tuple[GridPoint, Streamed, bool]:
        """Every table sorted (and checked against the stock sparsifier) at the item's point;
        the pruned tables are made as the zip is written, unless the pruning runs apart from
        the zipping (a GPU feeding zip workers), where they are made here."""
        point, device = item.payload, self.run.device
        checked = point in self.checked
        if self.engines is None:
            pruning = stream_stock(self.model, point, device, self.settings.positive_zeros)
        else:
            pruning = stream_sort_once(self.model, point, device, self.engines(point),
                                       self.check if checked else None,
                                       self.settings.positive_zeros)
        if not self.on_workers:
            pruning.materialized()
        return point, pruning, checked

    def zip_path(self, point: GridPoint) -> Path:
        path = self.dump_dir / point.zip_relpath()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def zip_columns(self, zip_path: Path, size: int) -> dict:
        dense = self.model.dense_bytes
        return {"zip_file_size": size / MB, "zip_file_size_bytes": size,
                "path": os.path.relpath(zip_path, self.run.output_dir),
                "sha256": sha256_of_file(zip_path), "compression_ratio": dense / size,
                "dense_size_bytes": dense}

    def store(self, job: tuple[GridPoint, Streamed, bool]) -> dict:
        """The pruned model streamed into its zip, table by table; the point's metadata row.
        zip_time_sec is the writing's time less the tables' making inside it."""
        point, pruning, checked = job
        zip_path, start = self.zip_path(point), time.perf_counter()
        made_before = _made_seconds(pruning)
        size = save_state_dict_zip(pruning.state_dict, zip_path, self.settings.compress_level,
                                   self.settings.compressor, self.threads, pruning.tables)
        zip_s = time.perf_counter() - start - (_made_seconds(pruning) - made_before)
        share = stock_check_fraction(self.model.state_dict, self.check.budget) if checked else 0.0
        return {"step_time_sec": pruning.stock_s, "mask_time_sec": pruning.engine_s,
                "stock_checked": checked, "stock_check_fraction": share,
                "check_time_sec": pruning.check_s, "zip_time_sec": zip_s,
                "actual_sparsity": pruning.zero_fraction(), **self.zip_columns(zip_path, size)}

    def copy(self, point: GridPoint, first: dict) -> dict:
        """A point whose weights equal an earlier point's: its zip copied, not pruned again."""
        if "sha256" not in first:
            raise RuntimeError(f"not copied: its weights come from {first['path']}, which failed")
        zip_path = self.zip_path(point)
        size = copy_zip_renamed(self.run.output_dir / first["path"], zip_path)
        return {"step_time_sec": float("nan"), "mask_time_sec": float("nan"),
                "actual_sparsity": first["actual_sparsity"], "copied_from": first["path"],
                **self.zip_columns(zip_path, size)}

    @staticmethod
    def describe(item: Item, rows: list[dict]) -> str:
        row = rows[0]
        times = [f"{what} {row[col]:.3f} s" for what, col in
                 (("stock step", "step_time_sec"), ("engine", "mask_time_sec"))
                 if row.get(col) == row.get(col)]  # not nan
        return (f"{item.payload.config} level {item.payload.level:g}: "
                f"{row['zip_file_size']:.2f} MB, " + ", ".join(times))

    def sweep(self) -> SweepResult:
        """Prune and zip every point that needs it, then copy the rest; rows in grid order."""
        if self.run.is_main:
            remove_stale_temporaries(self.dump_dir, recursive=True)
            if self.left_out:
                print(f"skipping {', '.join(self.left_out)}: its masks equal L1 (1, 1)'s (|x| "
                      "and x*x rank alike); --keep-l2-1x1 runs it")
        self.run.ctx.barrier()
        on_workers = self.on_workers
        with torch_threads(step_threads(on_workers, self.workers)):
            pruned = self.run.sweep(
                [self.item(p) for p in self.pruned_points],
                (lambda it: self.store(self.prune(it))) if on_workers else self.store,
                prepare=None if on_workers else self.prune, workers=self.workers,
                tables=[METADATA], label="pruning + zipping", still_valid=self.intact,
                describe=self.describe)
        firsts = {(r["norm"], r["sparse_block_shape"], r["sparsity_level"]): r
                  for r in pruned.tables[0]}
        copied = self.run.sweep(
            [self.item(p) for p in self.copies],
            lambda it: self.copy(it.payload, firsts[self.copies[it.payload].key]),
            tables=[METADATA], label="copying shared weights", still_valid=self.intact,
            workers=min(self.workers, len(self.copies)))  # each copy is a file copy and a hash
        order = {p.key: i for i, p in enumerate(self.points)}
        return pruned.followed_by(copied, lambda r: order[
            (r["norm"], r["sparse_block_shape"], float(r["sparsity_level"]))])


def _made_seconds(pruning: Streamed) -> float:
    """The seconds the tables' making has taken so far (stock steps and engine)."""
    return sum(x for x in (pruning.stock_s, pruning.engine_s) if x == x)  # nan: none


def summary(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns=["norm", "sparse_block_shape"],
                           values="zip_file_size")
    return table.to_string(float_format=lambda v: f"{v:.3f}") + "\n(zipped checkpoint, MB)"


def run_disk_grid(run: Session, settings: GridSettings) -> None:
    """The disk grid in this session, its CSV, plot and summary written."""
    result = DiskGrid(run, settings).sweep()
    run.finish(result, [METADATA], plot=Figure(plot_disk_savings, "disk_savings.png"),
               summary=summary)


def ensure_demo_metadata(run: Session, metadata: Path) -> None:
    """Another experiment's no-argument run that finds no metadata: the disk grid of the demo
    model first, in the same session."""
    if metadata.exists():
        return
    print(f"{metadata} not found: running the disk-savings step first", flush=True)
    run_disk_grid(run, GridSettings())
