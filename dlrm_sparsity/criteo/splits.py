"""A split of either data format, by the one call every experiment and the trainer use.

dlrm's processed `.npz` (with its raw file's day counts) is read into memory (data.py);
torchrec's `.npy` days are read through memory maps batch by batch (npy.py). Both give the
same Batch, so model and data formats are independent where the table sizes fit.
"""

from __future__ import annotations

from dlrm_sparsity.criteo.data import CriteoSplit, load_split, read_day_counts, split_bounds
from dlrm_sparsity.criteo.npy import NpySplit, is_npy_data, open_npy_files, split_ranges


def open_split(processed: str, raw: str | None, split: str, limit: int | None = None,
               table_sizes: tuple[int, ...] | None = None,
               test_half: str = "second") -> CriteoSplit | NpySplit:
    """`limit` samples (all when None) of a split; torchrec's ids are taken modulo
    `table_sizes`, dlrm's are checked against the model by the caller."""
    if is_npy_data(processed):
        files = open_npy_files(processed)
        return NpySplit(files, split_ranges(files, split, test_half), table_sizes,
                        origin=str(processed)).limited(limit)
    return load_split(processed, raw, split, limit)


def split_size(processed: str, raw: str | None, split: str, test_half: str = "second") -> int:
    """Samples in a split, without reading them."""
    if is_npy_data(processed):
        files = open_npy_files(processed)
        return sum(stop - start for _, start, stop in split_ranges(files, split, test_half))
    start, stop = split_bounds(read_day_counts(raw), split)
    return stop - start
