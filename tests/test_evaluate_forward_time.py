import timeit

import pandas as pd
import pytest
import torch

import evaluate_disk_savings
import evaluate_forward_time
from conftest import run_script
from dlrm_forward_time import (
    DENSE,
    SPARSE,
    Dense,
    Timing,
    TorchSparseTop,
    max_difference,
    measure,
    measure_paired,
    stage_calls,
)
from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.criteo.data import load_split
from dlrm_sparsity.model import DLRMNet

CPU = torch.device("cpu")


@pytest.mark.parametrize("paired", [False, True])
def test_the_default_timer_synchronises_the_device_before_every_reading(monkeypatch,
                                                                         paired):
    """measure() and measure_paired() read only torch.utils.benchmark's default timer,
    which waits for the accelerator: here a fake one, and a fake clock on which every fn()
    takes 1 ms."""
    calls = []
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(timeit, "default_timer",
                        lambda: (calls.append("clock"), calls.count("fn") * 1e-3)[1])
    timing = Timing(threads=1, min_run_time=0.05)
    fn = lambda: calls.append("fn")  # noqa: E731
    if paired:  # five rounds of blocks that fill min_run_time: 10 calls of 1 ms each
        m = measure_paired({"fake": fn}, timing)
        times, median = m.times["fake"], m.median("fake")
        assert len(times) == 5 and m.numbers["fake"] == 10
    else:
        m = measure(fn, "fake", timing)
        times, median = m.times, m.median
    reads = [i for i, c in enumerate(calls) if c == "clock"]
    assert reads and all(calls[i - 1] == "sync" for i in reads)
    assert calls.count("fn") > 2 and len(times) >= 3
    assert median == pytest.approx(1e-3)


@pytest.fixture(scope="module")
def model_and_batch(tiny_pipeline):
    test = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "test")
    batch = next(test.batches(len(test)))
    return DLRMNet.from_state_dict(load_state_dict(tiny_pipeline["model"])).eval(), batch


def test_dense_and_sparse_variants_agree(model_and_batch):
    model, batch = model_and_batch
    assert max_difference(Dense(model), TorchSparseTop(model), batch) <= 1e-6
    with torch.inference_mode():
        assert TorchSparseTop(model).on(batch)().shape == (len(batch.labels), 1)


def test_stage_times_are_positive_and_add_up_to_about_the_whole(model_and_batch):
    model, batch = model_and_batch
    fns: dict[str, dict] = {}
    timing = Timing(threads=1, min_run_time=0.05)
    for variant, stage, fn in stage_calls(model, batch):
        fns.setdefault(variant, {})[stage] = measure(fn, stage, timing).median
    forwards = {DENSE: Dense(model), SPARSE: TorchSparseTop(model)}
    for variant, stages in fns.items():
        whole = measure(forwards[variant].on(batch), variant, timing).median
        assert all(s > 0 for s in stages.values())
        assert 0.3 * whole < sum(stages.values()) < 3 * whole, (variant, stages, whole)
    assert set(fns[SPARSE]) == {"bottom_mlp", "embedding", "interaction", "to_sparse_coo",
                                "top_mlp"}


@pytest.fixture(scope="module")
def metadata(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("forward")
    assert run_script(evaluate_disk_savings, [
        "--model-path", tiny_pipeline["model"], "--output-dir", out, "--device", "cpu",
        "--sparsity-levels", "0.0", "0.5", "--norms", "L1", "--block-shapes", "1x1"]) == 0
    return out


def args_for(p, out):
    return ["--raw-data-file", p["raw"], "--processed-data-file", p["processed"],
            "--output-dir", out, "--device", "cpu", "--min-run-time", "0.01",
            "--batch-size", "256", "--threads", "1"]


def test_csv_has_both_variants_for_every_row_and_stages(tiny_pipeline, metadata):
    assert run_script(evaluate_forward_time, args_for(tiny_pipeline, metadata)) == 0
    df = pd.read_csv(metadata / "dlrm_forward_time_info.csv")
    assert list(df.columns[:5]) == ["norm", "sparse_block_shape", "sparsity_level",
                                    "time_taken", "dlrm_type"]
    assert df.groupby("sparsity_level")["dlrm_type"].apply(sorted).tolist() == \
        [[SPARSE, DENSE]] * 2
    assert (df["time_median_s"] > 0).all() and (df["n_runs"] >= 3).all()
    assert (df["batch_size"] == 256).all() and (df["num_threads"] == 1).all()
    level1 = df[df.sparsity_level == 0.5]
    assert (level1["embedding_density"] < 0.51).all()
    stages = pd.read_csv(metadata / "dlrm_forward_stage_times.csv")
    assert set(stages["sparsity_level"]) == {0.0, 0.5} and (stages["time_median_s"] > 0).all()
    assert (metadata / "forward_time.png").exists()


def test_a_budget_too_small_for_five_rounds_gives_the_later_units_three(tiny_pipeline,
                                                                        metadata, tmp_path,
                                                                        capsys):
    """The first unit is asked for its five rounds (no pace is known yet; a clear verdict may
    stop it at three); once a unit shows that the rest would overrun the budget even at one
    call per block, they get fewer, and the run says so."""
    meta = ["--sparse_model_metadata", metadata / "sparse_model_metadata.csv"]
    assert run_script(evaluate_forward_time, [*args_for(tiny_pipeline, tmp_path), *meta,
                                              "--time-budget", "0.01", "--no-report"]) == 0
    df = pd.read_csv(tmp_path / "dlrm_forward_time_info.csv").set_index("sparsity_level")
    assert (df.loc[0.0, "n_runs"] >= 3).all() and (df.loc[0.5, "n_runs"] == 3).all()
    assert "1 unit(s) given fewer first rounds to stay within it (3 at least)" in \
        capsys.readouterr().out


def test_outputs_that_disagree_are_an_error_not_a_timing(tiny_pipeline, metadata, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.setattr(evaluate_forward_time, "AGREEMENT_TOLERANCE", -1.0)
    meta = ["--sparse_model_metadata", metadata / "sparse_model_metadata.csv"]
    code = run_script(evaluate_forward_time, args_for(tiny_pipeline, tmp_path) + meta)
    df = pd.read_csv(tmp_path / "dlrm_forward_time_info.csv")
    assert code == 2 and "time_median_s" not in df.columns
    assert df["error"].str.contains("outputs differ").all()
    assert "dense and torch.sparse outputs differ" in capsys.readouterr().err


def test_rerun_keeps_timings_and_stage_breakdowns(tiny_pipeline, metadata, capsys):
    args = args_for(tiny_pipeline, metadata) + ["--stage-levels", "0.5"]
    assert run_script(evaluate_forward_time, args) == 0
    first = pd.read_csv(metadata / "dlrm_forward_time_info.csv")
    capsys.readouterr()
    assert run_script(evaluate_forward_time, args) == 0
    assert "kept 2 finished item(s)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(metadata / "dlrm_forward_time_info.csv"), first)
    stages = pd.read_csv(metadata / "dlrm_forward_stage_times.csv")
    assert set(stages["sparsity_level"]) == {0.5} and len(stages) == 9  # 4 + 5 stages, kept
    assert run_script(evaluate_forward_time, [*args, "--stage-levels", "0.0"]) == 0
    assert "kept 1 finished item(s)" in capsys.readouterr().out  # 0.0 needs its stages
