"""Experiment 4, memory savings: what pruned embedding tables cost in RAM, in every format.

For every pruned model of sparse_model_metadata.csv and every storage format of
dlrm_sparsity/formats.py (dense, coo, csr, csr_int64, row_pruned; with FBGEMM int8, int4,
row_pruned_int8 and row_pruned_int4), the tables are built in that format one at a time: the
exact bytes of every tensor it keeps, their ratio to the dense float32 tables, and the
embedding stage's time on the timed batch (at --timed-levels: bytes and quality at every
level), and there also the whole forward's, each timed in alternating rounds against the dense
tables' (ratios with 95% intervals; each model's formats one point for the drift guard).
Lossless formats must give the dense pruned model's outputs (within 1e-5); quantized ones are
scored on the whole test split (a row-pruned one takes its unpruned twin's scores: the same
lookups). A format larger than the dense tables is counted but never held whole, nor timed.
Writes sparse_model_memory.csv and memory_savings.png.
"""

from __future__ import annotations

import pandas as pd
import torch

from dlrm_sparsity.analysis import (
    AUC_DROP_BUDGETS,
    CONFIG,
    against_base,
    first_level_below,
    noise_note,
    smallest_within,
    verdict_counts,
)
from dlrm_sparsity.experiment import Experiment, against_dense
from dlrm_sparsity.formats import FORMATS, choose_formats, hold
from dlrm_sparsity.plots import plot_memory_savings
from dlrm_sparsity.pruning import LARGE_MODEL_BYTES
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.cli import (
    add_data_args,
    add_metadata_arg,
    add_run_args,
    add_timing_args,
    make_parser,
)
from dlrm_sparsity.runner.outputs import KEY_COLUMNS
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Figure, Table
from dlrm_sparsity.timing import AGREEMENT_TOLERANCE, trim_heap
from dlrm_sparsity.variants import FormatTables

MEMORY = Table("sparse_model_memory.csv", KEY_COLUMNS + [
    "format", "bytes", "bytes_ratio", "lookup_median_s", "lookup_iqr_s", "lookup_ratio",
    "lookup_ratio_low", "lookup_ratio_high", "forward_median_s", "forward_iqr_s",
    "forward_ratio", "forward_ratio_low", "forward_ratio_high", "max_abs_diff", "roc_auc",
    "quality_source", "auc_drop_vs_dense", "auc_drop_vs_level0"])


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for sparse_model_memory.csv and memory_savings.png")
    p.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                   help=f"storage formats, of {', '.join(FORMATS)} (default: all, less "
                        "those needing a missing FBGEMM)")
    add_timing_args(p, min_run_time=0.02, time_budget=120.0)
    p.add_argument("--timed-levels", "--forward-levels", dest="timed_levels", nargs="+",
                   default=["0.0", "0.5", "0.9", "1.0"], metavar="LEVEL",
                   help="levels whose lookups and whole forward are timed in every format "
                        "('all': every row)")
    return p.parse_args(argv)


def measure_format(exp: Experiment, name: str, dense: FormatTables, reference: torch.Tensor,
                   timed: bool, scored: dict) -> dict:
    """One format's row, its lookup and whole forward timed if asked; dense: the model with its
    tables in the dense format; scored: the model's quantized formats scored so far."""
    cls, batch, model = FORMATS[name], exp.batch, dense.model
    tables = [bag.weight.detach() for bag in model.emb_l]
    dense_bytes = sum(t.nbytes for t in tables)
    held, nbytes = hold(cls, tables, dense_bytes)
    row = {"format": name, "bytes": nbytes, "bytes_ratio": nbytes / dense_bytes,
           "lossy": cls.lossy, "held": held is not None}
    if held is None:
        return row
    served = FormatTables(model, held, name).eval()
    with torch.inference_mode():
        outputs = served.on(batch)()
    row["max_abs_diff"] = float((outputs - reference).abs().max())
    if not cls.lossy and not row["max_abs_diff"] <= AGREEMENT_TOLERANCE:
        raise RuntimeError(f"format {name}: outputs differ from the dense model's by "
                           f"{row['max_abs_diff']:.3g} (> {AGREEMENT_TOLERANCE})")
    if timed:
        row.update(against_dense(exp, "lookup", {
            v.label: lambda v=v: v.embed(batch.offsets, batch.indices) for v in (dense, served)},
            name))
        row.update(against_dense(exp, "forward", {v.label: v.on(batch) for v in (dense, served)},
                                 name))
    if cls.lossy:  # a row-pruned format drops only zero rows, which its unpruned twin holds
        # as zeros (tests/test_formats.py): the same lookups, so the twin's scores, taken when
        # the two agree bit for bit on the timed batch
        twin = name.removeprefix("row_pruned_")
        if twin in scored and torch.equal(scored[twin][0], outputs):
            row.update(scored[twin][1], quality_source=f"{twin}'s (the same lookups)")
        else:
            scored[name] = outputs, exp.score(served)
            row.update(scored[name][1], quality_source="scored in this format")
    return row


def add_drops(df: pd.DataFrame) -> pd.DataFrame:
    """AUC drops against the dense format of the same model and of the config's level 0."""
    if "format" not in df:  # every model failed: error rows only
        return df
    df = df.copy()
    dense = df["format"] == "dense"
    df["auc_drop_vs_dense"] = against_base(df, KEY_COLUMNS, dense, "roc_auc")
    df["auc_drop_vs_level0"] = against_base(df, CONFIG, dense & (df["sparsity_level"] == 0.0),
                                            "roc_auc")
    return df


def summary(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns="format", values="bytes_ratio")
    lines = [table.to_string(float_format="{:.3f}".format), "(bytes / dense float32 tables, "
             "mean over configs)"]
    for fmt in ("csr", "csr_int64", "coo"):
        for (norm, block), level in first_level_below(df[df["format"] == fmt],
                                                      "bytes_ratio").items():
            lines.append(f"{norm} {block}: {fmt} " + (f"smaller than dense from level "
                         f"{level:g}" if level is not None else "never smaller than dense"))
    timed = df.dropna(subset=["lookup_ratio"]) if "lookup_ratio" in df else df[:0]
    lines += [f"lookup time / dense, {f}: median {part['lookup_ratio'].median():.2f}x; "
              f"{verdict_counts(part, 'lookup_ratio_verdict')} of {len(part)} models"
              f"{noise_note(part)}" for f, part in timed.groupby("format", sort=False)]
    for budget in AUC_DROP_BUDGETS:
        best = smallest_within(df, budget, "bytes", "auc_drop_vs_level0")
        lines.append(f"AUC drop <= {budget}: no scored model within budget" if best is None
                     else f"AUC drop <= {budget}: smallest in memory is {best['norm']} "
                     f"{best['sparse_block_shape']} at level {best['sparsity_level']:g} stored "
                     f"as {best['format']}: {best['bytes'] / 2**20:.2f} MiB "
                     f"({best['bytes_ratio']:.3f} of dense), AUC {best['roc_auc']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        formats = choose_formats(args.formats, run.device)
        timed_levels = (None if args.timed_levels == ["all"]
                        else {float(x) for x in args.timed_levels})
        exp = Experiment(run, args)
        items = [item for meta in exp.metadata for item in exp.items([meta], {
            "formats": formats, "timed": timed_levels is None
            or float(meta["sparsity_level"]) in timed_levels})]

        def compute(item):
            model = exp.model(item.payload)
            with torch.inference_mode():
                reference = model(exp.batch.dense, exp.batch.offsets, exp.batch.indices)
            dense = exp.score(model)
            large = sum(bag.weight.nbytes for bag in model.emb_l) > LARGE_MODEL_BYTES
            tables = [bag.weight.detach() for bag in model.emb_l]
            dense_tables = FormatTables(model, hold(FORMATS["dense"], tables, 2**62)[0], "dense")
            def every_format() -> list[dict]:  # one at a time: the next built once one is freed
                rows, scored = [], {}
                for name in formats:
                    rows.append(measure_format(exp, name, dense_tables, reference,
                                               item.fields["timed"], scored))
                    if large:  # freed tables must not stay resident under the next format's
                        trim_heap()  # (small models: regrowing the heap costs)
                return rows
            # one model's formats are one point for the drift guard: hundreds of short
            # measurements, each read around, would cost more than they measure
            rows, guarded = (exp.guard.guarded(every_format) if item.fields["timed"]
                             else (every_format(), {}))
            for row in rows:
                row.update(guarded)  # held lossless formats give the dense model's outputs, checked
                if not row["lossy"] and row["held"]:
                    row.update(dense, quality_source="dense model (outputs agree)")
            return rows

        def describe(item, rows):
            return f"{item.fields['checkpoint']}: " + ", ".join(
                f"{r['format']} {r['bytes_ratio']:.2f}" for r in rows)

        result = run.sweep(items, compute, tables=[MEMORY], label="formats", describe=describe,
                           start=exp.plan_timing(  # each format's lookup and forward, if timed
                               lambda item: [exp.first_rounds_s(2)] * len(formats) * 2
                               * item.fields["timed"]))
        run.finish(result, [MEMORY], derive=add_drops,
                   plot=Figure(plot_memory_savings, "memory_savings.png"), summary=summary)
        if run.is_main:
            print(exp.timing_summary())
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
