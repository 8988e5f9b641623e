"""DLRM v2 on the seed's p4d.24xlarge, budgeted from costs measured here, one core at a time.

Measures, on one thread of this machine:
  1. the disk step's cost per byte of embedding table at L1 1x4, levels 0.5 and 0.9: the
     sort-once engine's first levels and masks, and the zip (the suite's streamed writer with
     zlib-ng at level 6), on a 256 MiB table of width 128 drawn as DLRM's tables are initialised;
  2. the metrics' forward cost per sample of DLRM v2's model (TorchRec's DLRM_DCN: bottom
     13-512-256-128, 3 low-rank cross layers of rank 512, over arch 1024-1024-512-256-1, 26
     tables of width 128 with MLPerf's multi-hot bag sizes) in batches of 8192; its tables here
     have 100,000 rows, so the lookups hit the cache more than 40 M-row tables would.
Then prints the plan: the model's bytes, what a process holds, the time per grid point and for
the seed's 60 points on 48 cores, the zips' total from the Kaggle-size grid's zip-to-model
ratio, and the metrics' time on the test split. The arithmetic is in docs/scale.md.

    python benchmarks/bench_dlrm_v2_plan.py
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from dlrm_sparsity.checkpoints import save_state_dict_zip
from dlrm_sparsity.criteo.npy_write import MLPERF_BAG_SIZES
from dlrm_sparsity.layouts import TORCHREC
from dlrm_sparsity.mask_engine import SortOnceMasks
from dlrm_sparsity.model import DLRMConfig, DLRMNet

# MLPerf DLRM v2 (Criteo 1TB, multi-hot): rows per table, capped at 40 M, width 128
DLRM_V2_ROWS = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956,
                405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152,
                12973, 108, 36)
WIDTH = 128
TEST_SAMPLES = 89_137_319  # the second half of day 23 (178,274,637 samples)
P4D_CORES, P4D_RAM_GB, A100_GB = 48, 1152, 40  # 96 vCPUs; 8 x A100 40 GB
GRID_POINTS, PRUNED_POINTS = 60, 56  # levels 0 and 1 are pruned once and copied
KAGGLE_ZIPS_PER_MODEL = 41.2 / 2.01  # the Kaggle-size full grid: 41.2 GiB of zips, 2.01 GiB model


def per_byte_disk_costs(levels=(0.5, 0.9)) -> dict[float, tuple[float, float]]:
    """Seconds per table byte of the engine and of the zip, at each level, on one thread."""
    torch.manual_seed(0)
    rows = 256 * 2**20 // (WIDTH * 4)
    bound = math.sqrt(1 / rows)  # dlrm's uniform(-sqrt(1/n), sqrt(1/n))
    table = torch.empty(rows, WIDTH).uniform_(-bound, bound)
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            engine = SortOnceMasks("L1", (1, 4), list(levels))
            start = time.perf_counter()
            pruned = engine.pruned("t", table, level)
            engine_s = time.perf_counter() - start
            start = time.perf_counter()
            save_state_dict_zip({"t": pruned}, Path(tmp) / "t.zip", threads=1)
            zip_s = time.perf_counter() - start
            costs[level] = (engine_s / table.nbytes, zip_s / table.nbytes)
    return costs


def per_sample_forward_cost(batch: int = 8192, rounds: int = 3) -> float:
    """Seconds per sample of DLRM v2's forward on one thread (tables of 100,000 rows)."""
    torch.manual_seed(0)
    tables = len(DLRM_V2_ROWS)
    config = DLRMConfig((100_000,) * tables, WIDTH, (13, 512, 256, WIDTH),
                        ((tables + 1) * WIDTH, 1024, 1024, 512, 256, 1), layout=TORCHREC,
                        cross_layers=3, cross_rank=512)
    model = DLRMNet(config).eval()
    dense = torch.randn(batch, 13)
    indices = [torch.randint(0, 100_000, (batch * size,)) for size in MLPERF_BAG_SIZES]
    offsets = [torch.arange(0, batch * size, size) for size in MLPERF_BAG_SIZES]
    with torch.inference_mode():
        model(dense, offsets, indices)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(dense, offsets, indices)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / batch


def main() -> None:
    torch.set_num_threads(1)
    model_bytes = sum(DLRM_V2_ROWS) * WIDTH * 4
    largest = max(DLRM_V2_ROWS) * WIDTH * 4
    gb = 1e9
    costs = per_byte_disk_costs()
    forward = per_sample_forward_cost()
    print(f"DLRM v2: {sum(DLRM_V2_ROWS):,} rows x {WIDTH} = {model_bytes / gb:.1f} GB of "
          f"tables (largest {largest / gb:.1f} GB)")
    for level, (engine, zipped) in costs.items():
        print(f"measured, one thread, L1 1x4 at {level}: engine {engine * gb:.2f} s/GB, zip "
              f"{zipped * gb:.2f} s/GB")
    print(f"measured, one thread: forward {forward * 1e6:.1f} us/sample")
    per_point = {lv: model_bytes * (e + z) / P4D_CORES for lv, (e, z) in costs.items()}
    mean_point = sum(per_point.values()) / len(per_point)
    print(f"p4d disk step per point ({P4D_CORES} cores, perfect scaling): "
          + ", ".join(f"{lv}: {s / 60:.1f} min" for lv, s in per_point.items())
          + f"; {PRUNED_POINTS} pruned points at their mean: "
            f"{PRUNED_POINTS * mean_point / 3600:.1f} h")
    print(f"zips for the {GRID_POINTS} points, at the Kaggle grid's {KAGGLE_ZIPS_PER_MODEL:.1f}x "
          f"the model: {KAGGLE_ZIPS_PER_MODEL * model_bytes / 1e12:.2f} TB")
    print(f"metrics per point on the CPUs ({TEST_SAMPLES:,} test samples, {P4D_CORES} cores): "
          f"{TEST_SAMPLES * forward / P4D_CORES / 60:.1f} min; {GRID_POINTS} points: "
          f"{GRID_POINTS * TEST_SAMPLES * forward / P4D_CORES / 3600:.1f} h")
    print(f"the tables on the GPUs: {model_bytes / gb:.0f} GB over 8 x {A100_GB} GB = "
          f"{model_bytes / gb / 8:.1f} GB a GPU if sharded table-wise evenly; the largest "
          f"table alone is {largest / gb:.1f} GB")


if __name__ == "__main__":
    main()
