"""How far can the forward-time experiment's figures be trusted on a shared machine, and what
does a run cost there?

By default the forward-time experiment runs three times on the demo's 60 pruned models, one
run after the other: on the machine as it is ("quiet"), beside a noisy neighbour ("noisy"), and
quiet again (a control: how far two runs on one machine agree with no neighbour). The
neighbour is a child process that, for the whole run, bursts on random cores at random times,
busy --duty of the time (started and stopped here); with --neighbour burst it is instead one
busy loop on core 0 from --load-after s for --load-seconds. Each run prints its wall time, the
noise it measured, the dense forward's max/min over the models, what the drift guard did and
the budget it spent. Then, side by side (noisy against quiet, and the control): the wall time;
how well the per-model torch.sparse/dense ratios agree (median |log(ratio_a / ratio_b)|); the
share of verdicts (faster / slower / not distinguishable) that agree, and the flips between
faster and slower; and whether the report's answer makes the same choices (figures masked).

--batch-size N times both runs at that batch (a small one puts torch.sparse near the dense
time, where verdicts are hard to make). The neighbour is benchmarks/noisy_neighbour.py, which
also times any command beside it (the README's first command in a fresh clone, say).

With --allocator-modes it measures the same dense forward 8 times in a row in three processes:
glibc's dynamic mmap threshold; the threshold fixed at 64 MiB with trimming on; and trimming
off too, as the suite sets it (steady_cpu_allocator). Each prints its medians, their spread
((max - min) / min) and its peak RSS; separate processes because a setting cannot be undone.

    python benchmarks/bench_timing_stability.py
    python benchmarks/bench_timing_stability.py --batch-size 1024
    python benchmarks/bench_timing_stability.py --allocator-modes
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import REPO_ROOT
from noisy_neighbour import neighbour

REPEATS = 8
MODES = {"default": "glibc default", "threshold": "fixed threshold, trimming on",
         "steady": "fixed threshold, no trimming (the suite's)"}
DENSE, SPARSE = "without_torch_sparse", "with_torch_sparse"


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


def forward_run(out: Path, metadata: Path, batch_size: int | None,
                flags: str = "") -> tuple[pd.DataFrame, float]:
    """evaluate_forward_time.py on the demo's models (a fresh run): its rows and wall time."""
    extra = (["--batch-size", str(batch_size)] if batch_size else []) + flags.split()
    start = time.perf_counter()
    subprocess.run([sys.executable, "evaluate_forward_time.py", "--output-dir", str(out),
                    "--sparse-model-metadata", str(metadata), "--no-report", "--overwrite",
                    *extra],
                   check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return pd.read_csv(out / "dlrm_forward_time_info.csv"), time.perf_counter() - start


def describe(name: str, df: pd.DataFrame, wall_s: float) -> None:
    dense = df[df["dlrm_type"] == DENSE]
    spread = dense["time_median_s"].max() / dense["time_median_s"].min()
    print(f"{name:>6}: wall {wall_s:.1f} s; machine noise +{dense['machine_noise_p90'].max():.1%}"
          f" (90th percentile), margin {dense['drift_margin'].max():.0%}; dense forward "
          f"max/min over {len(dense)} models {spread:.3f}; guard: "
          f"{int(dense['measured_again'].sum())} measured again, "
          f"{int(dense['disturbed'].sum())} flagged, "
          f"{int((~dense['guarded'].astype(bool)).sum())} unguarded; rounds per model "
          f"{dense['n_runs'].min()} to {dense['n_runs'].max()} (median "
          f"{dense['n_runs'].median():g}); the points' timing {dense['measure_s'].sum():.1f} s "
          f"and the guard's {dense['guard_s'].sum():.1f} s", flush=True)


MASKS = [(re.compile(r"\[[-\d.]+, [-\d.]+\]"), "[interval]"),
         (re.compile(r"[\d.]+ ms"), "N ms"), (re.compile(r"[\d.]+x"), "Nx"),
         (re.compile(r"machine noise \+[\d.]+%"), "machine noise +N%")]


def answer_choices(folder: Path) -> list[str]:
    """The report's answer with its timing figures masked: the choices it makes."""
    from dlrm_sparsity.report import write_report

    text = write_report(folder).read_text()
    answer = text.split("## The answer", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in answer.splitlines() if line.startswith("- ")]
    for pattern, mask in MASKS:
        lines = [pattern.sub(mask, line) for line in lines]
    return lines


def compare(quiet: pd.DataFrame, noisy: pd.DataFrame, walls: tuple[float, float],
            what: str = "noisy/quiet") -> None:
    keys = ["norm", "sparse_block_shape", "sparsity_level"]
    a = quiet[quiet["dlrm_type"] == SPARSE].set_index(keys)
    b = noisy[noisy["dlrm_type"] == SPARSE].set_index(keys).reindex(a.index)
    agreement = np.abs(np.log(a["ratio"] / b["ratio"]))
    same = a["ratio_verdict"] == b["ratio_verdict"]
    flips = ((a["ratio_verdict"] == "faster") & (b["ratio_verdict"] == "slower")) | \
        ((a["ratio_verdict"] == "slower") & (b["ratio_verdict"] == "faster"))
    counts = {k: int(v) for k, v in a["ratio_verdict"].value_counts().items()}
    print(f"{what}: wall time {walls[1] / walls[0]:.3f} (target <= 1.3); "
          f"torch.sparse/dense ratios agree to a median |log(ratio_a / ratio_b)| "
          f"{agreement.median():.4f} (target <= 0.1; largest {agreement.max():.4f}); verdicts "
          f"agree at {same.mean():.1%} of {len(same)} (target >= 95%; quiet run's verdicts "
          f"{counts}), {int(flips.sum())} flipped between faster and slower (target 0)",
          flush=True)


def compare_runs(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=REPO_ROOT) as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "evaluate_disk_savings.py", "--output-dir",
                        str(tmp / "disk"), "--no-report"], check=True, cwd=REPO_ROOT,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "evaluate_model_metrics.py", "--output-dir",
                        str(tmp / "disk"), "--no-report"], check=True, cwd=REPO_ROOT,
                       stdout=subprocess.DEVNULL)
        metadata = tmp / "disk" / "sparse_model_metadata.csv"
        loaded = (f"a noisy neighbour busy {args.duty:.0%} of the time on random cores"
                  if args.neighbour == "noisy" else f"a busy loop on core 0 from "
                  f"{args.load_after:g} s for {args.load_seconds:g} s")
        print(f"the forward-time experiment on the demo, {torch.get_num_threads()} threads, "
              f"batch {args.batch_size or 'the default'}; the noisy run beside {loaded}",
              flush=True)
        runs, walls, choices = {}, [], []
        plan = [("quiet", None), ("noisy", args.neighbour)] + (
            [("quiet again", None)] if args.control else [])
        for name, kind in plan:
            out = tmp / name.replace(" ", "_")
            out.mkdir(exist_ok=True)
            with neighbour(kind, args.duty, (args.load_after, args.load_seconds)):
                runs[name], wall = forward_run(out, metadata, args.batch_size, args.extra)
            describe(name, runs[name], wall)
            walls.append(wall)
            for csv in ("sparse_model_metadata.csv", "sparse_model_metrics.csv"):
                (out / csv).write_bytes((tmp / "disk" / csv).read_bytes())
            choices.append(answer_choices(out))
        compare(runs["quiet"], runs["noisy"], (walls[0], walls[1]))
        print("the report's answer makes the same choices in both runs" if choices[0] ==
              choices[1] else "the report's answers differ:\n  quiet: " +
              "\n  quiet: ".join(choices[0]) + "\n  noisy: " + "\n  noisy: ".join(choices[1]))
        if args.control:  # the same comparison between two quiet runs: the machine's own floor
            compare(runs["quiet"], runs["quiet again"], (walls[0], walls[2]),
                    "control, quiet again/quiet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neighbour", choices=("noisy", "burst"), default="noisy",
                   help="the loaded run's neighbour: random bursts for the whole run (default), "
                        "or one busy loop (--load-after, --load-seconds)")
    p.add_argument("--duty", type=float, default=0.3,
                   help="the share of the time the noisy neighbour is busy (default 0.3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="the timed batch of both runs (default: the experiment's)")
    p.add_argument("--load-after", type=float, default=20.0,
                   help="with --neighbour burst: seconds into the run when the loop starts")
    p.add_argument("--load-seconds", type=float, default=60.0,
                   help="with --neighbour burst: how long the loop runs")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the third run, quiet again, whose agreement with the first is "
                        "the machine's own floor")
    p.add_argument("--flags", dest="extra", default="",
                   help="more flags for both forward-time runs, as one string")
    p.add_argument("--keep", metavar="DIR", default=None,
                   help="keep the runs' folders here (default: a temporary folder)")
    p.add_argument("--allocator-modes", action="store_true",
                   help="compare the allocator settings instead of the two runs")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="with --allocator-modes: seconds per measurement")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 0 < args.duty < 1:
        p.error(f"--duty must be in (0, 1), got {args.duty}")
    if args.child:
        child(args.child, args.min_run_time)
    elif args.allocator_modes:
        print(f"{REPEATS} medians of the demo's dense forward, {torch.get_num_threads()} "
              "threads")
        for mode in MODES:
            subprocess.run([sys.executable, __file__, "--child", mode, "--min-run-time",
                            str(args.min_run_time)], check=True, cwd=REPO_ROOT)
    else:
        compare_runs(args)


if __name__ == "__main__":
    main()
