"""Experiment 4, memory savings: what pruned embedding tables cost in RAM, in every format.

For every pruned model of sparse_model_metadata.csv and every storage format (see
dlrm_sparsity/formats.py: dense, coo, csr (int32 indices), csr_int64, row_pruned, and with
FBGEMM int8, int4 and row_pruned_int8), the tables are built in that format one at a time
and measured: the exact
bytes of every tensor the format keeps, and their ratio to the dense float32 tables; the
embedding stage's time on the timed test batch (experiment 3's harness) and, at
--forward-levels, the whole forward with that format. Lossless formats must give the dense
pruned model's outputs on that batch (within 1e-5); lossy (quantized) ones are scored on the
whole test split. A format larger than the dense tables is counted table by table but never
held whole, nor timed: nobody would serve it, and holding it could take several times the
model's memory. Writes sparse_model_memory.csv and memory_savings.png.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from torch import nn

import evaluate_disk_savings
from dlrm_forward_time import (
    AGREEMENT_TOLERANCE,
    measure,
    steady_cpu_allocator,
    trim_heap,
)
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo.data import Batch, load_split, tensors_fingerprint
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.evaluation import AUC_DROP_BUDGETS, quality_metrics, score_split, within_budget
from dlrm_sparsity.formats import FORMATS, NEEDS_FBGEMM, fbgemm_available, hold
from dlrm_sparsity.inputs import metadata_item, resolve_inputs
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.plots import plot_memory_savings
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.cli import (
    add_data_args,
    add_metadata_arg,
    add_run_args,
    add_timing_args,
    make_parser,
)
from dlrm_sparsity.runner.outputs import KEY_COLUMNS, read_metadata
from dlrm_sparsity.runner.session import Session
from dlrm_sparsity.runner.sweep import Table
from sparse_utils import LARGE_MODEL_BYTES

MEMORY = Table("sparse_model_memory.csv", KEY_COLUMNS + [
    "format", "bytes", "bytes_ratio", "lookup_median_s", "lookup_iqr_s", "forward_median_s",
    "forward_iqr_s", "max_abs_diff", "roc_auc", "quality_source", "auc_drop_vs_dense",
    "auc_drop_vs_level0"])


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for sparse_model_memory.csv and memory_savings.png")
    p.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                   help=f"storage formats, of {', '.join(FORMATS)} (default: all; those "
                        "needing FBGEMM are then skipped with a notice when it is not "
                        "installed, while naming one is an error)")
    add_timing_args(p, min_run_time=0.02, why="; a tenth of experiment 3's (still at least 3 "
                    "runs each), so that 60 models x 8 formats fit in minutes")
    p.add_argument("--forward-levels", nargs="+", default=["0.0", "0.5", "0.9", "1.0"],
                   metavar="LEVEL", help="levels whose whole forward is timed in every format "
                   "('all' for every row)")
    return p.parse_args(argv)


def chosen_formats(asked: list[str] | None, device: torch.device) -> list[str]:
    names = asked or list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserInputError(f"--formats: unknown format {unknown[0]!r}; expected some of "
                             f"{', '.join(FORMATS)}")
    missing = [n for n in names if n in NEEDS_FBGEMM] if not fbgemm_available(device) else []
    if asked and missing:
        raise UserInputError(f"--formats {missing[0]}: needs FBGEMM, which is not installed "
                             f"for {device.type} (fbgemm-gpu-cpu on a CPU, fbgemm-gpu on CUDA)")
    if missing:
        print(f"note: {', '.join(n for n in names if n in NEEDS_FBGEMM)} skipped: FBGEMM is "
              f"not installed for {device.type} (fbgemm-gpu-cpu on a CPU, fbgemm-gpu, of the "
              "release that matches torch, on CUDA)")
        names = [n for n in names if n not in NEEDS_FBGEMM]
    return list(dict.fromkeys(names))


class FormatModel(nn.Module):
    """A DLRM whose embedding stage reads its tables in one storage format."""

    def __init__(self, model: DLRMNet, tables):
        super().__init__()
        self.model, self.tables = model, tables

    def embed(self, offsets: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        return self.tables.embed(offsets, indices)  # K x (B, d)

    def forward(self, dense_x, offsets, indices) -> torch.Tensor:
        x = self.model.bottom(dense_x)
        return self.model.top_l(self.model.interact(x, self.embed(offsets, indices)))


def measure_format(name: str, model: DLRMNet, batch: Batch, reference: torch.Tensor,
                   score: Callable[[nn.Module], dict], dense_bytes: int, timed_forward: bool,
                   threads: int, min_run_time: float) -> dict:
    """One format's row; score(model) gives a model's metrics on the whole test split."""
    cls = FORMATS[name]
    tables = [bag.weight.detach() for bag in model.emb_l]
    held, nbytes = hold(cls, tables, dense_bytes)
    row = {"format": name, "bytes": nbytes, "bytes_ratio": nbytes / dense_bytes,
           "lossy": cls.lossy, "held": held is not None}
    if held is None:
        return row
    served = FormatModel(model, held).eval()
    with torch.inference_mode():
        row["max_abs_diff"] = float((served(batch.dense, batch.offsets, batch.indices)
                                     - reference).abs().max())
    if not cls.lossy and not row["max_abs_diff"] <= AGREEMENT_TOLERANCE:
        raise RuntimeError(f"format {name}: outputs differ from the dense model's by "
                           f"{row['max_abs_diff']:.3g} (> {AGREEMENT_TOLERANCE})")
    # hundreds of short measurements: a warm-up as long as the timing itself (at least two
    # calls) and fixed blocks (see measure), or measuring would be most of the run
    lookup = measure(lambda: served.embed(batch.offsets, batch.indices), name, threads,
                     min_run_time, warmup_s=min_run_time, fixed_blocks=True)
    row.update(lookup_median_s=lookup.median, lookup_iqr_s=lookup.iqr)
    if timed_forward:
        whole = measure(lambda: served(batch.dense, batch.offsets, batch.indices), name,
                        threads, min_run_time, warmup_s=min_run_time, fixed_blocks=True)
        row.update(forward_median_s=whole.median, forward_iqr_s=whole.iqr)
    if cls.lossy:
        row.update(score(served), quality_source="scored in this format")
    return row


def add_drops(df: pd.DataFrame) -> pd.DataFrame:
    """AUC drops against the dense format of the same model and of the config's level 0."""
    if "format" not in df:  # every model failed: error rows only
        return df
    df = df.copy()
    dense = df[df["format"] == "dense"].set_index(KEY_COLUMNS)["roc_auc"]
    if dense.empty:
        return df
    same_model = [dense.get(tuple(r[c] for c in KEY_COLUMNS)) for r in df.to_dict("records")]
    level0 = [dense.get((r["norm"], r["sparse_block_shape"], 0.0))
              for r in df.to_dict("records")]
    df["auc_drop_vs_dense"] = pd.Series(same_model, index=df.index, dtype=float) - df["roc_auc"]
    df["auc_drop_vs_level0"] = pd.Series(level0, index=df.index, dtype=float) - df["roc_auc"]
    return df


def crossover(df: pd.DataFrame, fmt: str) -> list[str]:
    """Per config, the lowest level from which a format holds fewer bytes than dense."""
    lines = []
    for (norm, block), part in df[df["format"] == fmt].groupby(["norm", "sparse_block_shape"]):
        smaller = part[part["bytes_ratio"] < 1.0]["sparsity_level"]
        lines.append(f"{norm} {block}: {fmt} smaller than dense from level "
                     f"{smaller.min():g}" if len(smaller) else f"{norm} {block}: {fmt} never "
                     "smaller than dense")
    return lines


def summary(df: pd.DataFrame) -> str:
    table = df.pivot_table(index="sparsity_level", columns="format", values="bytes_ratio")
    lines = [table.to_string(float_format="{:.3f}".format), "(bytes / dense float32 tables, "
             "mean over configs)"]
    for fmt in ("csr", "csr_int64", "coo"):
        lines += crossover(df, fmt)
    cost = df.pivot_table(index=KEY_COLUMNS, columns="format", values="lookup_median_s")
    if "dense" in cost:
        lines.append("lookup time / dense, median over models: " + ", ".join(
            f"{f} {(cost[f] / cost['dense']).median():.2f}x" for f in cost.columns))
    for budget in AUC_DROP_BUDGETS:
        ok = within_budget(df, budget, "auc_drop_vs_level0")
        if ok.empty:
            lines.append(f"AUC drop <= {budget}: no scored model within budget")
            continue
        best = ok.loc[ok["bytes"].idxmin()]
        lines.append(f"AUC drop <= {budget}: smallest in memory is {best['norm']} "
                     f"{best['sparse_block_shape']} at level {best['sparsity_level']:g} stored "
                     f"as {best['format']}: {best['bytes'] / 2**20:.2f} MiB "
                     f"({best['bytes_ratio']:.3f} of dense), AUC {best['roc_auc']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        formats = chosen_formats(args.formats, run.device)
        forward_levels = (None if args.forward_levels == ["all"]
                          else {float(x) for x in args.forward_levels})
        steady = run.device.type == "cpu" and steady_cpu_allocator()
        inputs = resolve_inputs(args.raw_data_file, args.processed_data_file, args.metadata,
                                run.output_dir, args.skip_bad_lines, run.ctx)
        evaluate_disk_savings.ensure_metadata(inputs, run.output_dir, args.device)
        metadata = read_metadata(inputs.metadata).to_dict("records")
        test = load_split(inputs.processed, inputs.raw, "test")
        batch = next(test.to(run.device).batches(args.batch_size))
        determinants = {"test": test.fingerprint(), "formats": formats,
                        "timed_batch": tensors_fingerprint(batch.dense, batch.indices),
                        "threads": args.threads, "min_run_time": args.min_run_time,
                        "steady_malloc": steady, "device": run.environment()["device"]}
        test = test.to(run.device)
        labels = test.labels.cpu().numpy()

        def score(module: nn.Module) -> dict:
            return quality_metrics(labels, score_split(module, test, len(batch.labels)))

        shared = {"batch_size": len(batch.labels), "steady_malloc": steady,
                  **run.environment(), "num_threads": args.threads}

        def timed(meta) -> bool:
            return forward_levels is None or float(meta["sparsity_level"]) in forward_levels

        items = [metadata_item(m, {**determinants, "forward": timed(m)}, **shared)
                 for m in metadata]

        def compute(item):
            path = item.payload["checkpoint"]
            model = DLRMNet.from_state_dict(load_dlrm_state_dict(path)).to(run.device).eval()
            test.check_fits(model.config.table_sizes, path)
            dense_bytes = sum(bag.weight.nbytes for bag in model.emb_l)
            with torch.inference_mode():
                reference = model(batch.dense, batch.offsets, batch.indices)
            dense = score(model)
            rows = []
            for f in formats:
                rows.append(measure_format(f, model, batch, reference, score, dense_bytes,
                                           timed(item.payload), args.threads,
                                           args.min_run_time))
                if dense_bytes > LARGE_MODEL_BYTES:  # freed tables must not stay resident
                    trim_heap()  # under the next format's (small models: regrowing costs)
            for row in rows:  # held lossless formats give the dense model's outputs, checked
                if not row["lossy"] and row["held"]:
                    row.update(dense, quality_source="dense model (outputs agree)")
            return rows

        def describe(item, rows):
            return f"{item.fields['checkpoint']}: " + ", ".join(
                f"{r['format']} {r['bytes_ratio']:.2f}" for r in rows)

        result = run.sweep(items, compute, tables=[MEMORY], label="formats",
                           describe=describe)
        run.finish(result, [MEMORY], derive=add_drops,
                   plot=(plot_memory_savings, "memory_savings.png"), summary=summary)
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
