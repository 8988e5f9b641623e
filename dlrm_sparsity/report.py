"""The report: one page that tells a user which pruning to ship, from whatever CSVs exist.

Every number comes from the experiments' CSVs (rounded only for reading); every sentence is
generated from them. Experiments that have not run, and rows that failed, are named.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dlrm_sparsity.checkpoints import load_dlrm_state_dict
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.evaluation import AUC_DROP_BUDGETS, within_budget
from dlrm_sparsity.model import DLRMConfig
from dlrm_sparsity.plots import pareto_front, plot_tradeoffs
from dlrm_sparsity.runner.atomic import atomic_path
from dlrm_sparsity.runner.sweep import ok_rows

CONFIG = ["norm", "sparse_block_shape"]
DENSE_TYPE, SPARSE_TYPE = "without_torch_sparse", "with_torch_sparse"


@dataclass(frozen=True)
class Experiment:
    name: str
    script: str
    csv: str
    png: str


EXPERIMENTS = (
    Experiment("disk", "evaluate_disk_savings.py", "sparse_model_metadata.csv",
               "disk_savings.png"),
    Experiment("quality", "evaluate_model_metrics.py", "sparse_model_metrics.csv",
               "accuracy.png"),
    Experiment("forward", "evaluate_forward_time.py", "dlrm_forward_time_info.csv",
               "forward_time.png"),
    Experiment("memory", "evaluate_memory_savings.py", "sparse_model_memory.csv",
               "memory_savings.png"),
    Experiment("activation", "evaluate_activation_sparsity.py", "activation_sparsity.csv",
               "activation_sparsity.png"),
)


@dataclass
class Results:
    """Each experiment's rows (all, and those without an error) from an output folder."""

    folder: Path
    rows: dict[str, pd.DataFrame] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "Results":
        found = cls(folder)
        for exp in EXPERIMENTS:
            path = folder / exp.csv
            if path.is_file():
                try:
                    found.rows[exp.name] = pd.read_csv(path)
                except (pd.errors.EmptyDataError, pd.errors.ParserError):
                    continue
        return found

    def ok(self, name: str) -> pd.DataFrame | None:
        df = self.rows.get(name)
        if df is None:
            return None
        good = ok_rows(df)
        return None if good.empty else good


def config_name(norm: str, block: str) -> str:
    return f"{norm} {block}"


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if pd.isna(value) else f"{value:.{digits}f}"


def pivot(df: pd.DataFrame, value: str, digits: int, columns=CONFIG) -> str:
    """Levels as rows, configs as columns, as a Markdown table."""
    table = df.pivot_table(index="sparsity_level", columns=columns, values=value)
    heads = [" ".join(str(c) for c in (col if isinstance(col, tuple) else (col,)))
             for col in table.columns]
    lines = ["| level | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for level, row in table.iterrows():
        lines.append(f"| {level:g} | " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def quality_with_size(results: Results) -> pd.DataFrame | None:
    """Each scored model with its zip size (metrics joined with the metadata)."""
    quality, disk = results.ok("quality"), results.ok("disk")
    if quality is None:
        return None
    keys = CONFIG + ["sparsity_level"]
    if disk is None:
        return quality
    return quality.merge(disk[keys + ["zip_file_size", "zip_file_size_bytes"]], on=keys,
                         how="left")


def answer(results: Results, budgets: tuple[float, ...]) -> list[str]:
    """For each AUC budget: the highest level per config and the best point per resource."""
    scored = quality_with_size(results)
    if scored is None or "auc_drop" not in scored:
        return ["The quality experiment has not run (`evaluate_model_metrics.py`), so no "
                "pruning can be judged against an AUC budget yet.", ""]
    lines = []
    forward = results.ok("forward")
    activation = results.ok("activation")
    for budget in budgets:
        within = within_budget(scored, budget)
        lines.append(f"**AUC drop at most {budget}:**")
        for (norm, block), part in scored.groupby(CONFIG):
            ok = within_budget(part, budget)
            if ok.empty:
                lines.append(f"- {config_name(norm, block)}: no level stays within budget")
                continue
            top = ok.loc[ok["sparsity_level"].idxmax()]
            size = (f", zip {top['zip_file_size']:.2f} MB" if "zip_file_size" in ok
                    and pd.notna(top.get("zip_file_size")) else "")
            lines.append(f"- {config_name(norm, block)}: up to level "
                         f"{top['sparsity_level']:g} (AUC {top['roc_auc']:.4f}{size})")
        if "zip_file_size" in within and within["zip_file_size"].notna().any():
            best = within.loc[within["zip_file_size"].idxmin()]
            lines.append(f"- smallest zip: {config_name(best['norm'], best['sparse_block_shape'])} "
                         f"at level {best['sparsity_level']:g}, {best['zip_file_size']:.2f} MB, "
                         f"AUC {best['roc_auc']:.4f}")
        if forward is not None:
            dense = forward[forward["dlrm_type"] == DENSE_TYPE].merge(
                within[CONFIG + ["sparsity_level", "roc_auc"]], on=CONFIG + ["sparsity_level"])
            if not dense.empty:
                best = dense.loc[dense["time_median_s"].idxmin()]
                name = config_name(best["norm"], best["sparse_block_shape"])
                lines.append(f"- fastest forward: {name} at level {best['sparsity_level']:g}, "
                             f"{best['time_median_s'] * 1e3:.2f} ms (dense forward, batch "
                             f"{int(best['batch_size'])}), AUC {best['roc_auc']:.4f}")
        if activation is not None:
            lines += activation_answer(activation, budget)
        memory = results.ok("memory")
        if memory is None:
            lines.append("- smallest in memory: experiment 4 (memory savings) has not run")
        elif "auc_drop_vs_level0" in memory:
            ok = within_budget(memory, budget, "auc_drop_vs_level0")
            if not ok.empty:
                best = ok.loc[ok["bytes"].idxmin()]
                lines.append(f"- smallest in memory: "
                             f"{config_name(best['norm'], best['sparse_block_shape'])} at level "
                             f"{best['sparsity_level']:g} stored as {best['format']}, "
                             f"{best['bytes'] / 2**20:.2f} MiB ({best['bytes_ratio']:.3f} of "
                             f"the dense tables), AUC {best['roc_auc']:.4f}")
        lines.append("")
    return lines


def activation_answer(df: pd.DataFrame, budget: float) -> list[str]:
    """Per model, the highest activation level within budget of the unpruned model unmasked:
    on a pruned model, the masking's drop comes on top of the pruning's."""
    if "auc_drop_vs_level0" not in df or df["auc_drop_vs_level0"].isna().all():
        return ["- activation sparsity: no unpruned model in `activation_sparsity.csv` to "
                "measure the AUC drops against"]
    lines = []
    compact = df[df["variant"] == "compact"]
    for (norm, block, emb), part in compact.groupby(CONFIG + ["sparsity_level"]):
        ok = within_budget(part, budget, "auc_drop_vs_level0")
        if ok.empty:
            continue
        top = ok.loc[ok["activation_level"].idxmax()]
        model = "the dense model" if emb == 0.0 else f"{config_name(norm, block)} at {emb:g}"
        lines.append(f"- activation sparsity on {model}: up to level "
                     f"{top['activation_level']:g} (AUC {top['roc_auc']:.4f}, a drop of "
                     f"{top['auc_drop_vs_level0']:.4f} from the unpruned model), where the "
                     f"compact forward takes {top['time_median_s'] * 1e3:.2f} ms, "
                     f"{top['speedup_vs_dense']:.2f}x faster than the masked dense one")
    return lines


def disk_section(df: pd.DataFrame) -> list[str]:
    dense = df["dense_size_bytes"].iloc[0] / 2**20 if "dense_size_bytes" in df else None
    sentences = []
    for (norm, block), part in df.groupby(CONFIG):
        part = part.set_index("sparsity_level")
        if 0.9 in part.index and dense:
            sentences.append(f"{config_name(norm, block)} at level 0.9 zips to "
                             f"{part.loc[0.9, 'zip_file_size']:.2f} MB, "
                             f"{dense / part.loc[0.9, 'zip_file_size']:.1f}x less than the "
                             f"{dense:.2f} MB of dense tensors.")
    return ["Zipped checkpoint, MB (2^20 bytes):", "", pivot(df, "zip_file_size", 3), "",
            " ".join(sentences)]


def quality_section(df: pd.DataFrame) -> list[str]:
    sentences = []
    for (norm, block), part in df.groupby(CONFIG):
        part = part.sort_values("sparsity_level")
        first, last = part.iloc[0], part.iloc[-1]
        sentences.append(f"{config_name(norm, block)}: ROC AUC {first['roc_auc']:.4f} at level "
                         f"{first['sparsity_level']:g}, {last['roc_auc']:.4f} at level "
                         f"{last['sparsity_level']:g}.")
    samples = f" on {int(df['n_samples'].iloc[0]):,} test samples" if "n_samples" in df else ""
    return [f"ROC AUC{samples}:", "", pivot(df, "roc_auc", 4), "", " ".join(sentences)]


def forward_section(df: pd.DataFrame) -> list[str]:
    times = df.pivot_table(index=CONFIG + ["sparsity_level"], columns="dlrm_type",
                           values="time_median_s").dropna()
    if times.empty or SPARSE_TYPE not in times or DENSE_TYPE not in times:
        return ["Not enough timed rows for a comparison."]
    ratio = (times[SPARSE_TYPE] / times[DENSE_TYPE]).reset_index(name="ratio")
    sentences = []
    for (norm, block), part in ratio.groupby(CONFIG):
        part = part.sort_values("sparsity_level")
        first, last = part.iloc[0], part.iloc[-1]
        verdict = ("slower than dense at every level" if (part["ratio"] > 1).all() else
                   "faster than dense at some levels" if (part["ratio"] < 1).any() else
                   "never faster than dense")
        sentences.append(f"{config_name(norm, block)}: the torch.sparse variant is {verdict}, "
                         f"from {first['ratio']:.1f}x the time at level "
                         f"{first['sparsity_level']:g} to {last['ratio']:.1f}x at level "
                         f"{last['sparsity_level']:g}.")
    dense = df[df["dlrm_type"] == DENSE_TYPE].copy()
    dense["ms"] = dense["time_median_s"] * 1e3
    return ["Dense forward, median ms:", "", pivot(dense, "ms", 2), "", " ".join(sentences)]


def memory_section(df: pd.DataFrame) -> list[str]:
    lines = ["Bytes held by the embedding tables / dense float32 tables, mean over configs:", "",
             pivot(df, "bytes_ratio", 3, columns=["format"]), ""]
    sentences = []
    for fmt in ("csr", "csr_int64", "coo", "row_pruned"):
        part = df[(df["format"] == fmt) & (df["bytes_ratio"] < 1.0)]
        if fmt in set(df["format"]):
            sentences.append(f"{fmt} holds fewer bytes than dense from level "
                             f"{part['sparsity_level'].min():g}." if not part.empty else
                             f"{fmt} never holds fewer bytes than dense.")
    cost = df.pivot_table(index=CONFIG + ["sparsity_level"], columns="format",
                          values="lookup_median_s")
    if "dense" in cost:
        sentences.append("Lookup time against dense (median over models): " + ", ".join(
            f"{f} {(cost[f] / cost['dense']).median():.2f}x" for f in cost.columns
            if f != "dense") + ".")
    return lines + [" ".join(sentences)]


def activation_section(df: pd.DataFrame) -> list[str]:
    one = df[df["sparsity_level"] == df["sparsity_level"].min()]
    table = one.pivot_table(index="activation_level", columns="variant",
                            values="time_median_s") * 1e3
    auc = one[one["variant"] == "dense"].set_index("activation_level")["roc_auc"]
    lines = ["Least pruned model: ROC AUC and median forward ms per variant:", "",
             "| activation level | ROC AUC | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 2) + "|"]
    for level, row in table.iterrows():
        lines.append(f"| {level:g} | {fmt(auc.get(level))} | "
                     + " | ".join(fmt(v, 2) for v in row) + " |")
    compact = one[one["variant"] == "compact"].set_index("activation_level")
    faster = compact[compact["speedup_vs_dense"] > 1.0]
    if not faster.empty:
        top = compact.index.max()
        lines += ["", f"The compact forward is faster than the masked dense one at "
                      f"{len(faster)} of {len(compact)} levels, "
                      f"{compact.loc[top, 'speedup_vs_dense']:.2f}x at level {top:g}."]
    return lines


SECTIONS = {"disk": ("Disk savings", disk_section), "quality": ("Quality", quality_section),
            "forward": ("Forward time", forward_section),
            "memory": ("Memory savings", memory_section),
            "activation": ("Activation sparsity", activation_section)}


def shown_path(path: str, report_dir: Path) -> str:
    """A file as seen from the report's folder, so that no machine's layout is printed."""
    try:
        return os.path.relpath(str(path), report_dir)
    except ValueError:  # another drive
        return str(path)


def architecture(model_path: str) -> list[str]:
    """Table sizes and parameter count, read from the checkpoint's state dict (mapped, so a
    large model is not read in); nothing when the file is not where the CSV says."""
    if not Path(model_path).is_file():
        return []
    try:
        sd = load_dlrm_state_dict(model_path, mmap=True)
    except UserInputError:
        return []
    config = DLRMConfig.from_state_dict(sd)
    sizes = ", ".join(f"{n:,}" for n in config.table_sizes)
    return [f"- **Tables**: {len(config.table_sizes)} of width {config.embedding_dim} "
            f"({sizes} rows); {sum(t.numel() for t in sd.values()):,} parameters; MLPs "
            f"{'-'.join(map(str, config.bottom_mlp))} and {'-'.join(map(str, config.top_mlp))}"]


def header(results: Results, report_dir: Path) -> list[str]:
    lines = [f"Made {datetime.datetime.now():%Y-%m-%d %H:%M} from the CSVs of "
             f"`{shown_path(str(results.folder), report_dir)}`.", ""]
    disk = results.rows.get("disk")
    if disk is not None and "model_path" in disk:
        model = shown_path(disk["model_path"].iloc[0], report_dir)
        sha = disk["model_sha256"].iloc[0] if "model_sha256" in disk else "not recorded"
        lines.append(f"- **Model**: `{model}` (sha256 {sha})")
        if "dense_size_bytes" in disk:
            lines.append(f"- **Model size**: {disk['dense_size_bytes'].iloc[0] / 2**20:.2f} MB "
                         "of tensors")
        lines += architecture(str(disk["model_path"].iloc[0]))
    quality = results.rows.get("quality")
    if quality is not None and "n_samples" in quality:
        data = (shown_path(quality["processed_data_file"].iloc[0], report_dir)
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
            where = ", ".join(f"{k} {row[k]}" for k in CONFIG + ["sparsity_level"] if k in row)
            lines.append(f"- `{exp.csv}` ({where}): {row['error']}")
    return lines


def build(results: Results, budgets: tuple[float, ...], report_dir: Path) -> str:
    """The report's Markdown; writes its trade-off figure into report_dir."""
    title = "Pruning report"
    disk = results.rows.get("disk")
    if disk is not None and "model_path" in disk:
        title += f": {Path(str(disk['model_path'].iloc[0])).name}"
    parts = [f"# {title}", "", *header(results, report_dir), "", "## The answer", "",
             *answer(results, budgets)]
    scored = quality_with_size(results)
    if scored is not None and "zip_file_size" in scored and scored["zip_file_size"].notna().any():
        sized = scored.dropna(subset=["zip_file_size", "roc_auc"])
        memory = results.ok("memory")
        plot_tradeoffs(sized, pareto_front(sized, "zip_file_size"), memory,
                       results.ok("activation"), report_dir / "report_tradeoffs.png")
        parts += ["## Trade-offs", "", "ROC AUC against the zipped size (the Pareto front "
                  "marked: no other point is both smaller and better)"
                  + (", against the bytes held in memory" if memory is not None else "")
                  + (", and against the forward time with activation sparsity"
                     if results.ok("activation") is not None else "") + ".", "",
                  "![trade-offs](report_tradeoffs.png)", ""]
    missing = []
    for exp in EXPERIMENTS:
        good = results.ok(exp.name)
        if exp.name not in SECTIONS:
            if good is None:
                missing.append(exp)
            continue
        heading, section = SECTIONS[exp.name]
        if good is None:
            missing.append(exp)
            continue
        parts += [f"## {heading}", "", *section(good), ""]
        if (results.folder / exp.png).is_file():
            if report_dir.resolve() != results.folder.resolve():
                shutil.copyfile(results.folder / exp.png, report_dir / exp.png)
            parts += [f"![{heading}]({exp.png})", ""]
    failed = failures(results)
    if failed:
        parts += ["## Rows that failed", "", *failed, ""]
    if missing:
        parts += ["## Not in this report", ""]
        parts += [f"- {exp.name}: no rows in `{exp.csv}` (run `python3 {exp.script}`)"
                  for exp in missing]
        parts.append("")
    return "\n".join(parts)


def write_report(folder: str | os.PathLike, budgets: tuple[float, ...] = AUC_DROP_BUDGETS,
                 report_dir: str | os.PathLike | None = None) -> Path | None:
    """report.md (and its figures) for the CSVs in folder; None when there are none."""
    folder = Path(folder)
    results = Results.read(folder)
    if not results.rows:
        return None
    report_dir = Path(report_dir) if report_dir else folder
    report_dir.mkdir(parents=True, exist_ok=True)
    text = build(results, budgets, report_dir)
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
