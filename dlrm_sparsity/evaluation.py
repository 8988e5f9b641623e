"""Scoring a DLRM on a Criteo split and the quality metrics of the scores (scikit-learn)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from dlrm_sparsity.criteo.data import CriteoSplit
from dlrm_sparsity.criteo.npy import NpySplit
from dlrm_sparsity.model import DLRMNet

THRESHOLD = 0.5  # the seed's: a sample is predicted a click when p > 0.5


@torch.inference_mode()
def score_split(model: DLRMNet, split: CriteoSplit | NpySplit, batch_size: int) -> np.ndarray:
    """Click probabilities for every sample, in order, as float64 numpy."""
    model.eval()
    out = torch.empty(len(split), dtype=torch.float32, device=split.device)
    start = 0
    for batch in split.batches(batch_size):
        b = batch.labels.shape[0]
        out[start:start + b] = model(batch.dense, batch.offsets, batch.indices).view(-1)
        start += b
    return out.cpu().numpy().astype(np.float64)  # one device-to-host copy at the end


def quality_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The seed's metrics (unrounded) plus average precision, all from scikit-learn."""
    # imported here, not with the package: scikit-learn and SciPy weigh about 75 MiB in every
    # process, and only one process scoring a split in memory needs them (sharded ranks, the
    # disk step, the timing experiments do not)
    from sklearn import metrics

    labels = np.asarray(labels).astype(np.int64)
    predicted = (scores > THRESHOLD).astype(np.int64)
    both_classes = len(np.unique(labels)) == 2
    # one call for the three that precision_score, recall_score and f1_score each make on
    # their own (the same numbers; a third of the metrics' time at the demo's test split)
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        labels, predicted, average="binary", zero_division=0)
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": float(metrics.roc_auc_score(labels, scores)) if both_classes else float("nan"),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "log_loss": float(metrics.log_loss(labels, scores, labels=[0, 1])),
        "average_precision": float(metrics.average_precision_score(labels, scores))
        if both_classes else float("nan"),
    }



@torch.inference_mode()
def streamed_quality(model: DLRMNet, split: NpySplit, batch_size: int) -> dict[str, float]:
    """quality_metrics of a split read batch by batch, keeping 4 bytes per sample
    (quality_of_batches)."""
    model.eval()
    return quality_of_batches(
        ((model(b.dense, b.offsets, b.indices).view(-1).cpu().numpy(),
          b.labels.cpu().numpy() > 0.5) for b in split.batches(batch_size)), len(split))


def quality_of_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], n: int
                       ) -> dict[str, float]:
    """quality_metrics of n samples given as (float32 scores, clicked) a batch at a time,
    in the split's order.

    scikit-learn's metrics take about 40 bytes a sample (float64 copies, an argsort, cumulative
    sums), which at 20 M samples outweighs a Kaggle-size model; a test split read from memory
    maps needs the lean way. The scores go into one float32 array, the clicked samples' from
    the front and the others' from the back, each part then sorted in place. The definitions
    are scikit-learn's: the thresholded metrics from counts, ROC AUC as the Mann-Whitney
    statistic (ties count half), average precision as its step sum (each positive adds 1/P of
    the precision at its score), log loss summed per batch with its clipping. They agree with
    scikit-learn's to float64 rounding (tests/test_evaluation.py).
    """
    scores = np.empty(n, dtype=np.float32)
    eps, log_loss, n_pos, n_neg = np.finfo(np.float64).eps, 0.0, 0, 0
    for p, y in batches:
        pos, neg = p[y], p[~y]
        scores[n_pos:n_pos + len(pos)] = pos
        scores[len(scores) - n_neg - len(neg):len(scores) - n_neg] = neg
        n_pos, n_neg = n_pos + len(pos), n_neg + len(neg)
        q = np.clip(p.astype(np.float64), eps, 1 - eps)
        log_loss -= float(np.log(np.where(y, q, 1 - q)).sum())
    positives, negatives = scores[:n_pos], scores[n_pos:]
    positives.sort()
    negatives.sort()
    return metrics_from_sorted(positives, negatives, log_loss / max(len(scores), 1))


def metrics_from_sorted(pos: np.ndarray, neg: np.ndarray, log_loss: float,
                        chunk: int = 1 << 18) -> dict[str, float]:
    """The metrics of scores sorted ascending, the clicked samples' and the others', in
    chunks of the positives (a few MB of temporaries)."""
    n_pos, n_neg = len(pos), len(neg)
    tp = n_pos - int(np.searchsorted(pos, THRESHOLD, side="right"))
    fp = n_neg - int(np.searchsorted(neg, THRESHOLD, side="right"))
    both = n_pos > 0 and n_neg > 0
    auc, ap = 0.0, 0.0
    for a in range(0, n_pos, chunk):
        part = pos[a:a + chunk]
        below = np.searchsorted(neg, part, side="left")  # negatives scored lower
        auc += float(below.sum()) + 0.5 * float(
            (np.searchsorted(neg, part, side="right") - below).sum())  # ties count half
        tps = n_pos - np.searchsorted(pos, part, side="left")  # positives at or above
        ap += float((tps / (tps + (n_neg - below))).sum()) / n_pos
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / n_pos if n_pos else 0.0,
        "f1": 2 * tp / (2 * tp + fp + (n_pos - tp)) if tp + fp + n_pos else 0.0,
        "roc_auc": auc / (n_pos * n_neg) if both else float("nan"),
        "accuracy": (tp + n_neg - fp) / (n_pos + n_neg),
        "log_loss": log_loss,
        "average_precision": ap if both else float("nan"),
    }
