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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from atomic_io import atomic_path, remove_stale_temporaries
from checkpoint_io import (CheckpointTables, is_torch_archive, load_dlrm_state_dict,
                           save_state_dict_zip, sha256_of_file)
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
                   help="compression threads working while the next point is pruned; each "
                        "holds one pruned copy of the embeddings, so peak memory is about "
                        "(2 + N) x the embeddings plus the sparsifier's temporaries; 0 compresses "
                        "on the main thread without overlap and, for a model over 1 GiB in a "
                        "plain torch.save file, reads the original tables from the file one at "
                        "a time instead of holding them (about 1x the embeddings plus the "
                        "temporaries) (default: min(4, CPUs), or 0 for models over 1 GiB); on a "
                        "CPU the sparsifier's step shares the cores with them, so for clean "
                        "step_time_sec figures use 0 or a GPU")
    p.add_argument("--compress-level", type=int, default=6, choices=range(10), metavar="0-9",
                   help="deflate level (6: zlib's default, the seed's)")
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


def compress_point(pruned: dict, zip_path: Path, level: int) -> dict:
    """Runs on a worker thread: zlib and torch.save release the GIL for the heavy parts."""
    size = save_state_dict_zip(pruned, zip_path, compresslevel=level)
    return {"zip_file_size_bytes": size, "sha256": sha256_of_file(zip_path),
            "actual_sparsity": zero_fraction(pruned)}


def copy_point(original, original_zip: Path, zip_path: Path) -> dict:
    """Same weights as an earlier point, so the same bytes: copy its zip, don't recompress.

    Runs on a worker after `original` (submitted earlier to the same FIFO pool) has finished.
    """
    result = original.result()
    with atomic_path(zip_path) as tmp:
        shutil.copyfile(original_zip, tmp)
    return dict(result)


def weights_digest(pruned: dict) -> bytes:
    """Fingerprint of the pruned embeddings (level 0.0 of every config, say, is the same)."""
    digest = hashlib.blake2b(digest_size=32)
    for name in embedding_names(pruned):
        digest.update(pruned[name].contiguous().numpy().data)
    return digest.digest()


class Sweep:
    """Prunes grid points on the calling thread while earlier points compress on workers."""

    def __init__(self, state_dict, read_table, device, dump_dir: Path, csv_dir: Path,
                 workers: int, compress_level: int, resume: ResumeState, extra: dict):
        self.sd, self.read_table = state_dict, read_table
        self.device, self.dump_dir, self.csv_dir = device, dump_dir, csv_dir
        self.workers, self.level, self.resume, self.extra = workers, compress_level, resume, extra
        self.dense_bytes = tensor_bytes(state_dict)
        self.rows: list[dict] = []
        self.skipped = 0
        self.written: dict[bytes, tuple] = {}  # weights digest -> (future, zip) of this run

    def reusable(self, point: GridPoint) -> dict | None:
        old = self.resume.lookup(point.key)
        if not reusable(old, self.extra, ("model_fingerprint", "compress_level",
                                          "positive_zeros")):
            return None
        zip_path = self.dump_dir / point.zip_relpath()
        recorded = self.csv_dir / str(old.get("path"))
        if (recorded.resolve() != zip_path.resolve() or not zip_path.is_file()
                or sha256_of_file(zip_path) != old.get("sha256")):
            return None
        return old

    def run(self, points: list[GridPoint], show_progress: bool) -> list[dict]:
        self.show_progress, self.total = show_progress, len(points)
        pending: deque = deque()
        with ThreadPoolExecutor(max(1, self.workers)) as pool, \
                tqdm(total=len(points), desc="pruning + zipping", unit="model",
                     disable=None if show_progress else True) as bar:
            for point in points:
                old = self.reusable(point)
                if old is not None:
                    self.rows.append(old)
                    self.skipped += 1
                    bar.update()
                    continue
                pruned, step_s = sparsify_embeddings(self.sd, point, self.device,
                                                     self.read_table)
                if self.extra["positive_zeros"]:
                    make_zeros_positive(pruned)
                zip_path = self.dump_dir / point.zip_relpath()
                zip_path.parent.mkdir(parents=True, exist_ok=True)
                digest = weights_digest(pruned)
                # at most `workers` points compressing while this one was pruned: the copies
                # of the embeddings held never exceed workers + 1
                while pending and len(pending) >= self.workers:
                    self._finish(*pending.popleft(), bar)
                if digest in self.written:
                    future = pool.submit(copy_point, *self.written[digest], zip_path)
                else:
                    future = pool.submit(compress_point, pruned, zip_path, self.level)
                    self.written[digest] = (future, zip_path)
                pending.append((point, step_s, zip_path, future))
                del pruned
                if self.workers == 0:  # no overlap: one pruned copy at a time
                    self._finish(*pending.popleft(), bar)
            while pending:
                self._finish(*pending.popleft(), bar)
        return self.rows

    def _finish(self, point: GridPoint, step_s: float, zip_path: Path, future, bar) -> None:
        result = future.result()
        size = result["zip_file_size_bytes"]
        row = {"norm": point.norm, "sparse_block_shape": block_label(point.block_shape),
               "sparsity_level": point.level, "step_time_sec": step_s,
               "zip_file_size": size / MB,
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
    stat = os.stat(model_path)
    extra = {"model_path": os.path.abspath(model_path),
             "model_fingerprint": f"{stat.st_size}:{stat.st_mtime_ns}",
             "compress_level": args.compress_level, "positive_zeros": args.positive_zeros,
             **environment(device),
             # on a CPU the step shares the cores with these threads: see --workers
             "compress_workers": workers,
             "command": args.command}
    csv_path = out_dir / METADATA_CSV
    if ctx.is_main and skipped_configs:
        print(f"skipping {', '.join(skipped_configs)}: its masks equal L1 "
              f"{block_label((1, 1))}'s (|x| and x*x rank alike); --keep-l2-1x1 runs it")
    state_dict, read_table = hold_model(mapped, model_path, workers)
    del mapped
    sweep = Sweep(state_dict, read_table, device, dump_dir, out_dir, workers,
                  args.compress_level, ResumeState(csv_path, ctx.rank, args.overwrite), extra)
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
