"""Experiment 6, the compression front: which compression of the tables to ship.

Every method of dlrm_sparsity/methods compresses the trained, unpruned model (the metadata's
level-0 checkpoint) with no retraining: row pruning by L2 norm (FBGEMM's inference rule) and by
access frequency over the training split, FBGEMM's row-wise FP16/INT8/INT4/INT2, the pruners
joined to INT8/INT4 (one TBE behind FBGEMM's index remap), and a truncated SVD at the grid's
bytes fractions. For each setting: the bytes the tables hold as served (the kernel's own
buffers), the zipped checkpoint, every quality metric on the test split with its drop from the
unpruned model, and at --timed-levels the lookups against the dense tables in paired rounds.
The seed's DataNormSparsifier points come from experiment 4's sparse_model_memory.csv (datanorm,
datanorm+int8, datanorm+int4). A method that cannot apply (INT2 on a width FBGEMM refuses,
frequencies without training days, an SVD rank above a table's width) is a skipped row that
says why. Writes compression_front.csv and compression_front.png (ROC AUC against bytes, the
Pareto front named).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dlrm_sparsity.analysis import AUC_DROP_BUDGETS, against_base, front_choice, noise_note
from dlrm_sparsity.criteo.counts import counts_or_why
from dlrm_sparsity.criteo.data import tensors_fingerprint
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.experiment import Experiment, against_dense
from dlrm_sparsity.grid import parse_level
from dlrm_sparsity.methods import (
    BITS,
    DEFAULT_METHODS,
    Uncompressed,
    parse_methods,
    settings,
    zipped_bytes,
)
from dlrm_sparsity.methods.datanorm import datanorm_rows
from dlrm_sparsity.plots import plot_compression_front
from dlrm_sparsity.pruning import LARGE_MODEL_BYTES
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
from dlrm_sparsity.runner.sweep import Figure, Item, Table
from dlrm_sparsity.timing import drop_mapped_pages, trim_heap
from dlrm_sparsity.variants import FormatTables

FRONT = Table("compression_front.csv", [
    "method", "setting", "level", "bits", "rank", "bytes", "bytes_ratio", "zip_file_size",
    "roc_auc", "auc_drop", "lookup_ratio", "lookup_ratio_low", "lookup_ratio_high", "skipped"])
MEMORY_CSV = "sparse_model_memory.csv"  # experiment 4's, for the datanorm points


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, f"folder for compression_front.csv and .png (and experiment 4's {MEMORY_CSV})")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"of {', '.join(DEFAULT_METHODS)}, or PRUNER+ENCODING (default: all "
                        "of these)")
    p.add_argument("--levels", nargs="+", type=parse_level, default=None, metavar="LEVEL",
                   help="pruning ratios of row_norm/row_freq, 1 - bytes fraction of svd "
                        "(default: the metadata's levels, less 0 and 1)")
    p.add_argument("--svd-ranks", nargs="+", type=positive_int, default=[], metavar="RANK",
                   help="svd also at these ranks, every table (default: none)")
    add_timing_args(p, min_run_time=0.2, time_budget=30.0)
    p.add_argument("--timed-levels", nargs="+", default=["0.5", "0.9"], metavar="LEVEL",
                   help="levels whose lookups are timed, an encoding alone always ('all')")
    return p.parse_args(argv)


def add_front(df: pd.DataFrame, memory: Path, metadata: Path, asked: list[str]) -> pd.DataFrame:
    """The datanorm points read from experiment 4, every drop against the unpruned model."""
    if memory.is_file() and asked:
        df = pd.concat([df, datanorm_rows(pd.read_csv(memory), read_metadata(metadata), asked)],
                       ignore_index=True)
    df["zip_file_size"] = df["zip_file_size_bytes"] / 2**20
    df["auc_drop"] = against_base(df, [], df["method"] == "dense", "roc_auc")
    return df


def summary(df: pd.DataFrame) -> str:
    scored = df.dropna(subset=["roc_auc", "bytes"])
    lines = [f"{m}: {len(p)} settings, {p['bytes_ratio'].min():.3f} to "
             f"{p['bytes_ratio'].max():.3f} of the dense bytes, AUC {p['roc_auc'].min():.4f} "
             f"to {p['roc_auc'].max():.4f}" for m, p in scored.groupby("method", sort=False)]
    for budget in AUC_DROP_BUDGETS:
        best, datanorm = front_choice(scored, budget)
        if best is None:
            lines.append(f"AUC drop <= {budget}: no setting within budget")
            continue
        beside = ("" if datanorm is None else f"; the best datanorm point ({datanorm['setting']})"
                  f" is {datanorm['bytes'] / best['bytes']:.2f}x its bytes")
        lines.append(f"AUC drop <= {budget}: smallest is {best['method']} {best['setting']}, "
                     f"{best['bytes'] / 2**20:.2f} MiB ({best['bytes_ratio']:.3f} of dense), "
                     f"AUC {best['roc_auc']:.4f}{beside}")
    timed = scored.dropna(subset=["lookup_ratio"]) if "lookup_ratio" in scored else scored[:0]
    lines += [f"lookups / dense, {m}: {p['lookup_ratio'].median():.2f}x (median of {len(p)})"
              f"{noise_note(p)}" for m, p in timed.groupby("method", sort=False)]
    skipped = df[df["skipped"].notna()] if "skipped" in df else df[:0]
    return "\n".join(lines + [f"skipped {r['method']} {r['setting']}: {r['skipped']}"
                              for r in skipped.to_dict("records")])


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        methods = parse_methods(args.methods)
        exp = Experiment(run, args)
        base = exp.level0_row()
        if base is None:
            raise UserInputError(f"{exp.inputs.metadata}: no level-0 row, the unpruned model "
                                 "that every method compresses (run the grid with level 0)")
        model = exp.unpruned_model(base)
        tables = [bag.weight.detach() for bag in model.emb_l]
        levels = args.levels or sorted({float(m["sparsity_level"]) for m in exp.metadata} -
                                       {0.0, 1.0})
        timed = None if args.timed_levels == ["all"] else {float(x) for x in args.timed_levels}
        counts, counts_error = (counts_or_why(exp.inputs.processed, exp.inputs.raw,
                                              model.config.table_sizes)
                                if any(getattr(m, "needs_counts", False) for m in methods)
                                else (None, None))
        counted = (counts_error if counts is None else  # what a row_freq row depends on
                   tensors_fingerprint([torch.from_numpy(c) for c in counts]))
        made = [m for m in [Uncompressed(), *methods] if not isinstance(m, str)]
        [meta] = exp.items([base])
        shared = {k: v for k, v in meta.fields.items() if k not in KEY_COLUMNS}
        items = []
        for method in made:
            for label, kw in settings(method, levels, args.svd_ranks):
                determinants = {**meta.determinants, "method": method.name, "setting": label,
                                **({"counts": counted} if method.needs_counts else {})}
                is_timed = method.name != "dense" and "rank" not in kw and (
                    timed is None or kw.get("level", 0.5) in timed or not method.leveled)
                items.append(Item({**shared, "method": method.name, "setting": label,
                                   "level": kw.get("level"), "rank": kw.get("rank"),
                                   "bits": BITS.get(method.name.rsplit("+")[-1], 32),
                                   "timed": is_timed}, determinants, (method, kw)))
        dense = FormatTables(model, Uncompressed().serve(tables), "dense")

        def compute(item):
            method, kw = item.payload
            if dense.tables.nbytes > LARGE_MODEL_BYTES:  # the last setting's tables, freed,
                trim_heap()  # go back to the system (the timing's allocator never trims)
            if method.needs_counts and counts is None:
                return {"skipped": f"{method.name}: {counts_error}"}
            try:
                served = method.serve(tables, counts=counts, **kw)
            except UserInputError as exc:
                return {"skipped": str(exc)}
            if getattr(model, "mapped", False):  # only the timed lookups read them again,
                drop_mapped_pages(*tables)  # a few rows
            row = {"bytes": served.nbytes, "bytes_ratio": served.nbytes / dense.tables.nbytes,
                   "zip_file_size_bytes": zipped_bytes(model, served, run.output_dir,
                                                       args.threads)}
            if method.name == "svd":
                row["rank"] = max(r or 0 for r in served.ranks)
            variant = FormatTables(model, served, method.name).eval()
            row.update(exp.score(variant))
            if item.fields["timed"]:
                columns, guard = exp.guard.guarded(lambda: against_dense(exp, "lookup", {
                    v.label: lambda v=v: v.embed(exp.batch.offsets, exp.batch.indices)
                    for v in (dense, variant)}, method.name))
                row.update(columns, **guard)
            return row

        def describe(item, rows):
            return f"{item.fields['method']} {item.fields['setting']}: " + (
                f"skipped ({rows[0]['skipped']})" if "skipped" in rows[0] else
                f"{rows[0]['bytes_ratio']:.3f} of dense, AUC {rows[0]['roc_auc']:.4f}")

        result = run.sweep(items, compute, tables=[FRONT], label="compressions",
                           key_columns=["method", "setting"], describe=describe,
                           start=exp.plan_timing(
                               lambda item: [exp.first_rounds_s(2)] * item.fields["timed"]))
        asked = [m for m in methods if isinstance(m, str)]
        memory = run.output_dir / MEMORY_CSV
        if asked and not memory.is_file() and run.is_main:
            print(f"note: {', '.join(asked)} skipped: no {MEMORY_CSV} in the output folder "
                  "(run evaluate_memory_savings.py first)")
        run.finish(result, [FRONT], summary=summary,
                   derive=lambda df: add_front(df, memory, exp.inputs.metadata, asked),
                   plot=Figure(plot_compression_front, "compression_front.png"))
        if run.is_main:
            print(exp.timing_summary())
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
