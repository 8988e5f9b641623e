"""The forward-pass variants the experiments time and compare, each an nn.Module, named once.

Every variant runs the model's own stages (model.py) and replaces one of them:
- Dense: the DLRM as it is (experiment 3's "without_torch_sparse");
- TorchSparseTop: the seed's variant, the interaction output z as a COO tensor multiplied by
  the first top-layer weight with torch.mm ("with_torch_sparse");
- Masked: z multiplied by an activation mask, as the ActivationSparsifier's hook does, then
  the dense or the seed's torch.sparse top (experiment 5's "dense" and "torch_sparse");
- Compact: the masked columns of z removed from the interaction and from top_l.0 ("compact";
  for DLRM_DCN from top_l.0 only, since the cross net computes every column anyway);
- FormatTables: the embedding lookups served from one storage format (experiment 4).
Each takes (dense_x (B, 13), offsets (K, B), indices (K, B)) and returns (B, 1).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from dlrm_sparsity.criteo.data import Batch
from dlrm_sparsity.model import DLRMNet

# experiment 3's dlrm_type (the seed's labels)
DENSE, SPARSE = "without_torch_sparse", "with_torch_sparse"
# experiment 5's variant; timed in this order: compact right after dense, before
# torch_sparse's large allocations
MASKED, COMPACT, MASKED_SPARSE = "dense", "compact", "torch_sparse"
MASKED_VARIANTS = (MASKED, COMPACT, MASKED_SPARSE)


class Dense(nn.Module):
    """The model's own forward, stage by stage; subclasses replace a stage."""

    label = DENSE

    def __init__(self, model: DLRMNet):
        super().__init__()
        self.model = model

    def embed(self, offsets: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        return self.model.embed(offsets, indices)  # K x (B, d)

    def interact(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        return self.model.interact(x, ly)  # (B, width of z)

    def top(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.top_l(z)  # (B, 1)

    def forward(self, dense_x: torch.Tensor, offsets: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        x = self.model.bottom(dense_x)
        return self.top(self.interact(x, self.embed(offsets, indices)))

    def on(self, batch: Batch) -> Callable[[], torch.Tensor]:
        """This variant's forward of one batch, as a call with no arguments (for timing)."""
        return lambda: self(batch.dense, batch.offsets, batch.indices)


class TorchSparseTop(Dense):
    """The seed's: z to COO, torch.mm with top_l.0's weight, then the rest of the top MLP."""

    label = SPARSE

    def sparse_top(self, z_coo: torch.Tensor) -> torch.Tensor:
        first = self.model.top_l[0]
        return self.model.top_l[1:](torch.mm(z_coo, first.weight.t()) + first.bias)

    def top(self, z: torch.Tensor) -> torch.Tensor:
        return self.sparse_top(z.to_sparse_coo())


class Masked(Dense):
    """z's masked columns zeroed by multiplication (what the sparsifier's hook does), then
    the dense top or, with torch_sparse, the seed's."""

    def __init__(self, model: DLRMNet, mask: torch.Tensor, torch_sparse: bool = False):
        super().__init__(model)
        self.mask = mask
        self.label = MASKED_SPARSE if torch_sparse else MASKED
        self.sparse = TorchSparseTop(model) if torch_sparse else None

    def interact(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        return self.model.interact(x, ly) * self.mask

    def top(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.top_l(z) if self.sparse is None else self.sparse.top(z)


class Compact(Dense):
    """The model with the masked columns of z physically removed.

    The interaction multiplies only the vectors that some kept pair involves (one bmm over
    them, the full one when every vector is involved) and keeps only the kept dot products and
    the kept columns of the bottom MLP's output; top_l.0 keeps only the matching columns of its
    weight. So the forward is a smaller dense computation: the variant that can beat the masked
    dense one. A DLRM_DCN's cross net mixes every column into every other, so it runs whole and
    only top_l.0 is cut to the kept columns of its output.
    """

    label = COMPACT

    def __init__(self, model: DLRMNet, mask: torch.Tensor):
        super().__init__(model)
        kept = mask.nonzero().view(-1)  # ascending: z's own column order
        dim = model.config.embedding_dim
        self.kept = kept
        self.weight_t = model.top_l[0].weight[:, kept].t().contiguous()  # (K, out)
        self.bias = model.top_l[0].bias
        self.cross = bool(model.config.cross_layers)
        if self.cross:
            return
        self.kept_x = kept[kept < dim]
        pairs = kept[kept >= dim] - dim
        self.pair_i, self.pair_j = model.pair_i[pairs], model.pair_j[pairs]
        self.vectors = torch.unique(torch.cat([self.pair_i, self.pair_j]))  # sorted
        position = torch.full((model.config.num_features,), -1, device=kept.device)
        position[self.vectors] = torch.arange(len(self.vectors), device=kept.device)
        self.all_vectors = len(self.vectors) == model.config.num_features
        # each kept pair's place in the flattened (U, U) products, as DLRMNet.interact gathers
        self.flat = position[self.pair_i] * len(self.vectors) + position[self.pair_j]

    def interact(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        if self.cross:
            return self.model.interact(x, ly)[:, self.kept]  # (B, K)
        batch, dim = x.shape
        t = torch.cat([x, *ly], dim=1).view(batch, -1, dim)  # (B, F, d)
        if not self.all_vectors:
            t = t[:, self.vectors]  # (B, U, d): the vectors some kept pair involves
        products = torch.bmm(t, t.transpose(1, 2))  # (B, U, U)
        dots = products.flatten(1).index_select(1, self.flat)  # (B, kept pairs)
        return torch.cat([x[:, self.kept_x], dots], dim=1)  # (B, K) = z[:, kept]

    def top(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.top_l[1:](torch.addmm(self.bias, z, self.weight_t))  # (B, 1)


def masked_variants(model: DLRMNet, mask: torch.Tensor) -> dict[str, Dense]:
    """Experiment 5's three variants of one masked model, in timing order."""
    found = {MASKED: Masked(model, mask), COMPACT: Compact(model, mask),
             MASKED_SPARSE: Masked(model, mask, torch_sparse=True)}
    return {v: found[v] for v in MASKED_VARIANTS}


class FormatTables(Dense):
    """The embedding lookups served from tables held in one storage format (formats.py)."""

    def __init__(self, model: DLRMNet, tables, name: str):
        super().__init__(model)
        self.label = name
        self.tables = tables

    def embed(self, offsets: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        return self.tables.embed(offsets, indices)  # K x (B, d)


@torch.inference_mode()
def max_difference(a: Dense, b: Dense, batch: Batch) -> float:
    """Max |a - b| over one batch's outputs."""
    return float((a.on(batch)() - b.on(batch)()).abs().max())


@torch.inference_mode()
def interaction_density(model: DLRMNet, batch: Batch) -> float:
    """Share of non-zeros in z, the input the seed's variant converts to COO."""
    z = model.interact(model.bottom(batch.dense), model.embed(batch.offsets, batch.indices))
    return float((z != 0).float().mean())


def stage_calls(model: DLRMNet, batch: Batch) -> Iterator[tuple[str, str, Callable[[], object]]]:
    """(variant, stage, call) for every stage of experiment 3's two variants, each fed the
    real output of the stage before, through the very methods the whole forward calls. A
    generator: each input is made only when its stage comes up, so that the COO copy of z
    (about 120 MB at level 0 for 16384 x 367) is not held while the others are timed."""
    with torch.inference_mode():
        x = model.bottom(batch.dense)
        ly = model.embed(batch.offsets, batch.indices)
        z = model.interact(x, ly)
    for variant in (Dense(model), TorchSparseTop(model)):
        yield variant.label, "bottom_mlp", lambda: model.bottom(batch.dense)
        yield variant.label, "embedding", lambda v=variant: v.embed(batch.offsets, batch.indices)
        yield variant.label, "interaction", lambda v=variant: v.interact(x, ly)
        if not isinstance(variant, TorchSparseTop):
            yield variant.label, "top_mlp", lambda v=variant: v.top(z)
            continue
        yield variant.label, "to_sparse_coo", lambda: z.to_sparse_coo()
        with torch.inference_mode():
            z_coo = z.to_sparse_coo()
        yield variant.label, "top_mlp", lambda v=variant, z_coo=z_coo: v.sparse_top(z_coo)
