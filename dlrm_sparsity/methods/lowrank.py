"""Low rank: each table replaced by its truncated SVD, served as two factors.

A (R, D) table W at rank r is held as U_r S_r (R, r) and V_r^T (r, D): 4r(R + D) bytes in
float32. A bag's sum is linear, so a lookup sums the rows of U_r S_r and multiplies the
(B, r) sums by V_r^T once. The rank for a bytes fraction f of the table is Hetu's
floor(R D f / (R + D)) (at least 1); a table that would not shrink (r >= min(R, D)) is held
whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dlrm_sparsity.errors import UserInputError


def rank_for(rows: int, dim: int, fraction: float) -> int | None:
    """The rank holding `fraction` of the table's bytes; None where the table stays whole."""
    rank = max(1, math.floor(rows * dim * fraction / (rows + dim)))
    return None if rank >= min(rows, dim) else rank


def truncated_svd(table: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_r S_r (R, r) and V_r^T (r, D) of a tall table, from the eigenvectors of its (D, D)
    Gram matrix in float64: W V_r is U_r S_r, with no (R, D) U held beside the table, as
    torch.linalg.svd would (640 MB more for a 10 M-row table of width 16)."""
    gram = table.double().T @ table.double() if table.shape[0] < 1 << 20 else \
        sum(c.double().T @ c.double() for c in table.split(1 << 20))  # (D, D)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    right = vectors[:, -rank:].flip(1).to(table.dtype)  # (D, r), largest first
    return (table @ right).contiguous(), right.T.contiguous()


class LowRankTables:
    """The tables as factors (or whole, where a factor pair would not be smaller)."""

    def __init__(self, tables: list[torch.Tensor], ranks: list[int | None]):
        self.factors, self.ranks = [], []  # ranks: None where a table is held whole
        for k, (table, rank) in enumerate(zip(tables, ranks, strict=True)):
            if rank is not None and rank > table.shape[1]:
                raise UserInputError(f"svd: rank {rank} is above table {k}'s width "
                                     f"{table.shape[1]}")
            if rank is None or rank >= min(table.shape):  # no smaller than the table itself
                self.factors.append((table.detach().float(), None))
                self.ranks.append(None)
                continue
            self.ranks.append(rank)
            self.factors.append(truncated_svd(table.detach().float(), rank))
        self.nbytes = sum(a.nbytes + (0 if b is None else b.nbytes) for a, b in self.factors)

    def embed(self, offsets, indices) -> list[torch.Tensor]:
        out = []
        for k, (left, right) in enumerate(self.factors):  # K x (B, d)
            sums = F.embedding_bag(indices[k], left, offsets[k], mode="sum")  # (B, r)
            out.append(sums if right is None else sums @ right)
        return out

    def buffers(self) -> dict[str, torch.Tensor]:
        return {f"table{k}.{part}": t for k, pair in enumerate(self.factors)
                for part, t in zip(("weight", "right"), pair, strict=True) if t is not None}


class LowRank:
    """svd at a bytes fraction of 1 - level (the grid's levels), or at one rank for every
    table."""

    name = "svd"
    needs_counts = False
    leveled = True

    def serve(self, tables: list[torch.Tensor], level: float | None = None,
              rank: int | None = None, **_) -> LowRankTables:
        if rank is not None:
            return LowRankTables(tables, [rank] * len(tables))
        return LowRankTables(tables, [rank_for(t.shape[0], t.shape[1], 1.0 - level)
                                      for t in tables])
