"""Experiment 4: every pruned model in every storage format; bytes, lookups, quality."""

import pandas as pd
import pytest

import evaluate_disk_savings
import evaluate_memory_savings as mem
from conftest import run_script
from dlrm_sparsity import formats
from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.criteo.data import load_split
from dlrm_sparsity.evaluation import quality_metrics, score_split
from dlrm_sparsity.formats import FORMATS, fbgemm_available
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.runner.outputs import read_metadata
from dlrm_sparsity.variants import FormatTables

DIM = 16  # the embedding width of the wide model


@pytest.fixture(scope="module")
def run(tiny_pipeline, wide_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    assert run_script(evaluate_disk_savings, [
        "--model-path", wide_model, "--output-dir", out, "--device", "cpu",
        "--sparsity-levels", "0.0", "0.5", "1.0", "--norms", "L1", "--block-shapes", "1x4"]) == 0
    args = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--output-dir", out, "--device", "cpu",
            "--batch-size", "128", "--min-run-time", "0.005", "--threads", "1"]
    code = run_script(mem, args)
    return code, out, args, pd.read_csv(out / "sparse_model_memory.csv")


def test_a_row_for_each_model_and_format(run):
    code, out, _, df = run
    formats = list(FORMATS) if fbgemm_available() else ["dense", "coo", "csr", "csr_int64",
                                                        "row_pruned"]
    assert code == 0 and len(df) == 3 * len(formats)
    assert df.groupby("sparsity_level")["format"].apply(list).tolist() == [formats] * 3
    dense = df[df["format"] == "dense"]
    assert (dense["bytes_ratio"] == 1.0).all() and (dense["max_abs_diff"] == 0).all()
    held = df[df["held"]]
    assert (held["lookup_median_s"] > 0).all() and held["forward_median_s"].notna().all()
    assert (df[~df["lossy"] & df["held"]]["max_abs_diff"] <= 1e-5).all()
    assert held["roc_auc"].notna().all() and (out / "memory_savings.png").exists()


def test_formats_larger_than_dense_are_counted_but_not_held(run):
    _, _, _, df = run
    coo0 = df[(df["format"] == "coo") & (df["sparsity_level"] == 0.0)].iloc[0]
    assert coo0["bytes_ratio"] == pytest.approx(5.0, rel=0.01)  # 8 + 8 + 4 bytes per value
    assert not coo0["held"] and pd.isna(coo0["lookup_median_s"])
    assert pd.isna(coo0["roc_auc"]) and pd.isna(coo0["max_abs_diff"])  # nothing was checked
    full = df[df["sparsity_level"] == 1.0].set_index("format")
    dim, tables = DIM, 26  # Criteo's table count
    rows = full.loc["dense", "bytes"] // (4 * dim)
    assert full.loc["coo", "bytes"] == 0
    # every row pruned: the int32 remap, and one zero row per table
    assert full.loc["row_pruned", "bytes"] == 4 * rows + tables * 4 * dim


@pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm-gpu(-cpu)")
def test_quantized_formats_are_scored_and_their_drops_derived(run):
    _, _, _, df = run
    int8 = df[df["format"] == "int8"].set_index("sparsity_level")
    dense = df[df["format"] == "dense"].set_index("sparsity_level")
    assert (int8["quality_source"] == "scored in this format").all()
    # a row: 16 int8 values and a half scale and bias, padded to 16 bytes as TorchRec serves
    # it (32); each table padded to 128 bytes
    assert int8["bytes_ratio"].between(0.5, 0.6).all()
    int4 = df[df["format"] == "int4"].set_index("sparsity_level")
    assert (int4["bytes"] < int8["bytes"]).all()
    drop = dense["roc_auc"] - int8["roc_auc"]
    assert (int8["auc_drop_vs_dense"] - drop).abs().max() < 1e-12
    assert (int8["auc_drop_vs_level0"] - (dense.loc[0.0, "roc_auc"] - int8["roc_auc"])
            ).abs().max() < 1e-12


@pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm-gpu(-cpu)")
def test_a_row_pruned_quantized_format_has_the_quality_that_scoring_it_gives(run, tiny_pipeline):
    """Its quality is taken from the unpruned twin, not scored: scoring it gives every metric
    bit for bit."""
    _, out, _, df = run
    test = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "test")
    metrics = ["roc_auc", "accuracy", "precision", "recall", "f1", "log_loss"]
    for _, meta in read_metadata(out / "sparse_model_metadata.csv").iterrows():
        model = DLRMNet.from_state_dict(load_state_dict(meta["checkpoint"]))
        for fmt in ("row_pruned_int8", "row_pruned_int4"):
            row = df[(df["format"] == fmt)
                     & (df["sparsity_level"] == meta["sparsity_level"])].iloc[0]
            assert row["quality_source"] == f"{fmt[len('row_pruned_'):]}'s (the same lookups)"
            served = FormatTables(model, FORMATS[fmt]([b.weight.detach() for b in model.emb_l]),
                                  fmt)
            scored = quality_metrics(test.labels.numpy(), score_split(served, test, 128))
            assert [row[m] for m in metrics] == [scored[m] for m in metrics]


def test_a_rerun_keeps_finished_rows(run, capsys):
    _, out, args, df = run
    capsys.readouterr()
    assert run_script(mem, args) == 0
    assert "kept 3 finished item(s)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / "sparse_model_memory.csv"), df)


def test_an_unknown_format_is_one_line_and_exit_2(run, capsys):
    assert run_script(mem, [*run[2], "--formats", "dense", "bsr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--formats: unknown format 'bsr'" in err and len(err.splitlines()) == 1


def test_without_fbgemm_its_formats_are_skipped_with_a_notice(run, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(formats, "fbgemm_available", lambda device: False)
    _, out, args, _ = run
    args = [*args[:4], "--output-dir", tmp_path, *args[6:],
            "--sparse-model-metadata", out / "sparse_model_metadata.csv"]
    assert run_script(mem, [*args, "--formats", "dense", "int8", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --formats int8: needs FBGEMM, which is not installed for cpu "
                   "(fbgemm-gpu-cpu on a CPU, fbgemm-gpu on CUDA)")
    assert run_script(mem, [*args, "--min-run-time", "0.001"]) == 0  # the default: skipped
    assert ("note: int8, int4, row_pruned_int8, row_pruned_int4 skipped: FBGEMM is not "
            "installed for cpu" in capsys.readouterr().out)
    assert "int8" not in set(pd.read_csv(tmp_path / "sparse_model_memory.csv")["format"])


def test_a_level_outside_the_timed_levels_has_bytes_and_quality_but_no_timing(run, tmp_path):
    _, out, args, _ = run
    data = args[:4]  # the raw and processed files
    code = run_script(mem, [*data, "--output-dir", tmp_path, "--device", "cpu",
                            "--batch-size", "128", "--min-run-time", "0.005", "--threads", "1",
                            "--sparse-model-metadata", out / "sparse_model_metadata.csv",
                            "--timed-levels", "0.5", "--no-report"])
    df = pd.read_csv(tmp_path / "sparse_model_memory.csv")
    untimed = df[df["sparsity_level"] != 0.5]
    assert code == 0 and untimed["bytes"].notna().all() and untimed["lookup_median_s"].isna().all()
    assert untimed[untimed["held"]]["roc_auc"].notna().all()
    assert "reference_s" not in untimed or untimed["reference_s"].isna().all()
    timed = df[(df["sparsity_level"] == 0.5) & df["held"]]
    assert (timed["lookup_median_s"] > 0).all() and timed["forward_median_s"].notna().all()
