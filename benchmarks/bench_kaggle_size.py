"""The seed's real size: a random DLRM with Kaggle's table sizes, through the experiments.

Builds a DLRM with dlrm's Kaggle configuration (26 tables, 33.8 M rows of width 16, 2.16 GB of
float32; bottom 13-512-256-64-16, top 367-512-256-1), saves it in dlrm's checkpoint layout,
writes processed data whose ids span every table, then runs the experiments on a reduced grid,
each as a child process whose wall time and peak resident memory are reported; the compression
front's per-method sizes, quality and lookup ratios are printed from its CSV.

    python benchmarks/bench_kaggle_size.py                     # levels 0 0.5 0.9 1, L1 1x4
    python benchmarks/bench_kaggle_size.py --keep work/         # keep the files afterwards
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import gib, measured

from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo.data import day_sizes
from dlrm_sparsity.criteo.synthetic import KAGGLE_CARDINALITIES
from dlrm_sparsity.model import DLRMConfig, DLRMNet
from dlrm_sparsity.training import save_dlrm_checkpoint

REPO = Path(__file__).resolve().parent.parent
KAGGLE = DLRMConfig(KAGGLE_CARDINALITIES, 16, (13, 512, 256, 64, 16), (367, 512, 256, 1))


def write_test_data(folder: Path, num_samples: int, seed: int = 0) -> tuple[Path, Path]:
    """A processed file (and its day-count file) with ids uniform over each full table."""
    rng = np.random.default_rng(seed)
    x_cat = np.stack([rng.integers(0, n, size=num_samples, dtype=np.int32)
                      for n in KAGGLE.table_sizes], axis=1)
    x_int = rng.integers(0, 1000, size=(num_samples, 13), dtype=np.int32)
    y = rng.integers(0, 2, size=num_samples, dtype=np.int32)
    processed = folder / "kaggleAdDisplayChallenge_processed.npz"
    np.savez(processed, X_int=x_int, X_cat=x_cat, y=y,
             counts=np.array(KAGGLE.table_sizes, dtype=np.int32))
    raw = folder / "train.txt"  # never read: it only locates train_day_count.npz
    np.savez_compressed(folder / "train_day_count.npz", total_per_file=day_sizes(num_samples))
    return raw, processed


def save_kaggle_model(path: Path) -> int:
    """The random Kaggle-size DLRM (seed 0) saved in dlrm's checkpoint layout; its bytes. A
    --keep folder's is kept: torch.save does not write the same bytes twice, and the disk
    step's metadata records the file's sha256."""
    if path.is_file():
        return sum(t.nbytes for t in load_dlrm_state_dict(path, mmap=True).values())
    torch.manual_seed(0)
    model = DLRMNet(KAGGLE)
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    save_dlrm_checkpoint(path, model, 0.0, 0.0, 0, 0)
    return model_bytes


# The floor under the disk-savings peak: the stock sparsifier on the largest table, alone.
STOCK_ON_ONE_TABLE = """
import sys, torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
table = torch.randn(int(sys.argv[1]), 16)
sparsifier = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L1")
sparsifier.add_data("table", table)
sparsifier.step()
sparsifier.squash_mask()
"""


# what --experiments names, and how the report labels it
LABELS = {"disk": "disk savings", "floor": "stock, 1 table", "metrics": "model metrics",
          "forward": "forward time", "memory": "memory savings",
          "activation": "activation sparsity", "compression": "compression front"}


# The child's own peak. wait4's ru_maxrss will not do: subprocess starts children with vfork
# on Linux, and exec carries the parent's high-water mark into the child's, so a child of a
# parent that once held a Kaggle-size model would report at least that. VmHWM belongs to the
# memory map exec makes; the children the script itself waits for are added by their maxrss.
PEAK_WRAPPER = """
import atexit, os, resource, runpy, sys
def report():
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ["BENCH_PEAK_FILE"], "w") as f:
        f.write(str(max(own, children) * 1024))
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(args: list[str], cwd: Path = REPO) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one script run as a child process (in cwd)."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak_file:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], cwd=cwd,
                              env={**os.environ, "BENCH_PEAK_FILE": peak_file.name})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{args[0]} failed")
        return wall, int(Path(peak_file.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=458_406,
                   help="processed samples (1%% of Kaggle; the test split is 1/14 of them)")
    p.add_argument("--sparsity-levels", nargs="+", default=["0.0", "0.5", "0.9", "1.0"])
    p.add_argument("--keep", default=None, help="work in this folder and keep it")
    p.add_argument("--experiments", nargs="+", choices=list(LABELS), default=list(LABELS),
                   help="what to run; floor: the stock sparsifier on the largest table alone")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(args.keep or tmp).resolve()  # the children run from the repo root
        work.mkdir(parents=True, exist_ok=True)
        with measured("build") as build:
            model_bytes = save_kaggle_model(work / "kaggle.ckpt")
            raw, processed = write_test_data(work, args.samples)
        embedding_bytes = sum(n * 16 * 4 for n in KAGGLE.table_sizes)
        largest = max(KAGGLE.table_sizes) * 16 * 4
        data = ["--raw-data-file", str(raw), "--processed-data-file", str(processed),
                "--output-dir", str(work / "out")]
        steps = {
            "disk": ["evaluate_disk_savings.py", "--model-path", str(work / "kaggle.ckpt"),
                     "--output-dir", str(work / "out"), "--norms", "L1",
                     "--block-shapes", "1x4", "--sparsity-levels", *args.sparsity_levels],
            "floor": ["-c", STOCK_ON_ONE_TABLE, str(max(KAGGLE.table_sizes))],
            "metrics": ["evaluate_model_metrics.py", *data],
            "forward": ["evaluate_forward_time.py", *data, "--stage-levels", "0.0", "1.0"],
            "memory": ["evaluate_memory_savings.py", *data, "--forward-levels", "1.0"],
            "activation": ["evaluate_activation_sparsity.py", *data, "--embedding-levels",
                           "--levels", "0.0", "0.5", "0.9", "0.99"],
            # after memory: its datanorm points are experiment 4's rows
            "compression": ["evaluate_compression.py", *data, "--levels", "0.5", "0.9"],
        }
        results = {LABELS[e]: run_child(steps[e]) for e in args.experiments}
        front_csv = work / "out" / "compression_front.csv"
        front = pd.read_csv(front_csv) if "compression" in args.experiments else None
    print(f"\nKaggle-sized DLRM: {sum(KAGGLE.table_sizes):,} rows, embeddings "
          f"{gib(embedding_bytes)}, model {gib(model_bytes)}; built and saved in "
          f"{build.wall_s:.0f} s; {os.cpu_count()} CPUs, "
          f"{len(args.sparsity_levels)} grid points (L1 1x4); the largest table is "
          f"{gib(largest)}")
    for name, (wall, peak) in results.items():
        print(f"{name:>14}: {wall:7.1f} s wall, peak RSS {gib(peak)} "
              f"({peak / model_bytes:.2f}x the model)")
    if front is not None:
        print("\ncompression front (bytes held / dense tables, zipped checkpoint, ROC AUC on "
              "random labels, lookups / dense):")
        for row in front.dropna(subset=["bytes"]).to_dict("records"):
            timed = (f", lookups {row['lookup_ratio']:.2f}x [{row['lookup_ratio_low']:.2f}, "
                     f"{row['lookup_ratio_high']:.2f}]" if pd.notna(row.get("lookup_ratio"))
                     else "")
            print(f"  {row['method']:>14} {row['setting']:<34} {row['bytes_ratio']:.3f}, "
                  f"zip {row['zip_file_size']:.0f} MB, AUC {row['roc_auc']:.4f}{timed}")


if __name__ == "__main__":
    main()
