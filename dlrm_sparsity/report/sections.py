"""One section of the report per experiment: its table, and sentences read from it."""

from __future__ import annotations

import pandas as pd

from dlrm_sparsity.analysis import CONFIG, MODEL, first_level_below
from dlrm_sparsity.report.answer import config_name
from dlrm_sparsity.variants import COMPACT, DENSE, MASKED, SPARSE


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
    times = df.pivot_table(index=MODEL, columns="dlrm_type", values="time_median_s").dropna()
    if times.empty or SPARSE not in times or DENSE not in times:
        return ["Not enough timed rows for a comparison."]
    ratio = (times[SPARSE] / times[DENSE]).reset_index(name="ratio")
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
    dense = df[df["dlrm_type"] == DENSE].copy()
    dense["ms"] = dense["time_median_s"] * 1e3
    return ["Dense forward, median ms:", "", pivot(dense, "ms", 2), "", " ".join(sentences)]


def memory_section(df: pd.DataFrame) -> list[str]:
    lines = ["Bytes held by the embedding tables / dense float32 tables, mean over configs:", "",
             pivot(df, "bytes_ratio", 3, columns=["format"]), ""]
    sentences = []
    for name in ("csr", "csr_int64", "coo", "row_pruned"):
        for (norm, block), level in first_level_below(df[df["format"] == name],
                                                      "bytes_ratio").items():
            sentences.append(f"{config_name(norm, block)}: {name} holds fewer bytes than dense "
                             f"from level {level:g}." if level is not None else
                             f"{config_name(norm, block)}: {name} never holds fewer bytes "
                             "than dense.")
    cost = df.pivot_table(index=MODEL, columns="format", values="lookup_median_s")
    if "dense" in cost:
        sentences.append("Lookup time against dense (median over models): " + ", ".join(
            f"{f} {(cost[f] / cost['dense']).median():.2f}x" for f in cost.columns
            if f != "dense") + ".")
    return lines + [" ".join(sentences)]


def activation_section(df: pd.DataFrame) -> list[str]:
    one = df[df["sparsity_level"] == df["sparsity_level"].min()]
    table = one.pivot_table(index="activation_level", columns="variant",
                            values="time_median_s") * 1e3
    auc = one[one["variant"] == MASKED].set_index("activation_level")["roc_auc"]
    lines = ["Least pruned model: ROC AUC and median forward ms per variant:", "",
             "| activation level | ROC AUC | " + " | ".join(table.columns) + " |",
             "|---" * (len(table.columns) + 2) + "|"]
    for level, row in table.iterrows():
        lines.append(f"| {level:g} | {fmt(auc.get(level))} | "
                     + " | ".join(fmt(v, 2) for v in row) + " |")
    compact = one[one["variant"] == COMPACT].set_index("activation_level")
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
