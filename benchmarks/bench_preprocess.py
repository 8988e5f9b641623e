"""Raw Criteo -> dlrm's processed files: throughput and peak memory, and the per-line loop.

Writes (or takes) a raw train.txt, builds the processed npz with dlrm_sparsity.criteo.preprocess,
and reports lines per second and peak resident memory. On the first --loop-lines lines it also
runs, side by side, a per-line Python loop with dlrm's semantics (what dlrm's data_utils does)
and checks both give the same arrays.

    python benchmarks/bench_preprocess.py --lines 2000000
    python benchmarks/bench_preprocess.py --raw train.txt          # the real Kaggle file
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import gib, measured

from dlrm_sparsity.criteo.preprocess import preprocess_raw
from dlrm_sparsity.criteo.synthetic import write_synthetic_raw


def per_line_loop(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dlrm's semantics one line at a time (empty -> 0, clip, ids by first appearance)."""
    ids = [{} for _ in range(26)]
    y, x_int, x_cat = [], [], []
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            y.append(int(fields[0]))
            x_int.append([max(int(v), 0) if v else 0 for v in fields[1:14]])
            x_cat.append([ids[c].setdefault(int(v, 16) if v else 0, len(ids[c]))
                          for c, v in enumerate(fields[14:])])
    return np.array(y), np.array(x_int), np.array(x_cat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default=None, help="an existing raw file (default: synthetic)")
    p.add_argument("--lines", type=int, default=2_000_000, help="synthetic lines to write")
    p.add_argument("--max-cardinality", type=int, default=10_000_000,
                   help="cap on synthetic distinct values per column (Kaggle's largest: 10.1 M)")
    p.add_argument("--loop-lines", type=int, default=200_000,
                   help="lines for the side-by-side per-line loop")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        raw = Path(args.raw) if args.raw else write_synthetic_raw(
            tmp / "train.txt", args.lines, seed=1, max_cardinality=args.max_cardinality)
        size = raw.stat().st_size
        with measured("vectorised") as full:
            report = preprocess_raw(raw, tmp / "processed.npz", show_progress=False)
        head = tmp / "head.txt"
        with open(raw, "rb") as src, open(head, "wb") as dst:
            for _, line in zip(range(args.loop_lines), src, strict=False):
                dst.write(line)
        start = time.perf_counter()
        ours = preprocess_raw(head, tmp / "head.npz", show_progress=False)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        y, x_int, x_cat = per_line_loop(head)
        loop_s = time.perf_counter() - start
        with np.load(tmp / "head.npz") as f:
            same = (np.array_equal(f["y"], y) and np.array_equal(f["X_int"], x_int)
                    and np.array_equal(f["X_cat"], x_cat))
    n = report.num_samples
    print(f"{n} lines ({size / 2**30:.2f} GiB), {int(report.counts.sum())} distinct ids, "
          f"{os.cpu_count()} CPUs")
    print(f"vectorised: {full.wall_s:.1f} s, {n / full.wall_s:,.0f} lines/s, "
          f"peak RSS {gib(full.peak_rss_bytes)}")
    print(f"first {ours.num_samples} lines: vectorised {ours_s:.2f} s, per-line loop "
          f"{loop_s:.2f} s: {loop_s / ours_s:.1f}x faster; same arrays: {same}")
    kaggle = 45_840_617
    print(f"at this rate the Kaggle file ({kaggle:,} lines) takes "
          f"{kaggle / (n / full.wall_s) / 60:.1f} min")


if __name__ == "__main__":
    main()
