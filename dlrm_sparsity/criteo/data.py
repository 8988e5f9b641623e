"""dlrm's processed Criteo Kaggle data: the side files, the split, and tensors for evaluation.

What dlrm writes (and preprocess.py reproduces):
- `<raw_dir>/<raw_stem>_day_count.npz`: `total_per_file`, samples in each of the 7 "days";
- `<raw_dir>/<raw_stem>_fea_count.npz`: `counts`, distinct ids of each categorical column;
- the processed npz: `X_int` (N, 13), `X_cat` (N, 26), `y` (N,), `counts` (26,), days in order.

The seed's test split is the first half (rounded up) of the last day, in file order; the
validation split is the rest of that day; training is every earlier day.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dlrm_sparsity.errors import DataError

NUM_DENSE_FEATURES = 13
NUM_SPARSE_FEATURES = 26
NUM_DAYS = 7
SPLITS = ("train", "val", "test")


def day_count_path(raw_path: str | os.PathLike) -> Path:
    raw = Path(raw_path)
    return raw.parent / f"{raw.stem}_day_count.npz"


def fea_count_path(raw_path: str | os.PathLike) -> Path:
    raw = Path(raw_path)
    return raw.parent / f"{raw.stem}_fea_count.npz"


def day_sizes(num_samples: int) -> np.ndarray:
    """dlrm's cut into 7 days: n // 7 each, the first n % 7 days one more."""
    sizes = np.full(NUM_DAYS, num_samples // NUM_DAYS, dtype=np.int64)
    sizes[: num_samples % NUM_DAYS] += 1
    return sizes


def split_bounds(total_per_file: np.ndarray, split: str) -> tuple[int, int]:
    """[start, stop) rows of a split, as dlrm's CriteoDataset cuts them."""
    offsets = np.concatenate([[0], np.cumsum(total_per_file)]).astype(np.int64)
    last_start, end = int(offsets[-2]), int(offsets[-1])
    test_end = last_start + (end - last_start + 1) // 2  # np.array_split gives ceil to the first
    bounds = {"train": (0, last_start), "test": (last_start, test_end), "val": (test_end, end)}
    if split not in bounds:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return bounds[split]


def read_day_counts(raw_path: str | os.PathLike) -> np.ndarray:
    path = day_count_path(raw_path)
    if not path.exists():
        raise DataError(f"{path}: day-count file not found (dlrm writes it beside the raw "
                        f"data file {raw_path}; pass the --raw_data_file the data came from)")
    try:
        with np.load(path) as f:
            return np.asarray(f["total_per_file"], dtype=np.int64)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a day-count file with 'total_per_file' ({exc})") from None


def npz_member_memmap(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """Memory-map an uncompressed .npy member of an npz, so only the rows used are read."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)


def read_processed_rows(processed_path: str | os.PathLike, start: int, stop: int
                        ) -> dict[str, np.ndarray]:
    """X_int, X_cat, y rows [start, stop) and counts from a processed npz."""
    path = Path(processed_path)
    if not path.exists():
        raise DataError(f"{path}: processed data file not found")
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in ("X_int", "X_cat", "y", "counts"):
                if f"{key}.npy" not in names:
                    raise DataError(f"{path}: not a processed Criteo file (no '{key}' array)")
            for key in ("X_int", "X_cat", "y"):
                arr = npz_member_memmap(path, zf, f"{key}.npy")
                if arr is None:  # compressed (dlrm uses savez_compressed): read it whole
                    with np.load(path) as npz:
                        arr = npz[key]
                out[key] = np.array(arr[start:stop])
            with np.load(path) as npz:
                out["counts"] = np.asarray(npz["counts"], dtype=np.int64)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    return out


@dataclass
class Batch:
    dense: torch.Tensor  # (B, 13) float32, log1p of the counts (torchrec's: as its files hold)
    offsets: torch.Tensor | list  # (26, B) int64, one id per bag; or 26 x (B,) for bags
    indices: torch.Tensor | list  # (26, B) int64; or 26 x (ids of that table)
    labels: torch.Tensor  # (B,) float32


@dataclass
class CriteoSplit:
    """One split held as tensors; categorical ids stored (26, N) so each table's slice of a
    batch is contiguous, as EmbeddingBag wants it."""

    dense: torch.Tensor  # (N, 13) float32
    sparse_t: torch.Tensor  # (26, N) int64
    labels: torch.Tensor  # (N,) float32
    counts: np.ndarray  # (26,) distinct ids per column, from the processed file

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.dense.device

    def to(self, device: torch.device | str) -> "CriteoSplit":
        return CriteoSplit(self.dense.to(device), self.sparse_t.to(device),
                           self.labels.to(device), self.counts)

    def batches(self, batch_size: int, share: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """The split in batches; share=(r, w): only the batches r, r + w, r + 2w, ..."""
        n = len(self)
        arange = torch.arange(batch_size, device=self.dense.device)
        offsets_full = arange.expand(self.sparse_t.shape[0], batch_size)
        first, every = share
        for start in range(first * batch_size, n, every * batch_size):
            stop = min(start + batch_size, n)
            b = stop - start
            offsets = offsets_full if b == batch_size else offsets_full[:, :b]
            yield Batch(self.dense[start:stop], offsets, self.sparse_t[:, start:stop],
                        self.labels[start:stop])

    def fingerprint(self) -> str:
        """What a rerun must see unchanged to keep its results: the split's very samples."""
        return tensors_fingerprint(self.dense, self.sparse_t, self.labels)

    def check_fits(self, table_sizes: tuple[int, ...], origin: str) -> None:
        check_ids_fit(self.sparse_t, table_sizes, origin)


def tensors_fingerprint(*tensors: torch.Tensor | list[torch.Tensor]) -> str:
    """sha256 of the tensors' shapes and bytes (read on the CPU; a list's in turn), shortened."""
    digest = hashlib.sha256()
    flat = [t for x in tensors for t in (x if isinstance(x, list) else [x])]
    for t in flat:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]


def check_ids_fit(ids_t: torch.Tensor, table_sizes: tuple[int, ...], origin: str) -> None:
    """Raise DataError if an id of (26, N) ids is beyond its table (EmbeddingBag would fail
    obscurely, or on a GPU asynchronously)."""
    if len(table_sizes) != ids_t.shape[0]:
        raise DataError(f"{origin}: the model has {len(table_sizes)} embedding tables but "
                        f"the data has {ids_t.shape[0]} categorical features")
    if ids_t.shape[1] == 0:
        return
    largest = ids_t.max(dim=1).values.tolist()
    for k, (rows, top) in enumerate(zip(table_sizes, largest, strict=True)):
        if top >= rows:
            raise DataError(f"{origin}: table {k} (C{k + 1}) has {rows} rows but the "
                            f"data holds id {top}")


def arrays_to_split(x_int: np.ndarray, x_cat: np.ndarray, y: np.ndarray,
                    counts: np.ndarray) -> CriteoSplit:
    # log(x + 1) in float32 exactly as dlrm's collate computes it (log1p rounds differently)
    dense = torch.log(torch.from_numpy(np.maximum(x_int, 0).astype(np.float32)) + 1)
    sparse_t = torch.from_numpy(np.ascontiguousarray(x_cat.T).astype(np.int64))
    labels = torch.from_numpy(y.astype(np.float32))
    return CriteoSplit(dense, sparse_t, labels, counts)


def load_split(processed_path: str | os.PathLike, raw_path: str | os.PathLike,
               split: str = "test", limit: int | None = None) -> CriteoSplit:
    """Read one split of a processed file (only its rows) into tensors on the CPU."""
    total_per_file = read_day_counts(raw_path)
    start, stop = split_bounds(total_per_file, split)
    if limit is not None:
        stop = min(stop, start + limit)
    rows = read_processed_rows(processed_path, start, stop)
    n_file = rows["y"].shape[0]
    if n_file != stop - start:
        raise DataError(f"{processed_path}: holds fewer samples than the day-count file "
                        f"{day_count_path(raw_path)} says ({int(total_per_file.sum())})")
    return arrays_to_split(rows["X_int"], rows["X_cat"], rows["y"], rows["counts"])
