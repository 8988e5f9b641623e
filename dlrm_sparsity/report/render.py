"""The report's page: header, answer, trade-offs, one section per experiment, failures; and
writing it, with its figures, into the report's folder only."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from pathlib import Path

from dlrm_sparsity.analysis import AUC_DROP_BUDGETS, CONFIG
from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.model import DLRMConfig
from dlrm_sparsity.plots import pareto_front, plot_tradeoffs
from dlrm_sparsity.report.answer import answer
from dlrm_sparsity.report.results import EXPERIMENTS, Results
from dlrm_sparsity.report.sections import SECTIONS, stability_section
from dlrm_sparsity.runner.atomic import atomic_path

TRADEOFFS = "report_tradeoffs.png"


def shown_path(path: str, base: Path) -> str:
    """A file as seen from base, so that no machine's layout is printed."""
    try:
        return os.path.relpath(str(path), base)
    except ValueError:  # another drive
        return str(path)


def architecture(model_path: str) -> list[str]:
    """Table sizes and parameter count, read from the checkpoint's state dict (mapped, so a
    large model is not read in); nothing when the file is not where the CSV says."""
    if not Path(model_path).exists():  # a file, or a torchsnapshot or DCP folder
        return []
    try:
        sd = load_dlrm_state_dict(model_path, mmap=True)
    except UserInputError:
        return []
    config = DLRMConfig.from_state_dict(sd)
    sizes = ", ".join(f"{n:,}" for n in config.table_sizes)
    cross = (f", a cross net of {config.cross_layers} layers of rank {config.cross_rank}"
             if config.cross_layers else "")
    return [f"- **Kind**: {config.kind}{cross}",
            f"- **Tables**: {len(config.table_sizes)} of width {config.embedding_dim} "
            f"({sizes} rows); {sum(t.numel() for t in sd.values()):,} parameters; MLPs "
            f"{'-'.join(map(str, config.bottom_mlp))} and {'-'.join(map(str, config.top_mlp))}"]


def header(results: Results, report_dir: Path) -> list[str]:
    lines = [f"Made {datetime.datetime.now():%Y-%m-%d %H:%M} from the CSVs of "
             f"`{shown_path(str(results.folder), report_dir)}` (seen from this report); the "
             "files below are named relative to that folder.", ""]
    disk = results.rows.get("disk")
    if disk is not None and "model_path" in disk:
        model = shown_path(disk["model_path"].iloc[0], results.folder)
        sha = disk["model_sha256"].iloc[0] if "model_sha256" in disk else "not recorded"
        lines.append(f"- **Model**: `{model}` (sha256 {sha})")
        if "dense_size_bytes" in disk:
            lines.append(f"- **Model size**: {disk['dense_size_bytes'].iloc[0] / 2**20:.2f} MB "
                         "of tensors")
        lines += architecture(str(disk["model_path"].iloc[0]))
    quality = results.rows.get("quality")
    if quality is not None and "n_samples" in quality:
        data = (shown_path(quality["processed_data_file"].iloc[0], results.folder)
                if "processed_data_file" in quality else "not recorded")
        lines.append(f"- **Data**: `{data}`, {int(quality['n_samples'].iloc[0]):,} test samples")
    envs = set()
    for df in results.rows.values():
        if {"device", "torch_version"} <= set(df.columns):
            envs |= {f"{d}, torch {t}" for d, t in zip(df["device"], df["torch_version"],
                                                       strict=True)}
    if envs:
        lines.append(f"- **Measured on**: {'; '.join(sorted(envs))}")
    lines.append("- **Commands**:")
    for exp in EXPERIMENTS:
        df = results.rows.get(exp.name)
        if df is not None and "command" in df:
            for command in df["command"].dropna().unique():
                lines.append(f"  - `{exp.csv}`: `{command}`")
    return lines


def failures(results: Results) -> list[str]:
    lines = []
    for exp in EXPERIMENTS:
        df = results.rows.get(exp.name)
        if df is None or "error" not in df:
            continue
        for row in df[df["error"].notna()].to_dict("records"):
            where = ", ".join(f"{k} {row[k]}" for k in CONFIG + ["sparsity_level", "method",
                                                              "setting"]
                              if k in row and pd.notna(row[k]))
            lines.append(f"- `{exp.csv}` ({where}): {row['error']}")
    return lines


def tradeoffs(results: Results) -> tuple[list[str], pd.DataFrame | None]:
    """The trade-off section's text, and the scored rows its figure plots (None: no figure)."""
    scored = results.scored_with_size()
    if scored is None or "zip_file_size" not in scored or scored["zip_file_size"].isna().all():
        return [], None
    memory = results.ok("compression")
    memory = memory if memory is not None else results.ok("memory")
    activation = results.ok("activation")
    text = ("ROC AUC against the zipped size (the Pareto front marked: no other point is both "
            "smaller and better)" + (", against the bytes held in memory (every compression "
                                     "method where the compression front ran)"
                                     if memory is not None else "")
            + (", and against the forward time with activation sparsity"
               if activation is not None else "") + ".")
    return (["## Trade-offs", "", text, "", f"![trade-offs]({TRADEOFFS})", ""],
            scored.dropna(subset=["zip_file_size", "roc_auc"]))


def build(results: Results, budgets: tuple[float, ...], report_dir: Path
          ) -> tuple[str, pd.DataFrame | None, list[str]]:
    """The report's Markdown, the rows of its trade-off figure (None: none), and the
    experiments' figures it shows (file names in the results' folder)."""
    title = "Pruning report"
    disk = results.rows.get("disk")
    if disk is not None and "model_path" in disk:
        title += f": {Path(str(disk['model_path'].iloc[0])).name}"
    parts = [f"# {title}", "", *header(results, report_dir), "", "## The answer", "",
             *answer(results, budgets)]
    tradeoff_text, sized = tradeoffs(results)
    parts += tradeoff_text
    missing, figures = [], []
    for exp in EXPERIMENTS:
        good = results.ok(exp.name)
        if good is None:
            missing.append(exp)
            continue
        heading, section = SECTIONS[exp.name]
        parts += [f"## {heading}", "", *section(good), ""]
        if (results.folder / exp.png).is_file():
            figures.append(exp.png)
            parts += [f"![{heading}]({exp.png})", ""]
    stability = stability_section(results)
    if stability:
        parts += ["## Timing stability", "", "Every timed experiment measures the machine's "
                  "noise at its start (a fixed reference, the unpruned model's dense forward, "
                  "read for a few seconds), then re-times the reference around each point and "
                  "measures a point again while it reads slower than its median by more than "
                  "the margin, within its share of the run's time budget (drift guard):", "",
                  *stability, ""]
    failed = failures(results)
    if failed:
        parts += ["## Rows that failed", "", *failed, ""]
    if missing:
        parts += ["## Not in this report", ""]
        parts += [f"- {exp.name}: no rows in `{exp.csv}` (run `python3 {exp.script}`)"
                  for exp in missing]
        parts.append("")
    return "\n".join(parts), sized, figures


def write_report(folder: str | os.PathLike, budgets: tuple[float, ...] = AUC_DROP_BUDGETS,
                 report_dir: str | os.PathLike | None = None) -> Path | None:
    """report.md and its figures in report_dir (default: folder) for the CSVs in folder;
    None when there are none. Nothing is written outside report_dir."""
    folder = Path(folder)
    results = Results.read(folder)
    if not results.rows:
        return None
    report_dir = Path(report_dir) if report_dir else folder
    report_dir.mkdir(parents=True, exist_ok=True)
    text, sized, figures = build(results, budgets, report_dir)
    if sized is not None:
        compression = results.ok("compression")
        plot_tradeoffs(sized, pareto_front(sized, "zip_file_size"),
                       compression if compression is not None else results.ok("memory"),
                       results.ok("activation"), report_dir / TRADEOFFS)
    if report_dir.resolve() != folder.resolve():
        for name in figures:
            shutil.copyfile(folder / name, report_dir / name)
    path = report_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def refresh_report(output_dir: Path, enabled: bool, is_main: bool) -> None:
    """What each experiment script does at its end: bring report.md up to date. The
    experiment's own outputs are written by then, so a report that cannot be made is a
    one-line warning, not a failure."""
    if not (enabled and is_main):
        return
    try:
        path = write_report(output_dir)
    except Exception as exc:  # the report must never cost the experiment's results
        print(f"warning: report.md not refreshed ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return
    if path is not None:
        print(f"refreshed {path}")
