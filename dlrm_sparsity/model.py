"""The suite's DLRM: facebookresearch/dlrm's DLRM_Net, TorchRec's DLRM and its DLRM_DCN.

All three share the stages: a bottom (dense) MLP with ReLU on every layer, sum-pooled embedding
bags, an interaction, and a top (over) MLP with ReLU between its layers. They differ in the
interaction only:
- dlrm: the bottom output and the dot products of every pair of vectors, pairs in the lower
  triangle's row-major order (no self-interaction);
- TorchRec DLRM: the same dot products in the upper triangle's row-major order
  (`triu_indices(F, F, offset=1)`), so the pair (i, j) of dlrm is TorchRec's (j, i);
- TorchRec DLRM_DCN: a low-rank cross net over x0 = [bottom output, e_1 .. e_F]:
  x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l (torchrec/modules/crossnet.py, LowRankCrossNet).
dlrm ends the top MLP in a sigmoid; TorchRec's over arch returns logits, so the suite appends
the sigmoid (the metrics need probabilities) and `logit` gives TorchRec's own output.

The parameters use dlrm's names (`emb_l`, `bot_l`, `top_l`; `crossnet` for the cross net):
dlrm's checkpoints load with `strict=True`, and layouts.py renames TorchRec's keys to these.
The architecture is read off a state dict (`DLRMConfig.from_state_dict`), so any sizes work.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dlrm_sparsity.errors import CheckpointError
from dlrm_sparsity.layouts import DLRM, TORCHREC, Layout, embedding_names, read_layout

__all__ = ["DLRMConfig", "DLRMNet", "LowRankCrossNet", "embedding_names"]


@dataclass(frozen=True)
class DLRMConfig:
    """Everything needed to build a DLRMNet; all of it is readable from a state dict."""

    table_sizes: tuple[int, ...]  # rows of each embedding table (ln_emb)
    embedding_dim: int  # m_spa
    bottom_mlp: tuple[int, ...]  # ln_bot, input width first, ends with embedding_dim
    top_mlp: tuple[int, ...]  # ln_top, input width first (interaction output), ends with 1
    layout: str = DLRM  # whose model: dlrm's, or TorchRec's (pairs in upper-triangle order)
    cross_layers: int = 0  # TorchRec's DLRM_DCN: layers of the low-rank cross net
    cross_rank: int = 0  # and their rank

    @property
    def num_features(self) -> int:
        """Vectors that enter the interaction: the bottom-MLP output plus one per table."""
        return len(self.table_sizes) + 1

    @property
    def interaction(self) -> str:
        return "dcn" if self.cross_layers else "dot"

    @property
    def interaction_width(self) -> int:
        """Width of z, the top MLP's input: [x, the F(F-1)/2 dot products], or the cross
        net's output, as wide as its input [x, e_1 .. e_F]."""
        f = self.num_features
        if self.cross_layers:
            return f * self.embedding_dim
        return self.embedding_dim + f * (f - 1) // 2

    @property
    def kind(self) -> str:
        """What the model is, in words: 'dlrm', 'torchrec DLRM' or 'torchrec DLRM_DCN'."""
        if self.layout == DLRM:
            return "dlrm"
        return "torchrec DLRM_DCN" if self.cross_layers else "torchrec DLRM"

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DLRMConfig":
        return cls(tuple(d["table_sizes"]), int(d["embedding_dim"]),
                   tuple(d["bottom_mlp"]), tuple(d["top_mlp"]), d.get("layout", DLRM),
                   int(d.get("cross_layers", 0)), int(d.get("cross_rank", 0)))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "DLRMConfig":
        """Infer the architecture of a dlrm or TorchRec state dict; raise CheckpointError
        naming the first key that does not fit."""
        return cls.from_layout(state_dict, read_layout(state_dict))

    @classmethod
    def from_layout(cls, state_dict: Mapping[str, torch.Tensor], layout: Layout) -> "DLRMConfig":
        """from_state_dict, its layout already read."""
        try:
            return cls._from_suite_keys(layout.to_suite(state_dict), layout.kind)
        except CheckpointError as exc:  # name the file's keys, not the suite's
            message = re.sub(r"(emb_l|bot_l|top_l|crossnet)\.[\w.]+",
                             lambda m: layout.file_key(m.group(0)), str(exc))
            raise CheckpointError(message) from None

    @classmethod
    def _from_suite_keys(cls, state_dict: Mapping[str, torch.Tensor],
                         layout: str) -> "DLRMConfig":
        tables = _indexed_keys(state_dict, "emb_l", step=1, suffixes=("weight",))
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
        cross = _cross_net(state_dict, (len(sizes) + 1) * dim)
        cfg = cls(tuple(sizes), dim, bottom, top, layout, *cross)
        if bottom[-1] != dim:
            raise CheckpointError(f"bot_l.{2 * (len(bottom) - 2)}.weight ends with width "
                                  f"{bottom[-1]} but the embeddings have width {dim}")
        if top[0] != cfg.interaction_width:
            what = ("cross net" if cfg.cross_layers
                    else f"dot interaction of {len(sizes)} tables")
            raise CheckpointError(f"top_l.0.weight takes {top[0]} inputs but the {what} "
                                  f"gives {cfg.interaction_width} (one feature per table is "
                                  "supported)")
        expected = set(tables) | {f"{name}.{2 * i}.{p}" for name, mlp in
                                  (("bot_l", bottom), ("top_l", top))
                                  for i in range(len(mlp) - 1) for p in ("weight", "bias")}
        expected |= {f"crossnet.{p}.{i}" for p in ("W_kernels", "V_kernels", "bias")
                     for i in range(cfg.cross_layers)}
        unexpected = sorted(set(state_dict) - expected)
        if unexpected:
            raise CheckpointError(f"not a DLRM state dict: unexpected key '{unexpected[0]}'")
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


def _cross_net(state_dict, width: int) -> tuple[int, int]:
    """(layers, rank) of a low-rank cross net over inputs of `width`; (0, 0) without one."""
    layers = 0
    while f"crossnet.W_kernels.{layers}" in state_dict:
        layers += 1
    if not layers:
        return 0, 0
    rank = int(state_dict["crossnet.W_kernels.0"].shape[-1])
    for i in range(layers):
        shapes = {p: tuple(state_dict.get(f"crossnet.{p}.{i}", torch.empty(0)).shape)
                  for p in ("W_kernels", "V_kernels", "bias")}
        if shapes != {"W_kernels": (width, rank), "V_kernels": (rank, width),
                      "bias": (width,)}:
            raise CheckpointError(f"crossnet.W_kernels.{i} and its V_kernels and bias have "
                                  f"shapes {list(shapes.values())}: expected ({width}, "
                                  f"{rank}), ({rank}, {width}) and ({width},)")
    return layers, rank


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


class LowRankCrossNet(nn.Module):
    """TorchRec's DCN v2 cross net with low-rank kernels; its parameter names are TorchRec's
    (W_kernels.<l>, V_kernels.<l>, bias.<l>), so the layout map is a plain rename."""

    def __init__(self, width: int, layers: int, rank: int):
        super().__init__()
        # TorchRec's initialisation: Xavier-normal kernels, zero biases
        self.W_kernels = nn.ParameterList(
            [nn.Parameter(nn.init.xavier_normal_(torch.empty(width, rank)))
             for _ in range(layers)])
        self.V_kernels = nn.ParameterList(
            [nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, width)))
             for _ in range(layers)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(width)) for _ in range(layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, v, b in zip(self.W_kernels, self.V_kernels, self.bias, strict=True):
            x = x0 * (F.linear(F.linear(x, v), w) + b) + x  # (B, N)
        return x


class DLRMNet(nn.Module):
    """A DLRM of any of the three kinds (the forward variants built on its stages are in
    variants.py).

    Inputs of a batch of B samples and K tables:
        dense_x: (B, 13) float, the dense features as the data's loader gives them
        offsets: (K, B) int64, bag offsets of each table (arange(B) for one id per bag)
        indices: (K, B) int64, ids of each table
    (or, for bags of several ids, K-long lists of each table's 1-D offsets and indices).
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
        if config.cross_layers:
            self.crossnet = LowRankCrossNet(config.interaction_width, config.cross_layers,
                                            config.cross_rank)
        self.top_l = _make_mlp(config.top_mlp, final_sigmoid=True)
        self._register_pair_indices()

    def _register_pair_indices(self) -> None:
        # The dot interaction's index pairs (i, j) in the model's own order, built once here
        # rather than on every forward; non-persistent so the state dict stays the file's.
        f = self.config.num_features
        if self.config.layout == TORCHREC:  # upper triangle, row-major: i < j
            rows_i = [i for i in range(f) for _ in range(i + 1, f)]
            cols_j = [j for i in range(f) for j in range(i + 1, f)]
        else:  # dlrm: lower triangle, row-major: i outer, j < i inner
            rows_i = [i for i in range(f) for _ in range(i)]
            cols_j = [j for i in range(f) for j in range(i)]
        self.register_buffer("pair_i", torch.tensor(rows_i, dtype=torch.long), persistent=False)
        self.register_buffer("pair_j", torch.tensor(cols_j, dtype=torch.long), persistent=False)
        self.register_buffer("pair_flat", self.pair_i * f + self.pair_j, persistent=False)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "DLRMNet":
        """A model that uses the state dict's tensors (dlrm's or TorchRec's layout) as its
        parameters (no copy).

        Built on the meta device first, so a Kaggle-sized model is never allocated and
        randomly initialised only to be overwritten.
        """
        layout = read_layout(state_dict)
        with torch.device("meta"):
            model = cls(DLRMConfig.from_layout(state_dict, layout))
        model.load_state_dict(layout.to_suite(state_dict), strict=True, assign=True)
        model._register_pair_indices()  # the index buffers were made on the meta device
        return model

    # The stages, separately callable so that variants and stage timings can reuse them.
    def bottom(self, dense_x: torch.Tensor) -> torch.Tensor:
        return self.bot_l(dense_x)  # (B, d)

    def embed(self, offsets, indices) -> list[torch.Tensor]:
        return [bag(indices[k], offsets[k]) for k, bag in enumerate(self.emb_l)]  # K x (B, d)

    def interact(self, x: torch.Tensor, ly: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.config.cross_layers:
            return self.crossnet(torch.cat([x, *ly], dim=1))  # (B, (K + 1) d)
        batch, dim = x.shape
        t = torch.cat([x, *ly], dim=1).view(batch, -1, dim)  # (B, F, d)
        z = torch.bmm(t, t.transpose(1, 2))  # (B, F, F)
        # z[:, pair_i, pair_j] (dlrm's and TorchRec's gather) as one index_select over the
        # flattened products: the same values, the gather about 2x faster on the CPU at the
        # demo's batch, the whole forward a few percent (benchmarks/bench_interaction.py)
        pairs = z.flatten(1).index_select(1, self.pair_flat)
        return torch.cat([x, pairs], dim=1)  # (B, d + F(F-1)/2)

    def forward(self, dense_x: torch.Tensor, offsets, indices) -> torch.Tensor:
        x = self.bottom(dense_x)
        ly = self.embed(offsets, indices)
        return self.top_l(self.interact(x, ly))  # (B, 1)

    def logit(self, dense_x: torch.Tensor, offsets, indices) -> torch.Tensor:
        """The top MLP's output before its sigmoid: what TorchRec's DLRM returns."""
        x = self.bottom(dense_x)
        return self.top_l[:-1](self.interact(x, self.embed(offsets, indices)))  # (B, 1)
