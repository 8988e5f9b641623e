"""Experiment 5, activation sparsity: mask the interaction output before the top MLP.

PyTorch's stock ActivationSparsifier is registered on top_l.0, whose input is the interaction
output z (the bottom MLP's output and every pairwise dot product). Calibration batches from the
training days (never the test split) run through the model; the sparsifier aggregates |z| over
them, reduces it to one score per column of z, and its step() masks the lowest-scoring fraction
of columns at the requested level. With the mask in place the model is scored on the whole test
split, and three forward variants that must agree are timed on the first test batch with
experiment 3's harness: dense (the mask multiplies z, as the sparsifier does), torch_sparse (the
seed's COO path on the masked z) and compact (the masked columns removed from the interaction
and from top_l.0's weight).

Models: the dense (level-0) model of sparse_model_metadata.csv, and the pruned models at the
--embedding-levels (one per config), so that both sparsities combine. Writes
activation_sparsity.csv and activation_sparsity.png. With no arguments it runs on the demo.
"""

from __future__ import annotations

from functools import lru_cache

import pandas as pd
import torch
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
    ActivationSparsifier,
)

import evaluate_disk_savings
from dlrm_forward_time import (
    AGREEMENT_TOLERANCE,
    COMPACT,
    MASKED,
    MASKED_VARIANTS,
    CompactForward,
    masked_forward_fn,
    measure,
    steady_cpu_allocator,
    timing_columns,
)
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo.data import Batch, CriteoSplit, load_split, tensors_fingerprint
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.evaluation import AUC_DROP_BUDGETS, quality_metrics, score_split, within_budget
from dlrm_sparsity.inputs import metadata_item, resolve_inputs
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.plots import plot_activation_sparsity
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.cli import (
    add_data_args,
    add_metadata_arg,
    add_run_args,
    add_timing_args,
    make_parser,
    positive_int,
)
from dlrm_sparsity.runner.outputs import KEY_COLUMNS, read_metadata
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Table
from sparse_utils import SEED_LEVELS, parse_level

KEYS = KEY_COLUMNS + ["activation_level"]
ACTIVATION = Table("activation_sparsity.csv", KEYS + [
    "variant", "roc_auc", "accuracy", "log_loss", "auc_drop", "auc_drop_vs_level0",
    "time_median_s", "time_iqr_s", "speedup_vs_dense", "z_density", "kept_columns"])


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for activation_sparsity.csv and .png")
    p.add_argument("--levels", nargs="+", default=[str(x) for x in SEED_LEVELS], metavar="LEVEL",
                   help="activation sparsity levels in [0, 1] (default: the seed's 20)")
    p.add_argument("--embedding-levels", nargs="*", default=["0.9"], metavar="LEVEL",
                   help="also the pruned models at these embedding levels, one per config "
                        "(none: only the dense model)")
    p.add_argument("--calibration-batches", type=positive_int, default=16,
                   help="training batches the sparsifier aggregates |z| over")
    p.add_argument("--calibration-batch-size", type=positive_int, default=2048,
                   help="samples per calibration batch")
    add_timing_args(p, min_run_time=0.1, why="; half of experiment 3's default, so that the "
                    "80 (model, level) items fit in minutes")
    return p.parse_args(argv)


# The sparsifier's functions, recorded in the CSV by name.
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
    """The stock sparsifier on top_l.0, stepped on the calibration batches; its hook now
    multiplies top_l.0's input (z) by the mask."""
    sparsifier = ActivationSparsifier(model)
    sparsifier.register_layer(model.top_l[0], aggregate_fn=sum_abs, reduce_fn=mean_over_samples,
                              mask_fn=drop_lowest, sparsity_level=level)
    with torch.no_grad():  # not inference_mode: step() assigns to the mask it made here
        for batch in calibration.batches(batch_size):
            model(batch.dense, batch.offsets, batch.indices)
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def evaluate_level(model: DLRMNet, level: float, calibration: CriteoSplit,
                   calibration_batch_size: int, test: CriteoSplit, batch: Batch,
                   threads: int, min_run_time: float) -> list[dict]:
    """One row per variant: the masked model's quality, and each variant's forward time."""
    sparsifier = calibrate(model, calibration, calibration_batch_size, level)
    mask = sparsifier.get_mask(layer=model.top_l[0]).detach().clone()
    scores = score_split(model, test, len(batch.labels))
    quality = quality_metrics(test.labels.cpu().numpy(), scores)
    with torch.inference_mode():
        reference = model(batch.dense, batch.offsets, batch.indices)  # the sparsifier's hook
        sparsifier.squash_mask(attach_sparsify_hook=False)  # the variants mask z themselves
        z = model.interact(model.bottom(batch.dense), model.embed(batch.offsets, batch.indices))
        density = float(((z * mask) != 0).float().mean())
        compact = CompactForward(model, mask)
        fns = {v: masked_forward_fn(model, batch, mask, v, compact) for v in MASKED_VARIANTS}
        diffs = {v: float((fn() - reference).abs().max()) for v, fn in fns.items()}
    if not max(diffs.values()) <= AGREEMENT_TOLERANCE:
        raise RuntimeError(f"level {level:g}: variants differ from the sparsifier's output "
                           f"by {diffs} (> {AGREEMENT_TOLERANCE}); not timed")
    return [{"variant": v, **quality,  # the agreement check was each variant's first call
             **timing_columns(measure(fn, v, threads, min_run_time, called=1)),
             "z_density": density, "kept_columns": int(compact.kept.numel()),
             "max_abs_diff": diffs[v]} for v, fn in fns.items()]


def select_models(metadata: list[dict], embedding_levels: set[float], origin) -> list[dict]:
    """The first level-0 model, then one per config at each asked embedding level."""
    dense = [m for m in metadata if float(m["sparsity_level"]) == 0.0][:1]
    pruned = [m for m in metadata if float(m["sparsity_level"]) in embedding_levels - {0.0}]
    missing = embedding_levels - {0.0} - {float(m["sparsity_level"]) for m in pruned}
    if missing or not dense + pruned:
        levels = ", ".join(f"{x:g}" for x in sorted(missing)) or "0"
        raise UserInputError(f"{origin}: no pruned model at embedding level(s) {levels}")
    return dense + pruned


def add_drops(df: pd.DataFrame) -> pd.DataFrame:
    """Drops against the same model unmasked (auc_drop, accuracy_drop, log_loss_increase);
    the AUC drop against the unpruned model unmasked (auc_drop_vs_level0: what embedding
    pruning and masking add up to, the drop the report's budgets hold); speed-ups against
    dense."""
    df = df.copy()
    ok = df["roc_auc"].notna() if "roc_auc" in df else pd.Series(False, index=df.index)
    for _, part in df[ok].groupby(KEY_COLUMNS):
        base = part[part["activation_level"] == 0.0]
        if not base.empty:
            df.loc[part.index, "auc_drop"] = base["roc_auc"].iloc[0] - part["roc_auc"]
            df.loc[part.index, "accuracy_drop"] = base["accuracy"].iloc[0] - part["accuracy"]
            df.loc[part.index, "log_loss_increase"] = part["log_loss"] - base["log_loss"].iloc[0]
    unpruned = df[ok & (df["sparsity_level"] == 0.0) & (df["activation_level"] == 0.0)]
    if not unpruned.empty:
        df["auc_drop_vs_level0"] = unpruned["roc_auc"].iloc[0] - df["roc_auc"]
    for _, part in df[ok].groupby(KEYS):
        dense = part[part["variant"] == MASKED]["time_median_s"]
        if not dense.empty:
            df.loc[part.index, "speedup_vs_dense"] = dense.iloc[0] / part["time_median_s"]
    return df


def faster_from(speedup: pd.Series) -> float | None:
    """The lowest level from which compact is faster than dense at that level and every level
    above (a noisy dip lower down does not count); None if it is not faster at the top."""
    slower = speedup[speedup <= 1.0]
    above = speedup.index[speedup.index > slower.index.max()] if len(slower) else speedup.index
    return float(above.min()) if len(above) else None


def compact_speedups(part: pd.DataFrame) -> str:
    one = part[part["variant"] == COMPACT].set_index("activation_level").sort_index()
    speedup = one["speedup_vs_dense"]
    shown = [lv for lv in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0) if lv in speedup.index]
    text = "compact / dense speed-up: " + ", ".join(f"{speedup[lv]:.2f}x at {lv:g}"
                                                     for lv in shown)
    start = faster_from(speedup)
    if start is None:
        return text + "; not faster at the highest level"
    return (text + f"; faster at every level from {start:g} (AUC drop there "
            f"{one.loc[start, 'auc_drop']:.4f})")


def summary(df: pd.DataFrame) -> str:
    lines = []
    for (norm, block, emb), part in df.groupby(KEY_COLUMNS):
        name = "dense model" if emb == 0.0 else f"{norm} {block} at embedding level {emb:g}"
        one = part[part["variant"] == MASKED]
        within = [within_budget(one, b)["activation_level"].max()
                  for b in AUC_DROP_BUDGETS]
        lines.append(f"{name}: highest activation level with AUC drop (against it unmasked) <= "
                     + ", <= ".join(f"{b}: {w:g}" for b, w in zip(AUC_DROP_BUDGETS, within,
                                                                   strict=True)))
        lines.append("  " + compact_speedups(part))
        sparse = part[part["variant"] == "torch_sparse"].set_index("activation_level")
        start = faster_from(sparse["speedup_vs_dense"].sort_index())
        lines.append(f"  torch_sparse / dense time: {1 / sparse['speedup_vs_dense'].min():.2f}x "
                     f"at worst, {1 / sparse['speedup_vs_dense'].max():.2f}x at best; "
                     + ("it never pays" if start is None else
                        f"faster from level {start:g} (AUC drop there "
                        f"{sparse.loc[start, 'auc_drop']:.4f})"))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        levels = [parse_level(x) for x in args.levels]
        embedding_levels = {parse_level(x) for x in args.embedding_levels}
        steady = run.device.type == "cpu" and steady_cpu_allocator()
        inputs = resolve_inputs(args.raw_data_file, args.processed_data_file, args.metadata,
                                run.output_dir, args.skip_bad_lines, run.ctx)
        evaluate_disk_savings.ensure_metadata(inputs, run.output_dir, args.device)
        models = select_models(read_metadata(inputs.metadata).to_dict("records"),
                               embedding_levels, inputs.metadata)
        n_calibration = args.calibration_batches * args.calibration_batch_size
        calibration = load_split(inputs.processed, inputs.raw, "train", n_calibration)
        if len(calibration) < n_calibration:
            raise UserInputError(f"{inputs.processed}: {n_calibration} calibration samples "
                                 f"asked for, but the training days hold {len(calibration)}")
        test = load_split(inputs.processed, inputs.raw, "test")
        batch = next(test.to(run.device).batches(args.batch_size))
        determinants = {"test": test.fingerprint(), "calibration": calibration.fingerprint(),
                        "timed_batch": tensors_fingerprint(batch.dense, batch.indices),
                        "functions": FUNCTIONS, "batch_size": args.batch_size,
                        "threads": args.threads, "min_run_time": args.min_run_time,
                        "steady_malloc": steady, "device": run.environment()["device"]}
        calibration, test = calibration.to(run.device), test.to(run.device)
        shared = {"sparsifier_functions": FUNCTIONS, "calibration_samples": n_calibration,
                  "batch_size": len(batch.labels), "steady_malloc": steady,
                  **run.environment(), "num_threads": args.threads}
        items = [metadata_item(m, {**determinants, "level": lv}, activation_level=lv, **shared)
                 for m in models for lv in levels]

        @lru_cache(maxsize=1)  # items of one model follow each other: read it once
        def state_dict(path: str) -> dict:
            return load_dlrm_state_dict(path)

        def compute(item):
            path = item.payload["checkpoint"]
            model = DLRMNet.from_state_dict(state_dict(path)).to(run.device).eval()
            test.check_fits(model.config.table_sizes, path)
            return evaluate_level(model, item.fields["activation_level"], calibration,
                                  args.calibration_batch_size, test, batch, args.threads,
                                  args.min_run_time)

        def describe(item, rows):
            times = ", ".join(f"{r['variant']} {r['time_median_s'] * 1e3:.2f} ms" for r in rows)
            return (f"{item.fields['checkpoint']} activation level "
                    f"{item.fields['activation_level']:g}: AUC {rows[0]['roc_auc']:.4f}, {times}")

        result = run.sweep(items, compute, tables=[ACTIVATION], key_columns=KEYS,
                           label="activation levels", describe=describe)
        run.finish(result, [ACTIVATION], derive=add_drops,
                   plot=(plot_activation_sparsity, "activation_sparsity.png"), summary=summary)
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
