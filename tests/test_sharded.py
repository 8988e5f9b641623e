"""Metrics with each model's tables sharded over torchrun's ranks by TorchRec's
DistributedModelParallel (2 CPU processes on gloo) equal one process's exactly:
- dlrm's model on dlrm's data, table-wise, with batches that do not share out evenly (a rank
  makes a filler pass);
- a model with one table larger than a rank's memory (--rank-memory): sharded without being
  asked, that table column-wise;
- a TorchRec DLRM_DCN on multi-hot .npy days (streamed metrics, bags of several ids);
- DCP and torchsnapshot folders whose tables are stored in row or column shards.
And the planner's failure is one line on rank 0, exit 2, the earlier outputs kept.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate_disk_savings
import evaluate_model_metrics
from conftest import run_script, write_in_two_shards
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo.npy_write import write_npy_days
from dlrm_sparsity.model import DLRMConfig, DLRMNet

REPO = Path(__file__).resolve().parent.parent
METRICS = ["precision", "recall", "f1", "roc_auc", "accuracy", "log_loss", "average_precision",
           "n_samples"]


def torchrun(args, nproc: int = 2) -> subprocess.CompletedProcess:
    """evaluate_model_metrics.py under torchrun, one thread per process (as torchrun sets)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", str(REPO / "evaluate_model_metrics.py"),
         *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def single(args) -> None:
    """The same script in this process, on one thread as the ranks are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_script(evaluate_model_metrics, args) == 0
    finally:
        torch.set_num_threads(threads)


def pruned(model, out: Path, levels, block: str) -> Path:
    assert run_script(evaluate_disk_savings, [
        "--model-path", model, "--output-dir", out, "--device", "cpu", "--norms", "L1",
        "--sparsity-levels", *levels, "--block-shapes", block]) == 0
    return out / "sparse_model_metadata.csv"


def same_metrics(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """The ranks' metrics against one process's: the scores are the same bits, and rank 0's
    lean metric code agrees with scikit-learn's to float64 rounding (the target: 1e-12)."""
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)


def compare(one: Path, spread: Path) -> None:
    a, b = pd.read_csv(one / "sparse_model_metrics.csv"), pd.read_csv(spread)
    assert len(a) == len(b) > 0 and ("error" not in b or b["error"].isna().all())
    same_metrics(a[METRICS], b[METRICS])
    assert (a["tables_on_ranks"] == 1).all() and (b["tables_on_ranks"] == 2).all()


def no_inflated_copies_left(folder: Path) -> bool:
    return not list(folder.rglob("*.inflated*"))


@pytest.fixture(scope="module")
def dlrm_run(tiny_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    metadata = pruned(tiny_pipeline["model"], root / "one", ["0", "0.9"], "1x1")
    data = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--device", "cpu", "--no-report",
            "--sparse-model-metadata", metadata, "--batch-size", "128"]  # 3 batches, 2 ranks
    single([*data, "--output-dir", root / "one"])
    return {"root": root, "data": data, "metadata": metadata}


def test_table_wise_sharded_metrics_equal_one_process(dlrm_run):
    root = dlrm_run["root"]
    proc = torchrun([*dlrm_run["data"], "--output-dir", root / "spread", "--shard-tables"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tables sharded by TorchRec's planner: 26 table-wise (rank 0:" in proc.stdout
    assert "rank 1:" in proc.stdout
    compare(root / "one", root / "spread" / "sparse_model_metrics.csv")
    assert no_inflated_copies_left(root)
    assert not list((root / "spread").glob(".*progress*"))


def test_a_damaged_zip_is_an_error_row_on_every_rank_and_the_others_score(dlrm_run):
    """One rank's failure to read a model (here every rank's, the inflate on rank 0 and the
    map on rank 1) is agreed before any collective step: its row says why, the next model is
    scored by all ranks together, and nothing hangs."""
    root, out = dlrm_run["root"], dlrm_run["root"] / "damaged"
    out.mkdir()
    meta = pd.read_csv(dlrm_run["metadata"])
    good = root / "one" / meta["path"].iloc[-1]
    data = bytearray(good.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # the deflated stream, corrupted
    (out / "damaged.zip").write_bytes(bytes(data))
    bad = meta.iloc[[-1]].assign(sparsity_level=0.95, path=str(out / "damaged.zip"),
                                 sha256=float("nan"))
    meta = meta.assign(path=[str(root / "one" / p) for p in meta["path"]])
    pd.concat([meta.iloc[:1], bad, meta.iloc[1:]]).to_csv(out / "sparse_model_metadata.csv",
                                                          index=False)
    args = [a if a != dlrm_run["metadata"] else out / "sparse_model_metadata.csv"
            for a in dlrm_run["data"]]
    proc = torchrun([*args, "--output-dir", out, "--shard-tables"])
    assert proc.returncode != 0  # a row failed
    rows = pd.read_csv(out / "sparse_model_metrics.csv")
    failed = rows[rows["error"].notna()]
    assert list(failed["sparsity_level"]) == [0.95]
    assert "damaged.zip: cannot inflate the zip" in failed["error"].iloc[0]
    one = pd.read_csv(root / "one" / "sparse_model_metrics.csv")
    same_metrics(one[METRICS], rows[rows["error"].isna()][METRICS].reset_index(drop=True))
    assert no_inflated_copies_left(root)


def test_folders_whose_tables_are_stored_in_shards_score_the_same_sharded(dlrm_run):
    """The level-0 model saved as a DCP folder with its tables in two row shards and as a
    torchsnapshot with them in two column shards (neither read whole): scored sharded, each
    equals the level-0 zip scored by one process. A copy of the DCP folder with its data file
    cut short, between them, is an error row on every rank, and nothing hangs."""
    root, out = dlrm_run["root"], dlrm_run["root"] / "in_shards"
    meta = pd.read_csv(dlrm_run["metadata"])
    level0 = meta[meta["sparsity_level"] == 0].iloc[[0]]
    write_in_two_shards(root / "one" / level0["path"].iloc[0], out)
    assert load_dlrm_state_dict(out / "dcp", mmap=True)["emb_l.0.weight"].is_meta
    shutil.copytree(out / "dcp", out / "cut")
    data = next((out / "cut").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    rows = pd.concat([level0.assign(path=str(out / kind), sha256=float("nan"),
                                    sparsity_level=level)
                      for kind, level in (("dcp", 0.0), ("cut", 0.5), ("snapshot", 0.0))])
    rows.to_csv(out / "sparse_model_metadata.csv", index=False)
    args = [a if a != dlrm_run["metadata"] else out / "sparse_model_metadata.csv"
            for a in dlrm_run["data"]]
    proc = torchrun([*args, "--output-dir", out / "spread", "--shard-tables"])
    assert proc.returncode != 0  # a row failed
    spread = pd.read_csv(out / "spread" / "sparse_model_metrics.csv")
    assert len(spread) == 3
    failed = spread[spread["error"].notna()]
    assert list(failed["checkpoint"]) == [str(out / "cut")]
    assert "is not a whole torch.save archive" in failed["error"].iloc[0]
    one = pd.read_csv(root / "one" / "sparse_model_metrics.csv")
    expected = one[one["sparsity_level"] == 0][METRICS].reset_index(drop=True)
    scored = spread[spread["error"].isna()]
    assert list(scored["checkpoint"]) == [str(out / "dcp"), str(out / "snapshot")]
    for i in range(2):
        same_metrics(scored.iloc[[i]][METRICS].reset_index(drop=True), expected)


def test_a_table_larger_than_a_rank_is_sharded_column_wise_unasked(tiny_pipeline, tmp_path):
    """26 tables 16 wide, the first of 6000 rows (384 kB); a rank has 300 kB. The pruned
    models are two zips, then the second as a DCP folder with its tables in two row shards
    and as a torchsnapshot with them in two column shards (labelled levels 0.75 and 0.8), so
    that the ranks' column shards cross the stored shards both ways."""
    counts = np.load(tiny_pipeline["processed"])["counts"]
    sizes = (6000, *map(int, counts[1:]))
    f = len(sizes) + 1
    torch.manual_seed(0)
    torch.save(DLRMNet(DLRMConfig(sizes, 16, (13, 8, 16), (16 + f * (f - 1) // 2, 8, 1))
                       ).state_dict(), tmp_path / "wide.pt")
    metadata = pruned(tmp_path / "wide.pt", tmp_path / "one", ["0", "0.5"], "1x4")
    zips = pd.read_csv(metadata)
    write_in_two_shards(tmp_path / "one" / zips["path"].iloc[1], tmp_path / "two")
    folders = [zips.iloc[[1]].assign(path=str(tmp_path / "two" / kind), sha256=float("nan"),
                                     sparsity_level=level)
               for kind, level in (("dcp", 0.75), ("snapshot", 0.8))]
    pd.concat([zips, *folders]).to_csv(metadata, index=False)
    data = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--device", "cpu", "--no-report",
            "--sparse-model-metadata", metadata, "--batch-size", "16"]
    single([*data, "--output-dir", tmp_path / "one"])
    proc = torchrun([*data, "--output-dir", tmp_path / "spread", "--rank-memory", "0.0003"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not fit one rank (300 kB): its tables are sharded" in proc.stdout
    assert "1 column-wise, 25 table-wise" in proc.stdout
    compare(tmp_path / "one", tmp_path / "spread" / "sparse_model_metrics.csv")
    spread = pd.read_csv(tmp_path / "spread" / "sparse_model_metrics.csv")
    assert list(spread["sparsity_level"]) == [0, 0.5, 0.75, 0.8]
    for folder in (2, 3):  # each folder scores as its zip
        pd.testing.assert_frame_equal(spread.iloc[[folder]][METRICS].reset_index(drop=True),
                                      spread.iloc[[1]][METRICS].reset_index(drop=True),
                                      check_exact=True)


def test_a_torchrec_dcn_on_multi_hot_days_scores_the_same_sharded(tiny_pipeline, tmp_path):
    import train_dlrm
    days = tmp_path / "days"
    write_npy_days(tiny_pipeline["processed"], tiny_pipeline["raw"], days / "one")
    write_npy_days(tiny_pipeline["processed"], tiny_pipeline["raw"], days / "multi",
                   multi_hot=True)
    model = tmp_path / "dcn.pt"
    assert run_script(train_dlrm, [
        "--processed_data_file", days / "one", "--save-model", model,
        "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "13-8-4", "--arch-mlp-top", "8-1",
        "--num-batches", "20", "--device", "cpu", "--dcn-num-layers", "2"]) == 0
    metadata = pruned(model, tmp_path / "one", ["0", "0.5"], "1x4")
    data = ["--processed-data-file", days / "multi", "--device", "cpu", "--no-report",
            "--sparse-model-metadata", metadata, "--batch-size", "64"]
    single([*data, "--output-dir", tmp_path / "one"])
    proc = torchrun([*data, "--output-dir", tmp_path / "spread", "--shard-tables"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    compare(tmp_path / "one", tmp_path / "spread" / "sparse_model_metrics.csv")


def test_tables_the_planner_cannot_place_stop_the_run_in_one_line(dlrm_run):
    out = dlrm_run["root"] / "too_small"
    shutil.copytree(dlrm_run["root"] / "one", out,
                    ignore=shutil.ignore_patterns("sparsified_models"))
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = torchrun([*dlrm_run["data"], "--output-dir", out, "--shard-tables",
                     "--rank-memory", "0.000001", "--overwrite"])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: TorchRec's planner cannot place the tables (")
    assert errors[0].endswith("on 2 ranks with 1 kB each: run more ranks, or give each more "
                              "memory (--rank-memory)")
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    assert no_inflated_copies_left(dlrm_run["root"])


@pytest.mark.parametrize("world, device, asked, model_kb, expected", [
    (1, "cpu", False, 500, False),  # one process on CPUs maps a large model instead
    (1, "cpu", True, 1, "run under torchrun with 2 or more processes"),
    (1, "cuda", False, 500, "does not fit the GPU (300 kB): run under torchrun on several GPUs"),
    (1, "cuda", False, 100, False),
    (2, "cpu", False, 500, True),  # larger than a rank: sharded unasked
    (2, "cpu", False, 100, False),
    (2, "cpu", True, 100, True),
], ids=["cpu alone", "asked alone", "one gpu too small", "one gpu", "ranks too small",
        "ranks", "asked"])
def test_when_the_tables_are_sharded(tmp_path, world, device, asked, model_kb, expected):
    """The decision alone, on an Experiment's attributes: a rank holds 300 kB."""
    from types import SimpleNamespace

    from dlrm_sparsity.errors import UserInputError
    from dlrm_sparsity.experiment import Experiment
    from dlrm_sparsity.runner.distributed import DistContext
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        zf.writestr("m.ckpt", b"\0" * model_kb * 1000)
    exp = SimpleNamespace(
        args=SimpleNamespace(shard_tables=asked),
        run=SimpleNamespace(ctx=DistContext(rank=1, world_size=world),
                            device=torch.device(device)),
        metadata=[{"checkpoint": str(tmp_path / "m.zip")}], rank_capacity=300_000)
    if isinstance(expected, str):
        with pytest.raises(UserInputError, match=re.escape(expected)):
            Experiment._shards_tables(exp)
    else:
        assert Experiment._shards_tables(exp) is expected
