"""The streamed disk step against the code before it, side by side on the Kaggle-size model.

Builds the random DLRM with Kaggle's 26 tables (bench_kaggle_size.py, 2.16 GB), checks out a
baseline commit (default: the last one that held each pruned model whole) into a git worktree,
and runs evaluate_disk_savings.py from both trees on the same model, alternating, each run a
child process timed with its peak resident memory. Per grid it prints each run, the median
ratios new / baseline, the peak as a share of the model, and whether every zip is the same
file (sha256) in both. Grids: L1 1x4 at 0.5 and 0.9 (--rounds, default 2), then L1 1x1 at 0.5
(--rounds-1x1, default 1), where the baseline's sort of one table sets its peak. For each grid
it also prints how many of the largest table's blocks equal each cut's value, and how many of
those the level zeroes: where that is some but not all, torch.sort's order of the ties says
which (the streamed engine replays it: tie_order.py).

    python benchmarks/bench_streaming.py --keep work/
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import gib
from bench_kaggle_size import REPO, run_child, save_kaggle_model

from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.mask_engine import block_norms

BASELINE = "bceaa9f"  # the disk step before streaming: each pruned model held whole


def ties_at_cuts(model: Path, norm: str, shape: str, levels: list[str]) -> str:
    """The largest table's blocks at each level's cut: how many equal the cut's value, and
    how many of those the level zeroes (the sort's tie order picks them)."""
    tables = {k: v for k, v in load_dlrm_state_dict(model, mmap=True).items()
              if k.startswith("emb_l.")}
    name = max(tables, key=lambda k: tables[k].numel())
    with torch.no_grad():
        norms = block_norms(tables[name], norm, tuple(int(x) for x in shape.split("x")))
    values = norms.numpy()
    parts = []
    for level in levels:
        k = round(float(level) * len(values))
        cut = np.partition(values, k - 1)[k - 1]
        below, equal = int((values < cut).sum()), int((values == cut).sum())
        parts.append(f"level {level}: {equal} equal the cut's value, {k - below} of them zeroed")
    return (f"  {name} ({tuple(tables[name].shape)}, {len(values):,} blocks at {norm} {shape}): "
            + "; ".join(parts))


def run_grid(tree: Path, model: Path, out: Path, norm: str, shape: str, levels: list[str]
             ) -> tuple[float, int, pd.DataFrame]:
    """One disk run from a source tree: wall seconds, peak RSS, its metadata."""
    shutil.rmtree(out, ignore_errors=True)
    wall, peak = run_child([str(tree / "evaluate_disk_savings.py"), "--model_path", str(model),
                            "--output-dir", str(out), "--norms", norm, "--block-shapes", shape,
                            "--sparsity-levels", *levels, "--no-report"], cwd=tree)
    df = pd.read_csv(out / "sparse_model_metadata.csv")
    return wall, peak, df


def compare(name: str, trees: dict[str, Path], model: Path, model_bytes: int, work: Path,
            grid: tuple[str, str, list[str]], rounds: int) -> None:
    """Both trees on one grid, alternating; each run's wall, its wall without the stock
    check (whose budget the trees set differently: the share checked is printed), its peak."""
    runs: dict[str, list[tuple[float, float, int]]] = {label: [] for label in trees}
    hashes: dict[str, pd.Series] = {}
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for label in order:
            wall, peak, df = run_grid(trees[label], model, work / f"out_{label}", *grid)
            check = float(df["step_time_sec"].fillna(0).sum() + df["check_time_sec"].fillna(0)
                          .sum())
            runs[label].append((wall, wall - check, peak))
            hashes[label] = df.set_index(["norm", "sparse_block_shape",
                                          "sparsity_level"])["sha256"].sort_index()
            print(f"  {name} round {r + 1} {label}: {wall:.1f} s ({wall - check:.1f} s "
                  f"without the stock check, which covered "
                  f"{df['stock_check_fraction'].max():.1%} of the weights), peak {gib(peak)} "
                  f"({peak / model_bytes:.3f}x the model)", flush=True)
    base, new = runs["baseline"], runs["streamed"]

    def ratios(i: int) -> list[float]:
        return [n[i] / b[i] for b, n in zip(base, new, strict=True)]

    same = hashes["baseline"].equals(hashes["streamed"])
    print(f"{name}: streamed / baseline: wall {statistics.median(ratios(0)):.3f} (rounds: "
          f"{', '.join(f'{x:.3f}' for x in ratios(0))}), without the stock check "
          f"{statistics.median(ratios(1)):.3f} (rounds: "
          f"{', '.join(f'{x:.3f}' for x in ratios(1))}), peak "
          f"{statistics.median(ratios(2)):.3f}; streamed peak "
          f"{max(p for *_, p in new) / model_bytes:.3f}x the model, baseline "
          f"{max(p for *_, p in base) / model_bytes:.3f}x; zips identical (sha256): "
          f"{'yes' if same else 'NO'} ({len(hashes['streamed'])} points)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help="commit to compare against")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the L1 1x4 grid")
    p.add_argument("--rounds-1x1", type=int, default=1, help="rounds of the L1 1x1 grid (0: "
                                                              "skip it)")
    p.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model = work / "kaggle.ckpt"
        model_bytes = save_kaggle_model(model)
        baseline = work / "baseline_tree"
        if not baseline.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline],
                           cwd=REPO, check=True, capture_output=True)
        trees = {"baseline": baseline, "streamed": REPO}
        print(f"model {gib(model_bytes)}; baseline {args.baseline}", flush=True)
        try:
            compare("L1 1x4 at 0.5, 0.9", trees, model, model_bytes, work,
                    ("L1", "1x4", ["0.5", "0.9"]), args.rounds)
            print(ties_at_cuts(model, "L1", "1x4", ["0.5", "0.9"]), flush=True)
            if args.rounds_1x1:
                compare("L1 1x1 at 0.5", trees, model, model_bytes, work,
                        ("L1", "1x1", ["0.5"]), args.rounds_1x1)
                print(ties_at_cuts(model, "L1", "1x1", ["0.5"]), flush=True)
        finally:
            if not args.keep:
                subprocess.run(["git", "worktree", "remove", "--force", str(baseline)],
                               cwd=REPO, capture_output=True)


if __name__ == "__main__":
    main()
