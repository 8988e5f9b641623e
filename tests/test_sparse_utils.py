import copy

import pytest
import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

from conftest import tiny_config
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.model import DLRMNet
from sparse_utils import (
    SEED_LEVELS,
    GridPoint,
    build_grid,
    parse_block_shape,
    parse_level,
    parse_norm,
    sparsify_embeddings,
    zero_fraction,
)

CPU = torch.device("cpu")


@pytest.fixture
def model():
    torch.manual_seed(1)
    return DLRMNet(tiny_config(tables=(40, 33, 57), dim=6))  # width 6: 1x4 blocks pad


def seed_way(model, point):
    """The seed's procedure: deep copy, every emb_l parameter into one sparsifier, step."""
    clone = copy.deepcopy(model)
    sparsifier = DataNormSparsifier(sparsity_level=point.level,
                                    sparse_block_shape=point.block_shape, norm=point.norm)
    for name, param in clone.named_parameters():
        if "emb_l" in name:
            sparsifier.add_data(name=name.replace(".", "_"), data=param)
    sparsifier.step()
    sparsifier.squash_mask()
    return clone.state_dict()


@pytest.mark.parametrize("point", [GridPoint("L1", (1, 1), 0.5), GridPoint("L1", (1, 4), 0.9),
                                   GridPoint("L2", (1, 4), 0.3), GridPoint("L2", (2, 3), 0.7),
                                   GridPoint("L1", (1, 4), 0.0)])
def test_weights_equal_the_stock_sparsifier_used_the_seeds_way(model, point):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, step_s, _, _ = sparsify_embeddings(model.state_dict(), point, CPU)
    reference = seed_way(model, point)
    assert list(pruned) == list(reference) and step_s > 0
    for name, value in reference.items():  # bit for bit, signed zeros included
        assert torch.equal(pruned[name].view(torch.int32), value.view(torch.int32)), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])  # the source is never modified


def test_level_one_zeroes_every_embedding_and_shares_the_mlps(model):
    sd = model.state_dict()
    pruned = sparsify_embeddings(sd, GridPoint("L1", (1, 4), 1.0), CPU).weights
    assert zero_fraction(pruned) == 1.0
    for name in sd:
        if not name.startswith("emb_l"):
            assert pruned[name] is sd[name]


@pytest.mark.parametrize("level", [0.1, 0.35, 0.5, 0.93])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (2, 4)])
def test_achieved_sparsity_is_the_level_within_one_block_per_table(level, shape):
    torch.manual_seed(2)
    model = DLRMNet(tiny_config(tables=(40, 33, 58), dim=8))  # blocks tile the tables
    pruned = sparsify_embeddings(model.state_dict(), GridPoint("L1", shape, level),
                                 CPU).weights
    for k in range(3):
        w = pruned[f"emb_l.{k}.weight"]
        if w.shape[0] % shape[0]:
            continue
        assert abs(int((w == 0).sum()) - level * w.numel()) <= shape[0] * shape[1]


def test_l1_and_l2_with_single_weight_blocks_are_identical(model):
    a = sparsify_embeddings(model.state_dict(), GridPoint("L1", (1, 1), 0.6), CPU).weights
    b = sparsify_embeddings(model.state_dict(), GridPoint("L2", (1, 1), 0.6), CPU).weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_grid_and_its_l2_skip():
    points, skipped = build_grid(SEED_LEVELS, ["L1", "L2"], [(1, 1), (1, 4)])
    assert len(SEED_LEVELS) == 20 and SEED_LEVELS[9:12] == (0.9, 0.91, 0.92)
    assert len(points) == 60 and skipped == ["L2 (1, 1)"]
    assert [p.config for p in points[::20]] == ["L1 (1, 1)", "L1 (1, 4)", "L2 (1, 4)"]
    full, none = build_grid([0.5], ["L2"], [(1, 1)], keep_l2_1x1=True)
    assert len(full) == 1 and none == []


@pytest.mark.parametrize("parse, text", [(parse_level, "1.5"), (parse_level, "-0.1"),
                                         (parse_level, "abc"), (parse_norm, "L3"),
                                         (parse_block_shape, "0x4"), (parse_block_shape, "1by4"),
                                         (parse_block_shape, "4")])
def test_bad_grid_values_are_refused(parse, text):
    with pytest.raises(UserInputError, match=text):
        parse(text)


def test_block_shape_spellings():
    assert parse_block_shape("1x4") == parse_block_shape("(1, 4)") == parse_block_shape("1,4")
    assert GridPoint("L1", (1, 4), 0.91).zip_relpath().as_posix() == \
        "L1/config_1x4/criteo_model_norm=L1_sl=0.91.zip"
