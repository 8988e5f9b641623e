"""How stable are CPU forward timings, and what do they cost in memory, per allocator setting?

The same dense forward of the demo model (first test batch, 16384 samples) is measured 8 times
in a row in three processes: one keeps glibc's dynamic mmap threshold; one fixes the threshold at
64 MiB but keeps glibc's trimming; one also turns trimming off, as evaluate_forward_time.py
does (steady_cpu_allocator). Each prints its medians, their spread ((max - min) / min) and its
peak RSS. Separate processes because a setting cannot be undone.

    python benchmarks/bench_timing_stability.py
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import subprocess
import sys

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.min_run_time)
        return
    print(f"{REPEATS} medians of the demo's dense forward, {torch.get_num_threads()} threads")
    for mode in MODES:
        subprocess.run([sys.executable, __file__, "--child", mode, "--min-run-time",
                        str(args.min_run_time)], check=True, cwd=REPO_ROOT)


if __name__ == "__main__":
    main()
