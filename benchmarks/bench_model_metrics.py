"""Experiment 2 against a faithful re-creation of the seed's procedure, in one process.

The seed, per model: unzip the checkpoint next to itself, load it, build the Criteo test set
again (the whole processed file read, dlrm-style per-sample items) behind a DataLoader with 7
workers, score batch by batch, compute the metrics and round them to 3 decimals. This suite:
the test split read once and kept as tensors, each zip read in memory, unrounded metrics.
Both score the same checkpoints; the script checks the unrounded metrics agree to 1e-9 and
prints the wall-time ratio.

    python benchmarks/bench_model_metrics.py            # the demo, the seed's 60-model grid
"""

from __future__ import annotations

import argparse
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import measured

import evaluate_disk_savings
import evaluate_model_metrics
from dlrm_sparsity.evaluation import quality_metrics
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.runner.outputs import read_metadata

SEED_WORKERS = 7
SEED_BATCH = 16384


class SeedTestSet(torch.utils.data.Dataset):
    """dlrm's CriteoDataset(split="test") as the seed used it: read everything, keep the test."""

    def __init__(self, processed: str, raw: str):
        raw = Path(raw)
        with np.load(raw.parent / f"{raw.stem}_day_count.npz") as f:
            total_per_file = f["total_per_file"]
        with np.load(processed) as data:
            x_int, x_cat, y = data["X_int"], data["X_cat"], data["y"]
        days = np.array_split(np.arange(len(y)), np.cumsum(total_per_file)[:-1])
        test = np.array_split(days[-1], 2)[0]
        self.x_int, self.x_cat, self.y = x_int[test], x_cat[test], y[test]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x_int[i], self.x_cat[i], self.y[i]


def seed_collate(items):
    """dlrm's collate_wrapper_criteo_offset."""
    x_int, x_cat, y = (np.stack(col) for col in zip(*items, strict=True))
    dense = torch.log(torch.tensor(x_int, dtype=torch.float) + 1)
    cat = torch.tensor(x_cat, dtype=torch.long)
    offsets = torch.stack([torch.arange(cat.shape[0]) for _ in range(cat.shape[1])])
    return dense, offsets, cat.t().contiguous(), torch.tensor(y, dtype=torch.float32)


def seed_procedure(metadata: pd.DataFrame, processed: str, raw: str) -> list[dict]:
    rows = []
    for zip_path in metadata["checkpoint"]:
        folder = Path(zip_path).parent
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(folder)
        name = f"{Path(zip_path).stem}.ckpt"  # what the seed's script loads after extracting
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        model = DLRMNet.from_state_dict(state).eval()
        loader = torch.utils.data.DataLoader(SeedTestSet(processed, raw), batch_size=SEED_BATCH,
                                             num_workers=SEED_WORKERS, collate_fn=seed_collate)
        scores, labels = [], []
        with torch.no_grad():
            for dense, offsets, indices, y in loader:
                scores.append(model(dense, offsets, indices).view(-1).numpy())
                labels.append(y.numpy())
        os.remove(folder / name)
        exact = quality_metrics(np.concatenate(labels), np.concatenate(scores).astype(np.float64))
        rows.append({"exact": exact, "rounded": {k: round(v, 3) for k, v in exact.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity-levels", nargs="+", default=None,
                   help="a smaller grid (default: the seed's)")
    args = p.parse_args()
    from dlrm_sparsity.demo import ensure_demo
    demo = ensure_demo()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        grid = ["--sparsity-levels", *args.sparsity_levels] if args.sparsity_levels else []
        evaluate_disk_savings.main(["--output-dir", tmp, "--device", "cpu", *grid])
        metadata = read_metadata(Path(tmp) / "sparse_model_metadata.csv")
        with measured("seed") as seed_phase:
            seed_rows = seed_procedure(metadata, str(demo.processed), str(demo.raw))
        with measured("ours") as ours_phase:
            evaluate_model_metrics.main(["--output-dir", tmp, "--device", "cpu"])
        ours = pd.read_csv(Path(tmp) / "sparse_model_metrics.csv")
    keys = ["precision", "recall", "f1", "roc_auc", "accuracy", "log_loss"]
    worst = max(abs(ours[k][i] - row["exact"][k]) for i, row in enumerate(seed_rows)
                for k in keys)
    print(f"\n{len(metadata)} models, {int(ours['n_samples'][0])} test samples, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    for ph in (seed_phase, ours_phase):
        print(f"{ph.name:>5}: {ph.wall_s:7.2f} s wall")
    print(f"speed-up (seed wall / ours wall): {seed_phase.wall_s / ours_phase.wall_s:.2f}x")
    print(f"largest difference of the unrounded metrics: {worst:.2e} "
          f"({'within' if worst <= 1e-9 else 'NOT within'} 1e-9)")


if __name__ == "__main__":
    main()
