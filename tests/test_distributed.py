"""The scripts under torchrun (2 CPU processes, gloo) give the single-process CSVs."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
TIMING = {"step_time_sec", "mask_time_sec", "check_time_sec", "zip_time_sec", "time_taken",
          "time_median_s", "time_iqr_s", "time_mean_s", "n_runs", "number_per_run", "command",
          "whole_forward_median_s", "num_threads",  # torchrun sets OMP_NUM_THREADS=1
          "ratio", "ratio_low", "ratio_high", "ratio_verdict", "reference_s",
          "reference_drift", "measured_again", "disturbed", "ratio_decided", "guarded",
          "machine_noise_p90", "machine_noise_worst", "drift_margin", "measure_s", "guard_s",
          "noise_probe_s"}


def launch(script, args, nproc=None):
    """The script alone, or under torchrun; both on one thread per process, as torchrun sets
    it: the comparison is of the sharding and gathering, and a model's scores may differ in
    their last bits between thread counts (seen here as a 6e-5 AUC change on a model whose
    scores tie)."""
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
    proc = subprocess.run(prefix + [str(REPO / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def comparable(path):
    df = pd.read_csv(path)
    return df[[c for c in df.columns if c not in TIMING]]


@pytest.fixture(scope="module")
def runs(tiny_pipeline, tmp_path_factory):
    data = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--device", "cpu"]
    grid = ["--sparsity-levels", "0", "0.5", "0.9", "1", "--norms", "L1", "L2",
            "--block-shapes", "1x1", "1x4", "--device", "cpu"]
    outs = {}
    for name, nproc in (("single", None), ("torchrun", 2)):
        out = tmp_path_factory.mktemp(name)
        launch("evaluate_disk_savings.py",
               ["--model-path", tiny_pipeline["model"], "--output-dir", out, *grid], nproc)
        launch("evaluate_model_metrics.py", [*data, "--output-dir", out], nproc)
        launch("evaluate_forward_time.py", [*data, "--output-dir", out, "--batch-size", "128",
                                            "--min-run-time", "0.005", "--threads", "1",
                                            "--stage-levels", "1.0"], nproc)
        outs[name] = out
    return outs


@pytest.mark.parametrize("csv", ["sparse_model_metadata.csv", "sparse_model_metrics.csv",
                                 "dlrm_forward_time_info.csv"])
def test_torchrun_csvs_equal_single_process_ones_but_for_timings(runs, csv):
    single = comparable(runs["single"] / csv)
    spread = comparable(runs["torchrun"] / csv)
    assert len(single) == len(spread) > 0
    pd.testing.assert_frame_equal(single, spread)


def test_torchrun_writes_every_zip_once_and_no_progress_logs(runs):
    single = sorted(p.relative_to(runs["single"]) for p in runs["single"].rglob("*.zip"))
    spread = sorted(p.relative_to(runs["torchrun"]) for p in runs["torchrun"].rglob("*.zip"))
    assert single == spread and len(single) == 12
    assert not list(runs["torchrun"].glob(".*progress*"))
    assert (runs["torchrun"] / "forward_time.png").exists()
