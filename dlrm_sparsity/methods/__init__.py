"""Compression methods for a trained model's embedding tables, and the one registry that names
them.

A method turns the float32 tables into served tables: an object with `embed(offsets, indices)`
-> K x (B, d) (the dense tables' lookups), `nbytes` (every buffer it holds, counted from the
serving kernel's own buffers) and `buffers()` (those buffers by name, for the zip). Kinds:
- a row pruner (rows.py: row_norm, row_freq) keeps each table's rows at a level (the ratio);
- an encoding (fp16, int8, int4, int2) is the weight type FBGEMM's inference TBE holds the rows
  in (formats.TableBatched; fp32 where none is named);
- low rank (lowrank.py: svd) factors each table;
- datanorm (datanorm.py), the seed's sparsifier, is measured by experiments 1 to 4 and read
  from experiment 4's CSV.
A name joins a pruner or datanorm to an encoding with '+': row_norm+int8 keeps the rows, then
quantizes them, in one TBE behind FBGEMM's index remap (Compression, the two composed).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlrm_sparsity.checkpoints import save_state_dict_zip
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.formats import TableBatched, fbgemm_available
from dlrm_sparsity.methods.lowrank import LowRank, LowRankTables
from dlrm_sparsity.methods.rows import RowFreq, RowNorm

PRUNERS = {cls.name: cls for cls in (RowNorm, RowFreq)}
ENCODINGS = ("fp16", "int8", "int4", "int2")
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
DATANORM = ("datanorm", "datanorm+int8", "datanorm+int4")
DEFAULT_METHODS = (*DATANORM, "row_norm", "row_freq", *ENCODINGS, "row_norm+int8",
                   "row_norm+int4", "row_freq+int8", "row_freq+int4", "svd")


@dataclass(frozen=True)
class Compression:
    """A row pruner (or none) then an encoding: the tables FBGEMM's inference TBE serves."""

    pruner: RowNorm | RowFreq | None
    encoding: str = "fp32"

    @property
    def name(self) -> str:
        parts = [self.pruner.name] if self.pruner else []
        return "+".join(parts + ([self.encoding] if self.encoding != "fp32" or not parts
                                 else []))

    @property
    def needs_counts(self) -> bool:
        return self.pruner is not None and self.pruner.needs_counts

    @property
    def leveled(self) -> bool:
        return self.pruner is not None

    def serve(self, tables: list[torch.Tensor], level: float | None = None,
              counts: list[np.ndarray] | None = None, **_) -> TableBatched:
        if not fbgemm_available(tables[0].device):
            raise UserInputError(f"{self.name}: needs FBGEMM, which is not installed for "
                                 f"{tables[0].device.type} (fbgemm-gpu-cpu on a CPU, "
                                 "fbgemm-gpu on CUDA)")
        kept = None
        if self.pruner is not None:
            counts = counts or [None] * len(tables)
            kept = [self.pruner.kept(t, level, c) for t, c in zip(tables, counts, strict=True)]
        return TableBatched(tables, self.encoding, kept)


class Uncompressed:
    """The float32 tables as trained, looked up as the model does: the front's reference
    (method 'dense')."""

    name = "dense"
    needs_counts = leveled = False

    def serve(self, tables: list[torch.Tensor], **_) -> LowRankTables:
        return LowRankTables(tables, [None] * len(tables))  # every table whole


def parse_method(name: str) -> Compression | LowRank | str:
    """A --methods name as the method that makes it (a datanorm name stays a name: its rows
    are read, not made)."""
    if name in DATANORM:
        return name
    if name == "svd":
        return LowRank()
    parts = name.split("+")
    pruner = PRUNERS[parts[0]]() if parts[0] in PRUNERS else None
    encodings = parts[1:] if pruner else parts
    if len(encodings) > 1 or any(e not in ENCODINGS for e in encodings) or not name:
        raise UserInputError(f"--methods: unknown method {name!r}; expected one of "
                             f"{', '.join(DEFAULT_METHODS)}, or a pruner ({', '.join(PRUNERS)}) "
                             f"joined to an encoding ({', '.join(ENCODINGS)}) with '+'")
    return Compression(pruner, encodings[0] if encodings else "fp32")


def parse_methods(names: list[str] | None) -> list[Compression | LowRank | str]:
    """The methods to run, each once, in the order asked (default: DEFAULT_METHODS)."""
    return [parse_method(n) for n in dict.fromkeys(names or DEFAULT_METHODS)]


def settings(method, levels: list[float], ranks: list[int]) -> list[tuple[str, dict]]:
    """(label, serve's keywords) of each setting of a method: a pruner or svd at every level
    (svd also at every rank asked), anything else once."""
    if method.name == "svd":
        return ([(f"level {lv:g}", {"level": lv}) for lv in levels]
                + [(f"rank {r}", {"rank": r}) for r in ranks])
    if method.leveled:
        return [(f"level {lv:g}", {"level": lv}) for lv in levels]
    return [("float32" if method.name == "dense" else "all rows", {})]


def zipped_bytes(model: torch.nn.Module, served, folder: Path, threads: int) -> int:
    """The checkpoint as it would ship, zipped as experiment 1 zips (then removed): the
    model's other tensors and the served tables' buffers."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("emb_l.")}
    state.update({f"emb.{k}": v.cpu() for k, v in served.buffers().items()})
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        return save_state_dict_zip(state, Path(tmp) / "compressed.zip", threads=threads)
