"""The sort-once mask engine against the stock DataNormSparsifier, bit for bit."""

import pandas as pd
import pytest
import torch

import evaluate_disk_savings
from conftest import run_script, tiny_config
from dlrm_sparsity import mask_engine, tie_order
from dlrm_sparsity.errors import StopRun
from dlrm_sparsity.mask_engine import (
    SortOnceMasks,
    block_norms,
    first_levels,
    first_levels_from_cuts,
    level_cuts,
    smallest_index_dtype,
    sort_blocks,
)
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.pruning import Model
from dlrm_sparsity.sort_once import (
    StockCheck,
    prune_sort_once,
    stock_check_fraction,
    stock_check_points,
    stock_check_rows,
)
from sparse_utils import SEED_LEVELS, GridPoint, same_bits, sparsify_embeddings, sparsify_table

CPU = torch.device("cpu")
CONFIGS = [("L1", (1, 1)), ("L1", (1, 4)), ("L2", (1, 4)), ("L2", (2, 3)), ("L1", (8, 8))]


def tables():
    g = torch.Generator().manual_seed(0)
    zero_rows = torch.randn(120, 8, generator=g)
    zero_rows[::3] = 0.0
    with_nan = torch.randn(40, 8, generator=g)
    with_nan[5, 2] = float("nan")
    return {
        "random": torch.randn(300, 16, generator=g),
        "ties": torch.randint(-3, 4, (200, 16), generator=g).float(),  # many equal norms
        "repeated_rows": torch.randn(1, 12, generator=g).repeat(90, 1),
        "zero_rows": zero_rows,
        "odd_width": torch.randn(101, 10, generator=g),  # 10 is no multiple of 4 or 3
        "all_zero": torch.zeros(30, 16),
        "with_nan": with_nan,
    }


@pytest.mark.parametrize("norm, shape", CONFIGS, ids=lambda c: str(c))
def test_every_seed_level_gives_the_stock_weights_bit_for_bit(norm, shape):
    engine = SortOnceMasks(norm, shape, SEED_LEVELS)
    for name, table in tables().items():
        for level in SEED_LEVELS:
            ours = engine.pruned(name, table, level)
            stock, _ = sparsify_table(table.clone(), GridPoint(norm, shape, level), name, CPU)
            assert same_bits(ours, stock), (name, level)


@pytest.mark.parametrize("way", ["spilled", "torch.sort"])
def test_the_other_ways_give_the_stock_weights_too(way, tmp_path, monkeypatch):
    """First levels kept in a file rather than in memory (and tie_order's sort in a file
    there); or tie_order unavailable, so that torch.sort orders the ties."""
    sorts = []
    if way == "torch.sort":
        monkeypatch.setattr(tie_order, "matches_torch_sort", lambda: False)
        real = mask_engine.sort_blocks
        monkeypatch.setattr(mask_engine, "sort_blocks", lambda n: sorts.append(1) or real(n))
    for norm, shape in CONFIGS[:3]:
        engine = SortOnceMasks(norm, shape, SEED_LEVELS,
                               spill_to=tmp_path if way == "spilled" else None)
        for name, table in tables().items():
            for level in SEED_LEVELS:
                ours = engine.pruned(name, table, level)
                stock, _ = sparsify_table(table.clone(), GridPoint(norm, shape, level), name,
                                          CPU)
                assert same_bits(ours, stock), (name, level)
        assert way != "spilled" or not engine._first  # nothing held between points
    assert list(tmp_path.iterdir()) == []  # unlinked files only
    assert way != "torch.sort" or sorts  # the ties were there for torch.sort to order


def test_level_cuts_are_the_sorted_averages_at_each_count():
    """Two passes over chunks give each level's k-th smallest average, whether ties straddle
    it and how many equal it, as a sort would; None where the order decides otherwise."""
    torch.manual_seed(0)
    levels = list(SEED_LEVELS)
    for norms in (torch.randint(0, 40, (9999,)).float() / 3,  # ties at every cut
                  torch.rand(5000) ** 8,  # many exponents: the top bits' buckets differ
                  torch.cat([torch.zeros(3000), torch.rand(100)])):  # zeros at most cuts
        found = level_cuts(lambda n=norms: n.split(1234), levels)
        ordered = norms.sort().values
        assert found.count == len(norms)
        for level in levels:
            k = round(level * len(norms))
            if 0 < k < len(norms):
                cut, straddled = found.cuts[k]
                assert cut == ordered[k - 1] and straddled == bool(ordered[k] == cut)
                if straddled:
                    assert found.ties[cut] == int((norms == cut).sum())
    nan = float("nan")
    assert level_cuts(lambda: [torch.tensor([1.0, nan, nan])], [0.67]) is None
    assert level_cuts(lambda: [torch.tensor([1.0, -2.0])], [0.5]) is None
    assert level_cuts(lambda: [torch.tensor([1.0, nan])], [0.5]).cuts == {1: (1.0, False)}


def test_a_level_that_zeroes_no_block_needs_no_sort():
    engine = SortOnceMasks("L1", (1, 4), [0.0, 0.001, 0.5])
    table = tables()["with_nan"]  # 40 x 8: 80 blocks, round(0.001 * 80) = 0
    for level in (0.0, 0.001):
        ours = engine.pruned("t", table, level)
        stock, _ = sparsify_table(table.clone(), GridPoint("L1", (1, 4), level), "t", CPU)
        assert same_bits(ours, stock) and ours.data_ptr() != table.data_ptr()
    assert not engine.knows("t")  # the first point of a config (level 0) starts at once
    prune_sort_once(Model({"emb_l.0.weight": table}), GridPoint("L1", (1, 4), 0.0), CPU,
                    engine)
    assert not engine.knows("emb_l.0.weight")
    assert same_bits(engine.pruned("t", table, 0.5), sparsify_table(
        table.clone(), GridPoint("L1", (1, 4), 0.5), "t", CPU)[0])
    assert engine.knows("t")


def test_the_whole_model_through_prune_sort_once():
    """Every table of a DLRM, a table of one row among them (the engine defers to stock)."""
    torch.manual_seed(0)
    sd = DLRMNet(tiny_config(tables=(50, 3, 70, 20), dim=8)).state_dict()
    sd["emb_l.1.weight"] = sd["emb_l.1.weight"][:1].clone()
    before = {k: v.clone() for k, v in sd.items()}
    for norm, shape in CONFIGS[:3]:
        engine = SortOnceMasks(norm, shape, SEED_LEVELS)
        for level in (0.0, 0.3, 0.9, 0.97, 1.0):
            point = GridPoint(norm, shape, level)
            ours, stock_s, engine_s, check_s = prune_sort_once(
                Model(sd), point, CPU, engine, StockCheck() if level == 0.3 else None)
            stock = sparsify_embeddings(sd, point, CPU).weights
            assert all(same_bits(ours[k], stock[k]) for k in sd if k.startswith("emb_l"))
            assert engine_s >= 0 and (stock_s >= 0 if level == 0.3 else stock_s != stock_s)
            assert check_s > 0 if level == 0.3 else check_s != check_s  # nan: no check
    assert all(same_bits(sd[k], before[k]) for k in sd)  # the engine never writes the originals


def test_a_check_budget_checks_the_leading_rows_that_fit():
    table = torch.empty(1000, 16)  # 64 KiB; the check holds 10 copies of what it checks
    assert stock_check_rows(table, None) == 1000
    assert stock_check_rows(table, 10 * table.nbytes) == 1000
    assert stock_check_rows(table, 10 * 64 * 250) == 250  # 64 bytes a row
    assert stock_check_rows(table, 1) == 2  # two rows at least: still a matrix
    sd = {"emb_l.0.weight": table, "emb_l.1.weight": torch.empty(3000, 16),
          "emb_l.2.weight": torch.empty(1, 16)}  # one row: stock prunes it, so checked
    assert stock_check_fraction(sd, None) == 1.0
    assert stock_check_fraction(sd, 10 * 64 * 1000) == (1000 + 1000 + 1) / 4001


def test_a_budgeted_check_prunes_as_the_whole_check_and_catches_a_bad_engine(monkeypatch):
    torch.manual_seed(0)
    sd = DLRMNet(tiny_config(tables=(400, 30, 700), dim=8)).state_dict()
    point = GridPoint("L1", (1, 4), 0.5)
    budget = 10 * 8 * 4 * 100  # 100 rows of width 8
    ours, stock_s, _, _ = prune_sort_once(Model(sd), point, CPU, SortOnceMasks(
        "L1", (1, 4), SEED_LEVELS), StockCheck(budget))
    stock = sparsify_embeddings(sd, point, CPU).weights
    assert stock_s > 0 and all(same_bits(ours[k], stock[k]) for k in sd if "emb_l" in k)
    real = mask_engine.apply_mask

    def wrong_beyond_row_50(table, keep, block_shape):  # only a slice's engine is wrong
        out = real(table, keep, block_shape)
        if table.shape[0] == 100:
            out[50:] = 0.25
        return out
    monkeypatch.setattr(mask_engine, "apply_mask", wrong_beyond_row_50)
    with pytest.raises(StopRun, match=r"on the first 100 rows of emb_l\.0\.weight at L1"):
        prune_sort_once(Model(sd), point, CPU, SortOnceMasks("L1", (1, 4), SEED_LEVELS),
                        StockCheck(budget))


def test_the_order_is_kept_in_the_smallest_integer_type():
    assert smallest_index_dtype(2) == torch.int16
    assert smallest_index_dtype(32768) == torch.int16  # ids 0 .. 32767
    assert smallest_index_dtype(32769) == torch.int32
    assert smallest_index_dtype(2**31 + 1) == torch.int64
    assert sort_blocks(block_norms(torch.randn(100, 16), "L1", (1, 4))).dtype == torch.int16
    assert sort_blocks(block_norms(torch.randn(3000, 16), "L1", (1, 1))).dtype == torch.int32


def test_the_block_averages_are_sorted_in_place_into_torch_sorts_order():
    torch.manual_seed(0)
    norms = torch.randint(0, 50, (300_000,)).float()  # ties everywhere
    expected = torch.sort(norms.view(1, 1, -1).clone(), dim=2)
    order = sort_blocks(norms)
    assert torch.equal(order.long(), expected.indices.view(-1))
    assert torch.equal(norms, expected.values.view(-1))  # written over: no sorted copy


def first_levels_by_threshold(norms, levels):
    """The engine's first levels from the cuts alone: None where the order of ties decides."""
    found = level_cuts(lambda: [norms], levels)
    if found is None or found.ties:
        return None
    return first_levels_from_cuts([norms], found.count, levels, found.cuts, {})


def test_thresholds_give_the_sorts_first_levels_or_step_aside_for_ties():
    """Distinct averages (and NaN beyond every cut): the thresholds' first levels are the
    sort's. Ties across a cut: None, so the sort decides; ties inside a cut do not matter."""
    torch.manual_seed(0)
    levels = list(SEED_LEVELS)
    norms = block_norms(torch.randn(5000, 16), "L1", (1, 4))
    norms[-3:] = float("nan")
    expected = first_levels(sort_blocks(norms.clone()), levels)
    assert torch.equal(first_levels_by_threshold(norms, levels), expected)
    tied = torch.tensor([3.0, 1.0, 1.0, 2.0])  # 0.5 zeroes 2 of the 4: both 1.0, no choice
    assert first_levels_by_threshold(tied, [0.5]).tolist() == [1, 0, 0, 1]
    assert first_levels_by_threshold(tied, [0.25]) is None  # one of the two 1.0: the order's
    nan = float("nan")  # a cut among NaNs: the sort's; level 1 takes every block, NaN too
    assert first_levels_by_threshold(torch.tensor([1.0, nan, nan]), [0.67]) is None
    assert first_levels_by_threshold(torch.tensor([1.0, nan]), [1.0]).tolist() == [0, 0]


def test_first_levels_follow_the_stock_block_count():
    order = torch.tensor([4, 0, 3, 1, 2], dtype=torch.int16)
    # round(0.3 * 5) = 2 blocks, round(0.5 * 5) = 2 (banker's rounding of 2.5), then all 5
    first = first_levels(order, [0.0, 0.3, 0.5, 1.0])
    assert first.dtype == torch.uint8
    assert first.tolist() == [1, 3, 3, 3, 1]


def test_check_points_are_inside_the_level_range_where_there_is_one():
    points = [GridPoint("L1", (1, 4), x) for x in (0.0, 0.1, 0.5, 1.0)]
    points += [GridPoint("L2", (1, 4), x) for x in (1.0, 0.0)]
    assert stock_check_points(points) == {GridPoint("L1", (1, 4), 0.1),
                                          GridPoint("L2", (1, 4), 1.0)}


GRID = ["--sparsity-levels", "0.0", "0.5", "0.9", "--norms", "L1", "--block-shapes", "1x4"]


def test_both_engines_write_the_same_zips_and_their_own_time_columns(tiny_pipeline, tmp_path):
    frames = {}
    for engine in ("sort-once", "stock"):
        out = tmp_path / engine
        assert run_script(evaluate_disk_savings, ["--model-path", tiny_pipeline["model"],
                                                  "--output-dir", out, "--workers", "0",
                                                  "--mask-engine", engine, *GRID]) == 0
        frames[engine] = pd.read_csv(out / "sparse_model_metadata.csv")
    ours, stock = frames["sort-once"], frames["stock"]
    assert list(ours["sha256"]) == list(stock["sha256"])
    assert set(ours["mask_engine"]) == {"sort-once"} and set(stock["mask_engine"]) == {"stock"}
    # the stock step's time where it ran: at the checked point (0.5) only, with sort-once
    assert ours["step_time_sec"].notna().tolist() == [False, True, False]
    assert ours["stock_check_fraction"].tolist() == [0.0, 1.0, 0.0]  # tiny: checked whole
    assert (ours["zip_time_sec"] > 0).all()
    assert ours["mask_time_sec"].notna().all() and stock["mask_time_sec"].isna().all()
    assert stock["step_time_sec"].notna().all()
    # the check's own time beside its stock step, at the checked point alone
    assert ours["check_time_sec"].notna().tolist() == [False, True, False]
    assert ours["check_time_sec"][1] > 0 and stock["check_time_sec"].isna().all()


def test_an_engine_that_disagrees_stops_the_run_with_one_line(tiny_pipeline, tmp_path,
                                                               monkeypatch, capsys):
    def off_by_one_block(table, keep, block_shape):
        out = table.clone()
        out.view(-1)[:4] = 0.5  # a block the stock sparsifier would not have touched
        return out
    monkeypatch.setattr(mask_engine, "apply_mask", off_by_one_block)
    code = run_script(evaluate_disk_savings, ["--model-path", tiny_pipeline["model"],
                                              "--output-dir", tmp_path, "--workers", "0",
                                              *GRID])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: mask engine sort-once disagrees with the stock")
    assert "emb_l.0.weight at L1 (1, 4) level 0.5" in err[0]
