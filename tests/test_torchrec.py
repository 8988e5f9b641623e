"""TorchRec models and data, checked against real TorchRec (a dev requirement: these tests fail,
not skip, without it).

- The suite's forward equals TorchRec's DLRM and DLRM_DCN on the same weights and batch, for
  one id per bag and for multi-hot bags.
- A pruned zip keeps TorchRec's keys and loads into TorchRec's model with strict=True; that
  model's forward equals the suite's forward of the pruned model.
- DLRMTrain's `model.` prefix, a DistributedModelParallel state dict (gloo, one rank, CPU) and
  torch.save of either load.
- torchrec's own reader of its .npy files gives the suite's batches, modulo the tables.
- All five experiments run end to end on a small TorchRec DLRM and DLRM_DCN.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import run_script
from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.criteo.npy import open_npy_files, split_ranges
from dlrm_sparsity.criteo.npy_write import write_npy_days
from dlrm_sparsity.criteo.splits import open_split
from dlrm_sparsity.errors import DataError
from dlrm_sparsity.layouts import TORCHREC, dlrm_columns_of_torchrec, read_layout
from dlrm_sparsity.model import DLRMNet

REPO = Path(__file__).resolve().parent.parent
SIZES = (11, 7, 13, 5)


def collection(sizes, dim: int) -> EmbeddingBagCollection:
    """Tables named as torchrec's Criteo example names them."""
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n,
                           feature_names=[f"cat_{i}"]) for i, n in enumerate(sizes)])


def torchrec_model(sizes=SIZES, dim=4, dcn=False, seed=0, over=(6, 5, 1),
                   rank=3) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(embedding_bag_collection=collection(sizes, dim), dense_in_features=13,
              dense_arch_layer_sizes=[8, dim], over_arch_layer_sizes=list(over))
    model = DLRM_DCN(**kw, dcn_num_layers=2, dcn_low_rank_dim=rank) if dcn else DLRM(**kw)
    with torch.no_grad():  # TorchRec zeroes the cross net's biases: make them count
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3)
    return model.eval()


def bags(sizes, batch: int, max_bag: int, seed: int):
    """Random bags (empty ones included when max_bag > 1): a KJT and the suite's lists."""
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(0 if max_bag > 1 else 1, max_bag + 1, (batch,), generator=g)
               for _ in sizes]
    ids = [torch.randint(0, n, (int(lens.sum()),), generator=g)
           for n, lens in zip(sizes, lengths, strict=True)]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"cat_{i}" for i in range(len(sizes))], values=torch.cat(ids),
        lengths=torch.cat(lengths).int())
    offsets = [torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
               for lens in lengths]
    return kjt, offsets, ids


@pytest.mark.parametrize("dcn", [False, True], ids=["DLRM", "DLRM_DCN"])
@pytest.mark.parametrize("max_bag", [1, 3], ids=["one-hot", "multi-hot"])
def test_the_suite_computes_torchrecs_forward(dcn, max_bag):
    model = torchrec_model(dcn=dcn)
    dense = torch.randn(32, 13)
    kjt, offsets, ids = bags(SIZES, 32, max_bag, seed=1)
    suite = DLRMNet.from_state_dict(model.state_dict()).eval()
    assert suite.config.layout == TORCHREC and bool(suite.config.cross_layers) == dcn
    with torch.no_grad():
        expected = model(dense, kjt)
        torch.testing.assert_close(suite.logit(dense, offsets, ids), expected,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(suite(dense, offsets, ids), torch.sigmoid(expected),
                                   rtol=1e-5, atol=1e-6)


def test_dlrm_pairs_map_to_torchrecs_by_the_documented_column_map():
    """The same weights read as dlrm's model give TorchRec's forward once the first top
    layer's columns are permuted: dlrm's pair (i, j), j < i, is TorchRec's (j, i)."""
    tr = DLRMNet.from_state_dict(torchrec_model().state_dict()).eval()
    columns = dlrm_columns_of_torchrec(len(SIZES) + 1, 4)
    assert sorted(columns) == list(range(len(columns)))  # a permutation
    dlrm_sd = {k: v.clone() for k, v in tr.state_dict().items()}
    dlrm_sd["top_l.0.weight"][:, columns] = tr.top_l[0].weight
    dlrm = DLRMNet.from_state_dict(dlrm_sd).eval()
    assert dlrm.config.layout != tr.config.layout
    dense = torch.randn(16, 13)
    _, offsets, ids = bags(SIZES, 16, 1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(dlrm(dense, offsets, ids), tr(dense, offsets, ids))
        z_dlrm = dlrm.interact(dlrm.bottom(dense), dlrm.embed(offsets, ids))
        z_tr = tr.interact(tr.bottom(dense), tr.embed(offsets, ids))
        assert torch.equal(z_dlrm[:, columns], z_tr)


def test_prefixed_and_dmp_state_dicts_load(tmp_path):
    model = torchrec_model()
    train = DLRMTrain(model)
    for prefix, sd in (("model.", train.state_dict()),
                       ("module.", {f"module.{k}": v for k, v in model.state_dict().items()})):
        path = tmp_path / f"{prefix}pt"
        torch.save(sd, path)
        loaded = load_state_dict(path)
        assert read_layout(loaded).prefix == prefix
        torch.testing.assert_close(DLRMNet.from_state_dict(loaded).state_dict(),
                                   DLRMNet.from_state_dict(model.state_dict()).state_dict())
    script = textwrap.dedent(f"""
        import os, sys, torch, torch.distributed as dist
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
        dist.init_process_group("gloo", rank=0, world_size=1)
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.models.dlrm import DLRMTrain
        from test_torchrec import torchrec_model
        dmp = DistributedModelParallel(DLRMTrain(torchrec_model()), device=torch.device("cpu"))
        torch.save(dmp.state_dict(), sys.argv[1])
        dist.destroy_process_group()
        """)
    path = tmp_path / "dmp.pt"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=tmp_path,
                   capture_output=True)
    loaded = load_state_dict(path)
    assert read_layout(loaded).prefix == "model."
    suite = DLRMNet.from_state_dict(loaded).eval()
    assert suite.config == DLRMNet.from_state_dict(model.state_dict()).config
    fresh = torchrec_model(seed=1)  # DMP may initialise its tables anew: take its weights
    fresh.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=True)
    dense = torch.randn(8, 13)
    kjt, offsets, ids = bags(SIZES, 8, 2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(suite.logit(dense, offsets, ids), fresh(dense, kjt))


@pytest.fixture(scope="module")
def npy_data(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline's data as torchrec's day files, one-hot and multi-hot."""
    root = tmp_path_factory.mktemp("npy")
    write_npy_days(tiny_pipeline["processed"], tiny_pipeline["raw"], root / "one")
    write_npy_days(tiny_pipeline["processed"], tiny_pipeline["raw"], root / "multi",
                   multi_hot=True)
    return {"one": root / "one", "multi": root / "multi"}


@pytest.mark.parametrize("stage", ["train", "val", "test"])
def test_torchrecs_reader_yields_the_suites_batches(npy_data, stage):
    folder = npy_data["one"]
    days = sorted(folder.glob("day_*_dense.npy"), key=lambda p: int(p.name.split("_")[1]))
    days = days[:-1] if stage == "train" else days[-1:]
    sizes = [5 + k for k in range(26)]  # small, so the modulo matters
    paths = {part: [str(p).replace("_dense.npy", f"_{part}.npy") for p in days]
             for part in ("dense", "sparse", "labels")}
    theirs = InMemoryBinaryCriteoIterDataPipe(stage, paths["dense"], paths["sparse"],
                                              paths["labels"], batch_size=64, rank=0,
                                              world_size=1, hashes=sizes)
    ours = open_split(str(folder), None, stage, table_sizes=tuple(sizes))
    count = 0
    for a, b in zip(theirs, ours.batches(64), strict=True):
        assert torch.equal(a.dense_features, b.dense)
        assert torch.equal(a.labels.float(), b.labels)
        values = a.sparse_features.values().view(26, -1)
        assert torch.equal(values.long(), b.indices)
        count += len(b.labels)
    assert count == len(ours) > 0


def test_the_npy_days_hold_dlrms_data(tiny_pipeline, npy_data):
    """The same samples and inputs: dlrm's test split is the first half of the last day."""
    dlrm = open_split(str(tiny_pipeline["processed"]), str(tiny_pipeline["raw"]), "test")
    npy = open_split(str(npy_data["one"]), None, "test", test_half="first")
    batch = next(npy.batches(len(npy)))
    assert torch.equal(batch.dense, dlrm.dense)
    assert torch.equal(batch.indices, dlrm.sparse_t)
    assert torch.equal(batch.labels, dlrm.labels)


def test_the_split_follows_torchrec_and_mlperf(npy_data, tmp_path):
    files = open_npy_files(npy_data["one"])
    last, n = len(files) - 1, len(files[-1])
    half = (n + 1) // 2  # torchrec: the first ceil(N/2) rows of the last day are "val"
    assert split_ranges(files, "test") == [(last, half, n)]
    assert split_ranges(files, "val") == [(last, 0, half)]
    assert split_ranges(files, "test", "first") == [(last, 0, half)]  # MLPerf inference
    assert split_ranges(files, "train") == [(i, 0, len(f)) for i, f in enumerate(files[:-1])]
    alone = open_npy_files(npy_data["one"] / f"day_{last}_dense.npy")  # one file given
    assert split_ranges(alone, "train", "first") == [(0, half, n)]  # never the test half
    for part in ("dense", "sparse", "labels"):  # Kaggle's test file: labels of -1
        array = np.load(npy_data["one"] / f"day_0_{part}.npy")
        np.save(tmp_path / f"test_{part}.npy", -np.ones_like(array) if part == "labels"
                else array)
    with pytest.raises(DataError, match="holds no labels"):
        open_npy_files(tmp_path / "test_dense.npy")


@pytest.fixture(scope="module", params=["DLRM", "DLRM_DCN"])
def torchrec_run(request, tiny_pipeline, npy_data, tmp_path_factory):
    """All five experiments on a TorchRec model trained on the .npy days."""
    import evaluate_activation_sparsity
    import evaluate_disk_savings
    import evaluate_forward_time
    import evaluate_memory_savings
    import evaluate_model_metrics
    import train_dlrm
    out = tmp_path_factory.mktemp(request.param)
    model = out / "model.pt"
    dcn = ["--dcn-num-layers", "2"] if request.param == "DLRM_DCN" else ["--layout", "torchrec"]
    assert run_script(train_dlrm, ["--processed_data_file", npy_data["one"], "--save-model",
                                   model, "--arch-sparse-feature-size", "4",
                                   "--arch-mlp-bot", "13-8-4", "--arch-mlp-top", "8-1",
                                   "--num-batches", "30", "--device", "cpu", *dcn]) == 0
    run = ["--output-dir", out, "--device", "cpu"]
    assert run_script(evaluate_disk_savings, ["--model-path", model, *run, "--norms", "L1",
                                              "--sparsity-levels", "0", "0.5", "0.9",
                                              "--block-shapes", "1x4"]) == 0
    data = ["--processed_data_file", npy_data["one"], *run]
    timing = ["--min-run-time", "0.01", "--rounds", "2", "--batch-size", "256"]
    assert run_script(evaluate_model_metrics, [*data, "--batch-size", "256"]) == 0
    assert run_script(evaluate_forward_time, [*data, *timing]) == 0
    assert run_script(evaluate_memory_savings, [*data, *timing]) == 0
    assert run_script(evaluate_activation_sparsity, [*data, *timing, "--levels", "0", "0.5"]) == 0
    return {"out": out, "model": model, "kind": request.param}


def test_every_experiment_runs_on_a_torchrec_model(torchrec_run):
    out = torchrec_run["out"]
    for csv in ("sparse_model_metadata", "sparse_model_metrics", "dlrm_forward_time_info",
                "sparse_model_memory", "activation_sparsity"):
        df = pd.read_csv(out / f"{csv}.csv")
        assert len(df) > 0 and ("error" not in df or df["error"].isna().all()), csv
    metrics = pd.read_csv(out / "sparse_model_metrics.csv")
    assert metrics["roc_auc"].between(0.5, 1).all()
    forward = pd.read_csv(out / "dlrm_forward_time_info.csv")
    assert (forward["max_abs_diff"] < 1e-5).all()
    activation = pd.read_csv(out / "activation_sparsity.csv")
    assert (activation["max_abs_diff"] < 1e-5).all()
    dcn = torchrec_run["kind"] == "DLRM_DCN"
    assert set(activation["interaction"]) == {"dcn" if dcn else "dot"}
    report = (out / "report.md").read_text()
    assert f"torchrec {torchrec_run['kind']}" in report
    assert ("the mask applies to the cross net's output" in report) == dcn


def test_a_pruned_zip_loads_into_torchrec_unchanged(torchrec_run):
    original = load_state_dict(torchrec_run["model"])
    meta = pd.read_csv(torchrec_run["out"] / "sparse_model_metadata.csv")
    row = meta[meta["sparsity_level"] == 0.9].iloc[0]
    pruned = load_state_dict(torchrec_run["out"] / row["path"])
    assert list(pruned) == list(original)  # the input's own keys, in its order
    dcn = torchrec_run["kind"] == "DLRM_DCN"
    sizes = [pruned[k].shape[0] for k in read_layout(pruned).tables]
    # train_dlrm.py's sizes: --arch-mlp-top 8-1, and a rank of 4 x the width
    model = torchrec_model(tuple(sizes), dcn=dcn, over=(8, 1), rank=16)
    model.load_state_dict(pruned, strict=True)
    zeros = sum(int((pruned[k] == 0).sum()) for k in read_layout(pruned).tables)
    assert zeros > 0
    dense = torch.rand(64, 13)
    kjt, offsets, ids = bags(sizes, 64, 1, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(DLRMNet.from_state_dict(pruned).eval().logit(
            dense, offsets, ids), model.eval()(dense, kjt), rtol=1e-5, atol=1e-6)


def test_formats_are_independent_of_the_model(tiny_pipeline, npy_data, torchrec_run, tmp_path):
    """A TorchRec model scored on dlrm's .npz, dlrm's model on the .npy days: with the first
    half as the test split, dlrm's model scores the same on both files."""
    import evaluate_disk_savings
    import evaluate_model_metrics
    run = ["--device", "cpu", "--batch-size", "256"]
    assert run_script(evaluate_model_metrics, [
        "--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
        tiny_pipeline["processed"], "--output-dir", tmp_path / "tr_on_npz", *run,
        "--sparse-model-metadata", torchrec_run["out"] / "sparse_model_metadata.csv"]) == 0
    scores = {}
    for name, data in (("npz", ["--raw-data-file", tiny_pipeline["raw"],
                                "--processed-data-file", tiny_pipeline["processed"]]),
                       ("npy", ["--processed-data-file", npy_data["one"],
                                "--test-half", "first"])):
        out = tmp_path / f"dlrm_on_{name}"
        assert run_script(evaluate_disk_savings, [
            "--model-path", tiny_pipeline["model"], "--output-dir", out, "--device", "cpu",
            "--sparsity-levels", "0", "0.5", "--norms", "L1", "--block-shapes", "1x4"]) == 0
        assert run_script(evaluate_model_metrics, [*data, "--output-dir", out, *run]) == 0
        scores[name] = pd.read_csv(out / "sparse_model_metrics.csv")
    cols = ["precision", "recall", "f1", "roc_auc", "accuracy", "log_loss", "n_samples"]
    pd.testing.assert_frame_equal(scores["npz"][cols], scores["npy"][cols])


def test_multi_hot_days_go_through_every_experiment(npy_data, torchrec_run, tmp_path):
    import evaluate_activation_sparsity
    import evaluate_forward_time
    import evaluate_memory_savings
    import evaluate_model_metrics
    out = tmp_path / "multi"
    args = ["--processed-data-file", npy_data["multi"], "--output-dir", out, "--device", "cpu",
            "--sparse-model-metadata", torchrec_run["out"] / "sparse_model_metadata.csv"]
    timing = ["--min-run-time", "0.01", "--rounds", "2", "--batch-size", "256"]
    assert run_script(evaluate_model_metrics, args) == 0
    assert run_script(evaluate_forward_time, [*args, *timing]) == 0
    assert run_script(evaluate_memory_savings, [*args, *timing]) == 0
    assert run_script(evaluate_activation_sparsity, [*args, *timing, "--levels", "0", "0.5"]) == 0
    df = pd.read_csv(out / "sparse_model_metrics.csv")
    assert df["roc_auc"].notna().all()
    one = pd.read_csv(torchrec_run["out"] / "sparse_model_metrics.csv")
    assert not np.allclose(df["roc_auc"], one["roc_auc"])  # the extra ids count
    memory = pd.read_csv(out / "sparse_model_memory.csv")
    assert "error" not in memory or memory["error"].isna().all()
    assert (memory[~memory["lossy"] & memory["held"]]["max_abs_diff"] <= 1e-5).all()
    for csv in ("dlrm_forward_time_info", "activation_sparsity"):
        df = pd.read_csv(out / f"{csv}.csv")
        assert "error" not in df or df["error"].isna().all(), csv
        assert (df["max_abs_diff"] < 1e-5).all(), csv


def test_training_on_multi_hot_days_is_refused_in_one_line(npy_data, tmp_path, capsys):
    import train_dlrm
    assert run_script(train_dlrm, ["--processed_data_file", npy_data["multi"], "--save-model",
                                   tmp_path / "m.pt", "--layout", "torchrec"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hold multi-hot bags" in err
    assert str(npy_data["multi"]) in err and not (tmp_path / "m.pt").exists()
