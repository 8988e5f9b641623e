"""Embedding tables in memory, in every format that can hold a pruned table.

Each format is a small class built from one float32 table (rows, dim). `lookup(indices,
offsets)` returns the (bags, dim) sums that nn.EmbeddingBag(mode="sum") gives for the same
dlrm-style indices and offsets (empty bags included), and `nbytes` counts every tensor the
format keeps: values, indices, offsets, remap tables, scales and biases.

The quantized formats use FBGEMM's inference kernels (IntNBitTableBatchedEmbeddingBagsCodegen,
what torchrec serves tables with): row-wise INT8 or INT4 with a half-precision scale and bias
per row, and for pruned rows an index remap (a pruned id maps to -1, which adds nothing).
FBGEMM is optional (package fbgemm-gpu-cpu on a CPU, fbgemm-gpu on CUDA); without it those
formats are unavailable and the experiment says so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F

from dlrm_sparsity.errors import UserInputError


def _bag_of_each_id(offsets: torch.Tensor, n_ids: int) -> torch.Tensor:
    """For every id, the bag it belongs to (offsets are each bag's first id)."""
    ends = torch.cat([offsets[1:], offsets.new_tensor([n_ids])])
    return torch.repeat_interleave(torch.arange(len(offsets), device=offsets.device),
                                   ends - offsets)


class Dense:
    """The float32 table as the other experiments hold it: the baseline."""

    name: ClassVar[str] = "dense"
    lossy: ClassVar[bool] = False

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.nbytes = table.nbytes

    @staticmethod
    def nbytes_of(table: torch.Tensor) -> int:
        return table.nbytes

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.table, offsets, mode="sum")


def _quiet_sparse(fn, *args):
    """torch.sparse layouts warn that they are beta at every use; that is known here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta", category=UserWarning)
        return fn(*args)


class Coo:
    """torch.sparse COO (its indices can only be int64): rows gathered with index_select,
    then summed per bag."""

    name: ClassVar[str] = "coo"
    lossy: ClassVar[bool] = False

    def __init__(self, table: torch.Tensor):
        self.coo = _quiet_sparse(lambda t: t.to_sparse_coo().coalesce(), table)
        self.nbytes = self.coo.indices().nbytes + self.coo.values().nbytes

    @staticmethod
    def nbytes_of(table: torch.Tensor) -> int:
        """What __init__ would keep, without building it: (2, nnz) int64 and nnz values."""
        return int((table != 0).sum()) * (2 * 8 + table.element_size())

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # Never in inference mode: on tables of about 100,000 rows and more, index_select on a
        # COO tensor updates a tensor in place that inference mode made (torch 2.13 raises).
        with torch.inference_mode(False), torch.no_grad():
            rows = _quiet_sparse(lambda: self.coo.index_select(0, indices).to_dense())
        out = rows.new_zeros(len(offsets), rows.shape[1])
        return out.index_add_(0, _bag_of_each_id(offsets, len(indices)), rows)


def _csr_as(csr: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A CSR tensor of torch's own making, its indices cast to dtype. Its invariants hold by
    construction, so torch is told not to check them (it warns when left to decide)."""
    return torch.sparse_csr_tensor(csr.crow_indices().to(dtype), csr.col_indices().to(dtype),
                                   csr.values(), shape, check_invariants=False)


class Csr:
    """torch.sparse CSR with int32 indices. The lookup reads the CSR's own three tensors: each
    id's run of (column, value) pairs, found through crow_indices, is added into its bag.
    torch.sparse offers no CSR row gather (index_select has no CSR kernel), and the product of
    a one-hot CSR of the bags with the table (torch.sparse.mm, CSR x CSR) leaks about 0.2 MB a
    call on the CPU in torch 2.13 (benchmarks/bench_sparse_leak.py), hence this gather."""

    name: ClassVar[str] = "csr"
    lossy: ClassVar[bool] = False
    index_dtype: ClassVar[torch.dtype] = torch.int32

    def __init__(self, table: torch.Tensor):
        csr = _quiet_sparse(lambda t: t.to_sparse_csr(), table)
        self.csr = _csr_as(csr, tuple(table.shape), self.index_dtype)
        self.nbytes = sum(t.nbytes for t in (self.csr.crow_indices(), self.csr.col_indices(),
                                             self.csr.values()))

    @classmethod
    def nbytes_of(cls, table: torch.Tensor) -> int:
        """What __init__ would keep, without building it: rows + 1 offsets, nnz columns and
        nnz values."""
        index = torch.empty((), dtype=cls.index_dtype).element_size()
        nnz = int((table != 0).sum())
        return (table.shape[0] + 1) * index + nnz * (index + table.element_size())

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        crow, cols, values = (self.csr.crow_indices(), self.csr.col_indices(),
                              self.csr.values())
        dim = self.csr.shape[1]
        starts = crow[indices].long()
        counts = crow[indices + 1].long() - starts  # non-zeros of each id's row
        total = int(counts.sum())
        # position of every non-zero to add: its row's start plus its rank within the row
        run_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts,
                                            output_size=total)
        positions = (torch.repeat_interleave(starts, counts, output_size=total)
                     + torch.arange(total, device=indices.device) - run_start)
        bag = torch.repeat_interleave(_bag_of_each_id(offsets, len(indices)), counts,
                                      output_size=total)
        out = values.new_zeros(len(offsets) * dim)
        out.index_add_(0, bag * dim + cols[positions].long(), values[positions])
        return out.view(len(offsets), dim)


class Csr64(Csr):
    """CSR with torch's default int64 indices: twice the index bytes of int32."""

    name, index_dtype = "csr_int64", torch.int64


def kept_rows(table: torch.Tensor) -> torch.Tensor:
    """Rows with any non-zero value (-0.0 counts as zero)."""
    return (table != 0).any(dim=1).nonzero().view(-1)


def compact_ids(rows: int, kept: torch.Tensor, missing: int) -> torch.Tensor:
    """An int32 remap of a table's ids: kept row kept[i] -> i, every other id -> missing."""
    remap = torch.full((rows,), missing, dtype=torch.int32, device=kept.device)
    remap[kept] = torch.arange(len(kept), dtype=torch.int32, device=kept.device)
    return remap


class RowPruned:
    """All-zero rows removed; an int32 remap sends each id to its compact row, and every
    pruned id to one zero row at the end; then a dense lookup on the compact table."""

    name: ClassVar[str] = "row_pruned"
    lossy: ClassVar[bool] = False

    def __init__(self, table: torch.Tensor):
        kept = kept_rows(table)
        self.compact = torch.cat([table[kept], table.new_zeros(1, table.shape[1])])
        self.remap = compact_ids(table.shape[0], kept, missing=len(kept))
        self.nbytes = self.compact.nbytes + self.remap.nbytes

    @staticmethod
    def nbytes_of(table: torch.Tensor) -> int:
        """What __init__ would keep, without building it: kept rows and a zero row, the remap."""
        rows = len(kept_rows(table)) + 1
        return rows * table.shape[1] * table.element_size() + table.shape[0] * 4

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(self.remap[indices], self.compact, offsets.int(), mode="sum")


def fbgemm_available(device: torch.device | None = None) -> bool:
    """FBGEMM is installed, in a build with kernels for the device (CUDA needs fbgemm-gpu,
    not fbgemm-gpu-cpu)."""
    if importlib.util.find_spec("fbgemm_gpu") is None:
        return False
    if device is None or device.type != "cuda":
        return True
    try:
        importlib.metadata.distribution("fbgemm-gpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


WEIGHT_TYPES = ("fp32", "fp16", "int8", "int4", "int2")  # FBGEMM's CPU inference weights
# TorchRec's QuantEmbeddingBagCollection pads every row to 16 bytes on every device (its
# DEFAULT_ROW_ALIGNMENT); FBGEMM's own default is 1 on the CPU. Tables are counted as served.
ROW_ALIGNMENT = 16
PACK_ROWS = 1 << 20  # rows packed at a time: bounded temporaries on a table of 10 M rows


class TableBatched:
    """Every table of a model in one FBGEMM inference TBE (IntNBitTableBatchedEmbeddingBags-
    Codegen, what torchrec serves tables with), in one weight type of WEIGHT_TYPES (row-wise
    INT8/4/2 with a half-precision scale and bias per row), one kernel call for all the
    tables: one op per table costs 26 calls (on the demo's CPU, lookups 4.6-4.7x dense with one
    op per table, 4.1-4.3x with one for all). kept[k] (ascending row ids, or None for all)
    holds only those rows of table k, behind FBGEMM's index remap: a pruned id maps to -1 and
    adds nothing. nbytes counts the op's own buffers: its weights (rows padded to
    row_alignment bytes, tables to 128) and the remap. The weights are allocated once,
    quantized size; each table is quantized and copied in on its own, so the float
    temporaries never exceed one table."""

    def __init__(self, tables: list[torch.Tensor], weight_type: str,
                 kept: list[torch.Tensor | None] | None = None,
                 row_alignment: int = ROW_ALIGNMENT):
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        device = tables[0].device
        cuda = device.type == "cuda"
        kept = kept or [None] * len(tables)
        rows = [t.shape[0] if k is None else len(k) for t, k in zip(tables, kept, strict=True)]
        self.dims = [t.shape[1] for t in tables]
        sparse_type = SparseType(weight_type)
        for k, dim in enumerate(self.dims):
            if dim * sparse_type.bit_rate() % 8:  # the op's own refusal, said in one line
                raise UserInputError(f"{weight_type}: table {k} is {dim} wide, and FBGEMM "
                                     f"packs {weight_type} rows in whole bytes (a width "
                                     f"divisible by {8 // sparse_type.bit_rate()})")
        self.op = IntNBitTableBatchedEmbeddingBagsCodegen(
            [(f"table{k}", rows[k], self.dims[k], sparse_type,
              EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST)
             for k in range(len(tables))],
            device=device, pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32,
            row_alignment=row_alignment)
        self.op.initialize_weights()
        for (data, scale_bias), table, k in zip(self.op.split_embedding_weights(), tables, kept,
                                                strict=True):
            for start in range(0, len(data), PACK_ROWS):  # a chunk's temporaries at a time
                end = min(len(data), start + PACK_ROWS)
                packed = pack_rows(table[start:end] if k is None else table[k[start:end]],
                                   weight_type)
                data[start:end].copy_(packed if scale_bias is None else packed[:, :-4])
                if scale_bias is not None:  # the fused rows end with the half scale and bias
                    scale_bias[start:end].copy_(packed[:, -4:])
        self.nbytes = (self.op.weights_dev if cuda else self.op.weights_host).nbytes
        if any(k is not None for k in kept):
            self.op.set_index_remappings_array(
                [None if k is None else compact_ids(t.shape[0], k, missing=-1)
                 for t, k in zip(tables, kept, strict=True)])
            self.nbytes += (self.op.index_remappings_array.nbytes
                            + self.op.index_remappings_array_offsets.nbytes)

    def embed(self, offsets, indices) -> list[torch.Tensor]:
        """dlrm's (K, B) offsets and (K, N) indices (or K-long lists of each table's 1-D
        offsets and ids, for bags of several ids), every table in one call: K x (B, d)."""
        if isinstance(indices, torch.Tensor):
            tables, ids = indices.shape
            # one flat list of bags, table after table: table k's ids start at k * N
            starts = (offsets + ids * torch.arange(tables, device=offsets.device)[:, None])
            flat, total = indices.reshape(-1), tables * ids
        else:
            firsts = [0] + [len(i) for i in indices]
            base = torch.tensor(firsts, device=offsets[0].device).cumsum(0)
            starts = torch.cat([o + b for o, b in zip(offsets, base[:-1], strict=True)])
            flat, total = torch.cat(list(indices)), int(base[-1])
        ends = torch.cat([starts.reshape(-1), starts.new_tensor([total])])
        pooled = self.op(flat.int(), ends.int())  # (B, sum of dims)
        return list(pooled.split(self.dims, dim=1))

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """One table's lookup, for a format that holds one table."""
        return self.embed(offsets[None], indices[None])[0]

    def buffers(self) -> dict[str, torch.Tensor]:
        """What nbytes counts, by name (for the zip): the weights (an attribute of the op, not
        one of its registered buffers) and the remap."""
        weights = self.op.weights_dev if self.op.weights_dev.numel() else self.op.weights_host
        found = {"weights": weights}
        if hasattr(self.op, "index_remappings_array") and self.op.index_remappings_array.numel():
            found.update(index_remappings_array=self.op.index_remappings_array,
                         index_remappings_array_offsets=self.op.index_remappings_array_offsets)
        return found


def pack_rows(rows: torch.Tensor, weight_type: str) -> torch.Tensor:
    """(R, D) float rows as FBGEMM's inference TBE holds them, uint8: fp32 and fp16 as they
    are, INT8/4/2 row-wise with the half scale and bias at each row's end, as torchrec's
    quantize_state_dict packs them (FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf)."""
    rows = rows.detach().float()
    if weight_type == "fp32":
        return rows.contiguous().view(torch.uint8)
    if weight_type == "fp16":
        return rows.half().contiguous().view(torch.uint8)
    bits = int(weight_type[3:])
    return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, bits)


class Quantized(TableBatched):
    """An experiment-4 format: row-wise INT8 or INT4 in FBGEMM's inference table; with
    prune_rows, only the non-zero rows."""

    name: ClassVar[str] = "int8"
    lossy: ClassVar[bool] = True
    prune_rows: ClassVar[bool] = False

    def __init__(self, tables: list[torch.Tensor]):
        weight_type = self.name.rsplit("_", 1)[-1]
        super().__init__(tables, weight_type,
                         [kept_rows(t) for t in tables] if self.prune_rows else None)


class Int8(Quantized):
    name = "int8"


class Int4(Quantized):
    name = "int4"


class RowPrunedInt8(Quantized):
    name, prune_rows = "row_pruned_int8", True


class RowPrunedInt4(Quantized):
    name, prune_rows = "row_pruned_int4", True


class PerTable:
    """The tables of a format that holds each table on its own, looked up one by one."""

    def __init__(self, held: list):
        self.held = held
        self.nbytes = sum(t.nbytes for t in held)

    def embed(self, offsets: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        return [t.lookup(indices[k], offsets[k]) for k, t in enumerate(self.held)]  # K x (B, d)


def hold(cls, tables: list[torch.Tensor], budget: int) -> tuple[PerTable | Quantized | None, int]:
    """The model's tables in one format, and the bytes they take; None instead of the tables
    when those bytes exceed budget (nobody would serve them, and holding them could take
    several times the model). Tables are built one at a time; where a format's size follows
    from the table alone (nbytes_of), an outgrowing format is never built: COO at level 0 is
    5x the table."""
    if issubclass(cls, Quantized):
        held = cls(tables)
        return (held if held.nbytes <= budget else None), held.nbytes
    if hasattr(cls, "nbytes_of"):
        total = sum(cls.nbytes_of(t) for t in tables)
        if total > budget:
            return None, total
    kept: list | None = []
    total = 0
    for table in tables:
        fmt = cls(table)
        total += fmt.nbytes
        kept = kept + [fmt] if kept is not None and total <= budget else None
    return (PerTable(kept) if kept is not None else None), total


FORMATS = {cls.name: cls for cls in (Dense, Coo, Csr, Csr64, RowPruned, Int8, Int4,
                                     RowPrunedInt8, RowPrunedInt4)}
NEEDS_FBGEMM = {name for name, cls in FORMATS.items() if issubclass(cls, Quantized)}


def choose_formats(asked: list[str] | None, device: torch.device) -> list[str]:
    """The formats to measure: those asked for (a UserInputError for an unknown one, or for
    one whose FBGEMM is missing), or all, less those needing a missing FBGEMM (with a note)."""
    names = asked or list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserInputError(f"--formats: unknown format {unknown[0]!r}; expected some of "
                             f"{', '.join(FORMATS)}")
    missing = [n for n in names if n in NEEDS_FBGEMM] if not fbgemm_available(device) else []
    if asked and missing:
        raise UserInputError(f"--formats {missing[0]}: needs FBGEMM, which is not installed "
                             f"for {device.type} (fbgemm-gpu-cpu on a CPU, fbgemm-gpu on CUDA)")
    if missing:
        print(f"note: {', '.join(missing)} skipped: FBGEMM is not installed for "
              f"{device.type} (fbgemm-gpu-cpu on a CPU, fbgemm-gpu, of the release that "
              "matches torch, on CUDA)")
        names = [n for n in names if n not in NEEDS_FBGEMM]
    return list(dict.fromkeys(names))
