"""Writing dlrm's processed data in torchrec's preprocessed layout (read by npy.py).

Each of dlrm's 7 days becomes `day_<i>_dense.npy` (float32), `day_<i>_sparse.npy` (int32, as
torchrec's shuffle step leaves it) and `day_<i>_labels.npy` (int32, (N, 1)), or with
multi_hot `day_<i>_sparse_multi_hot.npz`, the layout of MLPerf DLRM v2's synthetic multi-hot
data. The dense features are transformed as dlrm's collate does, log(x + 1) in float32, so
that both files of one data set give a model the very same inputs (torchrec's own
preprocessing takes log(x - min + 2)). The ids are dlrm's contiguous ones, so they fit the
tables of a model trained on either file.

Multi-hot bags: the first id of a bag is the sample's own, the others are ids of the same
table drawn with a seeded generator, so every sample keeps its one-hot signal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlrm_sparsity.criteo.data import (
    NUM_SPARSE_FEATURES,
    arrays_to_split,
    read_day_counts,
    read_processed_rows,
)
from dlrm_sparsity.runner.atomic import atomic_path

# MLPerf DLRM v2's multi-hot bag size of each of the 26 features
MLPERF_BAG_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10,
                    3, 1, 1)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _save_bags(path: Path, bags: list[np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{str(k): b for k, b in enumerate(bags)})  # stored: memory-mappable


def multi_hot_bags(ids: np.ndarray, counts: np.ndarray, seed: int,
                   bag_sizes=MLPERF_BAG_SIZES) -> list[np.ndarray]:
    """26 int32 arrays (N, bag size): each sample's id first, then random ids of its table."""
    rng = np.random.default_rng(seed)
    bags = []
    for k in range(NUM_SPARSE_FEATURES):
        bag = rng.integers(0, max(int(counts[k]), 1), size=(len(ids), bag_sizes[k]))
        bag[:, 0] = ids[:, k]
        bags.append(bag.astype(np.int32))
    return bags


def write_npy_days(processed: str | Path, raw: str | Path, out_dir: str | Path,
                   multi_hot: bool = False, seed: int = 0) -> list[Path]:
    """dlrm's processed file as torchrec's day files in out_dir; returns the dense files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_day = read_day_counts(raw)
    bounds = np.concatenate([[0], np.cumsum(per_day)])
    written = []
    for day in range(len(per_day)):
        rows = read_processed_rows(processed, int(bounds[day]), int(bounds[day + 1]))
        split = arrays_to_split(rows["X_int"], rows["X_cat"], rows["y"], rows["counts"])
        dense = split.dense.numpy()  # dlrm's transform, computed by the same code
        ids = rows["X_cat"].astype(np.int32)
        stem = out / f"day_{day}"
        if multi_hot:
            _save_bags(Path(f"{stem}_sparse_multi_hot.npz"),
                       multi_hot_bags(ids, rows["counts"], seed + day))
        else:
            _save(Path(f"{stem}_sparse.npy"), ids)
        _save(Path(f"{stem}_labels.npy"), rows["y"].astype(np.int32).reshape(-1, 1))
        _save(Path(f"{stem}_dense.npy"), dense)
        written.append(Path(f"{stem}_dense.npy"))
    return written

