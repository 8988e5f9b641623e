"""The report, built from small hand-made CSVs: the chosen points, the sentences, the links."""

import re
from pathlib import Path

import markdown
import pandas as pd
import pytest
import torch

import make_report
from conftest import run_script, tiny_config
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.plots import pareto_front
from dlrm_sparsity.report import write_report

LEVELS = [0.0, 0.5, 0.9, 1.0]
CONFIGS = [("L1", "(1, 1)"), ("L1", "(1, 4)")]
AUC = {("L1", "(1, 1)"): [0.80, 0.799, 0.793, 0.70], ("L1", "(1, 4)"): [0.80, 0.796, 0.78, 0.70]}
ZIP_MB = {("L1", "(1, 1)"): [10.0, 6.0, 2.2, 0.8], ("L1", "(1, 4)"): [10.0, 5.8, 2.0, 0.8]}


def keys():
    return [{"norm": n, "sparse_block_shape": b, "sparsity_level": lv}
            for n, b in CONFIGS for lv in LEVELS]


def write_disk(folder: Path, error_at=None):
    rows = []
    for k in keys():
        i = LEVELS.index(k["sparsity_level"])
        mb = ZIP_MB[(k["norm"], k["sparse_block_shape"])][i]
        row = {**k, "step_time_sec": 0.1, "zip_file_size": mb, "path": "x.zip",
               "zip_file_size_bytes": int(mb * 2**20), "dense_size_bytes": 11 * 2**20,
               "model_path": str(folder / "model.ckpt"), "model_sha256": "ab12",
               "device": "cpu:x86_64", "torch_version": "2.13.0", "command": "disk"}
        if error_at == k["sparsity_level"]:
            row = {**k, "error": "OSError: disk full", "command": "disk"}
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "sparse_model_metadata.csv", index=False)
    (folder / "disk_savings.png").write_bytes(b"\x89PNG")


def write_quality(folder: Path, all_failed=False):
    rows = []
    for k in keys():
        auc = AUC[(k["norm"], k["sparse_block_shape"])][LEVELS.index(k["sparsity_level"])]
        rows.append({**k, "roc_auc": auc, "accuracy": auc, "auc_drop": 0.80 - auc,
                     "n_samples": 1000, "processed_data_file": str(folder / "p.npz"),
                     "command": "metrics"} if not all_failed
                    else {**k, "error": "gone.zip: checkpoint file not found"})
    pd.DataFrame(rows).to_csv(folder / "sparse_model_metrics.csv", index=False)
    (folder / "accuracy.png").write_bytes(b"\x89PNG")


# the dense forward's medians jump between models as a busy machine makes them (the same
# computation at every level); the torch.sparse/dense ratios are paired and steadier
NOISY_DENSE_MS = [41.5, 87.1, 44.8, 60.2]
RATIOS = {0.0: (11.0, 10.2, 11.9), 0.5: (5.0, 4.6, 5.5), 0.9: (1.6, 1.3, 1.9),
          1.0: (0.97, 0.85, 1.1)}  # (median, low, high); at 1.0 the interval holds 1


def write_forward(folder: Path, faster_at: float | None = None,
                  disturbed_at: float | None = None, noise: float | None = None):
    rows = []
    for k in keys():
        lv = k["sparsity_level"]
        dense_ms = NOISY_DENSE_MS[LEVELS.index(lv)] + (k["sparse_block_shape"] == "(1, 4)")
        ratio = (0.6, 0.55, 0.66) if lv == faster_at else RATIOS[lv]
        verdict = "slower" if ratio[1] > 1 else "faster" if ratio[2] < 1 else "same"
        guard = ({} if noise is None else
                 {"machine_noise_p90": noise, "disturbed": lv == disturbed_at})
        rows.append({**k, "dlrm_type": "without_torch_sparse", "time_median_s": dense_ms / 1e3,
                     "batch_size": 16384, **guard})
        rows.append({**k, "dlrm_type": "with_torch_sparse",
                     "time_median_s": dense_ms * ratio[0] / 1e3, "batch_size": 16384,
                     "ratio": ratio[0], "ratio_low": ratio[1], "ratio_high": ratio[2],
                     "ratio_verdict": verdict, **guard})
    pd.DataFrame(rows).to_csv(folder / "dlrm_forward_time_info.csv", index=False)


def images_of(report: Path) -> list[str]:
    html = markdown.markdown(report.read_text())
    return re.findall(r'<img alt="[^"]*" src="([^"]+)"', html)


def test_full_report_chooses_the_points_and_says_it_in_sentences(tmp_path):
    torch.save(DLRMNet(tiny_config()).state_dict(), tmp_path / "model.ckpt")
    write_disk(tmp_path)
    write_quality(tmp_path)
    write_forward(tmp_path)
    report = write_report(tmp_path)
    text = report.read_text()
    # within 0.005: level 0.9 of L1 (1, 1) drops 0.007, so 0.5 is the highest
    assert "- L1 (1, 1): up to level 0.5 (AUC 0.7990, zip 6.00 MB)" in text
    assert "- L1 (1, 4): up to level 0.5 (AUC 0.7960, zip 5.80 MB)" in text
    assert "- smallest zip: L1 (1, 4) at level 0.5, 5.80 MB, AUC 0.7960" in text
    # within 0.01: L1 (1, 1) reaches 0.9; the smallest zip is then L1 (1, 1) at 0.9
    assert "- L1 (1, 1): up to level 0.9 (AUC 0.7930, zip 2.20 MB)" in text
    assert "- smallest zip: L1 (1, 1) at level 0.9, 2.20 MB, AUC 0.7930" in text
    assert ("L1 (1, 1): the torch.sparse variant takes 11.0x the dense time at level 0 and "
            "1.0x at level 1; by its 95% interval it is slower at 3, not distinguishable at 1, "
            "faster at 0 of 4 levels.") in text
    assert "L1 (1, 4) at level 0.9 zips to 2.00 MB, 5.5x less than the 11.00 MB" in text
    assert "- **Model**: `model.ckpt` (sha256 ab12)" in text  # relative: no machine path
    assert "- **Tables**: 3 of width 4 (7, 5, 9 rows); 305 parameters; MLPs 13-8-4 and 10-6-1" \
        in text
    assert "experiment 4 (memory savings) has not run" in text
    assert "- activation: no rows in `activation_sparsity.csv`" in text
    linked = images_of(report)
    assert {"report_tradeoffs.png", "disk_savings.png", "accuracy.png"} <= set(linked)
    assert all((tmp_path / src).is_file() for src in linked)


def test_a_report_elsewhere_copies_its_images_and_links_them_relatively(tmp_path):
    write_disk(tmp_path)
    write_quality(tmp_path)
    report = write_report(tmp_path, report_dir=tmp_path / "docs" / "report")
    assert all((report.parent / src).is_file() for src in images_of(report))
    text = report.read_text()
    assert "from the CSVs of `../..` (seen from this report)" in text
    assert "- **Model**: `model.ckpt`" in text  # named from the CSVs' folder


def test_only_the_disk_experiment_still_renders_and_names_what_is_missing(tmp_path):
    write_disk(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "The quality experiment has not run" in text
    assert "## Disk savings" in text and "## Trade-offs" not in text
    for name in ("quality", "forward", "memory", "activation"):
        assert f"- {name}: no rows in" in text
    markdown.markdown(text)


def test_error_rows_in_every_experiment_are_listed(tmp_path):
    write_disk(tmp_path, error_at=0.5)
    write_quality(tmp_path, all_failed=True)
    text = write_report(tmp_path).read_text()
    assert "## Rows that failed" in text
    assert "(norm L1, sparse_block_shape (1, 1), sparsity_level 0.5): OSError: disk full" in text
    assert text.count("gone.zip: checkpoint file not found") == 8
    assert "- quality: no rows in `sparse_model_metrics.csv`" in text


def test_pareto_front_keeps_the_points_nothing_beats():
    df = pd.DataFrame({"zip_file_size": [1, 2, 3, 4, 2.5], "roc_auc": [0.7, 0.75, 0.74, 0.8,
                                                                       0.76]})
    assert pareto_front(df, "zip_file_size").index.tolist() == [0, 1, 4, 3]


def test_script_without_csvs_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_script(make_report, ["--output-dir", tmp_path]) == 2
    assert "no experiment CSVs found" in capsys.readouterr().err


@pytest.mark.parametrize("budgets", [["0.005"], ["0.001", "0.02"]])
def test_script_writes_one_answer_per_budget(tmp_path, budgets):
    write_disk(tmp_path)
    write_quality(tmp_path)
    assert run_script(make_report, ["--output-dir", tmp_path, "--auc-budgets", *budgets]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text.count("**AUC drop at most") == len(budgets)


def test_activation_answers_hold_the_budget_against_the_unpruned_model():
    """Masking a pruned model adds its drop to the pruning's: L1 (1, 1) at 0.9 loses 0.007 by
    pruning, so its masking at 0.5 (0.002 more, 0.009 in all) fits 0.01 but not 0.005."""
    from dlrm_sparsity.report.answer import activation_answer
    auc = {(0.0, 0.0): 0.800, (0.0, 0.5): 0.799, (0.9, 0.0): 0.793, (0.9, 0.5): 0.791}
    rows = [{"norm": "L1", "sparse_block_shape": "(1, 1)", "sparsity_level": emb,
             "activation_level": act, "variant": "compact", "roc_auc": a,
             "auc_drop_vs_level0": 0.800 - a, "time_median_s": 0.010,
             "ratio": 0.667, "ratio_low": 0.6, "ratio_high": 0.7 if emb == 0.0 else 1.02,
             "ratio_verdict": "faster" if emb == 0.0 else "same"}
            for (emb, act), a in auc.items()]
    df = pd.DataFrame(rows)
    strict, loose = activation_answer(df, 0.005), activation_answer(df, 0.01)
    assert strict == ["- activation sparsity on the dense model: up to level 0.5 (AUC 0.7990, "
                      "a drop of 0.0010 from the unpruned model), where the compact forward "
                      "takes 0.67x the masked dense one's time [0.60, 0.70]"]
    assert len(loose) == 2 and loose[1] == (
        "- activation sparsity on L1 (1, 1) at 0.9: up to level 0.5 (AUC 0.7910, a drop of "
        "0.0090 from the unpruned model), where the compact forward is not faster than the "
        "masked dense one beyond noise")  # its interval holds 1
    spoiled = activation_answer(df.assign(disturbed=[False, True, False, False]), 0.005)
    assert spoiled == ["- activation sparsity on the dense model: up to level 0.5 (AUC 0.7990, "
                       "a drop of 0.0010 from the unpruned model), where the compact forward's "
                       "time was disturbed by the machine and is not claimed from (rerun to "
                       "measure it)"]  # not "not faster": a disturbed point says nothing
    without = activation_answer(df.drop(columns="auc_drop_vs_level0"), 0.01)
    assert without == ["- activation sparsity: no unpruned model in `activation_sparsity.csv` "
                       "to measure the AUC drops against"]


def test_noisy_dense_times_are_never_ranked_and_only_significant_ratios_named(tmp_path):
    """The dense forwards of pruned models are one computation: a 2.1x spread between them
    is the machine's, and the report names no level for it. A torch.sparse ratio whose
    interval excludes 1 is named; one whose interval holds 1 is not called faster."""
    write_disk(tmp_path)
    write_quality(tmp_path)
    write_forward(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "fastest" not in text
    assert ("- forward pass: run the dense model; the seed's torch.sparse variant is faster "
            "at none of the 4 models within budget (95% intervals)") in text
    assert "max/min 2.12; its differences between models are the machine's noise" in text
    write_forward(tmp_path, faster_at=0.5)
    text = write_report(tmp_path).read_text()
    assert ("- forward pass: the seed's torch.sparse variant is faster than dense at 2 of 4 "
            "models within budget; most at L1 (1, 1) level 0.5: 0.60x the dense time "
            "[0.55, 0.66]") in text


def test_a_disturbed_point_is_never_claimed_from_and_the_noise_stands_beside_claims(tmp_path):
    """The torch.sparse variant reads faster at level 0.5 of both configs, but the drift guard
    flagged those points: no claim is made from them, and every timing claim carries the
    machine's noise measured at the start."""
    write_disk(tmp_path)
    write_quality(tmp_path)
    write_forward(tmp_path, faster_at=0.5, disturbed_at=0.5, noise=0.083)
    text = write_report(tmp_path).read_text()
    assert ("faster at none of the 4 models within budget (95% intervals), and pruning does "
            "not speed up the dense forward") in text
    assert "(machine noise +8.3% at the 90th percentile)" in text
    assert "faster at 0, disturbed (not claimed from) at 1 of 4 levels" in text
    assert "the machine's noise during the run: +8.3% at the 90th percentile" in text
