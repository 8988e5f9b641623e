"""Experiment 5, activation sparsity: mask the interaction output before the top MLP.

PyTorch's stock ActivationSparsifier is registered on top_l.0, whose input is the interaction
output z. Calibration batches from the training days (never the test split) run through the
model; the sparsifier scores each column of z and masks the lowest-scoring fraction at the
requested level (dlrm_sparsity/activation.py). With the mask in place the model is scored on
the whole test split, and three forward variants that must agree are timed on the first test
batch, in alternating rounds (ratios with 95% intervals, under the drift guard): dense (the
mask multiplies z, as the sparsifier does), torch_sparse (the seed's COO path on the masked z)
and compact (the masked columns removed from the interaction and from top_l.0's weight).

Models: the dense (level-0) model of sparse_model_metadata.csv, and the pruned models at the
--embedding-levels (one per config), so that both sparsities combine. Writes
activation_sparsity.csv and activation_sparsity.png. With no arguments it runs on the demo.
"""

from __future__ import annotations

import pandas as pd
import torch

from dlrm_sparsity.activation import FUNCTIONS, Calibration, calibrate
from dlrm_sparsity.analysis import (
    AUC_DROP_BUDGETS,
    MODEL,
    against_base,
    claimed_verdicts,
    faster_from,
    highest_within,
)
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.experiment import Experiment
from dlrm_sparsity.grid import SEED_LEVELS, parse_level
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
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Figure, Table
from dlrm_sparsity.timing import AGREEMENT_TOLERANCE
from dlrm_sparsity.variants import COMPACT, MASKED, MASKED_SPARSE, masked_variants

KEYS = MODEL + ["activation_level"]
ACTIVATION = Table("activation_sparsity.csv", KEYS + [
    "variant", "roc_auc", "accuracy", "log_loss", "auc_drop", "auc_drop_vs_level0",
    "time_median_s", "time_iqr_s", "speedup_vs_dense", "z_density", "kept_columns"])
CALIBRATION_DEFAULTS = (16, 2048)  # batches, samples per batch


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for activation_sparsity.csv and .png")
    p.add_argument("--levels", nargs="+", default=[str(x) for x in SEED_LEVELS], metavar="LEVEL",
                   help="activation sparsity levels in [0, 1] (default: the seed's 20)")
    p.add_argument("--embedding-levels", nargs="*", default=["0.9"], metavar="LEVEL",
                   help="also the pruned models at these embedding levels, one per config")
    p.add_argument("--calibration-batches", type=positive_int, default=None,
                   help=f"training batches the sparsifier aggregates |z| over (default: "
                        f"{CALIBRATION_DEFAULTS[0]}, or as many as the data holds)")
    p.add_argument("--calibration-batch-size", type=positive_int, default=None,
                   help=f"samples per calibration batch (default: {CALIBRATION_DEFAULTS[1]}, "
                        "or all the data holds)")
    add_timing_args(p, min_run_time=0.1, time_budget=60.0)
    return p.parse_args(argv)


def evaluate_level(exp: Experiment, meta: dict, level: float, calibration) -> list[dict]:
    """One row per variant: the masked model's quality, and each variant's forward time."""
    model, batch = exp.model(meta), exp.batch
    sparsifier = calibrate(model, calibration.split, calibration.batch_size, level)
    mask = sparsifier.get_mask(layer=model.top_l[0]).detach().clone()
    quality = exp.score(model)
    with torch.inference_mode():
        reference = model(batch.dense, batch.offsets, batch.indices)  # the sparsifier's hook
        sparsifier.squash_mask(attach_sparsify_hook=False)  # the variants mask z themselves
        z = model.interact(model.bottom(batch.dense), model.embed(batch.offsets, batch.indices))
        density = float(((z * mask) != 0).float().mean())
        variants = masked_variants(model, mask)
        diffs = {v: float((f.on(batch)() - reference).abs().max()) for v, f in variants.items()}
    if not max(diffs.values()) <= AGREEMENT_TOLERANCE:
        raise RuntimeError(f"level {level:g}: variants differ from the sparsifier's output "
                           f"by {diffs} (> {AGREEMENT_TOLERANCE}); not timed")
    paired, guarded = exp.time_point(  # the agreement check made each one's first call
        {v: f.on(batch) for v, f in variants.items()}, MASKED, called=1)
    rows = [{"variant": v, **quality, **paired.columns(v, None if v == MASKED else MASKED),
             "interaction": model.config.interaction, "z_density": density,
             "kept_columns": int(variants[COMPACT].kept.numel()), "max_abs_diff": diffs[v],
             **guarded} for v in variants]
    for row in rows:  # dense over the variant: above 1 is faster; the interval turned over
        row.update(speedup_vs_dense=1 / row.get("ratio", 1.0),
                   speedup_low=1 / row.get("ratio_high", 1.0),
                   speedup_high=1 / row.get("ratio_low", 1.0))
    return rows


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
    the AUC drop against the unpruned model unmasked (auc_drop_vs_level0: what pruning and
    masking add up to, the drop the report's budgets hold)."""
    if "variant" not in df:  # every item failed: error rows only
        return df
    df = df.copy()
    unmasked = df["activation_level"] == 0.0
    df["auc_drop"] = against_base(df, MODEL, unmasked, "roc_auc")
    df["accuracy_drop"] = against_base(df, MODEL, unmasked, "accuracy")
    df["log_loss_increase"] = -against_base(df, MODEL, unmasked, "log_loss")
    df["auc_drop_vs_level0"] = against_base(df, [], unmasked & (df["sparsity_level"] == 0.0),
                                            "roc_auc")
    return df


def summary(df: pd.DataFrame) -> str:
    lines = []
    dense = df[df["variant"] == MASKED]
    within = [highest_within(dense, b, MODEL, "activation_level") for b in AUC_DROP_BUDGETS]
    for (norm, block, emb), part in df.groupby(MODEL):
        name = "dense model" if emb == 0.0 else f"{norm} {block} at embedding level {emb:g}"
        tops = ["none" if w.get((norm, block, emb)) is None
                else f"{w[(norm, block, emb)]['activation_level']:g}" for w in within]
        lines.append(f"{name}: highest activation level with AUC drop (against it unmasked) "
                     + ", ".join(f"<= {b}: {top}"
                                 for b, top in zip(AUC_DROP_BUDGETS, tops, strict=True)))
        for variant in (COMPACT, MASKED_SPARSE):
            one = part[part["variant"] == variant].set_index("activation_level").sort_index()
            start = faster_from(claimed_verdicts(one).eq("faster"))
            lines.append(f"  {variant} / dense time: {1 / one['speedup_vs_dense'].max():.2f}x at "
                         f"best, {1 / one['speedup_vs_dense'].min():.2f}x at worst; " +
                         ("not faster beyond noise at the highest level" if start is None else
                          f"faster at every level from {start:g} (AUC drop there "
                          f"{one.loc[start, 'auc_drop']:.4f})"))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        levels = [parse_level(x) for x in args.levels]
        embedding_levels = {parse_level(x) for x in args.embedding_levels}
        exp = Experiment(run, args)
        models = select_models(exp.metadata, embedding_levels, exp.inputs.metadata)
        calibration = Calibration(exp, args.calibration_batches, args.calibration_batch_size,
                                  CALIBRATION_DEFAULTS)
        flags = {"calibration": calibration.fingerprint, "functions": FUNCTIONS}
        items = [item for meta in models for lv in levels for item in exp.items(
            [meta], flags, activation_level=lv, sparsifier_functions=FUNCTIONS,
            calibration_samples=calibration.samples)]  # a model's items adjacent: read once

        def describe(item, rows):
            times = ", ".join(f"{r['variant']} {r['time_median_s'] * 1e3:.2f} ms" for r in rows)
            return (f"{item.fields['checkpoint']} activation level "
                    f"{item.fields['activation_level']:g}: AUC {rows[0]['roc_auc']:.4f}, {times}")

        result = run.sweep(items, lambda item: evaluate_level(
            exp, item.payload, item.fields["activation_level"], calibration),
            tables=[ACTIVATION], key_columns=KEYS, label="activation levels", describe=describe,
            start=exp.plan_timing(lambda item: [exp.first_rounds_s(3)]))
        run.finish(result, [ACTIVATION], derive=add_drops,
                   plot=Figure(plot_activation_sparsity, "activation_sparsity.png"),
                   summary=summary)
        if run.is_main:
            print(exp.timing_summary())
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
