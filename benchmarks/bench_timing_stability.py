"""How stable are CPU forward timings, with and without the fixed mmap threshold?

The same dense forward of the demo model (first test batch, 16384 samples) is measured 8 times
in a row, once in a process that keeps glibc's dynamic mmap threshold and once in one that
fixes it as evaluate_forward_time.py does (steady_cpu_allocator). Each process prints its
medians; the spread is (max - min) / min. Two processes because the setting cannot be undone.

    python benchmarks/bench_timing_stability.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from bench_common import REPO_ROOT

REPEATS = 8


def child(steady: bool, min_run_time: float) -> None:
    from checkpoint_io import load_dlrm_state_dict
    from criteo_data import load_split
    from demo import ensure_demo
    from dlrm_forward_time import DENSE, forward_fn, measure, steady_cpu_allocator
    from dlrm_model import DLRMNet

    took = steady and steady_cpu_allocator()
    paths = ensure_demo()
    batch = next(load_split(paths.processed, paths.raw, "test", limit=16384).batches(16384))
    model = DLRMNet.from_state_dict(load_dlrm_state_dict(paths.model)).eval()
    fn = forward_fn(model, batch, DENSE)
    medians = [measure(fn, "dense", torch.device("cpu"), torch.get_num_threads(),
                       min_run_time).median_s * 1e3 for _ in range(REPEATS)]
    spread = (max(medians) - min(medians)) / min(medians)
    label = "fixed threshold" if took else "glibc default  "
    print(f"{label}: medians {' '.join(f'{m:.1f}' for m in medians)} ms, "
          f"spread {spread:.0%}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--child", choices=["steady", "default"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child == "steady", args.min_run_time)
        return
    print(f"{REPEATS} medians of the demo's dense forward, {torch.get_num_threads()} threads")
    for mode in ("default", "steady"):
        subprocess.run([sys.executable, __file__, "--child", mode, "--min-run-time",
                        str(args.min_run_time)], check=True, cwd=REPO_ROOT)


if __name__ == "__main__":
    main()
