"""Experiment 3, forward time: the dense DLRM vs the seed's torch.sparse variant, measured right.

For each pruned model of sparse_model_metadata.csv, both variants run on the first test batch
(16384 samples, as the seed), after a check that both give the same output. They are timed in
alternating rounds (warm-up first, the device synchronised before every clock reading), so
that the torch.sparse/dense ratio comes from neighbouring blocks, with a 95% interval; rounds are
added while a ratio is undecided. The machine's noise is measured at the start, and a drift
guard re-times the unpruned model around every point and measures a disturbed point again; all
of it within --time-budget.
dlrm_forward_time_info.csv holds the seed's columns (time_taken is the mean) plus median, IQR,
rounds, the ratio and its interval, the guard's columns, and the densities of the embeddings
and of the interaction output. A per-stage breakdown
(bottom MLP, embedding lookups, interaction, COO conversion, top MLP) at chosen levels of the
first config (the one plotted) goes to dlrm_forward_stage_times.csv; forward_time.png plots
both.

With no arguments it runs on the demo (running the disk-savings step first if needed).
"""

from __future__ import annotations

import pandas as pd

from dlrm_sparsity.analysis import noise_note, verdict_counts
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.experiment import Experiment
from dlrm_sparsity.plots import plot_forward_time
from dlrm_sparsity.pruning import zero_fraction
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
from dlrm_sparsity.timing import AGREEMENT_TOLERANCE, Timing, measure, timing_columns
from dlrm_sparsity.variants import (
    DENSE,
    SPARSE,
    Dense,
    TorchSparseTop,
    interaction_density,
    max_difference,
    stage_calls,
)

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
    add_timing_args(p, min_run_time=0.3, time_budget=90.0)
    p.add_argument("--no-steady-malloc", dest="steady_malloc", action="store_false",
                   help="keep glibc's dynamic mmap threshold (CPU timings then jump)")
    p.add_argument("--stage-levels", nargs="+", default=["0.0", "0.5", "0.9", "1.0"],
                   metavar="LEVEL", help="levels whose stage breakdown is measured ('all': "
                   "every row)")
    p.add_argument("--stage-configs", choices=("first", "all"), default="first",
                   help="configs whose stage breakdown is measured: the metadata's first (the "
                        "one forward_time.png draws) or all")
    return p.parse_args(argv)


STAGE_CALLS = 9  # what stage_calls yields: 4 stages of the dense forward, 5 of torch.sparse's
STAGE_RUN_TIME = 0.5  # a stage's timed calls, as a share of --min-run-time


def time_model(exp: Experiment, meta: dict, with_stages: bool) -> tuple[list[dict], list[dict]]:
    """The rows of one model: one per variant, and one per stage if asked."""
    model, batch, timing = exp.model(meta), exp.batch, exp.timing
    variants = [Dense(model), TorchSparseTop(model)]
    diff = max_difference(*variants, batch)
    if not diff <= AGREEMENT_TOLERANCE:
        raise UserInputError(f"{meta['checkpoint']}: dense and torch.sparse outputs differ by "
                             f"{diff:.3g} (> {AGREEMENT_TOLERANCE}); not timed")
    common = {"interaction_density": interaction_density(model, batch),
              "embedding_density": 1.0 - zero_fraction(model.state_dict()),
              "max_abs_diff": diff}
    paired, guarded = exp.time_point({v.label: v.on(batch) for v in variants}, DENSE,
                                     called=1)  # the agreement check made each one's first call
    rows = [{"time_taken": paired.mean(v.label), "dlrm_type": v.label,
             **paired.columns(v.label, None if v.label == DENSE else DENSE), **common,
             **guarded} for v in variants]
    whole = {r["dlrm_type"]: r["time_median_s"] for r in rows}
    if not with_stages:
        return rows, []
    stage_timing = Timing(timing.threads, timing.min_run_time * STAGE_RUN_TIME,
                          min(timing.warmup_s, timing.min_run_time * STAGE_RUN_TIME))
    config = f"{meta['norm']} {meta['sparse_block_shape']}"
    stages = exp.timed_unit(exp.first_rounds_s(STAGE_CALLS, STAGE_RUN_TIME), lambda _: [
        {"dlrm_type": variant, "stage": stage, "config": config,
         **timing_columns(measure(call, stage, stage_timing)),
         "whole_forward_median_s": whole[variant]}
        for variant, stage, call in stage_calls(model, batch)])
    return rows, stages


def timing_units(exp: Experiment, staged: bool) -> list[float]:
    """A model's measurements for the budget: the paired rounds, and the stages if asked."""
    return [exp.first_rounds_s(2)] + ([exp.first_rounds_s(STAGE_CALLS, STAGE_RUN_TIME)]
                                      if staged else [])


def summary(times: pd.DataFrame, stages: pd.DataFrame) -> str:
    table = times.pivot_table(index="sparsity_level", values="time_median_s",
                              columns=["norm", "sparse_block_shape", "dlrm_type"]) * 1e3
    sparse = times[times["dlrm_type"] == SPARSE]
    dense = times[times["dlrm_type"] == DENSE]["time_median_s"]
    return "\n".join([
        table.to_string(float_format="{:.2f}".format), "(median ms per forward)",
        f"torch.sparse / dense, per model (95% intervals over rounds): median "
        f"{sparse['ratio'].median():.2f}x; {verdict_counts(sparse)} of {len(sparse)}"
        f"{noise_note(times)}",
        f"the dense forward (the same computation at every level): median "
        f"{dense.median() * 1e3:.2f} ms, max/min {dense.max() / dense.min():.2f} over "
        f"{len(dense)} models",
        *disturbed_points(times)])


def disturbed_points(times: pd.DataFrame) -> list[str]:
    flagged = times[times["disturbed"].eq(True) & times["dlrm_type"].eq(DENSE)]
    return [f"disturbed (kept, flagged): {r['norm']} {r['sparse_block_shape']} level "
            f"{r['sparsity_level']:g}, reference {r['reference_drift']:.0%} off"
            for r in flagged.to_dict("records")]


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        if run.ctx.enabled and run.device.type == "cpu" and run.is_main:
            print("note: under torchrun on CPUs the ranks share this machine's cores, so "
                  "their timings disturb each other; time on CPUs with a single process")
        exp = Experiment(run, args, test_limit=args.batch_size)
        stage_levels = (None if args.stage_levels == ["all"]
                        else {float(x) for x in args.stage_levels})
        first = exp.metadata[0] if exp.metadata else {}

        def staged(meta) -> bool:
            same_config = all(meta[c] == first[c] for c in ("norm", "sparse_block_shape"))
            return ((stage_levels is None or float(meta["sparsity_level"]) in stage_levels)
                    and (args.stage_configs == "all" or same_config))

        def describe(item, rows):
            return f"{item.fields['checkpoint']}: " + ", ".join(
                f"{r['dlrm_type']} {r['time_median_s'] * 1e3:.2f} ms" for r in rows)

        result = run.sweep(exp.items(exp.metadata), lambda item: time_model(
                               exp, item.payload, staged(item.payload)),
                           tables=[TIMES, STAGES], label="timing", describe=describe,
                           # a model timed without stages lacks them
                           still_valid=lambda item, old: bool(old[1]) or not staged(item.payload),
                           start=exp.plan_timing(lambda item: timing_units(
                               exp, staged(item.payload))))
        result.tables[1] = [r for r in result.tables[1] if staged(r)]  # the levels asked for
        run.finish(result, [TIMES, STAGES], plot=Figure(plot_forward_time, "forward_time.png"),
                   summary=summary)
        if run.is_main:
            print(exp.timing_summary())
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
