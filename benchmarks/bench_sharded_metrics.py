"""Sharded metrics against one process, side by side on the Kaggle-size model's tables.

Builds the random DLRM with Kaggle's 26 tables (bench_kaggle_size.py, 2.16 GB) and processed
data whose ids span every table, prunes it once (L1 1x4 at --levels), then scores the pruned
models with evaluate_model_metrics.py in one process and under torchrun with --shard-tables
(--ranks gloo processes on the CPU), alternating, --rounds times. Every process is on one
thread (torchrun's setting), and each reports its own peak resident memory. Prints each run,
the largest rank's peak over the single process's, the tables each rank held, and the largest
difference of any metric between the two runs. With --from-dcp, the pruned models are scored
from DCP folders that store every table in two row shards (as a job that sharded the tables
row-wise saves them) instead of from the zips.

    python benchmarks/bench_sharded_metrics.py --keep work/
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from bench_common import gib
from bench_kaggle_size import PEAK_WRAPPER, REPO, run_child, save_kaggle_model, write_test_data

METRICS = ["precision", "recall", "f1", "roc_auc", "accuracy", "log_loss", "average_precision"]
# each rank's own peak, in a file of its own (PEAK_WRAPPER's, per rank)
RANK_WRAPPER = PEAK_WRAPPER.replace('os.environ["BENCH_PEAK_FILE"]',
                                    'os.environ["BENCH_PEAK_FILE"] + os.environ["RANK"]')

# a pruned zip saved by DCP with every table in two row shards (a ShardedTensor needs a
# process group: one gloo rank)
TO_DCP = """
import os, sys, warnings, torch, torch.distributed as dist
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29613")
dist.init_process_group("gloo", rank=0, world_size=1)
import torch.distributed.checkpoint as dcp
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.layouts import read_layout

def in_two(table):
    two = sharded_tensor.empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"] * 2),
                               *table.shape)
    for shard in two.local_shards():
        first = shard.metadata.shard_offsets[0]
        shard.tensor.copy_(table[first:first + shard.tensor.shape[0]])
    return two

sd = load_dlrm_state_dict(sys.argv[1])
tables = set(read_layout(sd).tables)
dcp.save({k: in_two(v) if k in tables and v.shape[0] > 1 else v for k, v in sd.items()},
         checkpoint_id=sys.argv[2])
dist.destroy_process_group()
"""


def as_dcp_folders(pruned: Path) -> Path:
    """The disk step's metadata with each zip replaced by a DCP folder of it, every table in
    two row shards (made once per folder); the new metadata's path."""
    meta = pd.read_csv(pruned / "sparse_model_metadata.csv")
    folders = []
    for path in meta["path"]:
        folder = pruned / "dcp" / Path(path).stem
        if not (folder / ".metadata").is_file():
            subprocess.run([sys.executable, "-c", TO_DCP, str(pruned / path), str(folder),
                            str(REPO)], check=True)
        folders.append(str(folder))
    out = pruned / "dcp_metadata.csv"
    meta.assign(path=folders, sha256=float("nan")).to_csv(out, index=False)
    return out


def sharded_run(work: Path, args: list[str], ranks: int) -> tuple[float, list[int], str]:
    """evaluate_model_metrics.py under torchrun: wall seconds, each rank's peak RSS, and the
    line that describes the plan."""
    wrapper = work / "rank_peak.py"
    wrapper.write_text(RANK_WRAPPER)
    peaks = work / "peak.rank"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={ranks}", str(wrapper),
                           str(REPO / "evaluate_model_metrics.py"), *args, "--shard-tables"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "BENCH_PEAK_FILE": str(peaks)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the sharded run failed:\n{proc.stderr[-3000:]}")
    plan = next((line for line in proc.stdout.splitlines() if "tables sharded" in line), "")
    return wall, [int(Path(f"{peaks}{r}").read_text()) for r in range(ranks)], plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200_000,
                   help="processed samples (the test split is about 1/14 of them)")
    p.add_argument("--levels", nargs="+", default=["0.5", "0.9"],
                   help="L1 1x4 levels pruned (two models: the second is read while the "
                        "first is let go)")
    p.add_argument("--batch-size", type=int, default=2048, help="samples per forward pass")
    p.add_argument("--ranks", type=int, default=2, help="torchrun processes")
    p.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (and reuse)")
    p.add_argument("--from-dcp", action="store_true",
                   help="score DCP folders of the pruned models, tables in two row shards")
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_sharded_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun sets it for its ranks
    try:
        model = work / "kaggle_model.pt"
        model_bytes = save_kaggle_model(model)
        raw, processed = write_test_data(work, args.samples)
        pruned = work / f"pruned_{'_'.join(args.levels)}"
        if not (pruned / "sparse_model_metadata.csv").is_file():
            run_child([str(REPO / "evaluate_disk_savings.py"), "--model_path", str(model),
                       "--output-dir", str(pruned), "--norms", "L1", "--block-shapes", "1x4",
                       "--sparsity-levels", *args.levels, "--no-report"])
        metadata = (as_dcp_folders(pruned) if args.from_dcp
                    else pruned / "sparse_model_metadata.csv")
        common = ["--raw-data-file", str(raw), "--processed-data-file", str(processed),
                  "--sparse-model-metadata", str(metadata),
                  "--batch-size", str(args.batch_size), "--device", "cpu", "--no-report",
                  "--overwrite"]
        print(f"model: {gib(model_bytes)}, {len(args.levels)} pruned model(s)"
              f"{' as DCP folders, tables in two row shards' if args.from_dcp else ''}, "
              f"{args.ranks} ranks on gloo, one thread each")
        single_peaks, rank_peaks, frames = [], [], {}
        for r in range(args.rounds):
            for kind in (("single", "sharded") if r % 2 == 0 else ("sharded", "single")):
                out = work / kind
                shutil.rmtree(out, ignore_errors=True)
                run = [*common, "--output-dir", str(out)]
                if kind == "single":
                    wall, peak = run_child([str(REPO / "evaluate_model_metrics.py"), *run])
                    single_peaks.append(peak)
                    print(f"round {r + 1} single : {wall:6.1f} s, peak {gib(peak)}")
                else:
                    wall, peaks, plan = sharded_run(work, run, args.ranks)
                    rank_peaks.append(peaks)
                    print(f"round {r + 1} sharded: {wall:6.1f} s, peaks "
                          + ", ".join(gib(x) for x in peaks) + f"\n  {plan}")
                frames[kind] = pd.read_csv(out / "sparse_model_metrics.csv")
        worst = max(max(peaks) / single for peaks, single in zip(rank_peaks, single_peaks,
                                                                 strict=True))
        diff = (frames["single"][METRICS] - frames["sharded"][METRICS]).abs().max().max()
        print(f"largest rank's peak / single process's: {worst:.3f} (worst round); "
              f"largest rank's peak / model: {max(map(max, rank_peaks)) / model_bytes:.3f}")
        print(f"largest metric difference, sharded vs single: {diff:.3g} "
              f"over {len(frames['single'])} model(s), "
              f"{int(frames['single']['n_samples'].iloc[0])} test samples")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
