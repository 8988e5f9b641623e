"""Train a DLRM on Criteo-format data with the seed's recipe and save it in dlrm's layout,
or in TorchRec's (a DLRM or DLRM_DCN state dict, as `torch.save(model.state_dict())` writes).

The recipe of dlrm's bench/dlrm_s_criteo_kaggle.sh: SGD, learning rate 0.1, mini-batch 128,
binary cross-entropy, one epoch over days 1-6 (shuffled), test on the first half of day 7.
The checkpoint is a dict with "state_dict" and dlrm's bookkeeping (numpy scalars included),
so the suite and dlrm's own scripts read it alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dlrm_sparsity.criteo.data import NUM_DENSE_FEATURES, CriteoSplit
from dlrm_sparsity.criteo.npy import NpySplit
from dlrm_sparsity.criteo.splits import open_split
from dlrm_sparsity.device import resolve_device
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.evaluation import quality_metrics, score_split
from dlrm_sparsity.layouts import DLRM, TORCHREC, torchrec_layout
from dlrm_sparsity.model import DLRMConfig, DLRMNet
from dlrm_sparsity.runner.atomic import atomic_path


def parse_widths(text: str, flag: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split("-"))
    except ValueError:
        raise UserInputError(f"{flag}: expected widths like 512-256-1, got {text!r}") from None
    if not widths or min(widths) <= 0:
        raise UserInputError(f"{flag}: widths must be positive, got {text!r}")
    return widths


def build_config(train: CriteoSplit, recipe: "Recipe") -> DLRMConfig:
    """dlrm's sizes: tables from the data's counts, top input from the interaction width."""
    embedding_dim, bottom, top = recipe.embedding_dim, recipe.bottom, recipe.top
    bot = parse_widths(bottom, "--arch-mlp-bot")
    if bot[0] != NUM_DENSE_FEATURES or bot[-1] != embedding_dim:
        raise UserInputError(f"--arch-mlp-bot must start with {NUM_DENSE_FEATURES} and end "
                             f"with --arch-sparse-feature-size {embedding_dim}, got {bottom}")
    sizes = tuple(int(c) for c in train.counts)
    kind = (recipe.layout, recipe.dcn_layers, recipe.dcn_rank)
    probe = DLRMConfig(sizes, embedding_dim, bot, (1,), *kind)
    return DLRMConfig(sizes, embedding_dim, bot,
                      (probe.interaction_width,) + parse_widths(top, "--arch-mlp-top"), *kind)


def train_one_epoch(model: DLRMNet, train: CriteoSplit, recipe: Recipe,
                    print_every: int = 1000) -> float:
    """SGD over a shuffled pass of the training split (the first recipe.num_batches batches
    of it, when that is positive); returns the mean training loss."""
    model.train()
    batch_size, num_batches = recipe.batch_size, recipe.num_batches
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr)
    loss_fn = nn.BCELoss()
    order = torch.from_numpy(np.random.default_rng(recipe.seed).permutation(len(train)))
    order = order.to(train.dense.device)
    steps = len(train) // batch_size  # dlrm drops the last partial batch
    if steps == 0:
        raise UserInputError(f"the training split has {len(train)} samples, fewer than one "
                             f"mini-batch of {batch_size}")
    if num_batches > 0:
        steps = min(steps, num_batches)
    offsets = torch.arange(batch_size, device=train.dense.device).expand(
        train.sparse_t.shape[0], batch_size)
    total, t0 = 0.0, time.time()
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        out = model(train.dense[idx], offsets, train.sparse_t[:, idx].contiguous())
        loss = loss_fn(out.view(-1), train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()  # note: a CPU-GPU sync point, fine at this batch size
        if print_every and (step + 1) % print_every == 0:
            print(f"step {step + 1}/{steps}: loss {total / (step + 1):.4f}, "
                  f"{(step + 1) * batch_size / (time.time() - t0):.0f} samples/s", flush=True)
    return total / max(steps, 1)


def save_dlrm_checkpoint(path: str | Path, model: DLRMNet, train_loss: float,
                         test_acc: float, nbatches: int, nbatches_test: int) -> None:
    """dlrm's --save-model layout, numpy scalars and all, plus the config for convenience."""
    state = {
        "epoch": 0, "nepochs": 1, "iter": nbatches, "nbatches": nbatches,
        "nbatches_test": nbatches_test,
        "train_loss": np.float32(train_loss), "total_loss": np.float32(train_loss),
        "test_acc": np.float64(test_acc),
        "opt_state_dict": {}, "state_dict": model.state_dict(),
        "model_config": model.config.as_dict(),
    }
    save_checkpoint(path, state)


def save_torchrec_checkpoint(path: str | Path, model: DLRMNet) -> None:
    """The state dict TorchRec's DLRM (or DLRM_DCN) of these sizes has, its own keys."""
    c = model.config
    layout = torchrec_layout(len(c.table_sizes), len(c.top_mlp) - 1, c.cross_layers,
                             len(c.bottom_mlp) - 1)
    save_checkpoint(path, layout.to_file(model.state_dict()))


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


@dataclass(frozen=True)
class Recipe:
    """The architecture and the training recipe (the defaults are the seed's: dlrm's Kaggle
    architecture, SGD at 0.1, batches of 128, one epoch; num_batches 0: the whole epoch)."""

    embedding_dim: int = 16
    bottom: str = "13-512-256-64-16"
    top: str = "512-256-1"
    lr: float = 0.1
    batch_size: int = 128
    test_batch_size: int = 16384
    seed: int = 0
    num_batches: int = 0
    layout: str = DLRM  # or TORCHREC: TorchRec's DLRM, or DLRM_DCN with dcn_layers
    dcn_layers: int = 0
    dcn_rank: int = 0


def train_and_save(processed: str, raw: str | None, save_path: str, recipe: Recipe = Recipe(),
                   device: str | None = None, print_every: int = 1000) -> dict[str, float]:
    """The whole recipe; returns the test metrics of the trained model."""
    torch.manual_seed(recipe.seed)
    dev = resolve_device(device)
    train = open_split(processed, raw, "train")
    if isinstance(train, NpySplit):  # torchrec's files: tables as large as their ids need
        train = train.load()
    test = open_split(processed, raw, "test", table_sizes=tuple(train.counts)).to(dev)
    train = train.to(dev)
    config = build_config(train, recipe)
    model = DLRMNet(config, sparse_grad=True).to(dev)
    loss = train_one_epoch(model, train, recipe, print_every)
    scores = score_split(model, test, recipe.test_batch_size)
    quality = quality_metrics(test.labels.cpu().numpy(), scores)
    if recipe.layout == TORCHREC:
        save_torchrec_checkpoint(save_path, model.cpu())
    else:
        save_dlrm_checkpoint(save_path, model.cpu(), loss, quality["accuracy"],
                             len(train) // recipe.batch_size,
                             -(-len(test) // recipe.test_batch_size))
    return {"train_loss": loss, **quality}
