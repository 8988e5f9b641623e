"""Experiment 2, model quality: score every pruned model on the Criteo test split.

The test split (first half of the last day, dlrm's definition) is read once and kept on the
device; each checkpoint named in sparse_model_metadata.csv is read from its zip in memory and
scored in inference mode. Metrics come from scikit-learn, unrounded, with a 0.5 threshold for
the threshold metrics, as the seed. sparse_model_metrics.csv gets the seed's columns, then
average precision, sample count and the drops from each config's level-0.0 row; accuracy.png
plots accuracy and AUC against sparsity.

With no arguments it runs on the demo (running the disk-savings step first if needed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

import evaluate_disk_savings
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo.data import CriteoSplit, load_split
from dlrm_sparsity.evaluation import AUC_DROP_BUDGETS, quality_metrics, score_split, within_budget
from dlrm_sparsity.inputs import metadata_item, resolve_inputs
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.plots import plot_quality
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.cli import (
    add_data_args,
    add_metadata_arg,
    add_run_args,
    make_parser,
    positive_int,
)
from dlrm_sparsity.runner.outputs import KEY_COLUMNS, read_metadata
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Table

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
    return p.parse_args(argv)


def score(path: str, test: CriteoSplit, labels: np.ndarray, batch_size: int,
          device: torch.device) -> dict:
    model = DLRMNet.from_state_dict(load_dlrm_state_dict(path)).to(device)
    test.check_fits(model.config.table_sizes, path)
    return quality_metrics(labels, score_split(model, test, batch_size))


def add_drops(df: pd.DataFrame) -> pd.DataFrame:
    """accuracy_drop and auc_drop against the level-0.0 row of the same (norm, block)."""
    df = df.copy()
    df["accuracy_drop"] = np.nan
    df["auc_drop"] = np.nan
    ok = df["accuracy"].notna() if "accuracy" in df else pd.Series(False, index=df.index)
    for _, part in df[ok].groupby(["norm", "sparse_block_shape"]):
        base = part[part["sparsity_level"] == 0.0]
        if base.empty:
            continue
        df.loc[part.index, "accuracy_drop"] = base["accuracy"].iloc[0] - part["accuracy"]
        df.loc[part.index, "auc_drop"] = base["roc_auc"].iloc[0] - part["roc_auc"]
    return df


def highest_levels_within(df: pd.DataFrame) -> list[str]:
    lines = []
    for (norm, block), part in df.dropna(subset=["auc_drop"]).groupby(
            ["norm", "sparse_block_shape"]):
        found = []
        for budget in AUC_DROP_BUDGETS:
            within = within_budget(part, budget)["sparsity_level"]
            found.append(f"{within.max():g}" if len(within) else "none")
        lines.append(f"{norm} {block}: highest level with AUC drop <= "
                     f"{AUC_DROP_BUDGETS[0]}: {found[0]}, <= {AUC_DROP_BUDGETS[1]}: {found[1]}")
    return lines


def summary(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns=["norm", "sparse_block_shape"],
                           values="roc_auc")
    return "\n".join([table.to_string(float_format="{:.4f}".format), "(ROC AUC)",
                      *highest_levels_within(df)])


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        inputs = resolve_inputs(args.raw_data_file, args.processed_data_file, args.metadata,
                                run.output_dir, args.skip_bad_lines, run.ctx)
        evaluate_disk_savings.ensure_metadata(inputs, run.output_dir, args.device)
        metadata = read_metadata(inputs.metadata).to_dict("records")
        test = load_split(inputs.processed, inputs.raw, "test", args.limit)
        data = {"data": test.fingerprint(), "split": "test", "batch_size": args.batch_size,
                "device": run.device.type}
        test = test.to(run.device)
        labels = test.labels.cpu().numpy()
        items = [metadata_item(m, data, n_samples=len(test), batch_size=args.batch_size,
                               limit=args.limit, processed_data_file=inputs.processed,
                               **run.environment()) for m in metadata]

        def compute(item):
            return score(item.payload["checkpoint"], test, labels, args.batch_size, run.device)

        result = run.sweep(items, compute, tables=[METRICS], label="scoring",
                           describe=lambda item, rows: f"{item.fields['checkpoint']}: "
                                                       f"AUC {rows[0]['roc_auc']:.4f}")
        run.finish(result, [METRICS], derive=add_drops, plot=(plot_quality, "accuracy.png"),
                   summary=summary)
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
