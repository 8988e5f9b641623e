"""Activation sparsity with PyTorch's stock ActivationSparsifier on the interaction output z.

The sparsifier is registered on top_l.0, whose input is z (the bottom MLP's output and every
pairwise dot product; for a DLRM_DCN, the cross net's output). Calibration batches run through
the model; the sparsifier aggregates |z| over them with sum_abs, reduces it to one score per
column with mean_over_samples, and its step() masks the lowest-scoring fraction of columns
with drop_lowest. The functions are recorded in the CSV by name.
"""

from __future__ import annotations

import torch
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
    ActivationSparsifier,
)

from dlrm_sparsity.criteo.data import CriteoSplit
from dlrm_sparsity.criteo.splits import open_split, split_size
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.experiment import Experiment
from dlrm_sparsity.model import DLRMNet


def sum_abs(aggregated: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """aggregate_fn: |z| summed over the calibration batches, (B, width)."""
    return aggregated + z.abs()


def mean_over_samples(aggregated: torch.Tensor) -> torch.Tensor:
    """reduce_fn: one score per column of z, (width,)."""
    return aggregated.mean(dim=0)


def drop_lowest(scores: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """mask_fn: 0 for the round(level * width) lowest-scoring columns (ties in column order)."""
    mask = torch.ones_like(scores)
    mask[torch.argsort(scores, stable=True)[:round(sparsity_level * scores.numel())]] = 0
    return mask


FUNCTIONS = f"{sum_abs.__name__}, {mean_over_samples.__name__}, {drop_lowest.__name__}"


def calibrate(model: DLRMNet, calibration: CriteoSplit, batch_size: int,
              level: float) -> ActivationSparsifier:
    """The stock sparsifier on top_l.0, stepped on the calibration batches (all of batch_size
    samples: the aggregate adds them up elementwise); its hook now multiplies top_l.0's input
    (z) by the mask."""
    sparsifier = ActivationSparsifier(model)
    sparsifier.register_layer(model.top_l[0], aggregate_fn=sum_abs, reduce_fn=mean_over_samples,
                              mask_fn=drop_lowest, sparsity_level=level)
    with torch.no_grad():  # not inference_mode: step() assigns to the mask it made here
        for batch in calibration.batches(batch_size):
            model(batch.dense, batch.offsets, batch.indices)
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def calibration_shape(available: int, batches: int | None, batch_size: int | None,
                      defaults: tuple[int, int]) -> tuple[int, int, str | None]:
    """(batches, batch size, a note or None) for the calibration. Asked sizes must fit in the
    available training samples (a ValueError says by how much they do not); the defaults take
    what the data holds, in whole batches."""
    if batches is not None or batch_size is not None:
        batches, batch_size = batches or defaults[0], batch_size or defaults[1]
        if batches * batch_size > available:
            raise ValueError(f"{batches * batch_size} calibration samples asked for, but the "
                             f"training days hold {available}")
        return batches, batch_size, None
    batches, batch_size = defaults
    if available < 1:
        raise ValueError("the training days hold no samples to calibrate on")
    if batches * batch_size <= available:
        return batches, batch_size, None
    batch_size = min(batch_size, available)
    batches = available // batch_size
    return batches, batch_size, (
        f"note: the training days hold {available} samples, fewer than the default "
        f"{defaults[0]} x {defaults[1]}: calibrating on {batches} x {batch_size}")


class Calibration:
    """The training samples the sparsifier aggregates over, in whole batches."""

    def __init__(self, exp: Experiment, batches: int | None, batch_size: int | None,
                 defaults: tuple[int, int]):
        inputs, half = exp.inputs, exp.args.test_half
        available = split_size(inputs.processed, inputs.raw, "train", half)
        try:
            n, self.batch_size, note = calibration_shape(available, batches, batch_size,
                                                         defaults)
        except ValueError as exc:
            raise UserInputError(f"{inputs.processed}: {exc}") from None
        if note and exp.run.is_main:
            print(note)
        self.samples = n * self.batch_size
        split = open_split(inputs.processed, inputs.raw, "train", self.samples,
                           exp.table_sizes(), half)
        self.fingerprint = split.fingerprint()
        self.split = split.to(exp.run.device)
