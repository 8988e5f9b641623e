"""torchrec's preprocessed Criteo files, read through memory maps one batch at a time.

What torchrec's scripts write (torchrec/datasets/scripts/npy_preproc_criteo.py and
torchrec/datasets/criteo.py, BinaryCriteoUtils), per day or per Kaggle file `<name>`:
- `<name>_dense.npy`: float32 (N, 13), already log-transformed: used as they are;
- `<name>_sparse.npy`: int64 or int32 (N, 26), one id per feature; or MLPerf DLRM v2's
  `<name>_sparse_multi_hot.npz`: arrays "0" .. "25", int32 (N, bag size of that feature);
- `<name>_labels.npy`: int32 (N, 1).
`<name>` is `day_0` .. `day_23` (the 1 TB set) or `train` (Kaggle; its `test` has no labels).

The split is torchrec's (InMemoryBinaryCriteoIterDataPipe in torchrec/datasets/criteo.py, and
the day lists of its DLRM example's data/dlrm_dataloader.py): the last day is the evaluation
day; its first ceil(N/2) rows are "val" and the rest "test"; "train" is every earlier day.
MLPerf's inference benchmark scores the first half instead (`test_half="first"`). With a
single file, the half that is not the test split is also the training samples (for
calibration). Ids are taken modulo each table's size, as torchrec's loader does with its
`hashes`.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dlrm_sparsity.criteo.data import (
    NUM_DENSE_FEATURES,
    NUM_SPARSE_FEATURES,
    Batch,
    CriteoSplit,
    npz_member_memmap,
)
from dlrm_sparsity.errors import DataError

TEST_HALVES = ("second", "first")  # torchrec's test half, MLPerf inference's
_DAY = re.compile(r"day_(\d+)$")


def is_npy_data(path: str | Path) -> bool:
    """A folder holding `*_dense.npy` files, or one `<name>_dense.npy` file."""
    p = Path(path)
    if p.is_dir():
        return any(p.glob("*_dense.npy"))
    return p.name.endswith("_dense.npy")


@dataclass(frozen=True)
class NpyFile:
    """One day (or Kaggle file) of the three arrays, memory-mapped, nothing read yet."""

    name: str
    dense: np.ndarray  # (N, 13) float32
    labels: np.ndarray  # (N, 1) int32
    sparse: np.ndarray | None  # (N, 26), or None with multi-hot bags
    bags: tuple[np.ndarray, ...] | None  # 26 x (N, bag size)

    def __len__(self) -> int:
        return self.dense.shape[0]

    def arrays(self) -> list[np.ndarray]:
        return [self.dense, self.labels] + ([self.sparse] if self.bags is None
                                            else list(self.bags))


def release(arr: np.ndarray, stop: int) -> None:
    """Unmap the pages of a memory-mapped array's rows before `stop` from this process.

    Pages read through a map stay in the process's resident memory until the kernel needs
    them back, so a pass over a 3 GB split would look like 3 GB held. They are clean copies
    of the file, so dropping them loses nothing: a later read maps them in again. numpy keeps
    the map in `_mmap` (np.memmap's attribute); anything else is left alone.
    """
    mapped = getattr(arr, "_mmap", None)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED") or stop <= 0:
        return
    end = arr.offset % mmap.ALLOCATIONGRANULARITY + stop * arr.strides[0]
    end -= end % mmap.PAGESIZE
    if end > 0:
        mapped.madvise(mmap.MADV_DONTNEED, 0, end)


def _npy_names(path: Path) -> list[str]:
    if not path.is_dir():
        return [path.name[: -len("_dense.npy")]]
    names = [p.name[: -len("_dense.npy")] for p in path.glob("*_dense.npy")]
    days = sorted((int(_DAY.match(n).group(1)), n) for n in names if _DAY.match(n))
    if days:
        return [n for _, n in days]
    if "train" in names:
        return ["train"]
    raise DataError(f"{path}: holds {sorted(names)} but neither day_<i> nor train files")


def _open_npy(path: Path, shape_tail: int | None) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    if arr.ndim != 2 or (shape_tail is not None and arr.shape[1] != shape_tail):
        raise DataError(f"{path}: has shape {arr.shape}, expected (N, {shape_tail})")
    return arr


def _open_bags(path: Path) -> tuple[np.ndarray, ...]:
    try:
        with zipfile.ZipFile(path) as zf:
            bags = []
            for k in range(NUM_SPARSE_FEATURES):
                if f"{k}.npy" not in zf.namelist():
                    raise DataError(f"{path}: no array '{k}' (one per categorical feature)")
                arr = npz_member_memmap(path, zf, f"{k}.npy")
                bags.append(arr if arr is not None else np.load(path)[str(k)])
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    return tuple(bags)


def open_npy_files(path: str | Path) -> list[NpyFile]:
    """Every day (or file) of torchrec's layout at path, in day order, checked to agree."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: processed data not found")
    folder = path if path.is_dir() else path.parent
    found = []
    for name in _npy_names(path):
        files = {part: folder / f"{name}_{part}.npy" for part in ("dense", "labels", "sparse")}
        multi_hot = folder / f"{name}_sparse_multi_hot.npz"
        for part in ("dense", "labels"):
            if not files[part].is_file():
                raise DataError(f"{files[part]}: missing (torchrec's layout has "
                                f"{name}_dense.npy, {name}_sparse.npy and {name}_labels.npy)")
        if not files["sparse"].is_file() and not multi_hot.is_file():
            raise DataError(f"{files['sparse']}: missing (nor is there a {multi_hot.name})")
        dense = _open_npy(files["dense"], NUM_DENSE_FEATURES)
        labels = _open_npy(files["labels"], 1)
        if len(labels) and labels[:1024].min() < 0:
            raise DataError(f"{files['labels']}: holds no labels (-1, as Kaggle's test file); "
                            "pass the train file or the day files")
        if files["sparse"].is_file():
            sparse, bags = _open_npy(files["sparse"], NUM_SPARSE_FEATURES), None
            rows = {len(dense), len(labels), len(sparse)}
        else:
            sparse, bags = None, _open_bags(multi_hot)
            rows = {len(dense), len(labels), *(len(b) for b in bags)}
        if len(rows) != 1:
            raise DataError(f"{folder}: {name}'s files hold different numbers of rows "
                            f"{sorted(rows)}")
        found.append(NpyFile(name, dense, labels, sparse, bags))
    return found


def split_ranges(files: list[NpyFile], split: str, test_half: str = "second"
                 ) -> list[tuple[int, int, int]]:
    """(file index, start, stop) row ranges of a split, in order (see the module's note)."""
    if test_half not in TEST_HALVES:
        raise ValueError(f"unknown test half {test_half!r}; expected one of {TEST_HALVES}")
    last = len(files) - 1
    n = len(files[last])
    half = (n + 1) // 2  # torchrec: len // 2 + len % 2
    first, second = (last, 0, half), (last, half, n)
    test, val = (second, first) if test_half == "second" else (first, second)
    if split == "test":
        return [test]
    if split == "val":
        return [val]
    if split == "train":  # one file alone: the half that is not the test split
        return [(i, 0, len(f)) for i, f in enumerate(files[:-1])] or [val]
    raise ValueError(f"unknown split {split!r}")


class NpySplit:
    """One split of torchrec's files, read batch by batch from the memory maps (a split
    larger than memory can be scored); the interface of data.CriteoSplit."""

    def __init__(self, files: list[NpyFile], ranges: list[tuple[int, int, int]],
                 table_sizes: tuple[int, ...] | None, device: torch.device | str = "cpu",
                 origin: str = ""):
        self.files, self.ranges, self.origin = files, ranges, origin
        self.device = torch.device(device)
        self.table_sizes = table_sizes
        self.multi_hot = files[0].bags is not None

    def __len__(self) -> int:
        return sum(stop - start for _, start, stop in self.ranges)

    def to(self, device: torch.device | str) -> "NpySplit":
        return NpySplit(self.files, self.ranges, self.table_sizes, device, self.origin)

    def limited(self, limit: int | None) -> "NpySplit":
        """The first `limit` samples (all when None)."""
        if limit is None:
            return self
        ranges, left = [], limit
        for i, start, stop in self.ranges:
            take = min(stop - start, left)
            if take > 0:
                ranges.append((i, start, start + take))
            left -= take
        return NpySplit(self.files, ranges, self.table_sizes, self.device, self.origin)

    @property
    def labels(self) -> torch.Tensor:
        """Every label, (N,) float32 (4 bytes a sample: read whole)."""
        parts = [self.files[i].labels[start:stop, 0] for i, start, stop in self.ranges]
        return torch.from_numpy(np.concatenate(parts).astype(np.float32)).to(self.device)

    def _rows(self, batch_size: int) -> Iterator[list[tuple[NpyFile, int, int]]]:
        """Pieces of at most batch_size rows, a batch crossing a day boundary in two."""
        pending, size = [], 0
        for i, start, stop in self.ranges:
            while start < stop:
                take = min(stop - start, batch_size - size)
                pending.append((self.files[i], start, start + take))
                size, start = size + take, start + take
                if size == batch_size:
                    yield pending
                    pending, size = [], 0
        if pending:
            yield pending

    def batches(self, batch_size: int, share: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """The split in batches; share=(r, w): only the batches r, r + w, r + 2w, ... (the
        others are not read)."""
        sizes = (np.asarray(self.table_sizes, dtype=np.int64) if self.table_sizes is not None
                 else None)
        first, every = share
        for index, pieces in enumerate(self._rows(batch_size)):
            if index % every != first:
                continue
            dense = np.concatenate([f.dense[a:b] for f, a, b in pieces])
            labels = np.concatenate([f.labels[a:b, 0] for f, a, b in pieces])
            b = len(labels)
            if self.multi_hot:
                indices, offsets = [], []
                for k in range(NUM_SPARSE_FEATURES):
                    bag = np.concatenate([f.bags[k][a:c] for f, a, c in pieces]).astype(np.int64)
                    if sizes is not None:
                        bag %= sizes[k]
                    indices.append(torch.from_numpy(bag.reshape(-1)).to(self.device))
                    offsets.append(torch.arange(0, bag.size, bag.shape[1],
                                                device=self.device))
            else:
                ids = np.concatenate([f.sparse[a:c] for f, a, c in pieces]).astype(np.int64)
                if sizes is not None:
                    ids %= sizes
                indices = torch.from_numpy(np.ascontiguousarray(ids.T)).to(self.device)
                offsets = torch.arange(b, device=self.device).expand(NUM_SPARSE_FEATURES, b)
            for f, _, stop in pieces:
                for arr in f.arrays():
                    release(arr, stop)
            yield Batch(torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)
                                         ).to(self.device),
                        offsets, indices, torch.from_numpy(labels.astype(np.float32)
                                                           ).to(self.device))

    def load(self) -> CriteoSplit:
        """The whole split in memory as tensors (the trainer's input; one id per bag)."""
        if self.multi_hot:
            raise DataError(f"{self.origin}: training reads one id per feature; these files "
                            "hold multi-hot bags (train on the one-hot day files)")
        parts = list(self.to("cpu").batches(1 << 20))
        counts = np.asarray(self.table_sizes if self.table_sizes is not None
                            else id_counts(self.files), dtype=np.int64)
        return CriteoSplit(torch.cat([b.dense for b in parts]),
                           torch.cat([b.indices for b in parts], dim=1),
                           torch.cat([b.labels for b in parts]), counts)

    def fingerprint(self) -> str:
        """sha256 of the split's rows as they are in the files, read a chunk at a time."""
        digest = hashlib.sha256()
        for i, start, stop in self.ranges:
            for arr in self.files[i].arrays():
                digest.update(f"{arr.dtype}{arr.shape[1:]}".encode())
                for a in range(start, stop, 1 << 20):
                    digest.update(np.ascontiguousarray(arr[a:min(stop, a + (1 << 20))]).data)
                    release(arr, min(stop, a + (1 << 20)))
        digest.update(repr(self.table_sizes).encode())  # the ids are taken modulo these
        return digest.hexdigest()[:16]

    def check_fits(self, table_sizes: tuple[int, ...], origin: str) -> None:
        """The ids were taken modulo the first model's table sizes; every model must have
        the same tables."""
        check_table_count(table_sizes, origin)
        if self.table_sizes is not None and tuple(table_sizes) != tuple(self.table_sizes):
            raise DataError(f"{origin}: its tables have {list(table_sizes)} rows, not the "
                            f"{list(self.table_sizes)} the data's ids were reduced to")


def check_table_count(table_sizes: tuple[int, ...], origin: str) -> None:
    if len(table_sizes) != NUM_SPARSE_FEATURES:
        raise DataError(f"{origin}: the model has {len(table_sizes)} embedding tables but "
                        f"the data has {NUM_SPARSE_FEATURES} categorical features")


def id_counts(files: list[NpyFile], chunk: int = 1 << 20) -> tuple[int, ...]:
    """Rows each table needs for every id in the files (the largest id + 1 per feature)."""
    top = np.zeros(NUM_SPARSE_FEATURES, dtype=np.int64)
    for f in files:
        for start in range(0, len(f), chunk):
            if f.sparse is not None:
                top = np.maximum(top, f.sparse[start:start + chunk].max(axis=0))
            else:
                top = np.maximum(top, [b[start:start + chunk].max() for b in f.bags])
    return tuple(int(t) + 1 for t in top)

