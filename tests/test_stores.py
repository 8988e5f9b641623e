"""Checkpoint folders as large TorchRec jobs write them, written here by the real libraries:
torchsnapshot (0.1.0, a dev requirement) and torch.distributed.checkpoint (torch's own).

- Each folder reads back as the plain state dict, keys in order, bit for bit, mapped or read.
- A DistributedModelParallel DLRM_DCN with table-wise sharded tables (ShardedTensor entries)
  snapshotted and saved by DCP reads back as its gathered tables; a table in two shards is
  only its shape until it is read for itself, then whole.
- The disk step and the metrics on a TorchRec DLRM_DCN give the same metadata, zips and
  metrics from its plain state dict, its DCP folder and its snapshot.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import run_script, write_dcp, write_in_two_shards, write_snapshot
from dlrm_sparsity.checkpoints import CheckpointTables, load_state_dict, sha256_of_file
from dlrm_sparsity.criteo.npy_write import write_npy_days
from dlrm_sparsity.layouts import read_layout
from dlrm_sparsity.stores import folder_kind

REPO = Path(__file__).resolve().parent.parent


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


@pytest.fixture(scope="module")
def prefixed(tiny_pipeline, tmp_path_factory):
    """The tiny model under DLRMTrain's `model.` prefix: plain, DCP and snapshot."""
    root = tmp_path_factory.mktemp("stores")
    sd = {f"model.{k}": v for k, v in load_state_dict(tiny_pipeline["model"]).items()}
    torch.save(sd, root / "plain.pt")
    write_dcp(sd, root / "dcp")
    write_snapshot(sd, root / "snapshot")
    return {"root": root, "sd": sd}


@pytest.mark.parametrize("kind", ["dcp", "snapshot"])
def test_a_folder_reads_as_its_state_dict(prefixed, kind):
    folder = prefixed["root"] / kind
    assert folder_kind(folder) == {"dcp": "dcp", "snapshot": "torchsnapshot"}[kind]
    for mmap in (False, True):
        assert same(load_state_dict(folder, mmap=mmap), prefixed["sd"])
    tables = CheckpointTables(folder)
    layout = read_layout(prefixed["sd"])
    assert layout.prefix == "model."
    for name in layout.tables:  # one table at a time, as the disk step reads them
        assert torch.equal(tables.read(name), prefixed["sd"][name])
        assert torch.equal(tables.read(name, copy=False), prefixed["sd"][name])
    assert sha256_of_file(folder) == sha256_of_file(folder)  # every file, in a fixed order
    assert sha256_of_file(folder) != sha256_of_file(prefixed["root"] / "plain.pt")


DMP_SAVE = textwrap.dedent("""
    import os, sys, warnings, torch, torch.distributed as dist
    warnings.simplefilter("ignore")
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import torchsnapshot
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.models.dlrm import DLRMTrain
    from test_torchrec import SIZES, torchrec_model
    from conftest import AppState
    model = DLRMTrain(torchrec_model(dcn=True))
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"),
        constraints={f"t_cat_{i}": ParameterConstraints(sharding_types=["table_wise"])
                     for i in range(len(SIZES))})
    plan = planner.collective_plan(model, None, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
    sd = dmp.state_dict()
    out = sys.argv[1]
    kinds = sorted({type(v).__name__ for v in sd.values()})
    torchsnapshot.Snapshot.take(path=out + "/snapshot", app_state={"model": dmp})
    dcp.save(sd, checkpoint_id=out + "/dcp")
    plain = {k: (v.local_shards()[0].tensor if type(v).__name__ == "ShardedTensor" else v)
             for k, v in sd.items()}
    torch.save(plain, out + "/plain.pt")
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec
    two = sharded_tensor.empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"] * 2), 10, 4)
    for shard in two.local_shards():
        rows = shard.metadata.shard_offsets[0]
        shard.tensor.copy_(torch.arange(40.0).view(10, 4)[rows:rows + shard.tensor.shape[0]])
    torchsnapshot.Snapshot.take(path=out + "/two_shards_snapshot",
                                app_state={"model": AppState({"t": two})})
    dcp.save({"t": two}, checkpoint_id=out + "/two_shards_dcp")
    print(",".join(kinds))
    dist.destroy_process_group()
    """)


def test_a_sharded_dmp_models_folders_read_as_its_tables(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DMP_SAVE, str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ShardedTensor" in proc.stdout  # the tables were sharded (table-wise)
    plain = load_state_dict(tmp_path / "plain.pt")
    assert read_layout(plain).prefix == "model."
    for kind in ("snapshot", "dcp"):
        assert same(load_state_dict(tmp_path / kind), plain), kind
        # one shard a table (table-wise on one rank): each mapped where it lies
        assert not any(v.is_meta for v in load_state_dict(tmp_path / kind, mmap=True).values())
        # a table in two shards: only its shape until it is read for itself, then whole
        two = tmp_path / f"two_shards_{kind}"
        assert load_state_dict(two, mmap=True)["t"].is_meta
        assert torch.equal(CheckpointTables(two).read("t"), torch.arange(40.0).view(10, 4))
        pieces = CheckpointTables(two).pieces("t")  # as stored, never put together
        assert sorted(offsets for offsets, _ in pieces) == [[0, 0], [5, 0]]
        for (row, _), piece in pieces:
            assert torch.equal(piece, torch.arange(40.0).view(10, 4)[row:row + 5])
        assert torch.equal(load_state_dict(two)["t"], torch.arange(40.0).view(10, 4))


@pytest.fixture(scope="module")
def dcn_runs(tiny_pipeline, tmp_path_factory):
    """A TorchRec DLRM_DCN trained on .npy days; the disk step and the metrics run on its
    plain state dict (DLRMTrain's keys), its DCP folder and its snapshot, each with its
    tables whole and with them in two shards (the DCP's by rows, the snapshot's by columns)."""
    import evaluate_disk_savings
    import evaluate_model_metrics
    import train_dlrm
    root = tmp_path_factory.mktemp("dcn_stores")
    write_npy_days(tiny_pipeline["processed"], tiny_pipeline["raw"], root / "days")
    trained = root / "trained.pt"
    assert run_script(train_dlrm, ["--processed_data_file", root / "days", "--save-model",
                                   trained, "--arch-sparse-feature-size", "4",
                                   "--arch-mlp-bot", "13-8-4", "--arch-mlp-top", "8-1",
                                   "--num-batches", "20", "--device", "cpu",
                                   "--dcn-num-layers", "2"]) == 0
    sd = {f"model.{k}": v for k, v in load_state_dict(trained).items()}
    models = {"plain": root / "plain.pt", "dcp": root / "dcp", "snapshot": root / "snapshot",
              "dcp_in_two": root / "two" / "dcp", "snapshot_in_two": root / "two" / "snapshot"}
    torch.save(sd, models["plain"])
    write_dcp(sd, models["dcp"])
    write_snapshot(sd, models["snapshot"])
    write_in_two_shards(models["plain"], root / "two")  # tables put together when read
    frames = {}
    for kind, model in models.items():
        out = root / f"out_{kind}"
        run = ["--output-dir", out, "--device", "cpu", "--no-report"]
        assert run_script(evaluate_disk_savings, ["--model-path", model, *run, "--norms", "L1",
                                                  "--block-shapes", "1x4", "--workers", "0",
                                                  "--sparsity-levels", "0", "0.5", "0.9"]) == 0
        assert run_script(evaluate_model_metrics, ["--processed_data_file", root / "days", *run,
                                                   "--batch-size", "256"]) == 0
        frames[kind] = (pd.read_csv(out / "sparse_model_metadata.csv"),
                        pd.read_csv(out / "sparse_model_metrics.csv"))
    return frames


@pytest.mark.parametrize("kind", ["dcp", "snapshot", "dcp_in_two", "snapshot_in_two"])
def test_the_experiments_give_the_same_results_from_every_kind(dcn_runs, kind):
    meta, metrics = dcn_runs[kind]
    plain_meta, plain_metrics = dcn_runs["plain"]
    assert len(meta) == 3 and ("error" not in meta or meta["error"].isna().all())
    for column in ("sha256", "zip_file_size_bytes", "actual_sparsity", "dense_size_bytes"):
        assert meta[column].tolist() == plain_meta[column].tolist(), column
    assert (meta["model_sha256"] != plain_meta["model_sha256"]).all()  # the folder's own
    numeric = [c for c in plain_metrics.columns if c in ("roc_auc", "accuracy", "log_loss",
                                                         "auc_drop", "num_samples")]
    assert "roc_auc" in numeric
    for column in numeric:
        assert metrics[column].tolist() == plain_metrics[column].tolist(), column
