"""Experiment 1, disk savings: prune every embedding table over the grid, zip each checkpoint.

For each (norm, block shape, sparsity level) the stock DataNormSparsifier prunes every
emb_l.*.weight (one step, mask squashed); the model-only state dict is streamed into a deflated
zip under the dump path. sparse_model_metadata.csv records sizes, timings and paths (relative to
the CSV) for evaluate_model_metrics.py and evaluate_forward_time.py; disk_savings.png plots them.

With no arguments it runs on the built-in demo model (made on first use). Reruns resume: points
whose zip is present with the recorded sha256 are kept. Runs unchanged under torchrun.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dlrm_sparsity.checkpoints import (
    COMPRESSORS,
    compressor_label,
    copy_zip_renamed,
    load_dlrm_state_dict,
    save_state_dict_zip,
    sha256_of_file,
)
from dlrm_sparsity.demo import ensure_demo
from dlrm_sparsity.inputs import Inputs
from dlrm_sparsity.mask_engine import ENGINES, SortOnceMasks
from dlrm_sparsity.mask_engine import NAME as MASK_ENGINE
from dlrm_sparsity.plots import plot_disk_savings
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.atomic import remove_stale_temporaries
from dlrm_sparsity.runner.cli import add_run_args, make_parser, positive_int
from dlrm_sparsity.runner.outputs import METADATA_COLUMNS, METADATA_CSV
from dlrm_sparsity.runner.session import Session, ensure_writable
from dlrm_sparsity.runner.sweep import Item, SweepResult, Table
from sparse_utils import (
    LARGE_MODEL_BYTES,
    SEED_BLOCK_SHAPES,
    SEED_LEVELS,
    SEED_NORMS,
    GridEngines,
    GridPoint,
    Model,
    block_label,
    build_grid,
    hold_model,
    make_zeros_positive,
    parse_block_shape,
    parse_level,
    parse_norm,
    shared_weights,
    sparsify_embeddings,
    step_threads,
    stock_check_fraction,
    stock_check_points,
    tensor_bytes,
    torch_threads,
    zero_fraction,
)

METADATA = Table(METADATA_CSV, METADATA_COLUMNS)
MB = 2**20  # the seed's MB


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None,
                   help="dlrm checkpoint, bare state dict or zip (default: the demo model)")
    p.add_argument("--sparsified_model_dump_path", "--sparsified-model-dump-path",
                   dest="dump_path", default=None,
                   help="folder for the pruned zips (default: OUTPUT_DIR/sparsified_models)")
    p.add_argument("--sparsity-levels", nargs="+", default=[str(x) for x in SEED_LEVELS],
                   metavar="LEVEL", help="levels in [0, 1] (default: the seed's 20)")
    p.add_argument("--norms", nargs="+", default=list(SEED_NORMS), metavar="NORM",
                   help="block norms, L1 and/or L2")
    p.add_argument("--block-shapes", nargs="+", default=[f"{r}x{c}" for r, c in SEED_BLOCK_SHAPES],
                   metavar="RxC", help="sparse block shapes")
    p.add_argument("--keep-l2-1x1", action="store_true",
                   help="also run L2 with 1x1 blocks (same masks as L1 1x1, so skipped)")
    add_run_args(p, "folder for sparse_model_metadata.csv and disk_savings.png")
    p.add_argument("--workers", type=int, default=None, choices=range(0, 65), metavar="N",
                   help="grid points in flight at once. On a CPU each worker prunes and zips "
                        "whole points, and the sparsifier's step gets CPUs/N torch threads; "
                        "on a GPU the main thread prunes and the workers zip. Each holds one "
                        "pruned copy of the embeddings (on a CPU also the sparsifier's "
                        "temporaries). 0: one point at a time, and for a model over 1 GiB "
                        "in a plain torch.save file the original tables are read from the "
                        "file as they are pruned instead of held. On a CPU with workers the "
                        "step shares the cores, so for clean step_time_sec figures use 0 or "
                        "a GPU (default: min(4, CPUs); for a model over 1 GiB, 0 below 8 "
                        "CPUs, else 2, one per 16 CPUs beyond 32, up to 4, as the RAM "
                        "allows)")
    p.add_argument("--compressor", default="zlib-ng", choices=COMPRESSORS,
                   help="deflate implementation; both write standard zips. zlib is what "
                        "Python's zipfile uses (the seed's deflate); zlib-ng takes about two "
                        "thirds of its time, and its zips are up to about 6%% smaller at high "
                        "sparsity")
    p.add_argument("--deflate-threads", type=positive_int, default=None,
                   metavar="N", help="threads that deflate the zips, into one standard stream "
                   "each (pigz's way: chunks primed with the 32 KiB before them; zips a few "
                   "bytes per MiB larger): one pool shared by all the zips in flight, so that "
                   "none idles while a worker hashes its zip or waits for its next point. "
                   "Default: every CPU for models over 64 MiB; 1 for smaller ones, whose zips "
                   "the workers deflate several at a time instead")
    p.add_argument("--compress-level", type=int, default=6, choices=range(10), metavar="0-9",
                   help="deflate level (6: the default of both, the seed's)")
    p.add_argument("--mask-engine", choices=ENGINES, default=MASK_ENGINE,
                   help="how the masks are made. sort-once: per table and config, the block "
                        "norms are sorted once, as the stock DataNormSparsifier sorts them, and "
                        "every level's mask is read from that order: the same masks, bit for "
                        "bit, without a sort per level (step_time_sec is then the stock "
                        "step's time at the checked points only, mask_time_sec the engine's, "
                        "check_time_sec the rest of the check's). "
                        "stock: the stock sparsifier at every point, as the seed")
    p.add_argument("--no-stock-check", dest="stock_check", action="store_false",
                   help="with sort-once, do not also prune one point per config (the first "
                        "between levels 0 and 1) with the stock sparsifier and compare the "
                        "weights bit for bit (a difference stops the run). The check costs "
                        "one stock step per config")
    p.add_argument("--whole-stock-check", action="store_true",
                   help="check every table whole. By default a table is checked whole when "
                        "the check's copies (the stock sparsifier holds 8x a table in "
                        "temporaries) fit in the model's own size, and otherwise on its "
                        "leading rows that fit, by a fresh engine that sorts just those rows: "
                        "the check then never holds more than the model's size again. "
                        "Whole, a large model's peak is set by the stock sparsifier on the "
                        "largest table (9x it). stock_check_fraction records the share "
                        "checked")
    p.add_argument("--positive-zeros", action="store_true",
                   help="store pruned weights as +0.0 instead of the -0.0 the stock sparsifier "
                        "leaves for negative weights: the same model, but the sign bits no "
                        "longer cost disk (off by default, as the seed)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class ZipSettings:
    dump_dir: Path
    csv_dir: Path
    compressor: str
    compress_level: int
    threads: int = 1


PARALLEL_DEFLATE_BYTES = 64 * 2**20
LARGE_MODEL_WORKERS_FROM_CPUS = 8
# A point in flight holds a pruned copy of the model, and on a CPU the sparsifier's
# temporaries beside it; with workers the original model is held too. Twice the model per
# point in flight, and twice the model held, leave room for both.
MODEL_COPIES_PER_WORKER = 2


def usable_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


def physical_memory() -> int:
    """The machine's RAM in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def default_workers(dense_bytes: int, cpus: int, ram_bytes: int) -> int:
    """Points in flight when --workers is not given. A model under 1 GiB: min(4, CPUs). A
    larger one, from 8 CPUs: two, and one per 16 CPUs beyond 32, up to 4 (all feed one pool
    of deflate threads, so one zip's serial parts, its hash, its pruned model's transfer, run
    while another's chunks are deflated), as many as the RAM holds; none below 8 CPUs, where
    memory comes first and each point reads its tables from the file."""
    if dense_bytes <= LARGE_MODEL_BYTES:
        return min(4, cpus)
    workers = min(4, max(2, cpus // 16)) if cpus >= LARGE_MODEL_WORKERS_FROM_CPUS else 0
    while workers and (workers + 1) * MODEL_COPIES_PER_WORKER * dense_bytes > ram_bytes:
        workers -= 1
    return workers


def deflate_threads(asked: int | None, dense_bytes: int) -> int:
    """Deflate threads, shared by the zips in flight: as asked, else every CPU for a model
    whose zips are worth cutting into chunks."""
    if asked is not None:
        return asked
    return 1 if dense_bytes < PARALLEL_DEFLATE_BYTES else usable_cpus()


def prune_point(model: Model, point: GridPoint, device: torch.device, positive_zeros: bool,
                engine: SortOnceMasks | None = None, check: bool = False,
                check_budget: int | None = None) -> tuple[GridPoint, dict, dict]:
    """Every embedding table pruned (by the engine, or by the stock sparsifier without one);
    the step's columns: the stock step's seconds where it ran, the engine's own, at a checked
    point the check's other seconds, and the share of the weights the stock check compared."""
    pruned, stock_s, engine_s, check_s = sparsify_embeddings(
        model.state_dict, point, device, model.read_table, engine, check, check_budget)
    if positive_zeros:
        make_zeros_positive(pruned)
    share = stock_check_fraction(model.state_dict, check_budget) if check else 0.0
    return point, pruned, {"step_time_sec": stock_s, "mask_time_sec": engine_s,
                           "stock_checked": check, "stock_check_fraction": share,
                           "check_time_sec": check_s}


def zip_columns(point: GridPoint, zip_path: Path, size: int, dense_bytes: int,
                settings: ZipSettings) -> dict:
    return {"zip_file_size": size / MB, "path": os.path.relpath(zip_path, settings.csv_dir),
            "zip_file_size_bytes": size, "sha256": sha256_of_file(zip_path),
            "compression_ratio": dense_bytes / size, "dense_size_bytes": dense_bytes}


def zip_point(point: GridPoint, pruned: dict, step: dict, dense_bytes: int,
              settings: ZipSettings) -> dict:
    """The pruned model streamed into its zip; the point's metadata row."""
    zip_path = settings.dump_dir / point.zip_relpath()
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    size = save_state_dict_zip(pruned, zip_path, settings.compress_level, settings.compressor,
                               settings.threads)
    return {**step, "zip_time_sec": time.perf_counter() - start,
            "actual_sparsity": zero_fraction(pruned),
            **zip_columns(point, zip_path, size, dense_bytes, settings)}


def copy_point(point: GridPoint, first: dict, dense_bytes: int, settings: ZipSettings) -> dict:
    """A point whose weights equal an earlier point's: its zip copied, not pruned again."""
    if "sha256" not in first:
        raise RuntimeError(f"not copied: its weights come from {first['path']}, which failed")
    zip_path = settings.dump_dir / point.zip_relpath()
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    size = copy_zip_renamed(settings.csv_dir / first["path"], zip_path)
    return {"step_time_sec": float("nan"), "mask_time_sec": float("nan"),
            "actual_sparsity": first["actual_sparsity"],
            "copied_from": first["path"],
            **zip_columns(point, zip_path, size, dense_bytes, settings)}


def prunes_on_workers(device: torch.device, workers: int) -> bool:
    """On a GPU with workers, the calling thread prunes (one step at a time on the device)
    and the workers only zip. On a CPU the workers take whole points."""
    return device.type != "cuda" or workers == 0


def summary(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns=["norm", "sparse_block_shape"],
                           values="zip_file_size")
    return table.to_string(float_format=lambda v: f"{v:.3f}") + "\n(zipped checkpoint, MB)"


def ensure_metadata(inputs: Inputs, output_dir: Path, device: str | None) -> None:
    """Another experiment's no-argument run without metadata: this experiment runs first."""
    if inputs.needs_disk_step:
        print(f"{inputs.metadata} not found: running the disk-savings step first", flush=True)
        main(["--output-dir", str(output_dir), "--model-path", str(inputs.demo_model)]
             + (["--device", device] if device else []))


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        levels = [parse_level(x) for x in args.sparsity_levels]
        norms = [parse_norm(x) for x in args.norms]
        shapes = [parse_block_shape(x) for x in args.block_shapes]
        points, left_out = build_grid(levels, norms, shapes, keep_l2_1x1=args.keep_l2_1x1)
        dump_dir = ensure_writable(Path(args.dump_path) if args.dump_path
                                   else run.output_dir / "sparsified_models", "dump folder")
        if run.is_main:
            remove_stale_temporaries(dump_dir, recursive=True)
            if left_out:
                print(f"skipping {', '.join(left_out)}: its masks equal L1 (1, 1)'s (|x| and "
                      "x*x rank alike); --keep-l2-1x1 runs it")
        run.ctx.barrier()
        model_path = args.model_path or str(ensure_demo().model)
        mapped = load_dlrm_state_dict(model_path, mmap=True)  # nothing read yet
        dense_bytes = tensor_bytes(mapped)
        large = dense_bytes > LARGE_MODEL_BYTES
        workers = (args.workers if args.workers is not None
                   else default_workers(dense_bytes, usable_cpus(), physical_memory()))
        model = hold_model(mapped, model_path, workers)
        del mapped  # with it goes the map of the file
        settings = ZipSettings(dump_dir, run.output_dir, args.compressor, args.compress_level,
                               deflate_threads(args.deflate_threads, model.dense_bytes))
        on_workers = prunes_on_workers(run.device, workers)
        zip_setup = {"compressor": compressor_label(args.compressor),
                     "compress_level": args.compress_level, "positive_zeros": args.positive_zeros,
                     "deflate_threads": settings.threads,
                     "mask_engine": args.mask_engine,
                     "stock_check": args.stock_check and args.mask_engine == MASK_ENGINE,
                     "whole_stock_check": args.stock_check and args.whole_stock_check}
        determinants = {"model_sha256": sha256_of_file(model_path), **zip_setup,
                        "dump_dir": os.path.relpath(dump_dir, run.output_dir)}
        threads = step_threads(on_workers, workers)
        fields = {"model_path": os.path.abspath(model_path),
                  "model_sha256": determinants["model_sha256"], **zip_setup, **run.environment(),
                  "num_threads": threads, "workers": workers}

        def item(point: GridPoint) -> Item:
            key = {"norm": point.norm, "sparse_block_shape": block_label(point.block_shape),
                   "sparsity_level": point.level}
            return Item({**key, **fields}, determinants, payload=point)

        def intact(_, tables: list[list[dict]]) -> bool:  # a kept row needs its zip as it was
            row = tables[0][0]
            zip_path = run.output_dir / str(row["path"])
            return zip_path.is_file() and sha256_of_file(zip_path) == row["sha256"]

        copies = shared_weights(points)
        pruned_points = [p for p in points if p not in copies]
        engines = GridEngines(pruned_points, keep_one=large)
        checked = stock_check_points(pruned_points) if args.stock_check else set()
        check_budget = None if args.whole_stock_check else model.dense_bytes

        def prune(it: Item):
            point = it.payload
            engine = engines(point) if args.mask_engine == MASK_ENGINE else None
            return prune_point(model, point, run.device, args.positive_zeros, engine,
                               engine is not None and point in checked, check_budget)

        def store(job) -> dict:
            return zip_point(*job, model.dense_bytes, settings)

        def describe(it: Item, rows: list[dict]) -> str:
            row = rows[0]
            times = [f"{what} {row[col]:.3f} s" for what, col in
                     (("stock step", "step_time_sec"), ("engine", "mask_time_sec"))
                     if row.get(col) == row.get(col)]  # not nan
            return (f"{it.payload.config} level {it.payload.level:g}: "
                    f"{row['zip_file_size']:.2f} MB, " + ", ".join(times))

        with torch_threads(threads):
            pruned = run.sweep(
                [item(p) for p in pruned_points],
                (lambda it: store(prune(it))) if on_workers else store,
                prepare=None if on_workers else prune, workers=workers, tables=[METADATA],
                label="pruning + zipping", still_valid=intact, describe=describe)
        firsts = {(r["norm"], r["sparse_block_shape"], r["sparsity_level"]): r
                  for r in pruned.tables[0]}
        copied = run.sweep(
            [item(p) for p in copies], lambda it: copy_point(
                it.payload, firsts[copies[it.payload].key], model.dense_bytes, settings),
            tables=[METADATA], label="copying shared weights", still_valid=intact,
            workers=min(workers, len(copies)))  # each copy is a file copy and a hash
        order = {p.key: i for i, p in enumerate(points)}
        rows = sorted(pruned.tables[0] + copied.tables[0], key=lambda r: order[
            (r["norm"], r["sparse_block_shape"], float(r["sparsity_level"]))])
        result = SweepResult([rows], pruned.kept + copied.kept,
                             pruned.failed + copied.failed, pruned.resume)
        run.finish(result, [METADATA], plot=(plot_disk_savings, "disk_savings.png"),
                   summary=summary)
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
