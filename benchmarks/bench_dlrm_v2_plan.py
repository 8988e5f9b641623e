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
import shutil
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import bench_common  # noqa: F401 (puts the suite on the path)
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


def per_byte_disk_costs(levels=(0.5, 0.9)) -> dict[str, float]:
    """Seconds per table byte on one thread: the engine's cuts at 1x1 and at 1x4 blocks (once
    per table and config), its mask at each level and the zip of each pruned table (per
    point), at L1."""
    torch.manual_seed(0)
    rows = 256 * 2**20 // (WIDTH * 4)
    bound = math.sqrt(1 / rows)  # dlrm's uniform(-sqrt(1/n), sqrt(1/n))
    table = torch.empty(rows, WIDTH).uniform_(-bound, bound)
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for blocks in ((1, 1), (1, 4)):
            engine = SortOnceMasks("L1", blocks, list(levels), spill_to=Path(tmp))
            start = time.perf_counter()  # as the disk step: tied averages ordered in a file
            engine.first_levels_of("t", lambda: table)
            costs[f"cuts {blocks[0]}x{blocks[1]}"] = (time.perf_counter() - start) / table.nbytes
            for level in levels:
                start = time.perf_counter()
                pruned = engine.pruned("t", table, level)
                costs[f"mask {blocks[0]}x{blocks[1]} at {level}"] = (
                    time.perf_counter() - start) / table.nbytes
                start = time.perf_counter()
                save_state_dict_zip({"t": pruned}, Path(tmp) / "t.zip", threads=1)
                costs[f"zip {blocks[0]}x{blocks[1]} at {level}"] = (
                    time.perf_counter() - start) / table.nbytes
        start = time.perf_counter()  # what the metrics do with a model larger than memory
        with zipfile.ZipFile(Path(tmp) / "t.zip") as zf, zf.open(zf.namelist()[0]) as src, \
                open(Path(tmp) / "t.inflated", "wb") as out:
            shutil.copyfileobj(src, out, 16 * 2**20)
        costs["inflate"] = (time.perf_counter() - start) / table.nbytes
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
    print("measured, one thread, s/GB of tables: "
          + ", ".join(f"{k} {v * gb:.2f}" for k, v in costs.items()))
    print(f"measured, one thread: forward {forward * 1e6:.1f} us/sample")
    point = {b: statistics.mean(v for k, v in costs.items() if k.startswith(("mask " + b,
                                                                             "zip " + b)))
             * 2 for b in ("1x1", "1x4")}  # mask + zip, the levels' mean
    configs = {"1x1": 1, "1x4": 2}  # L1 1x1; L1 and L2 1x4
    levels_each = (PRUNED_POINTS - 2) // 3  # each config's points between levels 0 and 1
    # a table's cuts are found on one thread, one table at a time (the workers wait for each
    # other's); the masks (torch's threads) and the zips (the deflate pool) use every core
    cuts_s = sum(n * model_bytes * costs[f"cuts {b}"] for b, n in configs.items())
    points_s = sum(n * levels_each * model_bytes * point[b] for b, n in configs.items()) \
        + 2 * model_bytes * point["1x4"]
    print(f"p4d, {P4D_CORES} cores: a point's mask and zip (every core, perfect scaling) "
          + ", ".join(f"{b}: {model_bytes * point[b] / P4D_CORES / 60:.1f} min"
                      for b in point)
          + ", a config's cuts (one thread) "
          + ", ".join(f"{b}: {model_bytes * costs[f'cuts {b}'] / 60:.0f} min" for b in configs)
          + f"; the seed's grid ({PRUNED_POINTS} pruned points, 3 configs): "
            f"{(cuts_s + points_s / P4D_CORES) / 3600:.1f} h")
    print(f"zips for the {GRID_POINTS} points, at the Kaggle grid's {KAGGLE_ZIPS_PER_MODEL:.1f}x "
          f"the model: {KAGGLE_ZIPS_PER_MODEL * model_bytes / 1e12:.2f} TB")
    metrics_s = TEST_SAMPLES * forward / P4D_CORES + model_bytes * costs["inflate"]
    print(f"metrics per point on the CPUs ({TEST_SAMPLES:,} test samples on {P4D_CORES} cores, "
          f"the zip inflated on one thread {model_bytes * costs['inflate'] / 60:.1f} min): "
          f"{metrics_s / 60:.1f} min; {GRID_POINTS} points: "
          f"{GRID_POINTS * metrics_s / 3600:.1f} h")
    print(f"the tables on the GPUs: {model_bytes / gb:.0f} GB over 8 x {A100_GB} GB = "
          f"{model_bytes / gb / 8:.1f} GB a GPU if sharded table-wise evenly; the largest "
          f"table alone is {largest / gb:.1f} GB")


if __name__ == "__main__":
    main()
