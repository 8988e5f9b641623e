"""Shared fixtures: tiny DLRMs and tiny Criteo files written to tmp_path."""

import numpy as np
import pytest
import torch

from dlrm_sparsity.model import DLRMConfig, DLRMNet


def tiny_config(tables=(7, 5, 9), dim=4) -> DLRMConfig:
    f = len(tables) + 1
    return DLRMConfig(tuple(tables), dim, (13, 8, dim), (dim + f * (f - 1) // 2, 6, 1))


@pytest.fixture
def tiny_model() -> DLRMNet:
    torch.manual_seed(0)
    return DLRMNet(tiny_config())


def random_batch(config: DLRMConfig, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, 13, generator=g) * 3
    indices = torch.stack([torch.randint(0, n, (batch,), generator=g)
                           for n in config.table_sizes])
    offsets = torch.arange(batch).expand(len(config.table_sizes), batch)
    return dense, offsets, indices


def write_raw_lines(path, rows) -> None:
    """rows: lists of 40 field strings."""
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def random_raw_rows(n: int, seed: int = 0, cardinality: int = 6):
    """Rows with empty fields, negatives, and hex values on both sides of 0x7fffffff."""
    rng = np.random.default_rng(seed)
    vocab = [f"{v:08x}" for v in rng.choice(2**32, size=cardinality, replace=False)]
    vocab[0] = "ffffffff"
    rows = []
    for _ in range(n):
        row = [str(rng.integers(0, 2))]
        for _ in range(13):
            v = int(rng.integers(-3, 50))
            row.append("" if rng.random() < 0.2 else str(v))
        for _ in range(26):
            row.append("" if rng.random() < 0.15 else vocab[rng.integers(0, cardinality)])
        rows.append(row)
    return rows


def run_script(module, argv) -> int:
    """Call a script's main(argv) and return its exit code."""
    try:
        module.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Raw file -> processed file -> a briefly trained DLRM, all tiny, shared by the tests."""
    from dlrm_sparsity.criteo.preprocess import preprocess_raw
    from dlrm_sparsity.criteo.synthetic import write_synthetic_raw
    from dlrm_sparsity.training import Recipe, train_and_save

    root = tmp_path_factory.mktemp("pipeline")
    raw = write_synthetic_raw(root / "train.txt", 4000, seed=3, max_cardinality=60,
                              show_progress=False)
    processed = root / "processed.npz"
    preprocess_raw(raw, processed, show_progress=False)
    model = root / "model.ckpt"
    train_and_save(str(processed), str(raw), str(model),
                   Recipe(embedding_dim=4, bottom="13-8-4", top="8-1", num_batches=30),
                   device="cpu", print_every=0)
    return {"root": root, "raw": raw, "processed": processed, "model": model}


@pytest.fixture(scope="session")
def wide_model(tiny_pipeline):
    """A DLRM 16 wide on the tiny pipeline's data: TorchRec pads a quantized row to 16 bytes,
    so at the tiny pipeline's width of 4 no quantized table is smaller than the dense one."""
    from dlrm_sparsity.training import Recipe, train_and_save

    model = tiny_pipeline["root"] / "wide.ckpt"
    train_and_save(str(tiny_pipeline["processed"]), str(tiny_pipeline["raw"]), str(model),
                   Recipe(embedding_dim=16, bottom="13-8-16", top="8-1", num_batches=30),
                   device="cpu", print_every=0)
    return model


class AppState:
    """What torchsnapshot snapshots: any object with state_dict and load_state_dict."""

    def __init__(self, state_dict):
        self.sd = state_dict

    def state_dict(self):
        return self.sd

    def load_state_dict(self, state_dict):
        self.sd = state_dict


def write_snapshot(state_dict, path) -> None:
    """A torchsnapshot folder of a state dict, taken by torchsnapshot itself (app state
    'model', as MLCommons' DLRM v2 snapshot is)."""
    import warnings

    import torchsnapshot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchsnapshot.Snapshot.take(path=str(path), app_state={"model": AppState(state_dict)})


def write_dcp(state_dict, path) -> None:
    """A torch.distributed.checkpoint folder of a state dict, saved by DCP in one process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(state_dict), checkpoint_id=str(path))


IN_TWO_SHARDS = """
import os, sys, warnings, torch, torch.distributed as dist
warnings.simplefilter("ignore")
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec
from conftest import write_dcp, write_snapshot
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.layouts import read_layout

def in_two(table, dim):
    two = sharded_tensor.empty(ChunkShardingSpec(dim=dim, placements=["rank:0/cpu"] * 2),
                               *table.shape)
    for shard in two.local_shards():
        (r, c), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        shard.tensor.copy_(table[r:r + rows, c:c + cols])
    return two

sd = load_dlrm_state_dict(sys.argv[1])
tables = read_layout(sd).tables
for kind, dim in (("dcp", 0), ("snapshot", 1)):
    stored = {k: in_two(v, dim) if k in tables and v.shape[dim] > 1 else v
              for k, v in sd.items()}
    (write_dcp if kind == "dcp" else write_snapshot)(stored, sys.argv[2] + "/" + kind)
dist.destroy_process_group()
"""


def write_in_two_shards(source, out) -> None:
    """A checkpoint's model as a DCP folder (out/dcp) with every table of two rows or more in
    two row shards, and as a torchsnapshot (out/snapshot) with every table of two columns or
    more in two column shards, as jobs sharding it row- or column-wise save it: read whole
    only when read for itself. Written in a process of its own (a one-rank gloo group: a
    ShardedTensor needs one)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", IN_TWO_SHARDS, str(source), str(out),
                           str(repo), str(port)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
