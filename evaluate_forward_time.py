"""Experiment 3, forward time: the dense DLRM vs the seed's torch.sparse variant, measured right.

For each pruned model of sparse_model_metadata.csv, both variants run on the first test batch
(16384 samples, as the seed). Each is timed with torch.utils.benchmark (warm-up, blocked runs,
device synchronised before every clock reading) after checking that both give the same output.
dlrm_forward_time_info.csv holds the seed's columns (time_taken is the mean) plus median, IQR,
runs, and the densities of the embeddings and of the interaction output. A per-stage breakdown
(bottom MLP, embedding lookups, interaction, COO conversion, top MLP) for chosen levels goes to
dlrm_forward_stage_times.csv; forward_time.png plots both.

With no arguments it runs on the demo (running the disk-savings step first if needed).
"""

from __future__ import annotations

import pandas as pd
import torch

import evaluate_disk_savings
from dlrm_forward_time import (
    AGREEMENT_TOLERANCE,
    VARIANTS,
    check_agreement,
    forward_fn,
    interaction_density,
    measure,
    stage_fns,
    steady_cpu_allocator,
    timing_columns,
)
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.criteo.data import Batch, check_ids_fit, load_split, tensors_fingerprint
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.inputs import metadata_item, resolve_inputs
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.plots import plot_forward_time
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
from sparse_utils import zero_fraction

TIMES = Table("dlrm_forward_time_info.csv", KEY_COLUMNS + [
    "time_taken", "dlrm_type",  # the seed's; time_taken is the mean
    "time_median_s", "time_iqr_s", "n_runs", "batch_size", "device", "num_threads",
    "torch_version", "interaction_density", "embedding_density"])
STAGES = Table("dlrm_forward_stage_times.csv", KEY_COLUMNS + ["dlrm_type", "stage"])


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for the two CSVs and forward_time.png")
    add_timing_args(p, min_run_time=0.2)
    p.add_argument("--no-steady-malloc", dest="steady_malloc", action="store_false",
                   help="keep glibc's dynamic mmap threshold, which makes CPU timings of "
                        "large batches jump between two modes (see dlrm_forward_time.py)")
    p.add_argument("--stage-levels", nargs="+", default=["0.0", "0.5", "0.9", "1.0"],
                   metavar="LEVEL", help="levels whose per-stage breakdown is measured "
                   "('all' for every row)")
    return p.parse_args(argv)


def time_model(path: str, batch: Batch, threads: int, min_run_time: float,
               with_stages: bool, config: str) -> tuple[list[dict], list[dict]]:
    """The rows of one model: one per variant, and one per stage if asked."""
    sd = load_dlrm_state_dict(path)
    model = DLRMNet.from_state_dict(sd).to(batch.dense.device).eval()
    check_ids_fit(batch.indices, model.config.table_sizes, path)
    diff = check_agreement(model, batch)
    if not diff <= AGREEMENT_TOLERANCE:
        raise UserInputError(f"{path}: dense and torch.sparse outputs differ by {diff:.3g} "
                             f"(> {AGREEMENT_TOLERANCE}); not timed")
    common = {"interaction_density": interaction_density(model, batch),
              "embedding_density": 1.0 - zero_fraction(sd), "max_abs_diff": diff}
    rows, stages = [], []
    for variant in VARIANTS:
        m = measure(forward_fn(model, batch, variant), variant, threads, min_run_time)
        rows.append({"time_taken": m.mean, "dlrm_type": variant, **timing_columns(m), **common})
    whole = {r["dlrm_type"]: r["time_median_s"] for r in rows}
    for variant, stage, fn in stage_fns(model, batch) if with_stages else ():
        m = measure(fn, stage, threads, min_run_time / 2)
        stages.append({"dlrm_type": variant, "stage": stage, "config": config,
                       **timing_columns(m), "whole_forward_median_s": whole[variant]})
    return rows, stages


def summary(times: pd.DataFrame, stages: pd.DataFrame) -> str:
    table = times.pivot_table(index="sparsity_level", values="time_median_s",
                              columns=["norm", "sparse_block_shape", "dlrm_type"]) * 1e3
    median = times.groupby("dlrm_type")["time_median_s"].median()
    return (table.to_string(float_format="{:.2f}".format) + "\n(median ms per forward)\n"
            f"torch.sparse variant / dense: {median[VARIANTS[1]] / median[VARIANTS[0]]:.2f}x "
            "the time (median over models)")


def repeatability(path: str, batch: Batch, threads: int, min_run_time: float) -> str:
    """The first model's dense forward measured twice more: the timings' stability."""
    model = DLRMNet.from_state_dict(load_dlrm_state_dict(path)).to(batch.dense.device).eval()
    fn = forward_fn(model, batch, VARIANTS[0])
    first, again = (measure(fn, "repeat", threads, min_run_time).median for _ in range(2))
    return (f"repeatability: {path} dense forward measured twice: medians "
            f"{first * 1e3:.3f} ms and {again * 1e3:.3f} ms "
            f"({abs(again - first) / first:.1%} apart)")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        if run.ctx.enabled and run.device.type == "cpu" and run.is_main:
            print("note: under torchrun on CPUs the ranks share this machine's cores, so "
                  "their timings disturb each other; time on CPUs with a single process")
        steady = run.device.type == "cpu" and args.steady_malloc and steady_cpu_allocator()
        inputs = resolve_inputs(args.raw_data_file, args.processed_data_file, args.metadata,
                                run.output_dir, args.skip_bad_lines, run.ctx)
        evaluate_disk_savings.ensure_metadata(inputs, run.output_dir, args.device)
        metadata = read_metadata(inputs.metadata).to_dict("records")
        test = load_split(inputs.processed, inputs.raw, "test", limit=args.batch_size)
        batch = next(test.to(run.device).batches(args.batch_size))
        stage_levels = (None if args.stage_levels == ["all"]
                        else {float(x) for x in args.stage_levels})
        env = run.environment()
        shared = {"batch_size": len(batch.labels), "min_run_time": args.min_run_time,
                  "steady_malloc": steady, **env, "num_threads": args.threads}
        measured_in = {k: v for k, v in shared.items() if k != "command"}
        data = tensors_fingerprint(batch.dense, batch.indices, batch.labels)

        def staged(meta) -> bool:
            return stage_levels is None or float(meta["sparsity_level"]) in stage_levels

        items = [metadata_item(m, {**measured_in, "data": data}, **shared) for m in metadata]

        def compute(item):
            meta = item.payload
            return time_model(meta["checkpoint"], batch, args.threads, args.min_run_time,
                              staged(meta), f"{meta['norm']} {meta['sparse_block_shape']}")

        def describe(item, rows):
            return f"{item.fields['checkpoint']}: " + ", ".join(
                f"{r['dlrm_type']} {r['time_median_s'] * 1e3:.2f} ms" for r in rows)

        result = run.sweep(items, compute, tables=[TIMES, STAGES], label="timing",
                           describe=describe,  # a model timed without stages lacks them
                           still_valid=lambda item, old: bool(old[1]) or not staged(item.payload))
        result.tables[1] = [r for r in result.tables[1] if staged(r)]  # the levels asked for
        run.finish(result, [TIMES, STAGES], plot=(plot_forward_time, "forward_time.png"),
                   summary=summary)
        refresh_report(run.output_dir, args.report, run.is_main)
        timed = [r for r in result.tables[0] if "time_median_s" in r]
        if run.is_main and timed and not run.ctx.enabled:
            first = next(m for m in metadata if m["path"] == timed[0]["checkpoint"])
            print(repeatability(first["checkpoint"], batch, args.threads, args.min_run_time))


if __name__ == "__main__":
    main()
