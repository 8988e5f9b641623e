import pytest
import torch

from conftest import random_batch, tiny_config
from dlrm_forward_time import Dense, TorchSparseTop
from dlrm_sparsity.criteo.data import Batch
from dlrm_sparsity.errors import CheckpointError
from dlrm_sparsity.model import DLRMConfig, DLRMNet, embedding_names


def reference_forward(sd, dense, indices):
    """dlrm's forward written out in float64 with loops (one id per bag)."""
    x = dense.double()
    i = 0
    while f"bot_l.{i}.weight" in sd:
        x = torch.relu(x @ sd[f"bot_l.{i}.weight"].double().T + sd[f"bot_l.{i}.bias"].double())
        i += 2
    feats = [x] + [sd[f"emb_l.{k}.weight"].double()[indices[k]] for k in range(len(indices))]
    pairs = [(feats[i] * feats[j]).sum(1) for i in range(len(feats)) for j in range(i)]
    h = torch.cat([x, torch.stack(pairs, dim=1)], dim=1)
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("top_l.")})
    for n, i in enumerate(layers):
        h = h @ sd[f"top_l.{i}.weight"].double().T + sd[f"top_l.{i}.bias"].double()
        h = torch.sigmoid(h) if n == len(layers) - 1 else torch.relu(h)
    return h


def test_state_dict_has_dlrms_keys_in_dlrms_order(tiny_model):
    assert list(tiny_model.state_dict()) == [
        "emb_l.0.weight", "emb_l.1.weight", "emb_l.2.weight",
        "bot_l.0.weight", "bot_l.0.bias", "bot_l.2.weight", "bot_l.2.bias",
        "top_l.0.weight", "top_l.0.bias", "top_l.2.weight", "top_l.2.bias"]
    assert tiny_model.state_dict()["emb_l.2.weight"].shape == (9, 4)
    assert isinstance(tiny_model.top_l[-1], torch.nn.Sigmoid)
    assert all(isinstance(tiny_model.bot_l[i], torch.nn.ReLU) for i in (1, 3))


def test_config_is_inferred_from_state_dict_and_loads_strictly(tiny_model):
    sd = tiny_model.state_dict()
    assert DLRMConfig.from_state_dict(sd) == tiny_config()
    clone = DLRMNet.from_state_dict(sd)
    for k, v in clone.state_dict().items():
        assert torch.equal(v, sd[k])
    assert embedding_names(sd) == ["emb_l.0.weight", "emb_l.1.weight", "emb_l.2.weight"]


def test_interaction_order_on_hand_checked_example():
    model = DLRMNet(DLRMConfig((3, 3), 2, (13, 2), (2 + 3, 1)))
    x = torch.tensor([[1.0, 2.0]])
    e0, e1 = torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0, 6.0]])
    # pairs in dlrm's order: (1,0) x.e0 = 11, (2,0) x.e1 = 17, (2,1) e0.e1 = 39
    assert model.interact(x, [e0, e1]).tolist() == [[1.0, 2.0, 11.0, 17.0, 39.0]]


def test_forward_matches_reference_written_with_loops(tiny_model):
    dense, offsets, indices = random_batch(tiny_model.config, 32)
    with torch.no_grad():
        out = tiny_model(dense, offsets, indices)
    ref = reference_forward(tiny_model.state_dict(), dense, indices)
    assert out.shape == (32, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)


def test_torch_sparse_variant_gives_the_same_output(tiny_model):
    dense, offsets, indices = random_batch(tiny_model.config, 64, seed=3)
    batch = Batch(dense, offsets, indices, torch.zeros(64))
    with torch.no_grad():
        dense_out = tiny_model(dense, offsets, indices)
        sparse_out = TorchSparseTop(tiny_model).on(batch)()
        assert torch.equal(Dense(tiny_model).on(batch)(), dense_out)
    assert (dense_out - sparse_out).abs().max() <= 1e-6


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("emb_l.0.weight"), "neither dlrm's 'emb_l.0.weight'"),
    (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), "unexpected key 'extra.weight'"),
    (lambda sd: sd.update({"top_l.0.weight": torch.zeros(6, 9)}), "top_l.0.weight"),
    (lambda sd: sd.update({"emb_l.1.weight": torch.zeros(5, 3)}), "different widths"),
    (lambda sd: sd.update({"bot_l.2.bias": torch.zeros(5)}), "bot_l.2.bias"),
])
def test_state_dict_that_is_not_a_dlrm_is_named(tiny_model, edit, message):
    sd = dict(tiny_model.state_dict())
    edit(sd)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        DLRMConfig.from_state_dict(sd)
