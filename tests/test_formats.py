"""Every storage format's lookup against nn.EmbeddingBag(mode="sum"), and its byte count."""

import pytest
import torch

from dlrm_sparsity.formats import (
    FORMATS,
    NEEDS_FBGEMM,
    Coo,
    Csr,
    Csr64,
    Dense,
    RowPruned,
    fbgemm_available,
    hold,
    kept_rows,
)

ROWS, DIM = 50, 8
needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm-gpu(-cpu)")


def pruned_table(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(ROWS, DIM, generator=g)
    table[torch.rand(ROWS, DIM, generator=g) < 0.6] = 0.0  # scattered zeros
    table[::3] = 0.0  # whole rows pruned
    table[7] = -0.0 * table[7].abs()  # a row of -0.0 (what the stock sparsifier leaves)
    table[ROWS - 1] = torch.randn(DIM, generator=g)  # the last row is kept
    return table


def bags():
    """Bags with repeated ids, empty bags, and the last row."""
    indices = torch.tensor([0, 5, 5, ROWS - 1, 3, 7, 2, 2, 2, ROWS - 1, 10])
    offsets = torch.tensor([0, 3, 3, 5, 5, 9, 11])  # bags 1, 3 and 6 are empty
    return indices, offsets


def reference(table):
    indices, offsets = bags()
    bag = torch.nn.EmbeddingBag(ROWS, DIM, mode="sum", _weight=table)
    return bag(indices, offsets).detach()


@pytest.mark.parametrize("cls", [Dense, Coo, Csr, Csr64, RowPruned], ids=lambda c: c.name)
def test_lossless_lookups_equal_the_embedding_bag(cls):
    table = pruned_table()
    fmt = cls(table)
    torch.testing.assert_close(fmt.lookup(*bags()), reference(table), rtol=0, atol=1e-6)


def test_byte_counts_are_the_kept_tensors_sizes():
    table = pruned_table()
    nnz = int((table != 0).sum())
    kept = len(kept_rows(table))
    assert Dense(table).nbytes == ROWS * DIM * 4
    assert Coo(table).nbytes == nnz * (2 * 8 + 4)  # int64 (row, col) and a float32 value
    assert Csr(table).nbytes == (ROWS + 1) * 4 + nnz * (4 + 4)  # int32 crow, col; values
    assert Csr64(table).nbytes == (ROWS + 1) * 8 + nnz * (8 + 4)
    assert RowPruned(table).nbytes == (kept + 1) * DIM * 4 + ROWS * 4  # + zero row, remap
    for cls in (Dense, Coo, Csr, Csr64, RowPruned):  # known before building, as built
        assert cls.nbytes_of(table) == cls(table).nbytes, cls.name


def test_row_pruning_maps_every_pruned_row_to_zero_and_keeps_the_others():
    table = pruned_table()
    fmt = RowPruned(table)
    zero_rows = [r for r in range(ROWS) if not (table[r] != 0).any()]
    assert 7 in zero_rows and 0 in zero_rows and ROWS - 1 not in zero_rows
    for r in range(ROWS):
        row = fmt.compact[fmt.remap[r]]
        assert torch.equal(row, torch.zeros(DIM)) if r in zero_rows else torch.equal(row, table[r])
    assert len(fmt.compact) == ROWS - len(zero_rows) + 1


@needs_fbgemm
@pytest.mark.parametrize("name, bits", [("int8", 8), ("int4", 4), ("row_pruned_int8", 8),
                                        ("row_pruned_int4", 4)])
def test_quantized_lookups_are_within_their_quantization_error(name, bits):
    table = pruned_table()
    fmt = FORMATS[name]([table])
    got, want = fmt.lookup(*bags()), reference(table)
    indices, offsets = bags()
    # row-wise: at most half a step (range / (2^bits - 1)) per value, per id in the bag
    step = (table.max(1).values - table.min(1).values) / (2**bits - 1)
    bound = torch.zeros(len(offsets))
    bound.index_add_(0, torch.repeat_interleave(torch.arange(len(offsets)),
                     torch.diff(torch.cat([offsets, torch.tensor([len(indices)])]))),
                     step[indices] / 2 + 1e-3)  # + half precision of scale and bias
    assert ((got - want).abs() <= bound[:, None]).all()
    if name.startswith("row_pruned"):
        assert fmt.nbytes < FORMATS[name[len("row_pruned_"):]]([table]).nbytes


@needs_fbgemm
@pytest.mark.parametrize("bits", [8, 4])
def test_row_pruned_quantized_lookups_equal_the_unpruned_ones_exactly(bits):
    """Why experiment 4 takes a row-pruned quantized format's quality from its unpruned twin:
    a zero row (of 0.0 or of -0.0, as the stock sparsifier leaves) quantizes to codes 0 and
    bias 0 (scale 1), so it adds nothing, as a dropped row does; the kept rows quantize
    alike, row by row."""
    from dlrm_sparsity.formats import pack_rows

    tables = [pruned_table(seed) for seed in range(4)]
    g = torch.Generator().manual_seed(9)
    indices = torch.randint(0, ROWS, (len(tables), 400), generator=g)
    offsets = torch.sort(torch.randint(0, 400, (len(tables), 64), generator=g)).values
    offsets[:, 0] = 0
    pruned = FORMATS[f"row_pruned_int{bits}"](tables).embed(offsets, indices)
    unpruned = FORMATS[f"int{bits}"](tables).embed(offsets, indices)
    for a, b in zip(pruned, unpruned, strict=True):
        assert torch.equal(a, b)
    for sign in (1.0, -1.0):  # (FBGEMM's ops are loaded by now)
        packed = pack_rows(sign * torch.zeros(3, DIM), f"int{bits}")
        scale, bias = packed[:, -4:].view(torch.float16).float().unbind(1)
        assert not packed[:, :-4].any() and not bias.any() and (scale == 1).all()


@needs_fbgemm
@pytest.mark.parametrize("name", ["int8", "row_pruned_int8"])
def test_one_batched_op_looks_up_every_table_as_its_own_op_does(name):
    """dlrm's (K, B) offsets and (K, N) ids through one table-batched op: the same sums as
    each table quantized in an op of its own, tables of different sizes, one wholly pruned."""
    tables = [pruned_table(seed) for seed in range(3)] + [torch.zeros(ROWS, DIM)]
    tables[1] = tables[1][:20]
    g = torch.Generator().manual_seed(5)
    indices = torch.stack([torch.randint(0, len(t), (12,), generator=g) for t in tables])
    offsets = torch.tensor([0, 2, 2, 5, 9, 9]).repeat(len(tables), 1)  # empty bags too
    batched = FORMATS[name](tables).embed(offsets, indices)
    for k, table in enumerate(tables):
        alone = FORMATS[name]([table]).lookup(indices[k], offsets[k])
        torch.testing.assert_close(batched[k], alone, rtol=0, atol=0)
    assert torch.equal(batched[3], torch.zeros(6, DIM))


def test_hold_keeps_what_fits_and_counts_what_does_not():
    tables = [pruned_table(seed) for seed in range(3)]
    dense = sum(t.nbytes for t in tables)
    held, nbytes = hold(Csr, tables, dense)
    assert nbytes == sum(Csr(t).nbytes for t in tables) and held.nbytes == nbytes
    indices = torch.stack([torch.arange(10), torch.arange(10, 20), torch.arange(40, 50)])
    offsets = torch.arange(10).repeat(3, 1)
    for k, got in enumerate(held.embed(offsets, indices)):  # one id per bag: that row
        torch.testing.assert_close(got, tables[k][indices[k]], rtol=0, atol=1e-6)
    too_big, coo_bytes = hold(Coo, tables, dense)  # COO of a 60%-sparse table: 2x dense
    assert too_big is None and coo_bytes == sum(Coo.nbytes_of(t) for t in tables) > dense


def test_formats_needing_fbgemm_are_named():
    assert NEEDS_FBGEMM == {"int8", "int4", "row_pruned_int8", "row_pruned_int4"}


def test_a_large_coo_table_serves_lookups_in_and_out_of_inference_mode():
    """index_select caches inside a COO tensor of 100,000 rows or so (not 20,000)."""
    table = torch.randn(100_000, 16, generator=torch.Generator().manual_seed(0))
    table[torch.rand(100_000, 16, generator=torch.Generator().manual_seed(1)) < 0.9] = 0
    ids, offsets = torch.randint(0, 100_000, (4096,)), torch.arange(4096)
    fmt = Coo(table)
    with torch.inference_mode():
        inside = fmt.lookup(ids, offsets)
    torch.testing.assert_close(fmt.lookup(ids, offsets), inside)
    torch.testing.assert_close(inside, Dense(table).lookup(ids, offsets))
