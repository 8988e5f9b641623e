import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate_disk_savings
import evaluate_model_metrics
from conftest import run_script
from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.criteo.data import load_split
from dlrm_sparsity.evaluation import quality_metrics, score_split
from dlrm_sparsity.model import DLRMNet
from evaluate_model_metrics import add_drops, summary


def test_metrics_equal_independent_formulas_on_a_fixed_score_vector():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=500)
    scores = np.clip(0.3 * labels + rng.random(500) * 0.7, 1e-6, 1 - 1e-6)
    scores[:3] = 0.5  # exactly at the threshold: predicted 0, as the seed's rounding does
    m = quality_metrics(labels, scores)
    pred = scores > 0.5
    tp, fp = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0))
    fn = np.sum(~pred & (labels == 1))
    assert m["accuracy"] == pytest.approx(np.mean(pred == labels), abs=1e-12)
    assert m["precision"] == pytest.approx(tp / (tp + fp), abs=1e-12)
    assert m["recall"] == pytest.approx(tp / (tp + fn), abs=1e-12)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    pos, neg = scores[labels == 1], scores[labels == 0]  # AUC as P(pos > neg), ties half
    auc = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :]))
    assert m["roc_auc"] == pytest.approx(auc / (len(pos) * len(neg)), abs=1e-12)
    ll = -np.mean(labels * np.log(scores) + (1 - labels) * np.log(1 - scores))
    assert m["log_loss"] == pytest.approx(ll, abs=1e-12)


def test_scoring_equals_a_direct_forward_pass(tiny_pipeline):
    test = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "test")
    model = DLRMNet.from_state_dict(load_state_dict(tiny_pipeline["model"]))
    scores = score_split(model, test, batch_size=100)  # several batches, a partial last one
    with torch.no_grad():
        offsets = torch.arange(len(test)).expand(26, len(test))
        direct = model(test.dense, offsets, test.sparse_t).view(-1).double().numpy()
    np.testing.assert_allclose(scores, direct, rtol=0, atol=1e-7)


def test_drops_use_the_level_zero_row_of_the_same_config():
    df = pd.DataFrame({
        "norm": ["L1", "L1", "L2", "L2", "L1"],
        "sparse_block_shape": ["(1, 1)", "(1, 1)", "(1, 4)", "(1, 4)", "(1, 4)"],
        "sparsity_level": [0.0, 0.9, 0.9, 0.0, 0.5],
        "accuracy": [0.80, 0.70, 0.60, 0.75, 0.7], "roc_auc": [0.81, 0.80, 0.5, 0.7, 0.6]})
    out = add_drops(df)
    assert out["accuracy_drop"].round(12).tolist()[:4] == [0.0, 0.1, 0.15, 0.0]
    assert out["auc_drop"].round(12).tolist()[:4] == [0.0, 0.01, 0.2, 0.0]
    assert np.isnan(out["auc_drop"][4])  # L1 (1, 4) has no level-0 row
    assert ("L1 (1, 1): highest level with AUC drop <= 0.005: 0, <= 0.01: 0.9"
            in summary(out).splitlines())


@pytest.fixture(scope="module")
def metadata(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics")
    assert run_script(evaluate_disk_savings, [
        "--model-path", tiny_pipeline["model"], "--output-dir", out, "--device", "cpu",
        "--sparsity-levels", "0.0", "0.9", "--norms", "L1", "--block-shapes", "1x4"]) == 0
    return out


def data_args(p):
    return ["--raw_data_file", p["raw"], "--processed_data_file", p["processed"],
            "--device", "cpu"]


def test_script_scores_every_row(tiny_pipeline, metadata):
    code = run_script(evaluate_model_metrics, [*data_args(tiny_pipeline), "--output-dir",
                                               metadata, "--batch-size", "64"])
    df = pd.read_csv(metadata / "sparse_model_metrics.csv")
    assert code == 0 and len(df) == 2
    assert list(df.columns[:9]) == ["norm", "sparse_block_shape", "sparsity_level",
                                    "precision", "recall", "f1", "roc_auc", "accuracy",
                                    "log_loss"]
    test = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "test")
    assert (df["n_samples"] == len(test)).all()
    assert df["auc_drop"][0] == 0.0
    assert (metadata / "accuracy.png").exists()


def test_a_bad_row_is_recorded_and_the_others_still_run(tiny_pipeline, metadata, tmp_path,
                                                       capsys):
    meta = pd.read_csv(metadata / "sparse_model_metadata.csv")
    meta["path"] = [str(metadata / meta["path"][0]), str(tmp_path / "gone.zip")]
    meta.to_csv(tmp_path / "meta.csv", index=False)
    code = run_script(evaluate_model_metrics, [*data_args(tiny_pipeline), "--output-dir",
                                               tmp_path, "--sparse_model_metadata",
                                               tmp_path / "meta.csv", "--limit", "50"])
    df = pd.read_csv(tmp_path / "sparse_model_metrics.csv")
    assert code == 2
    assert "gone.zip: checkpoint file not found" in capsys.readouterr().err
    assert df["roc_auc"].notna().tolist() == [True, False]
    assert "checkpoint file not found" in df["error"][1] and (df["n_samples"] == 50).all()


@pytest.mark.parametrize("content, message", [
    (None, "metadata CSV not found"), ("", "metadata CSV is empty"),
    ("a,b\n1,2\n", "lacks the column(s) norm, sparse_block_shape, sparsity_level, path")])
def test_bad_metadata_csv_is_one_line(tiny_pipeline, tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "meta.csv").write_text(content)
    code = run_script(evaluate_model_metrics, [*data_args(tiny_pipeline), "--output-dir",
                                               tmp_path, "--sparse_model_metadata",
                                               tmp_path / "meta.csv"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "meta.csv" in err and len(err.splitlines()) == 1


def test_rerun_keeps_scored_rows_unless_overwrite(tiny_pipeline, metadata, capsys):
    args = [*data_args(tiny_pipeline), "--output-dir", metadata, "--batch-size", "64"]
    assert run_script(evaluate_model_metrics, args) == 0
    first = pd.read_csv(metadata / "sparse_model_metrics.csv")
    capsys.readouterr()
    assert run_script(evaluate_model_metrics, args) == 0
    assert "resumed: kept 2 finished item(s)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(metadata / "sparse_model_metrics.csv"), first)
    assert run_script(evaluate_model_metrics, [*args, "--overwrite"]) == 0
    assert "resumed" not in capsys.readouterr().out


def test_a_rerun_on_a_changed_test_file_of_the_same_size_rescores(tiny_pipeline, metadata,
                                                                    tmp_path, capsys):
    """The test split's samples are part of what a row depends on, not only their count."""
    changed = tmp_path / "processed.npz"
    with np.load(tiny_pipeline["processed"]) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y"] = 1 - arrays["y"]  # same shape, other labels
    np.savez(changed, **arrays)
    raw = tmp_path / "train.txt"
    shutil.copy(tiny_pipeline["raw"].parent / "train_day_count.npz", tmp_path)
    args = ["--device", "cpu", "--output-dir", metadata, "--batch-size", "64"]
    assert run_script(evaluate_model_metrics, [*data_args(tiny_pipeline), *args]) == 0
    before = pd.read_csv(metadata / "sparse_model_metrics.csv")
    capsys.readouterr()
    assert run_script(evaluate_model_metrics, ["--raw-data-file", raw,
                                               "--processed-data-file", changed, *args]) == 0
    assert "resumed" not in capsys.readouterr().out
    after = pd.read_csv(metadata / "sparse_model_metrics.csv")
    assert (after["n_samples"] == before["n_samples"]).all()
    assert (after["roc_auc"] - (1 - before["roc_auc"])).abs().max() < 1e-9  # flipped labels


def test_seed_metadata_without_sha256_rescores_regenerated_checkpoints(tiny_pipeline, metadata,
                                                                       tmp_path, capsys):
    """The seed's CSV (absolute paths, whole MB, no sha256): the files' own hashes decide."""
    meta = pd.read_csv(metadata / "sparse_model_metadata.csv")
    zips = [shutil.copy(metadata / p, tmp_path / f"m{i}.zip") for i, p in enumerate(meta["path"])]
    seed = meta[["norm", "sparse_block_shape", "sparsity_level", "step_time_sec"]].copy()
    seed["zip_file_size"] = meta["zip_file_size"].astype(int)
    seed["path"] = zips
    seed.to_csv(tmp_path / "seed.csv", index=False)
    args = [*data_args(tiny_pipeline), "--output-dir", tmp_path, "--sparse_model_metadata",
            tmp_path / "seed.csv"]
    assert run_script(evaluate_model_metrics, args) == 0
    first = pd.read_csv(tmp_path / "sparse_model_metrics.csv")
    capsys.readouterr()
    shutil.copy(zips[1], zips[0])  # level 0.0's checkpoint regenerated with other weights
    assert run_script(evaluate_model_metrics, args) == 0
    assert "resumed: kept 1 finished item(s)" in capsys.readouterr().out
    again = pd.read_csv(tmp_path / "sparse_model_metrics.csv")
    assert again["roc_auc"][0] == pytest.approx(first["roc_auc"][1])
    assert again["checkpoint_sha256"][0] == again["checkpoint_sha256"][1]


def test_a_zip_replaced_after_the_disk_run_is_refused_naming_both_hashes(
        tiny_pipeline, metadata, tmp_path, capsys):
    """The same weights zipped again (another deflate level: another sha256) are not the
    file the metadata describes: that row is an error naming the file and both hashes."""
    from dlrm_sparsity.checkpoints import save_state_dict_zip, sha256_of_file
    out = tmp_path / "out"
    shutil.copytree(metadata, out)
    meta = pd.read_csv(out / "sparse_model_metadata.csv")
    replaced = out / meta["path"][1]
    save_state_dict_zip(load_state_dict(replaced), replaced, compresslevel=1)
    new_sha = sha256_of_file(replaced)
    assert new_sha != meta["sha256"][1]
    code = run_script(evaluate_model_metrics, [*data_args(tiny_pipeline), "--output-dir", out,
                                               "--overwrite"])
    df = pd.read_csv(out / "sparse_model_metrics.csv")
    assert code == 2 and df["error"].isna().tolist() == [True, False]
    error = df["error"][1]
    assert str(replaced) in error and new_sha in error and meta["sha256"][1] in error
    assert df["checkpoint_sha256"][1] == meta["sha256"][1]  # recorded, never scored
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
