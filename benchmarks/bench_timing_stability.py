"""How far can the forward-time experiment's figures be trusted on a shared machine?

By default, the forward-time experiment runs twice on the demo's 60 pruned models: once on a
quiet machine, and once while a busy loop (started and stopped here, pinned to one core) takes
that core for part of the run. For each run it prints the dense forward's max/min over the 60
models (the same computation at every level, so the spread is the machine's), how many points
the drift guard measured again and how many it flagged; then how well the per-model
torch.sparse/dense ratios of the two runs agree (median |log(ratio_a / ratio_b)|).

With --allocator-modes it instead measures the same dense forward 8 times in a row in three
processes: glibc's dynamic mmap threshold; the threshold fixed at 64 MiB with trimming on; and
trimming off too, as the suite sets it (steady_cpu_allocator). Each prints its medians, their
spread ((max - min) / min) and its peak RSS; separate processes because a setting cannot be
undone.

    python benchmarks/bench_timing_stability.py
    python benchmarks/bench_timing_stability.py --allocator-modes
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import REPO_ROOT

REPEATS = 8
MODES = {"default": "glibc default", "threshold": "fixed threshold, trimming on",
         "steady": "fixed threshold, no trimming (the suite's)"}


def child(mode: str, min_run_time: float) -> None:
    from dlrm_forward_time import Dense, Timing, measure, steady_cpu_allocator
    from dlrm_sparsity.checkpoints import load_dlrm_state_dict
    from dlrm_sparsity.criteo.data import load_split
    from dlrm_sparsity.demo import ensure_demo
    from dlrm_sparsity.model import DLRMNet

    if mode == "steady":
        assert steady_cpu_allocator()
    if mode == "threshold":
        assert ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 64 * 2**20)  # M_MMAP
    paths = ensure_demo()
    batch = next(load_split(paths.processed, paths.raw, "test", limit=16384).batches(16384))
    model = DLRMNet.from_state_dict(load_dlrm_state_dict(paths.model)).eval()
    fn = Dense(model).on(batch)
    timing = Timing(torch.get_num_threads(), min_run_time)
    medians = [measure(fn, "dense", timing).median * 1e3
               for _ in range(REPEATS)]
    spread = (max(medians) - min(medians)) / min(medians)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{MODES[mode]:>40}: medians {' '.join(f'{m:.1f}' for m in medians)} ms, "
          f"spread {spread:.0%}, peak RSS {peak:.0f} MiB", flush=True)


BUSY_LOOP = ("import os, sys, time\n"
             "os.sched_setaffinity(0, {0})\n"
             "end = time.monotonic() + float(sys.argv[1])\n"
             "while time.monotonic() < end:\n    pass\n")


def forward_run(out: Path, metadata: Path, load: tuple[float, float] | None) -> pd.DataFrame:
    """evaluate_forward_time.py on the demo's models; with load=(after, seconds), a busy loop
    takes core 0 from `after` seconds into the run for `seconds` (it ends by itself)."""
    loop: list[subprocess.Popen] = []

    def start_load():
        time.sleep(load[0])
        loop.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(load[1])]))
    starter = threading.Thread(target=start_load) if load else None
    if starter:
        starter.start()
    try:
        subprocess.run([sys.executable, "evaluate_forward_time.py", "--output-dir", str(out),
                        "--sparse-model-metadata", str(metadata), "--no-report"],
                       check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    finally:
        if starter:
            starter.join()
            for p in loop:
                p.kill()
                p.wait()
    return pd.read_csv(out / "dlrm_forward_time_info.csv")


def report(name: str, df: pd.DataFrame) -> pd.Series:
    dense = df[df["dlrm_type"] == "without_torch_sparse"]
    sparse = df[df["dlrm_type"] == "with_torch_sparse"].set_index(
        ["norm", "sparse_block_shape", "sparsity_level"])
    spread = dense["time_median_s"].max() / dense["time_median_s"].min()
    print(f"{name:>6}: dense forward max/min over {len(dense)} models {spread:.3f}; guard: "
          f"{int(dense['measured_again'].sum())} point(s) measured again, "
          f"{int(dense['disturbed'].sum())} flagged; reference max/min "
          f"{dense['reference_s'].max() / dense['reference_s'].min():.3f}", flush=True)
    return sparse["ratio_median"]


def compare_runs(load_after: float, load_seconds: float) -> None:
    with tempfile.TemporaryDirectory(dir=REPO_ROOT) as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "evaluate_disk_savings.py", "--output-dir",
                        str(tmp / "disk"), "--no-report"], check=True, cwd=REPO_ROOT,
                       stdout=subprocess.DEVNULL)
        metadata = tmp / "disk" / "sparse_model_metadata.csv"
        print(f"the forward-time experiment on the demo, {torch.get_num_threads()} threads; "
              f"the loaded run has a busy loop on core 0 from {load_after:g} s for "
              f"{load_seconds:g} s", flush=True)
        quiet = report("quiet", forward_run(tmp / "quiet", metadata, None))
        loaded = report("loaded", forward_run(tmp / "loaded", metadata,
                                              (load_after, load_seconds)))
    agreement = np.abs(np.log(quiet / loaded.reindex(quiet.index)))
    print(f"torch.sparse/dense ratios, quiet vs loaded run: median |log(ratio_a / ratio_b)| "
          f"{agreement.median():.4f}, largest {agreement.max():.4f} over {len(agreement)} "
          "models")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="with --allocator-modes: seconds per measurement")
    p.add_argument("--allocator-modes", action="store_true",
                   help="compare the allocator settings instead of the two runs")
    p.add_argument("--load-after", type=float, default=20.0,
                   help="seconds into the loaded run when the busy loop starts")
    p.add_argument("--load-seconds", type=float, default=60.0,
                   help="how long the busy loop runs")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.min_run_time)
        return
    if not args.allocator_modes:
        compare_runs(args.load_after, args.load_seconds)
        return
    print(f"{REPEATS} medians of the demo's dense forward, {torch.get_num_threads()} threads")
    for mode in MODES:
        subprocess.run([sys.executable, __file__, "--child", mode, "--min-run-time",
                        str(args.min_run_time)], check=True, cwd=REPO_ROOT)


if __name__ == "__main__":
    main()
