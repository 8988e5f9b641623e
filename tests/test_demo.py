"""The built-in demo, end to end, as the README's first command runs it (with smaller grids)."""

import pandas as pd
import pytest

import evaluate_disk_savings
import evaluate_forward_time
import evaluate_model_metrics
from conftest import run_script
from dlrm_sparsity.demo import ensure_demo


@pytest.fixture(scope="module")
def demo():
    return ensure_demo()


def test_demo_model_learns_the_signal_and_loses_it_when_pruned(demo, tmp_path):
    assert run_script(evaluate_disk_savings, [
        "--output-dir", tmp_path, "--sparsity-levels", "0.0", "0.9", "1.0",
        "--norms", "L1", "--block-shapes", "1x4"]) == 0
    assert run_script(evaluate_model_metrics, ["--output-dir", tmp_path]) == 0
    df = pd.read_csv(tmp_path / "sparse_model_metrics.csv").set_index("sparsity_level")
    assert df.loc[0.0, "roc_auc"] >= 0.70
    assert df.loc[1.0, "auc_drop"] >= 0.03  # pruning every weight costs visible quality
    assert df.loc[0.9, "auc_drop"] < df.loc[1.0, "auc_drop"]
    assert run_script(evaluate_forward_time, [
        "--output-dir", tmp_path, "--min-run-time", "0.02", "--stage-levels", "1.0",
        "--batch-size", "2048"]) == 0
    times = pd.read_csv(tmp_path / "dlrm_forward_time_info.csv")
    assert len(times) == 6 and times["time_median_s"].gt(0).all()


def test_metrics_without_metadata_runs_the_disk_savings_step_first(demo, tmp_path, capsys):
    code = run_script(evaluate_model_metrics, ["--output-dir", tmp_path, "--limit", "2000"])
    assert code == 0
    assert "running the disk-savings step first" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "sparse_model_metadata.csv")) == 60
    assert len(pd.read_csv(tmp_path / "sparse_model_metrics.csv")) == 60
