"""Row pruning of a trained table: which rows to keep at a pruning ratio.

Both rules keep ceil(E * (1 - ratio)) of a table's E rows, as FBGEMM's inference converter
(SplitEmbInferenceConverter) sizes them, and serve the kept rows behind FBGEMM's index remap:
a pruned id maps to -1 and looks up nothing. A ratio that keeps every row prunes nothing
(None: no remap, as the converter leaves such a table).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dlrm_sparsity.errors import UserInputError


def rows_kept(rows: int, ratio: float) -> int:
    """FBGEMM's count: ceil(E * (1 - ratio)), at least one row (its converter asserts one)."""
    if not 0.0 <= ratio < 1.0:
        raise UserInputError(f"row pruning ratio {ratio:g} is outside [0, 1)")
    return max(1, math.ceil(rows * (1.0 - ratio)))


class RowNorm:
    """FBGEMM's rule: keep the rows of largest L2 norm. As its converter does, every row tied
    with the last kept one is kept too: the threshold is the first norm below the last kept
    one's, and a row is kept where its norm exceeds it, which is what the converter's
    embedding_bag_rowwise_prune keeps. That op also returns a copy of the kept rows (320 MB at
    half of a 10 M-row table), so the rule is applied here directly; the tests hold it to the
    converter's rows and remap."""

    name = "row_norm"
    needs_counts = False

    def kept(self, table: torch.Tensor, ratio: float, counts: np.ndarray | None = None
             ) -> torch.Tensor | None:
        keep = rows_kept(table.shape[0], ratio)
        if keep == table.shape[0]:
            return None
        norms = torch.linalg.vector_norm(table.float(), dim=1)
        ranked = norms.sort(descending=True).values
        below = ranked[keep:][ranked[keep:] < ranked[keep - 1]]
        threshold = below[0] if len(below) else ranked[-1] - 1.0
        return (norms > threshold).nonzero().view(-1)


class RowFreq:
    """Keep the rows looked up most often over the training split (ties to the lower id):
    what production systems keep. Needs the counts (criteo/counts.py)."""

    name = "row_freq"
    needs_counts = True

    def kept(self, table: torch.Tensor, ratio: float, counts: np.ndarray | None = None
             ) -> torch.Tensor | None:
        if counts is None:
            raise UserInputError("row_freq needs the training split's id counts")
        if len(counts) != table.shape[0]:
            raise UserInputError(f"row_freq: {len(counts)} counted ids for a table of "
                                 f"{table.shape[0]} rows")
        keep = rows_kept(table.shape[0], ratio)
        if keep == table.shape[0]:
            return None
        # a stable sort of the negated counts: the most frequent first, ties by id
        order = np.argsort(-counts.astype(np.int64), kind="stable")[:keep]
        return torch.from_numpy(np.sort(order)).to(table.device)
