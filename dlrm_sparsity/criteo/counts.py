"""How often each id of each table is looked up over the training split: row_freq's input.

dlrm's processed npz: the first six days (the rows before the last day), read a chunk at a
time from the memory-mapped X_cat where the npz stores it uncompressed. torchrec's `.npy` days:
every day but the last, ids taken modulo the table sizes as the loader takes them (a multi-hot
bag counts each of its ids). The counts are numpy.bincount's, summed chunk by chunk; only the
(rows,) counts of each table are ever held whole.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from dlrm_sparsity.criteo.data import npz_member_memmap, read_day_counts, split_bounds
from dlrm_sparsity.criteo.npy import is_npy_data, open_npy_files, release
from dlrm_sparsity.errors import DataError

CHUNK = 1 << 20  # rows read at a time


def _add(counts: list[np.ndarray], table: int, ids: np.ndarray, origin: str) -> None:
    ids = ids.astype(np.int64, copy=False).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(counts[table])):
        raise DataError(f"{origin}: table {table} (C{table + 1}) has {len(counts[table])} rows "
                        f"but the training split holds id {int(ids.max())}")
    counts[table] += np.bincount(ids, minlength=len(counts[table]))


def _dlrm_counts(processed: str, raw: str, sizes: tuple[int, ...]) -> list[np.ndarray]:
    start, stop = split_bounds(read_day_counts(raw), "train")
    if stop <= start:
        raise DataError(f"{processed}: the training split is empty")
    path = Path(processed)
    with zipfile.ZipFile(path) as zf:
        x_cat = npz_member_memmap(path, zf, "X_cat.npy")
    if x_cat is None:  # compressed (dlrm writes savez_compressed): read the column block whole
        with np.load(path) as npz:
            x_cat = npz["X_cat"]
    counts = [np.zeros(n, dtype=np.int64) for n in sizes]
    for a in range(start, stop, CHUNK):
        chunk = np.asarray(x_cat[a:min(stop, a + CHUNK)])
        for k in range(len(sizes)):
            _add(counts, k, chunk[:, k], str(processed))
    return counts


def _npy_counts(folder: str, sizes: tuple[int, ...]) -> list[np.ndarray]:
    files = open_npy_files(folder)
    if len(files) < 2:
        raise DataError(f"{folder}: one day only, so no training days to count ids over "
                        "(torchrec trains on every day but the last)")
    counts = [np.zeros(n, dtype=np.int64) for n in sizes]
    modulo = np.asarray(sizes, dtype=np.int64)
    for f in files[:-1]:
        for a in range(0, len(f), CHUNK):
            b = min(len(f), a + CHUNK)
            if f.sparse is not None:
                chunk = np.asarray(f.sparse[a:b]).astype(np.int64) % modulo
                for k in range(len(sizes)):
                    _add(counts, k, chunk[:, k], folder)
            else:
                for k, bag in enumerate(f.bags):
                    _add(counts, k, np.asarray(bag[a:b]).astype(np.int64) % modulo[k], folder)
            for arr in f.arrays():
                release(arr, b)
    return counts


def training_counts(processed: str, raw: str | None, sizes: tuple[int, ...]
                    ) -> list[np.ndarray]:
    """Per table, each id's lookups over the training split ((rows,) int64)."""
    if is_npy_data(processed):
        return _npy_counts(processed, sizes)
    return _dlrm_counts(processed, raw, sizes)


def counts_or_why(processed: str, raw: str | None, sizes: tuple[int, ...]
                  ) -> tuple[list[np.ndarray] | None, str | None]:
    """training_counts, or None and why they cannot be had (for the rows that need them)."""
    try:
        return training_counts(processed, raw, sizes), None
    except DataError as exc:
        return None, str(exc)
