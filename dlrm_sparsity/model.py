"""A DLRM whose state dict is key-for-key that of facebookresearch/dlrm's DLRM_Net.

Only the configuration the seed uses is supported: "dot" interaction without self-interaction,
sum-pooled embedding bags, ReLU everywhere except a final Sigmoid on the top MLP. The
architecture is read off a state dict (`DLRMConfig.from_state_dict`), so any table sizes work.

Parameter names (`emb_l`, `bot_l`, `top_l`) are dlrm's and must not change: checkpoints written
by dlrm's `--save-model` load into `DLRMNet` with `strict=True`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from dlrm_sparsity.errors import CheckpointError


@dataclass(frozen=True)
class DLRMConfig:
    """Everything needed to build a DLRMNet; all of it is readable from a state dict."""

    table_sizes: tuple[int, ...]  # rows of each embedding table (ln_emb)
    embedding_dim: int  # m_spa
    bottom_mlp: tuple[int, ...]  # ln_bot, input width first, ends with embedding_dim
    top_mlp: tuple[int, ...]  # ln_top, input width first (interaction output), ends with 1

    @property
    def num_features(self) -> int:
        """Vectors that enter the interaction: the bottom-MLP output plus one per table."""
        return len(self.table_sizes) + 1

    @property
    def interaction_width(self) -> int:
        """Width of R = [x, strictly-lower-triangular dot products]."""
        f = self.num_features
        return self.embedding_dim + f * (f - 1) // 2

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DLRMConfig":
        return cls(tuple(d["table_sizes"]), int(d["embedding_dim"]),
                   tuple(d["bottom_mlp"]), tuple(d["top_mlp"]))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "DLRMConfig":
        """Infer the architecture; raise CheckpointError naming the first key that does not fit."""
        tables = _indexed_keys(state_dict, "emb_l", step=1, suffixes=("weight",))
        if not tables:
            raise CheckpointError("not a DLRM state dict: no 'emb_l.0.weight' key")
        sizes, dims = [], set()
        for key in tables:
            w = state_dict[key]
            if w.dim() != 2:
                raise CheckpointError(f"{key} has shape {tuple(w.shape)}, expected (rows, dim)")
            sizes.append(int(w.shape[0]))
            dims.add(int(w.shape[1]))
        if len(dims) != 1:
            raise CheckpointError(f"embedding tables have different widths {sorted(dims)}")
        dim = dims.pop()
        bottom = _mlp_widths(state_dict, "bot_l")
        top = _mlp_widths(state_dict, "top_l")
        cfg = cls(tuple(sizes), dim, bottom, top)
        if bottom[-1] != dim:
            raise CheckpointError(f"bot_l ends with width {bottom[-1]} but the embeddings "
                                  f"have width {dim}")
        if top[0] != cfg.interaction_width:
            raise CheckpointError(f"top_l.0.weight takes {top[0]} inputs but the dot "
                                  f"interaction of {len(sizes)} tables gives "
                                  f"{cfg.interaction_width}")
        expected = set(tables) | {f"{name}.{2 * i}.{p}" for name, mlp in
                                  (("bot_l", bottom), ("top_l", top))
                                  for i in range(len(mlp) - 1) for p in ("weight", "bias")}
        unexpected = sorted(set(state_dict) - expected)
        if unexpected:
            raise CheckpointError(f"not a DLRM_Net state dict: unexpected key '{unexpected[0]}'")
        return cfg


def _indexed_keys(state_dict, prefix: str, step: int, suffixes: Sequence[str]) -> list[str]:
    """Keys prefix.0.s, prefix.{step}.s, ... for as long as they exist."""
    keys, i = [], 0
    while f"{prefix}.{i}.{suffixes[0]}" in state_dict:
        keys.extend(f"{prefix}.{i}.{s}" for s in suffixes)
        i += step
    return keys


def _mlp_widths(state_dict, prefix: str) -> tuple[int, ...]:
    keys = _indexed_keys(state_dict, prefix, step=2, suffixes=("weight", "bias"))
    if not keys:
        raise CheckpointError(f"not a DLRM state dict: no '{prefix}.0.weight' key")
    widths = [int(state_dict[keys[0]].shape[1])]
    for wkey, bkey in zip(keys[::2], keys[1::2], strict=True):
        w, b = state_dict[wkey], state_dict[bkey]
        if w.dim() != 2 or w.shape[1] != widths[-1] or tuple(b.shape) != (w.shape[0],):
            raise CheckpointError(f"{wkey} has shape {tuple(w.shape)} and {bkey} "
                                  f"{tuple(b.shape)}: expected ({{out}}, {widths[-1]}) and (out,)")
        widths.append(int(w.shape[0]))
    return tuple(widths)


def _make_mlp(widths: Sequence[int], final_sigmoid: bool) -> nn.Sequential:
    """Linear, act, Linear, act, ... so Linears sit at even indices, as in dlrm's create_mlp."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        linear = nn.Linear(n_in, n_out, bias=True)
        # dlrm's initialisation: Xavier-like normal weights, normal biases
        nn.init.normal_(linear.weight, 0.0, math.sqrt(2.0 / (n_in + n_out)))
        nn.init.normal_(linear.bias, 0.0, math.sqrt(1.0 / n_out))
        last = i == len(widths) - 2
        layers += [linear, nn.Sigmoid() if (last and final_sigmoid) else nn.ReLU()]
    return nn.Sequential(*layers)


class DLRMNet(nn.Module):
    """DLRM with dot interaction (the forward variants built on its stages are in variants.py).

    Inputs of a batch of B samples and K tables:
        dense_x: (B, 13) float, log(1 + count) features
        offsets: (K, B) int64, bag offsets of each table (arange(B) for one id per bag)
        indices: (K, B) int64, ids of each table
    Output: (B, 1) click probabilities.
    """

    def __init__(self, config: DLRMConfig, sparse_grad: bool = False):
        super().__init__()
        self.config = config
        self.emb_l = nn.ModuleList()
        for rows in config.table_sizes:
            bag = nn.EmbeddingBag(rows, config.embedding_dim, mode="sum", sparse=sparse_grad)
            bound = math.sqrt(1.0 / rows)
            nn.init.uniform_(bag.weight, -bound, bound)
            self.emb_l.append(bag)
        self.bot_l = _make_mlp(config.bottom_mlp, final_sigmoid=False)
        self.top_l = _make_mlp(config.top_mlp, final_sigmoid=True)
        self._register_tril_indices()

    def _register_tril_indices(self) -> None:
        # Lower-triangle index pairs in dlrm's order (i outer, j < i inner), built once here
        # rather than on every forward; non-persistent so the state dict stays dlrm's.
        f = self.config.num_features
        rows_i = [i for i in range(f) for _ in range(i)]
        cols_j = [j for i in range(f) for j in range(i)]
        self.register_buffer("tril_i", torch.tensor(rows_i, dtype=torch.long), persistent=False)
        self.register_buffer("tril_j", torch.tensor(cols_j, dtype=torch.long), persistent=False)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "DLRMNet":
        """A model that uses the state dict's tensors as its parameters (no copy).

        Built on the meta device first, so a Kaggle-sized model is never allocated and
        randomly initialised only to be overwritten.
        """
        with torch.device("meta"):
            model = cls(DLRMConfig.from_state_dict(state_dict))
        model.load_state_dict(state_dict, strict=True, assign=True)
        model._register_tril_indices()  # the index buffers were made on the meta device
        return model

    # The stages, separately callable so that variants and stage timings can reuse them.
    def bottom(self, dense_x: torch.Tensor) -> torch.Tensor:
        return self.bot_l(dense_x)  # (B, d)

    def embed(self, offsets: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        return [bag(indices[k], offsets[k]) for k, bag in enumerate(self.emb_l)]  # K x (B, d)

    def interact(self, x: torch.Tensor, ly: Sequence[torch.Tensor]) -> torch.Tensor:
        batch, dim = x.shape
        t = torch.cat([x, *ly], dim=1).view(batch, -1, dim)  # (B, F, d)
        z = torch.bmm(t, t.transpose(1, 2))  # (B, F, F)
        return torch.cat([x, z[:, self.tril_i, self.tril_j]], dim=1)  # (B, d + F(F-1)/2)

    def forward(self, dense_x: torch.Tensor, offsets: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense_x)
        ly = self.embed(offsets, indices)
        return self.top_l(self.interact(x, ly))  # (B, 1)


def embedding_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the embedding weights, in table order (what the sparsifier prunes)."""
    return _indexed_keys(state_dict, "emb_l", step=1, suffixes=("weight",))

