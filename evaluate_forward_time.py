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

import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from checkpoint_io import load_dlrm_state_dict
from cli_common import (add_data_args, add_metadata_arg, add_run_args, log_progress, make_parser,
                        positive_int, resolve_device, resolve_inputs, script_main)
from criteo_data import Batch, check_ids_fit, load_split
from distributed import DistContext
from dlrm_forward_time import (AGREEMENT_TOLERANCE, VARIANTS, check_agreement,
                               forward_fn, interaction_density, measure, stage_fns,
                               steady_cpu_allocator)
from dlrm_model import DLRMNet
from errors import UserInputError
from plotting import plot_forward_time
from results_io import (KEY_COLUMNS, ResumeState, earlier_rows, environment, read_metadata,
                        reusable, row_key, write_csv)
from sparse_utils import zero_fraction

TIMES_CSV = "dlrm_forward_time_info.csv"
STAGES_CSV = "dlrm_forward_stage_times.csv"
SEED_TIME_COLUMNS = KEY_COLUMNS + ["time_taken", "dlrm_type"]
# an earlier timing is kept only if measured on the same checkpoint in the same conditions
SAME = ("checkpoint", "checkpoint_sha256", "batch_size", "device", "num_threads", "min_run_time")


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p)
    add_metadata_arg(p)
    add_run_args(p, "folder for the two CSVs and forward_time.png")
    p.add_argument("--batch-size", type=positive_int, default=16384,
                   help="samples in the timed batch (the first test batch, as the seed)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="CPU threads for torch, recorded in the CSV (default: torch's)")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="seconds of timed runs per measurement, after a warm-up")
    p.add_argument("--no-steady-malloc", dest="steady_malloc", action="store_false",
                   help="keep glibc's dynamic mmap threshold, which makes CPU timings of "
                        "large batches jump between two modes (see dlrm_forward_time.py)")
    p.add_argument("--stage-levels", nargs="+", default=["0.0", "0.5", "0.9", "1.0"],
                   metavar="LEVEL", help="levels whose per-stage breakdown is measured "
                   "('all' for every row)")
    return p.parse_args(argv)


def time_row(meta: dict, batch: Batch, args, device, with_stages: bool) -> tuple[list, list]:
    """The two variant rows of one model, and its stage rows (if asked)."""
    sd = load_dlrm_state_dict(meta["checkpoint"])
    model = DLRMNet.from_state_dict(sd).to(device).eval()
    check_ids_fit(batch.indices, model.config.table_sizes, meta["checkpoint"])
    diff = check_agreement(model, batch)
    if not diff <= AGREEMENT_TOLERANCE:
        raise UserInputError(f"{meta['checkpoint']}: dense and torch.sparse outputs differ by "
                             f"{diff:.3g} (> {AGREEMENT_TOLERANCE}); not timed")
    common = {"interaction_density": interaction_density(model, batch),
              "embedding_density": 1.0 - zero_fraction(sd), "max_abs_diff": diff}
    rows, stages = [], []
    for variant in VARIANTS:
        m = measure(forward_fn(model, batch, variant), variant, device, args.threads,
                    args.min_run_time)
        rows.append({"time_taken": m.mean_s, "dlrm_type": variant, "time_median_s": m.median_s,
                     "time_iqr_s": m.iqr_s, "n_runs": m.n_runs,
                     "number_per_run": m.number_per_run, **common})
    if with_stages:
        whole = {r["dlrm_type"]: r["time_median_s"] for r in rows}
        for variant, fns in stage_fns(model, batch).items():
            for stage, fn in fns.items():
                m = measure(fn, stage, device, args.threads, args.min_run_time / 2)
                stages.append({"dlrm_type": variant, "stage": stage,
                               "time_median_s": m.median_s, "time_iqr_s": m.iqr_s,
                               "n_runs": m.n_runs, "whole_forward_median_s": whole[variant]})
    return rows, stages


def previous_stage_rows(path: Path, overwrite: bool) -> dict[tuple, list[dict]]:
    """Stage rows of an earlier run, by grid key."""
    found: dict[tuple, list[dict]] = {}
    for row in [] if overwrite else earlier_rows(path):
        found.setdefault(row_key(row), []).append(row)
    return found


def sweep(metadata: list[dict], batch: Batch, args, device, stage_levels, resume: ResumeState,
          old_stages: dict[tuple, list[dict]], extra: dict, show_progress: bool
          ) -> tuple[list, list, int]:
    rows, stages, skipped = [], [], 0
    bar = tqdm(metadata, desc="timing", unit="model", disable=None if show_progress else True)
    for done, meta in enumerate(bar, 1):
        key = {c: meta[c] for c in KEY_COLUMNS}
        base = {**key, "checkpoint": meta["path"], "checkpoint_sha256": meta.get("sha256"),
                **extra}
        old = [r for r in resume.previous_rows(row_key(meta)) if reusable(r, base, SAME)]
        wants_stages = stage_levels is None or float(meta["sparsity_level"]) in stage_levels
        kept_stages = [r for r in old_stages.get(row_key(meta), []) if reusable(r, base, SAME)]
        if len(old) == len(VARIANTS) and (kept_stages or not wants_stages):
            rows += old
            stages += kept_stages if wants_stages else []
            skipped += 1
            continue
        try:
            timed, staged = time_row(meta, batch, args, device, wants_stages)
        except (UserInputError, RuntimeError) as exc:
            message = str(exc).strip().splitlines()[0]
            tqdm.write(f"error: {message}", file=sys.stderr)
            timed, staged = [{"dlrm_type": v, "error": message} for v in VARIANTS], []
        for r in timed:
            row = {**base, **r}
            resume.record(row)
            rows.append(row)
        config = f"{meta['norm']} {meta['sparse_block_shape']}"
        stages += [{**base, "config": config, **s} for s in staged]
        times = ", ".join(f"{r['dlrm_type']} {r.get('time_median_s', float('nan')) * 1e3:.2f} ms"
                          for r in timed)
        log_progress(show_progress, bar, done, len(metadata), f"{meta['path']}: {times}")
    return rows, stages, skipped


def repeatability(model_meta: dict, batch: Batch, args, device) -> str:
    """The first model's dense forward measured twice in this run: the timings' stability."""
    model = DLRMNet.from_state_dict(load_dlrm_state_dict(model_meta["checkpoint"])).to(device)
    fn = forward_fn(model, batch, VARIANTS[0])
    first, again = (measure(fn, "repeat", device, args.threads, args.min_run_time).median_s
                    for _ in range(2))
    change = abs(again - first) / first
    return (f"repeatability: {model_meta['path']} dense forward measured twice: medians "
            f"{first * 1e3:.3f} ms and {again * 1e3:.3f} ms ({change:.1%} apart)")


def summary(df: pd.DataFrame) -> str:
    ok = df[df["time_median_s"].notna()] if "time_median_s" in df else df.iloc[0:0]
    if ok.empty:
        return "no model was timed"
    table = ok.pivot_table(index="sparsity_level", columns=["norm", "sparse_block_shape",
                                                             "dlrm_type"],
                           values="time_median_s") * 1e3
    ratio = (ok[ok.dlrm_type == VARIANTS[1]]["time_median_s"].median()
             / ok[ok.dlrm_type == VARIANTS[0]]["time_median_s"].median())
    return (table.to_string(float_format="{:.2f}".format) + "\n(median ms per forward)\n"
            f"torch.sparse variant / dense: {ratio:.2f}x the time (median over models)")


def run(args, ctx: DistContext) -> int:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if ctx.enabled and device.type == "cpu" and ctx.is_main:
        print("note: under torchrun on CPUs the ranks share this machine's cores, so their "
              "timings disturb each other; time on CPUs with a single process")
    steady = device.type == "cpu" and args.steady_malloc and steady_cpu_allocator()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, processed, metadata_path = resolve_inputs(args, ctx)
    metadata = read_metadata(metadata_path).to_dict("records")
    test = load_split(processed, raw, "test", limit=args.batch_size).to(device)
    batch = next(test.batches(args.batch_size))
    stage_levels = (None if args.stage_levels == ["all"]
                    else {float(x) for x in args.stage_levels})
    extra = {"batch_size": len(batch.labels), **environment(device),
             "min_run_time": args.min_run_time, "steady_malloc": steady, "command": args.command}
    extra["num_threads"] = args.threads
    resume = ResumeState(out_dir / TIMES_CSV, ctx.rank, args.overwrite)
    old_stages = previous_stage_rows(out_dir / STAGES_CSV, args.overwrite)
    rows, stages, skipped = sweep(ctx.shard(metadata), batch, args, device, stage_levels,
                                  resume, old_stages, extra, ctx.is_main)
    rows, stages = ctx.gather(rows), ctx.gather(stages)
    skipped = sum(ctx.gather([skipped]))
    failed = 0
    if ctx.is_main:
        order = {row_key(m): i for i, m in enumerate(metadata)}
        rows.sort(key=lambda r: (order[row_key(r)], VARIANTS.index(r["dlrm_type"])))
        df = write_csv(rows, out_dir / TIMES_CSV, SEED_TIME_COLUMNS + [
            "time_median_s", "time_iqr_s", "n_runs", "batch_size", "device", "num_threads",
            "torch_version", "interaction_density", "embedding_density"])
        stage_df = write_csv(stages, out_dir / STAGES_CSV, KEY_COLUMNS + ["dlrm_type", "stage"])
        ok = df[df["time_median_s"].notna()] if "time_median_s" in df else df.iloc[0:0]
        if not ok.empty:
            plot_forward_time(ok, stage_df, out_dir / "forward_time.png")
        resume.log.remove()
        failed = int(len(df) - len(ok)) // len(VARIANTS)
        if skipped:
            print(f"resumed: kept the timings of {skipped} model(s) of an earlier run")
        print(summary(df))
        if not ok.empty and not ctx.enabled:
            first = ok.iloc[0].to_dict()
            meta = next(m for m in metadata if row_key(m) == row_key(first))
            print(repeatability(meta, batch, args, device))
        print(f"wrote {out_dir / TIMES_CSV}, {out_dir / STAGES_CSV} and "
              f"{out_dir / 'forward_time.png'} (batch {len(batch.labels)}, {device}, "
              f"{args.threads} threads{f', {failed} failed' if failed else ''})")
    ctx.barrier()
    return 2 if failed else 0


def main(argv=None) -> None:
    script_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
