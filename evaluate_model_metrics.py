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

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from checkpoint_io import load_dlrm_state_dict
from cli_common import (add_data_args, add_metadata_arg, add_run_args, log_progress, make_parser,
                        positive_int, resolve_device, resolve_inputs, script_main)
from criteo_data import CriteoSplit, load_split
from distributed import DistContext
from dlrm_model import DLRMNet
from errors import UserInputError
from evaluation import quality_metrics, score_split
from plotting import plot_quality
from results_io import (KEY_COLUMNS, ResumeState, environment, read_metadata, reusable,
                        row_key, write_csv)

METRICS_CSV = "sparse_model_metrics.csv"
SEED_METRIC_COLUMNS = KEY_COLUMNS + ["precision", "recall", "f1", "roc_auc", "accuracy",
                                     "log_loss"]
AUC_DROP_BUDGETS = (0.005, 0.01)


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


def score_checkpoint(path: str, test: CriteoSplit, labels: np.ndarray, batch_size: int,
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
            within = part[part["auc_drop"] <= budget + 1e-12]["sparsity_level"]
            found.append(f"{within.max():g}" if len(within) else "none")
        lines.append(f"{norm} {block}: highest level with AUC drop <= "
                     f"{AUC_DROP_BUDGETS[0]}: {found[0]}, <= {AUC_DROP_BUDGETS[1]}: {found[1]}")
    return lines


def evaluate_rows(rows: list[dict], test: CriteoSplit, args, device, resume: ResumeState,
                  extra: dict, show_progress: bool) -> tuple[list[dict], int]:
    labels = test.labels.cpu().numpy()
    out, skipped = [], 0
    bar = tqdm(rows, desc="scoring", unit="model", disable=None if show_progress else True)
    for meta in bar:
        base = {c: meta[c] for c in KEY_COLUMNS}
        base.update(checkpoint=meta["path"], checkpoint_sha256=meta.get("sha256"),
                    n_samples=len(test), batch_size=args.batch_size, limit=args.limit)
        old = resume.lookup(row_key(meta))
        if reusable(old, base, ("checkpoint_sha256", "n_samples", "checkpoint")):
            out.append(old)
            skipped += 1
            continue
        try:
            metrics = score_checkpoint(meta["checkpoint"], test, labels, args.batch_size, device)
            row = {**base, **metrics, **extra}
        except UserInputError as exc:
            tqdm.write(f"error: {exc}", file=sys.stderr)
            row = {**base, "error": str(exc), **extra}
        resume.record(row)
        out.append(row)
        log_progress(show_progress, bar, len(out), len(rows),
                     f"{meta['path']}: AUC {row.get('roc_auc', 'error')}")
    return out, skipped


def run(args, ctx: DistContext) -> int:
    device = resolve_device(args.device)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, processed, metadata_path = resolve_inputs(args, ctx)
    metadata = read_metadata(metadata_path)
    test = load_split(processed, raw, "test", args.limit).to(device)
    csv_path = out_dir / METRICS_CSV
    resume = ResumeState(csv_path, ctx.rank, args.overwrite)
    extra = {**environment(device), "command": args.command}
    mine = ctx.shard(metadata.to_dict("records"))
    rows, skipped = evaluate_rows(mine, test, args, device, resume, extra, ctx.is_main)
    rows, skipped = ctx.gather(rows), sum(ctx.gather([skipped]))
    failed = 0
    if ctx.is_main:
        order = {row_key(r): i for i, r in enumerate(metadata.to_dict("records"))}
        rows.sort(key=lambda r: order[row_key(r)])
        df = add_drops(pd.DataFrame(rows))
        df = write_csv(df.to_dict("records"), csv_path, SEED_METRIC_COLUMNS +
                       ["average_precision", "n_samples", "accuracy_drop", "auc_drop"])
        good = df[df["accuracy"].notna()] if "accuracy" in df else df.iloc[0:0]
        if not good.empty:
            plot_quality(good, out_dir / "accuracy.png")
        resume.log.remove()
        failed = len(df) - len(good)
        if skipped:
            print(f"resumed: kept {skipped} scored model(s) of an earlier run")
        if not good.empty:
            print(good.pivot_table(index="sparsity_level", columns=["norm", "sparse_block_shape"],
                                   values="roc_auc").to_string(float_format="{:.4f}".format))
            print("\n".join(highest_levels_within(df)))
        print(f"wrote {csv_path} ({len(good)} models scored on {len(test)} test samples"
              f"{f', {failed} failed' if failed else ''})")
    ctx.barrier()
    return 2 if failed else 0


def main(argv=None) -> None:
    script_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
