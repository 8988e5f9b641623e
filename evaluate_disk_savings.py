"""Experiment 1, disk savings: prune every embedding table over the grid, zip each checkpoint.

For each (norm, block shape, sparsity level) the stock DataNormSparsifier prunes every
emb_l.*.weight (one step, mask squashed); the model-only state dict is streamed into a deflated
zip under the dump path. sparse_model_metadata.csv records sizes, timings and paths (relative to
the CSV) for evaluate_model_metrics.py and evaluate_forward_time.py; disk_savings.png plots them.

With no arguments it runs on the built-in demo model (made on first use). Reruns resume: points
whose zip is present with the recorded sha256 are kept. Runs unchanged under torchrun.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from atomic_io import atomic_path, remove_stale_temporaries
from checkpoint_io import (COMPRESSORS, CheckpointTables, compressor_label, is_torch_archive,
                           load_dlrm_state_dict, save_state_dict_zip, sha256_of_file)
from cli_common import add_run_args, log_progress, make_parser, resolve_device, script_main
from distributed import DistContext
from dlrm_model import embedding_names
from errors import UserInputError
from plotting import plot_disk_savings
from results_io import METADATA_COLUMNS, ResumeState, environment, reusable, write_csv
from sparse_utils import (SEED_BLOCK_SHAPES, SEED_LEVELS, SEED_NORMS, GridPoint, block_label,
                          build_grid, make_zeros_positive, parse_block_shape, parse_level,
                          parse_norm, sparsify_embeddings, tensor_bytes, zero_fraction)

METADATA_CSV = "sparse_model_metadata.csv"
MB = 2**20  # the seed's MB
LARGE_MODEL_BYTES = 2**30  # above this, memory comes before overlap


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
                        "temporaries), so peak memory is about (1 + N) x the embeddings plus "
                        "the temporaries. 0: one point at a time, and for a model over 1 GiB "
                        "in a plain torch.save file the original tables are read from the "
                        "file as they are pruned instead of held (about 1x the embeddings "
                        "plus the temporaries). On a CPU with workers the step shares the "
                        "cores, so for clean step_time_sec figures use 0 or a GPU (default: "
                        "min(4, CPUs), or 0 for models over 1 GiB)")
    p.add_argument("--compressor", default="zlib-ng", choices=COMPRESSORS,
                   help="deflate implementation; both write standard zips. zlib is what "
                        "Python's zipfile uses (the seed's deflate); zlib-ng takes about two "
                        "thirds of its time, and its zips are up to about 6%% smaller at high "
                        "sparsity")
    p.add_argument("--compress-level", type=int, default=6, choices=range(10), metavar="0-9",
                   help="deflate level (6: the default of both, the seed's)")
    p.add_argument("--positive-zeros", action="store_true",
                   help="store pruned weights as +0.0 instead of the -0.0 the stock sparsifier "
                        "leaves for negative weights: the same model, but the sign bits no "
                        "longer cost disk (off by default, as the seed)")
    return p.parse_args(argv)


def grid_from_args(args) -> tuple[list[GridPoint], list[str]]:
    levels = [parse_level(x) for x in args.sparsity_levels]
    norms = [parse_norm(x) for x in args.norms]
    shapes = [parse_block_shape(x) for x in args.block_shapes]
    return build_grid(levels, norms, shapes, keep_l2_1x1=args.keep_l2_1x1)


def ensure_writable(folder: Path, what: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{folder}: cannot create the {what} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"{folder}: the {what} is not writable")
    return folder


def weights_digest(pruned: dict) -> bytes:
    """Fingerprint of the pruned embeddings (level 0.0 of every config, say, is the same)."""
    digest = hashlib.blake2b(digest_size=32)
    for name in embedding_names(pruned):
        digest.update(pruned[name].contiguous().numpy().data)
    return digest.digest()


def prunes_on_workers(device: torch.device, workers: int) -> bool:
    """On a GPU with workers, the calling thread prunes (one step at a time on the device)
    and the workers only zip. With 0 workers one thread does all, a point at a time."""
    return device.type != "cuda" or workers == 0


class Sweep:
    """Prunes and zips grid points, several at once, and records a row for each in grid order.

    On a CPU, worker threads take whole points (prune, then zip); on a GPU the calling thread
    prunes, so that the device runs one step at a time, and the workers zip. torch's kernels,
    zlib and zlib-ng release the GIL for the heavy parts, so the threads share the cores.
    """

    def __init__(self, state_dict, read_table, device, dump_dir: Path, csv_dir: Path,
                 workers: int, on_workers: bool, compressor: str, compress_level: int,
                 resume: ResumeState, extra: dict):
        self.sd, self.read_table = state_dict, read_table
        self.device, self.dump_dir, self.csv_dir = device, dump_dir, csv_dir
        self.workers, self.on_workers = workers, on_workers  # see prunes_on_workers
        self.resume, self.extra = resume, extra
        self.compressor, self.level = compressor, compress_level
        self.dense_bytes = tensor_bytes(state_dict)
        self.rows: list[dict] = []
        self.skipped = 0
        self.lock = threading.Lock()
        self.written: dict[bytes, tuple[Future, Path]] = {}  # weights digest -> first zip

    def reusable(self, point: GridPoint) -> dict | None:
        old = self.resume.lookup(point.key)
        if not reusable(old, self.extra, ("model_fingerprint", "compressor", "compress_level",
                                          "positive_zeros")):
            return None
        zip_path = self.dump_dir / point.zip_relpath()
        recorded = self.csv_dir / str(old.get("path"))
        if (recorded.resolve() != zip_path.resolve() or not zip_path.is_file()
                or sha256_of_file(zip_path) != old.get("sha256")):
            return None
        return old

    def prune(self, point: GridPoint) -> tuple[dict, float]:
        pruned, step_s = sparsify_embeddings(self.sd, point, self.device, self.read_table)
        if self.extra["positive_zeros"]:
            make_zeros_positive(pruned)
        return pruned, step_s

    def store(self, pruned: dict, zip_path: Path, step_s: float) -> dict:
        """Zip a pruned model; if an earlier point had the same weights, copy its zip instead.

        The first point with given weights registers a future before it compresses; a later
        one waits for that future, which is already running on another thread, then copies.
        """
        digest = weights_digest(pruned)
        with self.lock:
            first = self.written.get(digest)
            if first is None:
                mine: Future = Future()
                self.written[digest] = (mine, zip_path)
        if first is not None:
            result = first[0].result()
            with atomic_path(zip_path) as tmp:
                shutil.copyfile(first[1], tmp)
        else:
            try:
                size = save_state_dict_zip(pruned, zip_path, self.level, self.compressor)
                result = {"zip_file_size_bytes": size, "sha256": sha256_of_file(zip_path),
                          "actual_sparsity": zero_fraction(pruned)}
            except BaseException as exc:
                mine.set_exception(exc)
                raise
            mine.set_result(result)
        return {**result, "step_time_sec": step_s}

    def prune_and_store(self, point: GridPoint, zip_path: Path) -> dict:
        pruned, step_s = self.prune(point)
        return self.store(pruned, zip_path, step_s)

    def run(self, points: list[GridPoint], show_progress: bool) -> list[dict]:
        self.show_progress, self.total = show_progress, len(points)
        in_flight = max(1, self.workers)
        pending: deque = deque()
        with ThreadPoolExecutor(in_flight) as pool, \
                tqdm(total=len(points), desc="pruning + zipping", unit="model",
                     disable=None if show_progress else True) as bar:
            for point in points:
                old = self.reusable(point)
                if old is not None:
                    self.rows.append(old)
                    self.skipped += 1
                    bar.update()
                    continue
                zip_path = self.dump_dir / point.zip_relpath()
                zip_path.parent.mkdir(parents=True, exist_ok=True)
                if self.on_workers:
                    while len(pending) >= in_flight:
                        self._finish(*pending.popleft(), bar)
                    future = pool.submit(self.prune_and_store, point, zip_path)
                else:  # prune on the GPU while earlier points zip
                    pruned, step_s = self.prune(point)
                    while len(pending) >= in_flight:
                        self._finish(*pending.popleft(), bar)
                    future = pool.submit(self.store, pruned, zip_path, step_s)
                    del pruned
                pending.append((point, zip_path, future))
                if self.workers == 0:
                    self._finish(*pending.popleft(), bar)
            while pending:
                self._finish(*pending.popleft(), bar)
        return self.rows

    def _finish(self, point: GridPoint, zip_path: Path, future, bar) -> None:
        result = future.result()
        size, step_s = result["zip_file_size_bytes"], result["step_time_sec"]
        row = {"norm": point.norm, "sparse_block_shape": block_label(point.block_shape),
               "sparsity_level": point.level, "zip_file_size": size / MB,
               "path": os.path.relpath(zip_path, self.csv_dir), **result,
               "compression_ratio": self.dense_bytes / size,
               "dense_size_bytes": self.dense_bytes, **self.extra}
        self.resume.record(row)
        self.rows.append(row)
        bar.update()
        log_progress(self.show_progress, bar, len(self.rows), self.total,
                     f"{point.config} level {point.level:g}: "
                     f"{size / MB:.2f} MB, step {step_s:.3f} s")


def summary_table(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns=["norm", "sparse_block_shape"],
                           values="zip_file_size")
    return table.to_string(float_format=lambda v: f"{v:.3f}")


def default_workers(model_bytes: int) -> int:
    return 0 if model_bytes > LARGE_MODEL_BYTES else max(1, min(4, os.cpu_count() or 1))


def hold_model(mapped: dict, model_path: str, workers: int):
    """What the sweep keeps in memory: (state dict, table reader or None).

    Overlapped compression needs the original tables at hand, so they are read in. Without
    it, a large model's tables stay in the checkpoint file and each grid point reads them one
    at a time: the process then holds one pruned model and one table with the sparsifier's
    temporaries (several times that table), not the model twice.
    """
    if not is_torch_archive(model_path):  # a zip or legacy file: already read into memory
        return mapped, None
    if workers == 0 and tensor_bytes(mapped) > LARGE_MODEL_BYTES:
        tables = set(embedding_names(mapped))
        held = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if k in tables
                else v.clone() for k, v in mapped.items()}
        return held, CheckpointTables(model_path).read
    return {k: v.clone() for k, v in mapped.items()}, None  # read the mapped file in


def run_record(args, model_path: str, device: torch.device, workers: int) -> dict:
    """The columns every row gets: what the figures were measured on and with."""
    stat = os.stat(model_path)
    return {"model_path": os.path.abspath(model_path),
            "model_fingerprint": f"{stat.st_size}:{stat.st_mtime_ns}",
            "compressor": compressor_label(args.compressor),
            "compress_level": args.compress_level, "positive_zeros": args.positive_zeros,
            **environment(device),  # num_threads: the step's, as step_threads set it
            # on a CPU the step shares the cores with the other workers: see --workers
            "workers": workers,
            "command": args.command}


@contextmanager
def step_threads(on_workers: bool, workers: int):
    """When workers prune side by side, give each step an equal share of torch's threads."""
    threads = torch.get_num_threads()
    if on_workers and workers > 1:
        torch.set_num_threads(max(1, threads // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args, ctx: DistContext) -> int:
    """The whole experiment; returns the exit code. All ranks call it."""
    points, skipped_configs = grid_from_args(args)
    device = resolve_device(args.device)
    out_dir = ensure_writable(Path(args.output_dir), "output folder")
    dump_dir = ensure_writable(Path(args.dump_path) if args.dump_path
                               else out_dir / "sparsified_models", "dump folder")
    if ctx.is_main:  # before any rank writes: temporaries of a killed run are garbage
        for folder, deep in ((out_dir, False), (dump_dir, True)):
            remove_stale_temporaries(folder, recursive=deep)
    ctx.barrier()
    model_path = args.model_path
    if model_path is None:
        from demo import ensure_demo
        model_path = str(ensure_demo().model)
    mapped = load_dlrm_state_dict(model_path, mmap=True)  # nothing read yet
    workers = (args.workers if args.workers is not None
               else default_workers(tensor_bytes(mapped)))
    csv_path = out_dir / METADATA_CSV
    if ctx.is_main and skipped_configs:
        print(f"skipping {', '.join(skipped_configs)}: its masks equal L1 "
              f"{block_label((1, 1))}'s (|x| and x*x rank alike); --keep-l2-1x1 runs it")
    state_dict, read_table = hold_model(mapped, model_path, workers)
    del mapped  # with it goes the map of the file
    on_workers = prunes_on_workers(device, workers)
    with step_threads(on_workers, workers):
        sweep = Sweep(state_dict, read_table, device, dump_dir, out_dir, workers, on_workers,
                      args.compressor, args.compress_level,
                      ResumeState(csv_path, ctx.rank, args.overwrite),
                      run_record(args, model_path, device, workers))
        rows = ctx.gather(sweep.run(ctx.shard(points), show_progress=ctx.is_main))
    skipped = sum(ctx.gather([sweep.skipped]))
    if ctx.is_main:
        order = {p.key: i for i, p in enumerate(points)}
        rows.sort(key=lambda r: order[(r["norm"], r["sparse_block_shape"],
                                       float(r["sparsity_level"]))])
        df = write_csv(rows, csv_path, METADATA_COLUMNS)
        plot_disk_savings(df, out_dir / "disk_savings.png")
        sweep.resume.log.remove()
        if skipped:
            print(f"resumed: kept {skipped} finished point(s) of an earlier run "
                  "(--overwrite redoes them)")
        print(summary_table(df))
        print(f"wrote {csv_path} and {out_dir / 'disk_savings.png'} "
              f"({len(df)} models in {dump_dir})")
    ctx.barrier()
    return 0


def main(argv=None) -> None:
    script_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
