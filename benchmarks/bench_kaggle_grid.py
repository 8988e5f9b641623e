"""The Kaggle-size model's disk-savings grid: the sort-once engine and threaded deflate vs stock.

Builds the random DLRM with Kaggle's 26 tables (bench_kaggle_size.py), then runs
evaluate_disk_savings.py as child processes, each timed with its peak resident memory:
  1. side by side on a few points of one config (default L1 1x4 at 0.5 and 0.9): the stock
     sparsifier with one-thread deflate (the seed's way, `--mask-engine stock
     --deflate-threads 1`), the defaults (sort-once, stock check at the first point, deflate
     on every CPU), and the defaults without the stock check; the embedding weights of every
     zip are compared with the stock run's, bit for bit, and the zip sizes with its sizes;
  2. the seed's full grid (20 levels x L1 1x1, L1 1x4, L2 1x4) with the defaults;
  3. with --compare-workers N M ...: the points of --compare-levels (config L1 1x4) with
     `--workers N`, then M, ..., one run after the other (on a machine with the cores for
     more than one point in flight).
Each part prints its figures as soon as it ends.

    python benchmarks/bench_kaggle_grid.py                 # parts 1 and 2
    python benchmarks/bench_kaggle_grid.py --no-full-grid  # the side-by-side part only
    python benchmarks/bench_kaggle_grid.py --no-side-by-side  # the full grid only
    python benchmarks/bench_kaggle_grid.py --no-side-by-side --compare-workers 2 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from bench_common import gib, measured
from bench_kaggle_size import run_child, save_kaggle_model

from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.model import embedding_names


def same_weights(a: Path, b: Path) -> bool:
    """Every embedding table of two zips equal to the bit."""
    left, right = load_state_dict(a), load_state_dict(b)
    return all(torch.equal(left[n].view(torch.int32), right[n].view(torch.int32))
               for n in embedding_names(left))


def where_the_time_went(df: pd.DataFrame) -> str:
    """The stock check's steps and the rest of the check (its copies, its engine run on the
    checked rows, its comparison), the engine (its sorts and masks) and the zips, in seconds."""
    checked = df[df["stock_checked"].eq(True)]  # copied points have no value there
    share = (f" on {checked['stock_check_fraction'].min():.0%} of the weights"
             if len(checked) else "")
    rest = (f" (and {df['check_time_sec'].sum():.1f} s of the check beside them)"
            if "check_time_sec" in df else "")
    return (f"stock steps {df['step_time_sec'].sum():.1f} s{share}{rest}, engine "
            f"{df['mask_time_sec'].sum():.1f} s, zips {df['zip_time_sec'].sum():.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", default=["0.5", "0.9"],
                   help="levels of the side-by-side part (config L1 1x4)")
    p.add_argument("--no-full-grid", dest="full_grid", action="store_false")
    p.add_argument("--no-side-by-side", dest="side_by_side", action="store_false")
    p.add_argument("--compare-workers", nargs="+", type=int, default=[], metavar="N",
                   help="also run the --compare-levels points once with each --workers N")
    p.add_argument("--compare-levels", nargs="+",
                   default=["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9",
                            "0.91", "0.92", "0.93"],
                   help="levels of the worker comparison (config L1 1x4; default: 12)")
    p.add_argument("--keep", default=None, help="work in this folder and keep it")
    p.add_argument("--keep-zips", action="store_true",
                   help="keep each run's zips (the full grid's come to about 45 GB); by "
                        "default they are deleted once the run's figures are printed")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        with measured("build") as build:
            model_bytes = save_kaggle_model(work / "kaggle.ckpt")
        print(f"built and saved in {build.wall_s:.0f} s\nKaggle-sized DLRM: model "
              f"{gib(model_bytes)}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
        base = ["evaluate_disk_savings.py", "--model-path", str(work / "kaggle.ckpt"),
                "--no-report"]

        def run(name: str, flags: list[str]) -> tuple[float, int, pd.DataFrame, Path]:
            out = work / name
            wall, peak = run_child([*base, *flags, "--output-dir", str(out)])
            return wall, peak, pd.read_csv(out / "sparse_model_metadata.csv"), out

        def done(*outs: Path) -> None:
            for out in outs if not args.keep_zips else ():
                shutil.rmtree(out / "sparsified_models", ignore_errors=True)

        if args.side_by_side:
            done(*side_by_side(run, args.levels, model_bytes))
        if args.full_grid:
            wall, peak, full, out = run("full", [])
            done(out)
            ok = full["sha256"].notna().sum()
            print(f"full grid: {len(full)} points ({ok} zipped or copied) in {wall:.0f} s "
                  f"({wall / 60:.1f} min), peak RSS {gib(peak)} "
                  f"({peak / model_bytes:.2f}x the model)\n    {where_the_time_went(full)}",
                  flush=True)
        if args.compare_workers:
            compare_workers(run, done, args.compare_workers, args.compare_levels, model_bytes)


def l1_1x4(levels: list[str]) -> list[str]:
    """The flags of a few points of config L1 1x4, as both comparisons run them."""
    return ["--norms", "L1", "--block-shapes", "1x4", "--sparsity-levels", *levels]


def side_by_side(run, levels: list[str], model_bytes: int) -> list[Path]:
    """Stock with one-thread deflate, the defaults and the defaults without the check; the
    runs' folders."""
    few = l1_1x4(levels)
    runs = {"stock, 1-thread deflate": ["--mask-engine", "stock", "--deflate-threads", "1"],
            "sort-once + stock check, threaded deflate (defaults)": [],
            "sort-once, no stock check, threaded deflate": ["--no-stock-check"]}
    results = {name: run(f"side{i}", [*few, *flags])
               for i, (name, flags) in enumerate(runs.items())}
    stock_wall, _, stock_df, stock_out = results[list(runs)[0]]
    print(f"side by side, L1 (1, 4) at levels {', '.join(levels)}:")
    for name, (wall, peak, df, out) in results.items():
        identical = all(same_weights(stock_out / a, out / b)
                        for a, b in zip(stock_df["path"], df["path"], strict=True))
        sizes = df["zip_file_size_bytes"] / stock_df["zip_file_size_bytes"]
        print(f"  {name}: {wall:.1f} s ({stock_wall / wall:.2f}x faster than stock), peak "
              f"RSS {gib(peak)} ({peak / model_bytes:.2f}x the model); zip sizes "
              f"{sizes.min():.5f}-{sizes.max():.5f} of stock's; weights "
              f"{'bit-identical to' if identical else 'DIFFERENT from'} stock's")
        print(f"    {where_the_time_went(df)} (sums over the points)", flush=True)
    return [out for *_, out in results.values()]


def compare_workers(run, done, counts: list[int], levels: list[str], model_bytes: int) -> None:
    """The same points with each worker count, one run after another; same zips expected."""
    few = l1_1x4(levels)
    print(f"worker counts, L1 (1, 4) at {len(levels)} levels ({levels[0]}-{levels[-1]}):")
    first = None
    for n in counts:
        wall, peak, df, out = run(f"workers{n}", [*few, "--workers", str(n)])
        done(out)
        first = first or (wall, df)
        same = list(df["sha256"]) == list(first[1]["sha256"])
        print(f"  --workers {n} ({df['deflate_threads'].iloc[0]} deflate threads): "
              f"{wall:.1f} s ({first[0] / wall:.2f}x the first), peak RSS {gib(peak)} "
              f"({peak / model_bytes:.2f}x the model); zips "
              f"{'the same as' if same else 'DIFFERENT from'} the first run's\n"
              f"    {where_the_time_went(df)} (sums over the points)", flush=True)

if __name__ == "__main__":
    main()
