"""Kill a run with SIGKILL at several moments; the rerun must end as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_config
from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.model import DLRMNet

REPO = Path(__file__).resolve().parent.parent
LEVELS = ["0", "0.2", "0.4", "0.6", "0.8", "0.9", "0.95", "0.99"]
TIMING = {"step_time_sec", "mask_time_sec", "check_time_sec", "zip_time_sec", "command"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"  # ~7 MB: each zip takes a moment
    torch.save(DLRMNet(tiny_config(tables=(4000,) * 26, dim=16)).state_dict(), path)
    return path


def command(model, out):
    return [sys.executable, str(REPO / "evaluate_disk_savings.py"), "--model-path", str(model),
            "--output-dir", str(out), "--device", "cpu", "--workers", "1", "--norms", "L1",
            "--block-shapes", "1x1", "1x4", "--sparsity-levels", *LEVELS]


def finished_zips(out):
    return sorted((out / "sparsified_models").rglob("*.zip"))


def assert_nothing_truncated(out):
    for path in finished_zips(out):
        load_state_dict(path)  # raises on a truncated or damaged zip
    csv = out / "sparse_model_metadata.csv"
    if csv.exists():
        assert len(pd.read_csv(csv)) == 2 * len(LEVELS)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(command(model, out), check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("kill_after_zips", [1, 5, 11])
def test_killed_run_resumes_to_the_uninterrupted_result(model, reference, tmp_path,
                                                       kill_after_zips):
    proc = subprocess.Popen(command(model, tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(finished_zips(tmp_path)) < kill_after_zips and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not after it had finished
    assert_nothing_truncated(tmp_path)
    rerun = subprocess.run(command(model, tmp_path), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    if kill_after_zips > 1:
        assert "resumed: kept" in rerun.stdout  # finished points are not redone
    got = pd.read_csv(tmp_path / "sparse_model_metadata.csv")
    want = pd.read_csv(reference / "sparse_model_metadata.csv")
    keep = [c for c in want.columns if c not in TIMING]
    pd.testing.assert_frame_equal(got[keep], want[keep])
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob(".*progress*"))


def test_forward_time_killed_during_the_stage_breakdown_keeps_its_finished_items(
        tiny_pipeline, tmp_path):
    """Stage rows go to the progress log with their item: a rerun does not time them again."""
    import evaluate_disk_savings
    from conftest import run_script
    assert run_script(evaluate_disk_savings, [
        "--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
        "--sparsity-levels", "0", "0.5", "0.9", "1", "--norms", "L1",
        "--block-shapes", "1x4"]) == 0
    forward = [sys.executable, str(REPO / "evaluate_forward_time.py"), "--raw-data-file",
               str(tiny_pipeline["raw"]), "--processed-data-file",
               str(tiny_pipeline["processed"]), "--output-dir", str(tmp_path), "--device",
               "cpu", "--batch-size", "256", "--threads", "1", "--min-run-time", "0.2",
               "--stage-levels", "all"]
    log = tmp_path / ".dlrm_forward_time_info.csv.progress.rank0.jsonl"
    proc = subprocess.Popen(forward, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    logged = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    stage_times = {(e["key"][2], r["dlrm_type"], r["stage"]): r["time_median_s"]
                   for e in logged for r in e["tables"][1]}
    assert len(logged) >= 2 and len(stage_times) == 9 * len(logged)
    rerun = subprocess.run(forward, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"kept {len(logged)} finished item(s)" in rerun.stdout
    stages = pd.read_csv(tmp_path / "dlrm_forward_stage_times.csv")
    assert len(stages) == 4 * 9
    again = {(r["sparsity_level"], r["dlrm_type"], r["stage"]): r["time_median_s"]
             for r in stages.to_dict("records")}
    assert all(again[k] == v for k, v in stage_times.items())  # kept, not timed again
