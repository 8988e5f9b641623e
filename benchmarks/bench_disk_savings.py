"""Experiment 1 against a faithful re-creation of the seed's procedure, in one process.

The seed, per grid point: deep copy of the whole model, DataNormSparsifier over the embedding
parameters, torch.save of the state dict to disk, zip that file (deflate), delete it. This suite:
clone only the embedding tables, prune, stream into the zip on worker threads while the next
point is pruned. Both run on the same checkpoint and grid; the script checks that every pair of
checkpoints holds bit-identical embedding weights, then prints the wall-time ratio and the
peak memory of each.

    python benchmarks/bench_disk_savings.py              # the demo model, the seed's grid
    python benchmarks/bench_disk_savings.py --model-path criteo.ckpt --sparsity-levels 0 0.5
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import zipfile
from pathlib import Path

import torch
from bench_common import gib, measured
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

import evaluate_disk_savings
from checkpoint_io import load_state_dict
from dlrm_model import DLRMNet
from distributed import DistContext
from sparse_utils import SEED_LEVELS, GridPoint


def seed_procedure(model: DLRMNet, points: list[GridPoint], dump: Path) -> dict:
    """What the seed's evaluate_disk_savings.py does, step for step."""
    paths = {}
    for point in points:
        clone = copy.deepcopy(model)
        sparsifier = DataNormSparsifier(sparsity_level=point.level,
                                        sparse_block_shape=point.block_shape, norm=point.norm)
        for name, param in clone.named_parameters():
            if "emb_l" in name:
                sparsifier.add_data(name=name.replace(".", "_"), data=param)
        sparsifier.step()
        sparsifier.squash_mask()
        ckpt = dump / f"{point.norm}_{point.block_shape[0]}x{point.block_shape[1]}_" \
                      f"{point.level:g}.ckpt"
        torch.save(clone.state_dict(), ckpt)
        with zipfile.ZipFile(f"{ckpt}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(ckpt, ckpt.name)
        os.remove(ckpt)
        paths[point.key] = Path(f"{ckpt}.zip")
    return paths


def same_embeddings(a: dict, b: dict) -> bool:
    names = [k for k in a if k.startswith("emb_l")]
    return all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the demo model")
    p.add_argument("--sparsity-levels", nargs="+", default=[str(x) for x in SEED_LEVELS])
    p.add_argument("--norms", nargs="+", default=["L1", "L2"])
    p.add_argument("--block-shapes", nargs="+", default=["1x1", "1x4"])
    p.add_argument("--workers", type=int, default=None, help="this suite's compression threads")
    p.add_argument("--ours-threads", type=int, default=None,
                   help="torch threads for this suite's run only (the seed keeps the default), "
                        "to see what a step on fewer threads would save")
    args = p.parse_args()
    if args.model_path is None:
        from demo import ensure_demo
        args.model_path = str(ensure_demo().model)
    grid = ["--sparsity-levels", *args.sparsity_levels, "--norms", *args.norms,
            "--block-shapes", *args.block_shapes]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        ours_args = evaluate_disk_savings.parse_args(
            ["--model-path", args.model_path, "--output-dir", str(tmp / "ours"),
             "--device", "cpu", *grid] + (["--workers", str(args.workers)] if args.workers
                                          else []))
        ours_args.command = "benchmark"
        points, _ = evaluate_disk_savings.grid_from_args(ours_args)
        model = DLRMNet.from_state_dict(load_state_dict(args.model_path))
        (tmp / "seed").mkdir()
        with measured("seed") as seed_phase:
            seed_paths = seed_procedure(model, points, tmp / "seed")
        del model
        seed_threads = torch.get_num_threads()
        torch.set_num_threads(args.ours_threads or seed_threads)
        with measured("ours") as ours_phase:
            evaluate_disk_savings.run(ours_args, DistContext())
        torch.set_num_threads(seed_threads)
        dump = tmp / "ours" / "sparsified_models"
        identical = all(same_embeddings(load_state_dict(seed_paths[pt.key]),
                                        load_state_dict(dump / pt.zip_relpath()))
                        for pt in points)
    model_bytes = os.path.getsize(args.model_path)
    print(f"\n{len(points)} grid points, model file {gib(model_bytes)}, "
          f"{seed_threads} torch threads (ours {args.ours_threads or seed_threads}), "
          f"{os.cpu_count()} CPUs")
    for ph in (seed_phase, ours_phase):
        print(f"{ph.name:>5}: {ph.wall_s:7.2f} s wall, {ph.cpu_s:7.2f} s CPU, peak RSS "
              f"{gib(ph.peak_rss_bytes)} (+{gib(ph.peak_growth_bytes)} over its start)")
    print(f"speed-up (seed wall / ours wall): {seed_phase.wall_s / ours_phase.wall_s:.2f}x")
    # The same CPU work cannot finish faster than when it is spread evenly over every core.
    cores = len(os.sched_getaffinity(0))
    print(f"ceiling for ours' CPU work on {cores} cores (seed wall / (ours CPU / {cores})): "
          f"{seed_phase.wall_s / (ours_phase.cpu_s / cores):.2f}x")
    print(f"embedding weights bit-identical in all {len(points)} checkpoints: {identical}")


if __name__ == "__main__":
    main()
