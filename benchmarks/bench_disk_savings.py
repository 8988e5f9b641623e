"""Experiment 1 against a faithful re-creation of the seed's procedure, in one process.

The seed, per grid point: deep copy of the whole model, DataNormSparsifier over the embedding
parameters, torch.save of the state dict to disk, zip that file (deflate), delete it. This suite:
clone only the embedding tables, and prune and stream into the zip on worker threads, several
points at once. Both run on the same checkpoint and grid; this suite runs once per compressor
(zlib-ng, its default, and zlib, the one the seed's zipfile uses). The script checks that every
pair of checkpoints holds bit-identical embedding weights, then prints the wall-time ratio, the
ceiling that this suite's CPU time sets on this machine's cores, the zip sizes against the
seed's, and the peak memory of each.

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
from bench_common import Phase, gib, measured
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

import evaluate_disk_savings
from dlrm_sparsity.checkpoints import COMPRESSORS, load_state_dict
from dlrm_sparsity.model import DLRMNet
from sparse_utils import (
    SEED_LEVELS,
    GridPoint,
    build_grid,
    parse_block_shape,
    parse_level,
    parse_norm,
)


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


def run_ours(model_path: str, grid: list[str], out: Path, compressor: str,
             workers: int | None) -> Phase:
    with measured(f"ours, {compressor}") as phase:
        evaluate_disk_savings.main(
            ["--model-path", model_path, "--output-dir", str(out), "--device", "cpu",
             "--compressor", compressor, *grid]
            + (["--workers", str(workers)] if workers is not None else []))
    return phase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the demo model")
    p.add_argument("--sparsity-levels", nargs="+", default=[str(x) for x in SEED_LEVELS])
    p.add_argument("--norms", nargs="+", default=["L1", "L2"])
    p.add_argument("--block-shapes", nargs="+", default=["1x1", "1x4"])
    p.add_argument("--workers", type=int, default=None, help="this suite's --workers")
    p.add_argument("--compressors", nargs="+", default=list(COMPRESSORS), choices=COMPRESSORS,
                   help="run this suite once with each (default: both; zlib-ng is its default, "
                        "zlib deflates as the seed did)")
    args = p.parse_args()
    if args.model_path is None:
        from dlrm_sparsity.demo import ensure_demo
        args.model_path = str(ensure_demo().model)
    grid = ["--sparsity-levels", *args.sparsity_levels, "--norms", *args.norms,
            "--block-shapes", *args.block_shapes]
    points, _ = build_grid([parse_level(x) for x in args.sparsity_levels],
                           [parse_norm(x) for x in args.norms],
                           [parse_block_shape(x) for x in args.block_shapes])
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        model = DLRMNet.from_state_dict(load_state_dict(args.model_path))
        (tmp / "seed").mkdir()
        with measured("seed") as seed_phase:
            seed_paths = seed_procedure(model, points, tmp / "seed")
        del model
        runs = []
        for compressor in args.compressors:
            out = tmp / f"ours-{compressor}"
            phase = run_ours(args.model_path, grid, out, compressor, args.workers)
            dump = out / "sparsified_models"
            identical = all(same_embeddings(load_state_dict(seed_paths[pt.key]),
                                            load_state_dict(dump / pt.zip_relpath()))
                            for pt in points)
            size_ratios = [os.path.getsize(dump / pt.zip_relpath())
                           / os.path.getsize(seed_paths[pt.key]) for pt in points]
            runs.append((phase, identical, size_ratios))
    cores = len(os.sched_getaffinity(0))
    print(f"\n{len(points)} grid points, model file {gib(os.path.getsize(args.model_path))}, "
          f"{cores} cores, {threads} torch threads")
    for ph in [seed_phase] + [r[0] for r in runs]:
        print(f"{ph.name:>14}: {ph.wall_s:7.2f} s wall, {ph.cpu_s:7.2f} s CPU, peak RSS "
              f"{gib(ph.peak_rss_bytes)} (+{gib(ph.peak_growth_bytes)} over its start)")
    for phase, identical, size_ratios in runs:
        # the same CPU work cannot finish sooner than when spread evenly over every core
        ceiling = seed_phase.wall_s / (phase.cpu_s / cores)
        print(f"{phase.name}: speed-up {seed_phase.wall_s / phase.wall_s:.2f}x (seed wall / "
              f"ours wall; its CPU time allows at most {ceiling:.2f}x on {cores} cores); "
              f"embedding weights bit-identical in all {len(points)} checkpoints: {identical}; "
              f"zip size / the seed's zip: {min(size_ratios):.4f} to {max(size_ratios):.4f}")


if __name__ == "__main__":
    main()
