"""Experiment 5: the stock ActivationSparsifier on the interaction output, three variants."""

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate_activation_sparsity as act
import evaluate_disk_savings
from conftest import random_batch, run_script, tiny_config
from dlrm_forward_time import COMPACT, MASKED_VARIANTS, Compact, masked_variants
from dlrm_sparsity.activation import FUNCTIONS, calibrate, calibration_shape, drop_lowest
from dlrm_sparsity.analysis import faster_from
from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.criteo.data import Batch, CriteoSplit, load_split, split_bounds
from dlrm_sparsity.evaluation import quality_metrics, score_split
from dlrm_sparsity.model import DLRMNet


def tiny(seed=0):
    torch.manual_seed(seed)
    return DLRMNet(tiny_config()).eval()  # 3 tables of width 4: z has 4 + 6 = 10 columns


def split_of(config, n, seed=0):
    dense, _, indices = random_batch(config, n, seed)
    return CriteoSplit(dense, indices, torch.zeros(n), np.array(config.table_sizes))


def test_the_stock_sparsifier_masks_exactly_the_lowest_scoring_columns():
    model = tiny()
    calibration = split_of(model.config, 64)
    with torch.no_grad():  # the scores the sparsifier should find: mean |z| per column
        zs = [model.interact(model.bottom(b.dense), model.embed(b.offsets, b.indices))
              for b in calibration.batches(16)]
        scores = torch.stack([z.abs() for z in zs]).sum(0).mean(0)
    for level in (0.0, 0.3, 0.5, 1.0):
        sparsifier = calibrate(model, calibration, 16, level)
        mask = sparsifier.get_mask(layer=model.top_l[0])
        dropped = set(torch.nonzero(mask == 0).view(-1).tolist())
        expected = set(torch.argsort(scores)[:round(level * 10)].tolist())
        assert dropped == expected, level
        sparsifier.squash_mask(attach_sparsify_hook=False)


def test_drop_lowest_breaks_ties_in_column_order():
    mask = drop_lowest(torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0]), sparsity_level=0.4)
    assert mask.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_three_variants_agree_and_compact_keeps_exactly_the_unmasked_columns():
    model = tiny()
    dense, offsets, indices = random_batch(model.config, 32, seed=5)
    batch = Batch(dense, offsets, indices, torch.zeros(32))
    mask = torch.ones(10)
    mask[[1, 4, 7, 8]] = 0  # one column of x, three pairs
    compact = Compact(model, mask)
    assert compact.kept.tolist() == [0, 2, 3, 5, 6, 9]
    assert compact.kept_x.tolist() == [0, 2, 3]
    pairs = [(int(i), int(j)) for i, j in zip(compact.pair_i, compact.pair_j, strict=True)]
    assert pairs == [(2, 0), (2, 1), (3, 2)]  # dlrm's order: (1,0) (2,0) (2,1) (3,0) (3,1) (3,2)
    assert compact.weight_t.shape == (6, model.top_l[0].weight.shape[0])
    with torch.no_grad():
        z = model.interact(model.bottom(dense), model.embed(offsets, indices))
        torch.testing.assert_close(compact.interact(model.bottom(dense),
                                                    model.embed(offsets, indices)), z[:, mask > 0])
        outs = [f.on(batch)() for f in masked_variants(model, mask).values()]
        reference = model.top_l(z * mask)
    for out in outs:
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)


def test_calibration_batches_come_from_the_training_days_only(tiny_pipeline):
    from dlrm_sparsity.criteo.data import read_day_counts
    counts = read_day_counts(tiny_pipeline["raw"])
    train_stop = split_bounds(counts, "train")[1]
    test_start = split_bounds(counts, "test")[0]
    calibration = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "train", 200)
    with np.load(tiny_pipeline["processed"]) as f:
        rows = f["X_cat"][:200].T  # file rows 0..199, which lie in the training days
    assert 200 <= train_stop <= test_start
    assert torch.equal(calibration.sparse_t, torch.from_numpy(rows.astype(np.int64)))


@pytest.fixture(scope="module")
def run(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("activation")
    assert run_script(evaluate_disk_savings, [
        "--model-path", tiny_pipeline["model"], "--output-dir", out, "--device", "cpu",
        "--sparsity-levels", "0.0", "0.9", "--norms", "L1", "--block-shapes", "1x4"]) == 0
    args = ["--raw-data-file", tiny_pipeline["raw"], "--processed-data-file",
            tiny_pipeline["processed"], "--output-dir", out, "--device", "cpu",
            "--levels", "0", "0.5", "1", "--calibration-batches", "4",
            "--calibration-batch-size", "64", "--batch-size", "128", "--min-run-time", "0.01",
            "--threads", "1"]
    code = run_script(act, args)
    return code, out, args, pd.read_csv(out / "activation_sparsity.csv")


def test_a_row_per_model_level_and_variant_with_metrics(run, tiny_pipeline):
    code, out, _, df = run
    assert code == 0 and len(df) == 2 * 3 * 3
    assert set(df["variant"]) == set(MASKED_VARIANTS)
    assert set(df["sparsity_level"]) == {0.0, 0.9}  # the dense model and L1 (1, 4) at 0.9
    assert (df["sparsifier_functions"] == FUNCTIONS).all()
    assert (df["max_abs_diff"] <= 1e-5).all() and (df["time_median_s"] > 0).all()
    full = df[df["activation_level"] == 1.0]
    assert (full["z_density"] == 0).all() and (full["kept_columns"] == 0).all()
    assert (out / "activation_sparsity.png").stat().st_size > 0


def test_level_zero_gives_the_unmasked_models_metrics(run, tiny_pipeline):
    _, out, _, df = run
    test = load_split(tiny_pipeline["processed"], tiny_pipeline["raw"], "test")
    meta = pd.read_csv(out / "sparse_model_metadata.csv")
    model = DLRMNet.from_state_dict(load_state_dict(out / meta["path"][0]))
    unmasked = quality_metrics(test.labels.numpy(), score_split(model, test, 128))
    level0 = df[(df["sparsity_level"] == 0.0) & (df["activation_level"] == 0.0)]
    assert level0["roc_auc"].tolist() == [unmasked["roc_auc"]] * 3
    assert (level0["auc_drop"] == 0).all()
    # against the unpruned model: 0 for it, the pruned model's own drop for the other
    assert (level0["auc_drop_vs_level0"] == 0).all()
    unmasked_pruned = df[(df["sparsity_level"] == 0.9) & (df["activation_level"] == 0.0)]
    assert (unmasked_pruned["auc_drop_vs_level0"]
            == unmasked["roc_auc"] - unmasked_pruned["roc_auc"]).all()


def test_a_rerun_keeps_finished_rows(run, capsys):
    _, _, args, df = run
    capsys.readouterr()
    assert run_script(act, args) == 0
    assert "kept 6 finished item(s)" in capsys.readouterr().out
    again = pd.read_csv(run[1] / "activation_sparsity.csv")
    pd.testing.assert_frame_equal(again, df)


@pytest.mark.parametrize("flags, message", [
    (["--levels", "1.5"], "sparsity level 1.5 is outside [0, 1]"),
    (["--calibration-batches", "0"], "expected a positive integer, got 0"),
    (["--embedding-levels", "0.33"], "no pruned model at embedding level(s) 0.33"),
])
def test_bad_input_is_one_line_and_exit_2(run, capsys, flags, message):
    assert run_script(act, [*run[2], *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_model_whose_top_layer_does_not_fit_the_interaction_is_an_error_row(
        run, tmp_path, capsys):
    _, out, args, _ = run
    sd = DLRMNet(tiny_config(tables=(7, 5, 9))).state_dict()
    sd["top_l.0.weight"] = torch.zeros(6, 11)  # the interaction of 3 tables gives 10
    torch.save(sd, tmp_path / "bad.pt")
    pd.DataFrame({"norm": ["L1"], "sparse_block_shape": ["(1, 4)"], "sparsity_level": [0.0],
                  "path": [str(tmp_path / "bad.pt")]}).to_csv(tmp_path / "m.csv", index=False)
    code = run_script(act, [*args[:4], "--output-dir", tmp_path, *args[6:],
                            "--sparse-model-metadata", tmp_path / "m.csv", "--embedding-levels"])
    err = capsys.readouterr().err
    assert code == 2 and "top_l.0.weight takes 11 inputs" in err
    assert COMPACT not in pd.read_csv(tmp_path / "activation_sparsity.csv").get("variant", [])


def test_faster_from_ignores_a_noisy_dip_below_the_last_slower_level():
    speedup = pd.Series([1.02, 0.98, 1.3, 1.4, 5.0], index=[0.0, 0.5, 0.9, 0.95, 1.0])
    assert faster_from(speedup > 1) == 0.9
    assert faster_from(pd.Series([True, True], index=[0.0, 1.0])) == 0.0
    assert faster_from(pd.Series([True, False], index=[0.0, 1.0])) is None


def test_the_default_calibration_takes_what_a_small_data_set_holds():
    assert calibration_shape(40_000, None, None, (16, 2048)) == (16, 2048, None)
    batches, size, note = calibration_shape(5_000, None, None, (16, 2048))
    assert (batches, size) == (2, 2048)
    assert note == ("note: the training days hold 5000 samples, fewer than the default "
                    "16 x 2048: calibrating on 2 x 2048")
    assert calibration_shape(100, None, None, (16, 2048))[:2] == (1, 100)
    with pytest.raises(ValueError, match="32768 calibration samples asked for, but the "
                                         "training days hold 5000"):
        calibration_shape(5_000, 16, None, (16, 2048))


def test_the_defaults_run_on_a_data_set_smaller_than_them(run, tmp_path, capsys):
    """The tiny data set's training days hold far fewer than 16 x 2048 samples."""
    _, out, args, _ = run
    code = run_script(act, [*args[:4], "--output-dir", tmp_path, "--device", "cpu",
                            "--sparse-model-metadata", out / "sparse_model_metadata.csv",
                            "--levels", "0", "0.5", "--batch-size", "128",
                            "--min-run-time", "0.01", "--threads", "1"])
    assert code == 0
    assert "note: the training days hold" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "activation_sparsity.csv")
    assert "error" not in df and df["calibration_samples"].iloc[0] > 0
