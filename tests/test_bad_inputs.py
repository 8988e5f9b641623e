"""A catalogue of user mistakes, each run as a real subprocess of a script.

For every case: a non-zero exit, exactly one line on stderr naming the problem and the file,
no traceback, and the outputs of an earlier good run in the same folder left as they were.
"""

import dataclasses
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import (
    random_raw_rows,
    run_script,
    tiny_config,
    write_dcp,
    write_raw_lines,
    write_snapshot,
)
from dlrm_sparsity.criteo.npy_write import write_npy_days
from dlrm_sparsity.layouts import TORCHREC, torchrec_layout
from dlrm_sparsity.model import DLRMConfig, DLRMNet

REPO = Path(__file__).resolve().parent.parent
DISK, METRICS, FORWARD = "evaluate_disk_savings.py", "evaluate_model_metrics.py", \
    "evaluate_forward_time.py"


@pytest.fixture(scope="module")
def world(tiny_pipeline, tmp_path_factory):
    """An output folder holding a good run of experiments 1 and 2, and files to spoil."""
    import evaluate_disk_savings
    import evaluate_model_metrics
    out = tmp_path_factory.mktemp("good")
    assert run_script(evaluate_disk_savings, ["--model-path", tiny_pipeline["model"],
                                              "--output-dir", out, "--device", "cpu",
                                              "--sparsity-levels", "0", "1", "--norms", "L1",
                                              "--block-shapes", "1x4"]) == 0
    data = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--device", "cpu"]
    assert run_script(evaluate_model_metrics, [*data, "--output-dir", out]) == 0
    bad = tmp_path_factory.mktemp("bad")
    return {"out": out, "bad": bad, "data": data, **tiny_pipeline}


def one_row_metadata(path: Path, checkpoint: Path) -> None:
    """A metadata CSV naming one pruned model, L1 (1, 4) at level 0.5."""
    pd.DataFrame({"norm": ["L1"], "sparse_block_shape": ["(1, 4)"], "sparsity_level": [0.5],
                  "path": [str(checkpoint)]}).to_csv(path, index=False)


def make(world, kind: str) -> Path:
    """Write one kind of bad file into world['bad'] and return its path."""
    bad: Path = world["bad"]
    path = bad / kind
    if kind == "empty.ckpt":
        path.write_bytes(b"")
    elif kind == "text.ckpt":
        path.write_text("this is a text file\n")
    elif kind == "truncated.zip":
        good = next(world["out"].rglob("*.zip"))
        path.write_bytes(good.read_bytes()[:300])
    elif kind == "other.zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "no model in here")
    elif kind == "linear.pt":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif kind == "evil.pt":
        torch.save({"state_dict": {}, "hook": print}, path)
    elif kind == "small_tables.pt":
        torch.save(DLRMNet(tiny_config(tables=(2,) * 26)).state_dict(), path)
    elif kind == "empty.csv":
        path.write_text("")
    elif kind == "columnless.csv":
        path.write_text("a,b\n1,2\n")
    elif kind == "dangling.csv":
        one_row_metadata(path, bad / "nowhere" / "model.zip")
    elif kind == "small_tables.csv":
        make(world, "small_tables.pt")
        one_row_metadata(path, bad / "small_tables.pt")
    elif kind in ("short_line.txt", "nonhex.txt"):
        rows = random_raw_rows(12, seed=9)
        if kind == "short_line.txt":
            rows[6].pop()
        else:
            rows[6][20] = "zz00zz00"
        write_raw_lines(path, rows)
    elif kind == "no_day_count.txt":
        shutil.copy(world["processed"], bad / "copied.npz")
    elif kind == "sharded.pt":  # what a sharded TorchRec model's state dict holds
        subprocess.run([sys.executable, "-c", SHARDED, str(path)], check=True,
                       capture_output=True, timeout=120)
    elif kind == "projection.pt":  # TorchRec's DLRM_Projection: an interaction not read
        sd = torchrec_state_dict(tiny_config(tables=(4,) * 26))
        sd["inter_arch.interaction_branch1._mlp.0._linear.weight"] = torch.zeros(2, 2)
        torch.save(sd, path)
    elif kind == "three_tables.csv":
        torch.save(torchrec_state_dict(tiny_config()), bad / "three_tables.pt")
        one_row_metadata(path, bad / "three_tables.pt")
    elif kind.startswith(("snapshot_", "dcp_")) and not path.exists():
        sd = torch.load(world["model"], weights_only=False)["state_dict"]
        if kind == "dcp_of_another_model":
            sd = torch.nn.Linear(3, 2).state_dict()
        (write_snapshot if kind.startswith("snapshot_") else write_dcp)(sd, path)
        if kind == "snapshot_missing_file":
            next((path / "batched").iterdir()).unlink()
        elif kind == "snapshot_missing_entry":  # the manifest lists a key it holds no entry for
            manifest = yaml.safe_load((path / ".snapshot_metadata").read_text())
            del manifest["manifest"]["0/model/emb_l.1.weight"]
            (path / ".snapshot_metadata").write_text(yaml.safe_dump(manifest))
        elif kind == "dcp_missing_shard":
            next(path.glob("*.distcp")).unlink()
    elif kind == "empty_folder":
        path.mkdir(exist_ok=True)
    elif kind in ("npy", "npy_without_labels"):
        if not path.exists():
            write_npy_days(world["processed"], world["raw"], path)
        if kind == "npy_without_labels":
            (path / "day_6_labels.npy").unlink()
    return path


SHARDED = """
import os, sys, torch, torch.distributed as dist
from torch.distributed._shard.sharding_spec import ChunkShardingSpec
from torch.distributed._shard import sharded_tensor
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29563")
dist.init_process_group("gloo", rank=0, world_size=1)
table = sharded_tensor.zeros(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"]), 10, 4)
torch.save({"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight": table},
           sys.argv[1])
dist.destroy_process_group()
"""


def torchrec_state_dict(config) -> dict:
    """A TorchRec DLRM's state dict (its keys, the suite's random weights)."""
    model = DLRMNet(DLRMConfig(*dataclasses.astuple(config)[:4], layout=TORCHREC))
    layout = torchrec_layout(len(config.table_sizes), len(config.top_mlp) - 1, 0,
                             len(config.bottom_mlp) - 1)
    return layout.to_file(model.state_dict())


def metrics_args(world, **over):
    args = {"--raw-data-file": world["raw"], "--processed-data-file": world["processed"],
            "--output-dir": world["out"],
            "--sparse-model-metadata": world["out"] / "sparse_model_metadata.csv",
            "--device": "cpu"}
    args.update(over)
    return [str(x) for kv in args.items() for x in kv]


def disk_args(world, *extra, model=None):
    return ["--model-path", str(model or world["model"]), "--output-dir", str(world["out"]),
            "--device", "cpu", *extra]


CASES = [
    # (id, script, args(world), words the message must hold, file the message must name)
    ("missing checkpoint", DISK, lambda w: disk_args(w, model=w["bad"] / "gone.ckpt"),
     "checkpoint file not found", "gone.ckpt"),
    ("empty checkpoint", DISK, lambda w: disk_args(w, model=make(w, "empty.ckpt")),
     "not a readable PyTorch checkpoint", "empty.ckpt"),
    ("text file as checkpoint", DISK, lambda w: disk_args(w, model=make(w, "text.ckpt")),
     "not a readable PyTorch checkpoint", "text.ckpt"),
    ("truncated zip", DISK, lambda w: disk_args(w, model=make(w, "truncated.zip")),
     "zip", "truncated.zip"),
    ("zip holding something else", DISK, lambda w: disk_args(w, model=make(w, "other.zip")),
     "not a readable PyTorch checkpoint", "other.zip"),
    ("state dict of another model", DISK, lambda w: disk_args(w, model=make(w, "linear.pt")),
     "not a DLRM state dict", "linear.pt"),
    ("unsafe pickle", DISK, lambda w: disk_args(w, model=make(w, "evil.pt")),
     "not allowed in safe (weights_only) loading", "evil.pt"),
    ("level of 1.5", DISK, lambda w: disk_args(w, "--sparsity-levels", "1.5"),
     "sparsity level 1.5 is outside [0, 1]", None),
    ("snapshot missing a data file", DISK,
     lambda w: disk_args(w, model=make(w, "snapshot_missing_file")),
     "its data file", "snapshot_missing_file"),
    ("snapshot manifest without an entry it lists", DISK,
     lambda w: disk_args(w, model=make(w, "snapshot_missing_entry")),
     "the manifest lists 'emb_l.1.weight' but holds no entry", "snapshot_missing_entry"),
    ("DCP folder missing a shard", DISK,
     lambda w: disk_args(w, model=make(w, "dcp_missing_shard")),
     ".distcp is missing", "dcp_missing_shard"),
    ("DCP folder of another model", DISK,
     lambda w: disk_args(w, model=make(w, "dcp_of_another_model")),
     "not a DLRM state dict", "dcp_of_another_model"),
    ("folder that is no checkpoint", DISK, lambda w: disk_args(w, model=make(w, "empty_folder")),
     "neither a torchsnapshot", "empty_folder"),
    ("unknown norm", DISK, lambda w: disk_args(w, "--norms", "L7"), "unknown norm 'L7'", None),
    ("block shape 0x4", DISK, lambda w: disk_args(w, "--block-shapes", "0x4"),
     "block shape '0x4'", None),
    ("unknown flag", DISK, lambda w: disk_args(w, "--sparsity", "0.5"),
     "unrecognized arguments: --sparsity", None),
    ("unwritable output folder", DISK,
     lambda w: ["--model-path", str(w["model"]), "--output-dir",
                str(make(w, "text.ckpt") / "out")], "cannot create the output folder",
     "text.ckpt/out"),
    ("unwritable output folder (quality)", METRICS,
     lambda w: metrics_args(w, **{"--output-dir": make(w, "text.ckpt") / "out"}),
     "cannot create the output folder", "text.ckpt/out"),
    ("a time budget of 0", FORWARD, lambda w: metrics_args(w, **{"--time-budget": "0"}),
     "--time-budget: expected a positive number, got 0", None),
    ("a guard share of 1.5", FORWARD, lambda w: metrics_args(w, **{"--guard-share": "1.5"}),
     "--guard-share: expected a number in [0, 1), got 1.5", None),
    ("unwritable output folder (timing)", FORWARD,
     lambda w: metrics_args(w, **{"--output-dir": make(w, "text.ckpt") / "out"}),
     "cannot create the output folder", "text.ckpt/out"),
    ("missing metadata CSV", METRICS,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": w["bad"] / "none.csv"}),
     "metadata CSV not found", "none.csv"),
    ("empty metadata CSV", METRICS,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": make(w, "empty.csv")}),
     "metadata CSV is empty", "empty.csv"),
    ("metadata CSV without its columns", METRICS,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": make(w, "columnless.csv"),
                                  "--output-dir": w["bad"]}),
     "lacks the column(s)", "columnless.csv"),
    ("metadata paths that do not exist", METRICS,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": make(w, "dangling.csv"),
                                  "--output-dir": w["bad"]}),
     "checkpoint file not found", "nowhere/model.zip"),
    ("processed file without its day-count file", METRICS,
     lambda w: (make(w, "no_day_count.txt"), metrics_args(
         w, **{"--raw-data-file": w["bad"] / "copied.txt",
               "--processed-data-file": w["bad"] / "copied.npz"}))[1],
     "day-count file not found", "copied_day_count.npz"),
    ("raw file with a short line", METRICS,
     lambda w: metrics_args(w, **{"--raw-data-file": make(w, "short_line.txt"),
                                  "--processed-data-file": w["bad"] / "p1.npz"}),
     ":7: expected 40 tab-separated fields, found 39", "short_line.txt"),
    ("raw file with a non-hex category", METRICS,
     lambda w: metrics_args(w, **{"--raw-data-file": make(w, "nonhex.txt"),
                                  "--processed-data-file": w["bad"] / "p2.npz"}),
     ":7: malformed field C7", "nonhex.txt"),
    ("ids beyond a table's size (quality)", METRICS,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": make(w, "small_tables.csv"),
                                  "--output-dir": w["bad"]}),
     "has 2 rows but the data holds id", "small_tables.pt"),
    ("ids beyond a table's size (timing)", FORWARD,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": make(w, "small_tables.csv"),
                                  "--output-dir": w["bad"] / "fw"}) + ["--batch-size", "64"],
     "has 2 rows but the data holds id", "small_tables.pt"),
    ("tables sharded without torchrun", METRICS, lambda w: metrics_args(w) + ["--shard-tables"],
     "--shard-tables spreads the tables over torchrun's ranks: run under torchrun", None),
    ("batch size of zero", FORWARD, lambda w: metrics_args(w) + ["--batch-size", "0"],
     "expected a positive integer, got 0", None),
    ("sharded TorchRec checkpoint", DISK, lambda w: disk_args(w, model=make(w, "sharded.pt")),
     "holds sharded tables (ShardedTensor); save them", "sharded.pt"),
    ("interaction the suite does not know", DISK,
     lambda w: disk_args(w, model=make(w, "projection.pt")),
     "an interaction the suite does not know", "projection.pt"),
    ("model tables that do not match the data's columns", METRICS,
     lambda w: metrics_args(w, **{"--sparse-model-metadata": make(w, "three_tables.csv"),
                                  "--processed-data-file": make(w, "npy"),
                                  "--output-dir": w["bad"] / "three"}),
     "the model has 3 embedding tables but the data has 26", "three_tables.pt"),
    (".npy folder with a missing file", METRICS,
     lambda w: metrics_args(w, **{"--processed-data-file": make(w, "npy_without_labels"),
                                  "--output-dir": w["bad"] / "nolabels"}),
     "missing", "day_6_labels.npy"),
]


@pytest.mark.parametrize("name, script, build, words, filename", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(world, name, script, build, words, filename):
    earlier = {p: p.read_bytes() for p in world["out"].rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, str(REPO / script), *build(world)], cwd=world["bad"],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and words in err, err
    if filename:
        assert filename in err, err
    after = {p: p.read_bytes() for p in world["out"].rglob("*") if p.is_file()}
    assert after == earlier  # nothing of the earlier good run was touched


def test_catalogue_is_large_enough():
    assert len(CASES) >= 15
