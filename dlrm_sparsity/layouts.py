"""The two checkpoint layouts the suite reads, and the map from each to the suite's model.

- dlrm: facebookresearch/dlrm's DLRM_Net, `emb_l.<k>.weight`, `bot_l.<2k>.*`, `top_l.<2k>.*`;
- torchrec: TorchRec's DLRM and DLRM_DCN (torchrec/models/dlrm.py),
  `sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight`,
  `dense_arch.model._mlp.<k>._linear.*`, `over_arch.model.0._mlp.<k>._linear.*` and
  `over_arch.model.1.*` (the last layer), and for DCN `inter_arch.crossnet.{W_kernels,
  V_kernels,bias}.<l>`.

Either may carry a prefix of `model.` (DLRMTrain, DistributedModelParallel) or `module.` (DDP).
The suite's model (model.py) uses dlrm's names, plus `crossnet.*` for the cross net; a Layout
renames a file's keys to those and back. Files are never rewritten: a pruned checkpoint keeps
the input's own keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from dlrm_sparsity.errors import CheckpointError

DLRM, TORCHREC = "dlrm", "torchrec"
TORCHREC_TABLES = "sparse_arch.embedding_bag_collection.embedding_bags."
_PREFIX = re.compile(r"((model|module)\.)*")
_TORCHREC_RULES = (  # file key (after the prefix) -> the suite's key, by pattern
    (re.compile(r"dense_arch\.model\._mlp\.(\d+)\._linear\.(weight|bias)"), "bot_l"),
    (re.compile(r"over_arch\.model\.0\._mlp\.(\d+)\._linear\.(weight|bias)"), "top_l"),
    (re.compile(r"inter_arch\.crossnet\.(W_kernels|V_kernels|bias)\.(\d+)"), "crossnet"),
)
_LAST_OVER = re.compile(r"over_arch\.model\.1\.(weight|bias)")


@dataclass(frozen=True)
class Layout:
    """A checkpoint's key layout: its kind, its prefix, its tables' keys in table order, and
    each of its keys' name in the suite's model."""

    kind: str
    prefix: str
    tables: tuple[str, ...]
    suite_keys: dict[str, str]  # file key -> suite key

    def to_suite(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same tensors (no copies) under the suite's names."""
        return {self.suite_keys[k]: v for k, v in state_dict.items()}

    def to_file(self, suite_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The suite model's tensors under this layout's names, in the file's order."""
        return {k: suite_state[s] for k, s in self.suite_keys.items()}

    def file_key(self, suite_key: str) -> str:
        """The file's name for a suite key (for messages)."""
        return next((k for k, s in self.suite_keys.items() if s == suite_key), suite_key)


def _table_order(keys: list[str]) -> list[str]:
    """TorchRec tables in the model's feature order. torch.save of a DLRM keeps the order of
    its EmbeddingBagCollection; a sharded model's state dict need not, so names that all end
    in a distinct number (torchrec's t_cat_0 .. t_cat_25) are put in that number's order."""
    found = [re.search(r"(\d+)\.weight$", k) for k in keys]
    if not all(found):
        return keys
    numbers = [int(m.group(1)) for m in found]
    if len(set(numbers)) < len(keys):
        return keys
    return [k for _, k in sorted(zip(numbers, keys, strict=True))]


def read_layout(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    """Recognise a state dict's layout from its keys; CheckpointError says what does not fit."""
    keys = list(state_dict)
    prefix = _common_prefix(keys)
    if f"{prefix}emb_l.0.weight" in state_dict:
        tables, i = [], 0
        while f"{prefix}emb_l.{i}.weight" in state_dict:
            tables.append(f"{prefix}emb_l.{i}.weight")
            i += 1
        return Layout(DLRM, prefix, tuple(tables), {k: k[len(prefix):] for k in keys})
    table_keys = [k for k in keys if k.startswith(prefix + TORCHREC_TABLES)]
    if not table_keys:
        raise CheckpointError("not a DLRM state dict: neither dlrm's 'emb_l.0.weight' nor "
                              f"TorchRec's '{TORCHREC_TABLES}<table>.weight' keys")
    tables = _table_order(table_keys)
    suite = {k: f"emb_l.{i}.weight" for i, k in enumerate(tables)}
    top_layers = sum(1 for k in keys if _TORCHREC_RULES[1][0].fullmatch(k[len(prefix):])) // 2
    for key in keys:
        if key in suite:
            continue
        rest = key[len(prefix):]
        suite[key] = _torchrec_suite_key(rest, top_layers, key)
    return Layout(TORCHREC, prefix, tuple(tables), {k: suite[k] for k in keys})


def _torchrec_suite_key(rest: str, top_layers: int, key: str) -> str:
    for pattern, name in _TORCHREC_RULES:
        match = pattern.fullmatch(rest)
        if match and name == "crossnet":
            return f"crossnet.{match.group(1)}.{match.group(2)}"
        if match:
            return f"{name}.{2 * int(match.group(1))}.{match.group(2)}"
    match = _LAST_OVER.fullmatch(rest)
    if match:
        return f"top_l.{2 * top_layers}.{match.group(1)}"
    if rest.startswith("inter_arch."):
        raise CheckpointError(
            f"'{key}': an interaction the suite does not know; it reads TorchRec's DLRM (dot "
            "products) and DLRM_DCN (low-rank cross net), and dlrm's DLRM_Net")
    raise CheckpointError(f"not a TorchRec DLRM state dict: unexpected key '{key}'")


def _common_prefix(keys: Sequence[str]) -> str:
    """The `model.`/`module.` prefix every key shares ('' when there is none)."""
    first = _PREFIX.match(keys[0]).group(0) if keys else ""
    if any(not k.startswith(first) for k in keys):
        return ""
    return first


def embedding_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The file's keys of the embedding weights, in table order (what the sparsifier prunes)."""
    return list(read_layout(state_dict).tables)


def torchrec_layout(num_tables: int, top_layers: int, cross_layers: int,
                    bottom_layers: int, prefix: str = "") -> Layout:
    """The keys TorchRec's DLRM (or DLRM_DCN, with cross layers) of these sizes has, its
    tables named as torchrec's Criteo example names them (t_cat_0, t_cat_1, ...)."""
    suite: dict[str, str] = {}
    tables = tuple(f"{prefix}{TORCHREC_TABLES}t_cat_{i}.weight" for i in range(num_tables))
    suite.update({k: f"emb_l.{i}.weight" for i, k in enumerate(tables)})
    for k in range(bottom_layers):
        for p in ("weight", "bias"):
            suite[f"{prefix}dense_arch.model._mlp.{k}._linear.{p}"] = f"bot_l.{2 * k}.{p}"
    for part in ("W_kernels", "V_kernels", "bias"):
        for layer in range(cross_layers):
            suite[f"{prefix}inter_arch.crossnet.{part}.{layer}"] = f"crossnet.{part}.{layer}"
    for k in range(top_layers - 1):
        for p in ("weight", "bias"):
            suite[f"{prefix}over_arch.model.0._mlp.{k}._linear.{p}"] = f"top_l.{2 * k}.{p}"
    for p in ("weight", "bias"):
        suite[f"{prefix}over_arch.model.1.{p}"] = f"top_l.{2 * (top_layers - 1)}.{p}"
    return Layout(TORCHREC, prefix, tables, suite)


def dlrm_columns_of_torchrec(num_features: int, dim: int) -> list[int]:
    """For each column of TorchRec's dot interaction output, the column of dlrm's that holds
    the same value: the first `dim` (the bottom output) are equal; TorchRec's pair (j, i),
    j < i, in upper-triangle order, is dlrm's pair (i, j) in lower-triangle order. So
    `W_torchrec = W_dlrm[:, dlrm_columns_of_torchrec(F, D)]` for the first top layer."""
    n = num_features
    return list(range(dim)) + [dim + i * (i - 1) // 2 + j
                               for j in range(n) for i in range(j + 1, n)]
