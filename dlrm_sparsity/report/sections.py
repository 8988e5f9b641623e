"""One section of the report per experiment: its table, and sentences read from it."""

from __future__ import annotations

from typing import Iterator

from dlrm_sparsity.analysis import (
    AUC_DROP_BUDGETS,
    CONFIG,
    MODEL,
    first_level_below,
    machine_noise,
    noise_note,
    smallest_within,
)
from dlrm_sparsity.analysis import verdict_counts as verdicts
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.plots import pareto_front
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


def per_config(df: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame, pd.Series, pd.Series]]:
    """Per config: its name, its rows by level, and its first and last row."""
    for (norm, block), part in df.groupby(CONFIG):
        part = part.sort_values("sparsity_level")
        yield config_name(norm, block), part, part.iloc[0], part.iloc[-1]


def quality_section(df: pd.DataFrame) -> list[str]:
    sentences = []
    for name, _, first, last in per_config(df):
        sentences.append(f"{name}: ROC AUC {first['roc_auc']:.4f} at level "
                         f"{first['sparsity_level']:g}, {last['roc_auc']:.4f} at level "
                         f"{last['sparsity_level']:g}.")
    samples = f" on {int(df['n_samples'].iloc[0]):,} test samples" if "n_samples" in df else ""
    return [f"ROC AUC{samples}:", "", pivot(df, "roc_auc", 4), "", " ".join(sentences)]


def dense_forward(df: pd.DataFrame) -> str:
    """The dense forward is the same computation at every level: its spread, not a ranking."""
    dense = df[df["dlrm_type"] == DENSE]["time_median_s"] * 1e3
    return (f"The dense forward is the same computation at every level (pruning zeroes "
            f"weights, it removes no work): {dense.median():.2f} ms median over the "
            f"{len(dense)} models, max/min {dense.max() / dense.min():.2f}; its differences "
            "between models are the machine's noise, not the pruning's doing.")


def claims(df: pd.DataFrame) -> str:
    """The rule every timing claim of a section follows, and the noise it was made in."""
    effect = df["min_effect"].max() if "min_effect" in df else float("nan")
    rule = ("A variant is called faster or slower only where its 95% interval excludes 1"
            + (f" and its ratio differs from 1 by {effect:.0%} at least" if effect > 0 else ""))
    noise = machine_noise(df)
    return rule + ("." if noise is None else f"; the machine's noise during the run: "
                   f"+{noise:.1%} at the 90th percentile of a fixed reference's readings.")


def forward_section(df: pd.DataFrame) -> list[str]:
    sparse = df[df["dlrm_type"] == SPARSE]
    if sparse.empty or "ratio" not in sparse or sparse["ratio"].isna().all():
        return ["Not enough timed rows for a comparison."]
    sentences = []
    for name, part, first, last in per_config(sparse):
        sentences.append(f"{name}: the torch.sparse variant takes "
                         f"{first['ratio']:.1f}x the dense time at level "
                         f"{first['sparsity_level']:g} and {last['ratio']:.1f}x at level "
                         f"{last['sparsity_level']:g}; by its 95% interval it is "
                         f"{verdicts(part)} of {len(part)} levels.")
    table = sparse.assign(shown=[f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in zip(
        sparse["ratio"], sparse["ratio_low"], sparse["ratio_high"], strict=True)])
    return ["torch.sparse time / dense time, each from its least disturbed block of the rounds "
            "[95% interval]:", "",
            text_pivot(table, "shown"), "", " ".join(sentences), "", claims(df), "",
            dense_forward(df)]


def text_pivot(df: pd.DataFrame, value: str, columns=CONFIG) -> str:
    """pivot for a column of text."""
    table = df.pivot_table(index="sparsity_level", columns=columns, values=value,
                           aggfunc="first")
    heads = [" ".join(str(c) for c in col) for col in table.columns]
    lines = ["| level | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for level, row in table.iterrows():
        lines.append(f"| {level:g} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


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
    if "lookup_ratio_verdict" in df:
        timed = df.dropna(subset=["lookup_ratio"])
        sentences.append("Lookup time against dense, by each model's 95% interval: " + "; ".join(
            f"{f} {part['lookup_ratio'].median():.2f}x (median), "
            f"{verdicts(part, 'lookup_ratio_verdict')} of {len(part)} models"
            for f, part in timed.groupby("format", sort=False)) + ".")
        sentences.append(claims(df))
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
    if "ratio_verdict" in compact:
        top = compact.index.max()
        lines += ["", f"By its 95% interval the compact forward is {verdicts(compact)} of "
                      f"{len(compact)} levels against the masked dense one; at level {top:g} "
                      f"it takes {compact.loc[top, 'ratio']:.2f}x the dense time "
                      f"[{compact.loc[top, 'ratio_low']:.2f}, "
                      f"{compact.loc[top, 'ratio_high']:.2f}]. {claims(one)}"]
    if "interaction" in one and (one["interaction"] == "dcn").any():
        lines += ["", "This is a DLRM_DCN: the mask applies to the cross net's output, the "
                      "over arch's input. The compact variant cuts only the over arch's first "
                      "layer to the kept columns; the cross net mixes every column into every "
                      "other, so it still computes them all."]
    return lines


def stability_section(results) -> list[str]:
    """Per timed experiment: the noise measured at its start, the drift guard's margin and
    what it did, and its share of the timing."""
    lines = []
    for name in ("forward", "memory", "activation"):
        df = results.ok(name)
        if df is None or "reference_s" not in df:
            continue
        df = df.drop_duplicates(subset=[c for c in MODEL + ["activation_level"] if c in df])
        ref = df["reference_s"].dropna()  # one row per point: its variants share the guard
        flagged = df[df["disturbed"].eq(True)]
        noise = machine_noise(df)
        text = f"- {name}: " + ("" if noise is None else
                                f"machine noise +{noise:.1%} at the 90th percentile "
                                f"(+{df['machine_noise_worst'].max():.1%} at worst), "
                                f"margin {df['drift_margin'].max():.0%}; ")
        text += (f"the reference read {ref.median() * 1e3:.2f} ms median, max/min "
                 f"{ref.max() / ref.min():.2f}; {int(df['measured_again'].sum())} "
                 f"measurement(s) taken again; {len(flagged)} point(s) flagged as disturbed")
        if "guarded" in df:
            text += f"; {int((~df['guarded'].astype(bool)).sum())} unguarded"
        if "guard_s" in df and df["guard_s"].notna().any():
            guard, measured = df["guard_s"].sum(), df["measure_s"].sum()
            text += (f"; the guard took {guard:.1f} s, {guard / (guard + measured):.0%} of "
                     f"the points' timing (at most {df['guard_share'].max():.0%})")
        lines.append(text + ("" if flagged.empty else ": " + ", ".join(sorted(
            {f"{r['norm']} {r['sparse_block_shape']} level {r['sparsity_level']:g}"
             for r in flagged.to_dict("records")}))))
    return lines


def compression_section(df: pd.DataFrame) -> list[str]:
    """Per method, the smallest setting within each AUC budget and its lookups against the
    dense tables; the front across methods; what was skipped."""
    scored = df.dropna(subset=["bytes", "roc_auc"])
    heads = [f"smallest within an AUC drop of {b}" for b in AUC_DROP_BUDGETS]
    lines = ["Every method on the unpruned model (the datanorm points: experiment 4's pruned "
             "models, each in its smallest format); bytes held as served, against the dense "
             "float32 tables:", "", "| method | settings | " + " | ".join(heads)
             + " | lookups / dense (timed settings, median) |", "|---" * (len(heads) + 3) + "|"]
    for method, part in scored.groupby("method", sort=False):
        cells = []
        for budget in AUC_DROP_BUDGETS:
            best = smallest_within(part, budget, "bytes")
            cells.append("none" if best is None else f"{best['setting']}: "
                         f"{best['bytes_ratio']:.3f}, AUC {best['roc_auc']:.4f}")
        timed = part["lookup_ratio"].dropna() if "lookup_ratio" in part else part[:0]
        lines.append(f"| {method} | {len(part)} | " + " | ".join(cells) + " | "
                     + (f"{timed.median():.2f}x ({len(timed)})" if len(timed) else "-") + " |")
    front = pareto_front(scored, "bytes")
    lines += ["", "The Pareto front across methods (no other setting is both smaller and "
              "better): " + "; ".join(f"{r['method']} {r['setting']} ({r['bytes_ratio']:.3f}, "
                                      f"AUC {r['roc_auc']:.4f})"
                                      for r in front.to_dict("records")) + "."]
    if "lookup_ratio" in scored and scored["lookup_ratio"].notna().any():
        lines += ["", f"Lookups are timed against the dense tables in paired rounds, their 95% "
                      f"intervals in the CSV{noise_note(scored)}."]
    skipped = df[df["skipped"].notna()] if "skipped" in df else df[:0]
    if not skipped.empty:
        lines += ["", "Skipped: " + "; ".join(sorted({str(s) for s in skipped["skipped"]})) + "."]
    return lines


SECTIONS = {"disk": ("Disk savings", disk_section), "quality": ("Quality", quality_section),
            "forward": ("Forward time", forward_section),
            "memory": ("Memory savings", memory_section),
            "activation": ("Activation sparsity", activation_section),
            "compression": ("Compression front", compression_section)}
