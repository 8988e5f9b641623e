"""The lean metrics of a streamed split agree with scikit-learn's on the same scores."""

import numpy as np
import pytest

from dlrm_sparsity.evaluation import metrics_from_sorted, quality_metrics


@pytest.mark.parametrize("levels", [None, 7], ids=["distinct scores", "many ties"])
def test_lean_metrics_agree_with_scikit_learn(levels):
    rng = np.random.default_rng(0)
    labels = (rng.random(20_000) < 0.3).astype(np.int64)
    scores = np.clip(rng.normal(0.3 + 0.2 * labels, 0.2), 0, 1).astype(np.float32)
    if levels:  # scores that tie, and some exactly at the threshold
        scores = (np.round(scores * levels) / levels).astype(np.float32)
        scores[:50] = 0.5
    p = scores.astype(np.float64)
    q = np.clip(p, np.finfo(np.float64).eps, 1 - np.finfo(np.float64).eps)
    log_loss = float(-np.mean(np.where(labels == 1, np.log(q), np.log(1 - q))))
    clicked = labels == 1
    lean = metrics_from_sorted(np.sort(scores[clicked]), np.sort(scores[~clicked]), log_loss,
                                chunk=999)  # several chunks
    reference = quality_metrics(labels, p)
    assert lean.keys() == reference.keys()
    for name, value in reference.items():
        assert lean[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_one_class_gives_nan_like_scikit_learn():
    lean = metrics_from_sorted(np.sort(np.float32([0.2, 0.7])), np.float32([]), 0.1)
    assert np.isnan(lean["roc_auc"]) and np.isnan(lean["average_precision"])
    assert lean["accuracy"] == 0.5 and lean["recall"] == 0.5 and lean["precision"] == 1.0


@pytest.mark.parametrize("case", ["distinct", "ties at the threshold", "one class", "none above"])
def test_quality_metrics_are_scikit_learns_own_functions_bit_for_bit(case):
    """precision, recall and f1 come from one precision_recall_fscore_support call: the
    numbers must be exactly those of precision_score, recall_score and f1_score, which the
    seed's script calls one by one."""
    from sklearn import metrics

    rng = np.random.default_rng(3)
    labels = (rng.random(5_000) < 0.3).astype(np.int64)
    scores = rng.random(5_000)
    if case == "ties at the threshold":
        scores = np.round(scores, 1)
    elif case == "one class":
        labels[:] = 0
    elif case == "none above":
        scores *= 0.5
    predicted = (scores > 0.5).astype(np.int64)
    m = quality_metrics(labels, scores)
    assert m["precision"] == metrics.precision_score(labels, predicted, zero_division=0)
    assert m["recall"] == metrics.recall_score(labels, predicted, zero_division=0)
    assert m["f1"] == metrics.f1_score(labels, predicted, zero_division=0)
