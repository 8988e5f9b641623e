"""Scoring a DLRM on a Criteo split and the quality metrics of the scores (scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics

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
    labels = np.asarray(labels).astype(np.int64)
    predicted = (scores > THRESHOLD).astype(np.int64)
    both_classes = len(np.unique(labels)) == 2
    return {
        "precision": float(metrics.precision_score(labels, predicted, zero_division=0)),
        "recall": float(metrics.recall_score(labels, predicted, zero_division=0)),
        "f1": float(metrics.f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(metrics.roc_auc_score(labels, scores)) if both_classes else float("nan"),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "log_loss": float(metrics.log_loss(labels, scores, labels=[0, 1])),
        "average_precision": float(metrics.average_precision_score(labels, scores))
        if both_classes else float("nan"),
    }

