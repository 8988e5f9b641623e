"""Kill a run with SIGKILL at several moments; the rerun must end as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from checkpoint_io import load_state_dict
from conftest import tiny_config
from dlrm_model import DLRMNet

REPO = Path(__file__).resolve().parent.parent
LEVELS = ["0", "0.2", "0.4", "0.6", "0.8", "0.9", "0.95", "0.99"]
TIMING = {"step_time_sec", "command"}


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
