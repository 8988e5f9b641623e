"""Experiment 2, model quality: score every pruned model on the Criteo test split.

The test split (first half of the last day, dlrm's definition) is read once and kept on the
device; each checkpoint named in sparse_model_metadata.csv is read from its zip in memory (or
mapped, when large) and scored in inference mode. Metrics come from scikit-learn, unrounded,
with a 0.5 threshold for the threshold metrics, as the seed. sparse_model_metrics.csv gets the
seed's columns, then average precision, sample count, the drops from each config's level-0.0
row and the ranks that held the tables; accuracy.png plots accuracy and AUC against sparsity.
Under torchrun, --shard-tables spreads each model's tables over the ranks with TorchRec's
DistributedModelParallel, with the same metrics (dlrm_sparsity/sharded.py).

With no arguments it runs on the demo (running the disk-savings step first if needed).
"""

from __future__ import annotations

import pandas as pd

from dlrm_sparsity.analysis import AUC_DROP_BUDGETS, CONFIG, against_base, highest_within
from dlrm_sparsity.experiment import Experiment
from dlrm_sparsity.plots import plot_quality
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.cli import (
    add_data_args,
    add_metadata_arg,
    add_run_args,
    make_parser,
    positive_float,
    positive_int,
)
from dlrm_sparsity.runner.outputs import KEY_COLUMNS
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Figure, Table

METRICS = Table("sparse_model_metrics.csv", KEY_COLUMNS + [
    "precision", "recall", "f1", "roc_auc", "accuracy", "log_loss",  # the seed's
    "average_precision", "n_samples", "accuracy_drop", "auc_drop"])


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for sparse_model_metrics.csv and accuracy.png")
    p.add_argument("--batch-size", type=positive_int, default=16384,
                   help="samples per forward pass (the seed's test batch)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N test samples, for a quick look")
    p.add_argument("--shard-tables", action="store_true",
                   help="under torchrun, spread each model's tables over the ranks with "
                        "TorchRec's DistributedModelParallel (automatic when a model is "
                        "larger than one rank's device)")
    p.add_argument("--rank-memory", type=positive_float, default=None, metavar="GB",
                   help="memory a rank (or the one GPU) has for a model: above it the tables "
                        "are sharded, and TorchRec's planner fills it (default: the GPU's, "
                        "or the rank's share of the machine's)")
    return p.parse_args(argv)


def add_drops(df: pd.DataFrame) -> pd.DataFrame:
    """accuracy_drop and auc_drop against the level-0.0 row of the same (norm, block)."""
    df = df.copy()
    level0 = df["sparsity_level"] == 0.0
    df["accuracy_drop"] = against_base(df, CONFIG, level0, "accuracy")
    df["auc_drop"] = against_base(df, CONFIG, level0, "roc_auc")
    return df


def summary(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns=CONFIG, values="roc_auc")
    lines = [table.to_string(float_format="{:.4f}".format), "(ROC AUC)"]
    found = [highest_within(df, budget) for budget in AUC_DROP_BUDGETS]
    for norm, block in found[0]:
        levels = [f"{f[(norm, block)]['sparsity_level']:g}" if f[(norm, block)] is not None
                  else "none" for f in found]
        lines.append(f"{norm} {block}: highest level with AUC drop " + ", ".join(
            f"<= {b}: {lv}" for b, lv in zip(AUC_DROP_BUDGETS, levels, strict=True)))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        exp = Experiment(run, args, test_limit=args.limit)
        items = exp.items(exp.metadata, {"split": "test", "limit": args.limit},
                          n_samples=len(exp.test))

        ranks = run.ctx.world_size if exp.sharded else 1  # that held each model's tables

        def compute(item):
            return {**exp.quality(item.payload), "tables_on_ranks": ranks}

        result = run.sweep(items, compute, tables=[METRICS], label="scoring",
                           together=exp.sharded,
                           describe=lambda item, rows: f"{item.fields['checkpoint']}: "
                                                       f"AUC {rows[0]['roc_auc']:.4f}")
        run.finish(result, [METRICS], derive=add_drops,
                   plot=Figure(plot_quality, "accuracy.png"), summary=summary)
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
