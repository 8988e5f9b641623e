"""The compression methods against the field's own code: FBGEMM's inference converter and
TBE, TorchRec's quantized EmbeddingBagCollection, numpy.bincount, and a truncated SVD."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlrm_sparsity.criteo.counts import training_counts
from dlrm_sparsity.criteo.data import load_split
from dlrm_sparsity.errors import DataError, UserInputError
from dlrm_sparsity.formats import TableBatched, fbgemm_available, pack_rows
from dlrm_sparsity.methods import (
    DEFAULT_METHODS,
    Compression,
    Uncompressed,
    parse_method,
    parse_methods,
    zipped_bytes,
)
from dlrm_sparsity.methods.lowrank import LowRank, rank_for
from dlrm_sparsity.methods.rows import RowFreq, RowNorm, rows_kept

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm-gpu(-cpu)")


def table(rows=50, dim=8, seed=0):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def bags(rows, n=40, bags_=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, rows, (n,), generator=g)
    offsets = torch.sort(torch.randint(0, n, (bags_,), generator=g)).values
    offsets[0] = 0
    return indices, offsets


def converter_prune(weights: torch.Tensor, ratio: float):
    """FBGEMM's SplitEmbInferenceConverter pruning one CPU table: its kept rows and remap."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_embedding_inference_converter import SplitEmbInferenceConverter
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(weights.shape[0], weights.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU)])
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(weights)
    converter = SplitEmbInferenceConverter(SparseType.FP32, ratio)
    return converter._prune_embs(0, weights.shape[0], tbe)


@needs_fbgemm
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9, 0.99])
def test_row_norm_keeps_the_rows_and_remap_of_fbgemms_converter(ratio):
    weights = table(200, 8)
    weights[10:20] = weights[5]  # ties at the cut: the converter keeps them all
    pruned, remap = converter_prune(weights, ratio)
    kept = RowNorm().kept(weights, ratio)
    assert torch.equal(kept, (remap >= 0).nonzero().view(-1))
    assert torch.equal(weights[kept], pruned)
    served = Compression(RowNorm(), "fp32").serve([weights], ratio)
    assert torch.equal(served.op.index_remappings_array, remap)  # -1: pruned, looks up nothing
    assert len(kept) >= rows_kept(200, ratio)


@needs_fbgemm
def test_a_ratio_that_keeps_every_row_prunes_nothing_as_the_converter_does():
    weights = table(10, 8)
    assert converter_prune(weights, 0.01)[1] is None and RowNorm().kept(weights, 0.01) is None
    assert rows_kept(3, 0.99) == 1  # at least one row, as the converter asserts


@needs_fbgemm
@pytest.mark.parametrize("weight_type", ["fp32", "fp16", "int8", "int4", "int2"])
def test_each_encoding_looks_up_what_fbgemm_packed_and_counts_what_the_tbe_allocates(
        weight_type):
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    tables = [table(50, 8, 0), table(30, 16, 1)]
    served = TableBatched(tables, weight_type)
    # FBGEMM's TBE built on its own from the same packed rows
    packed = [pack_rows(t, weight_type) for t in tables]
    lists = [(p, None) if weight_type in ("fp32", "fp16") else (p[:, :-4], p[:, -4:])
             for p in packed]
    ref = IntNBitTableBatchedEmbeddingBagsCodegen(
        [(f"t{k}", t.shape[0], t.shape[1], SparseType(weight_type), EmbeddingLocation.HOST)
         for k, t in enumerate(tables)], weight_lists=lists, device="cpu",
        pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32, row_alignment=16)
    assert served.nbytes == ref.weights_host.nbytes
    bits = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}[weight_type]
    scale_bias = 0 if bits >= 16 else 4
    want = sum(math.ceil(t.shape[0] * 16 * math.ceil((t.shape[1] * bits // 8 + scale_bias)
                                                      / 16) / 128) * 128 for t in tables)
    assert served.nbytes == want  # rows padded to 16 bytes, tables to 128
    lookups = [bags(t.shape[0], seed=k) for k, t in enumerate(tables)]  # 12 bags each
    got = served.embed([o for _, o in lookups], [i for i, _ in lookups])
    ends = torch.cat([lookups[0][1], lookups[1][1] + len(lookups[0][0]), torch.tensor([80])])
    theirs = ref(torch.cat([i for i, _ in lookups]).int(), ends.int()).split([8, 16], dim=1)
    for k, (indices, offsets) in enumerate(lookups):
        torch.testing.assert_close(got[k], theirs[k], rtol=0, atol=0)
        # and what the packed rows hold, dequantized by FBGEMM, summed per bag
        rows = (packed[k].view(torch.float32) if weight_type == "fp32" else
                packed[k].view(torch.float16).float() if weight_type == "fp16" else
                torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(packed[k], bits))
        torch.testing.assert_close(got[k], F.embedding_bag(indices, rows, offsets, mode="sum"),
                                   rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_int2_on_a_width_fbgemm_refuses_is_one_clear_error():
    with pytest.raises(UserInputError, match="table 0 is 6 wide.*int2.*divisible by 4"):
        TableBatched([table(10, 6)], "int2")


def test_frequency_pruning_keeps_the_most_looked_up_rows_ties_to_the_lower_id():
    counts = np.array([5, 0, 7, 5, 5, 1, 7, 0])
    kept = RowFreq().kept(torch.zeros(8, 4), 0.5, counts)
    ranked = sorted(range(8), key=lambda i: (-counts[i], i))[:4]
    assert kept.tolist() == sorted(ranked) == [0, 2, 3, 6]
    with pytest.raises(UserInputError, match="training split's id counts"):
        RowFreq().kept(torch.zeros(8, 4), 0.5, None)


def test_training_counts_are_numpys_bincount_over_the_training_ids(tiny_pipeline):
    from dlrm_sparsity.checkpoints import load_dlrm_state_dict
    from dlrm_sparsity.model import DLRMConfig

    sizes = DLRMConfig.from_state_dict(load_dlrm_state_dict(tiny_pipeline["model"])).table_sizes
    counts = training_counts(str(tiny_pipeline["processed"]), str(tiny_pipeline["raw"]), sizes)
    train = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "train")
    for k, c in enumerate(counts):
        assert np.array_equal(c, np.bincount(train.sparse_t[k].numpy(), minlength=sizes[k]))
    assert sum(int(c.sum()) for c in counts) == 26 * len(train)


def test_counts_without_training_days_are_one_clear_error(tmp_path):
    np.save(tmp_path / "day_0_dense.npy", np.zeros((4, 13), np.float32))
    np.save(tmp_path / "day_0_sparse.npy", np.zeros((4, 26), np.int64))
    np.save(tmp_path / "day_0_labels.npy", np.zeros((4, 1), np.int32))
    with pytest.raises(DataError, match="one day only, so no training days"):
        training_counts(str(tmp_path), None, (3,) * 26)


def test_low_rank_holds_the_truncated_svd_and_its_bytes():
    t = table(300, 16)
    served = LowRank().serve([t, table(1, 16, 2)], level=0.5)
    rank = rank_for(300, 16, 0.5)
    assert served.ranks == [rank, None] and rank == math.floor(300 * 16 * 0.5 / 316)
    assert served.nbytes == 4 * rank * (300 + 16) + 4 * 16  # a one-row table stays whole
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: the closest rank-r table
    indices, offsets = bags(300)
    torch.testing.assert_close(served.embed([offsets, offsets[:1]], [indices, indices[:0]])[0],
                               F.embedding_bag(indices, best, offsets, mode="sum"),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(UserInputError, match="rank 17 is above table 0's width 16"):
        LowRank().serve([t], rank=17)


def test_the_registry_names_every_method_once_and_composes_pruner_and_encoding():
    names = [getattr(m, "name", m) for m in parse_methods(None)]
    assert names == list(DEFAULT_METHODS) and len(set(names)) == len(names)
    combo = parse_method("row_freq+int4")
    assert isinstance(combo.pruner, RowFreq) and combo.encoding == "int4" and combo.needs_counts
    assert parse_method("row_norm").encoding == "fp32" and parse_method("int2").pruner is None
    assert Uncompressed().name == "dense"
    for bad in ("row_norm+int3", "int8+int4", "svd+int8", "row_norm+row_freq", ""):
        with pytest.raises(UserInputError, match="--methods: unknown method"):
            parse_method(bad)


@needs_fbgemm
@pytest.mark.parametrize("name", ["int8", "row_norm+int4", "svd"])
def test_the_zip_holds_the_served_tables(name, tiny_model, tmp_path):
    """Random rows barely compress: the zip holds at least half of what the tables hold as
    served (INT8/INT4 rows are padded with zeros to 16 bytes, which deflate removes)."""
    tables = [table(4000, 16, seed) for seed in range(2)]
    served = parse_method(name).serve(tables, level=0.5)
    assert zipped_bytes(tiny_model, served, tmp_path, 1) >= served.nbytes / 2
    assert not list(tmp_path.iterdir())  # the zip is removed
