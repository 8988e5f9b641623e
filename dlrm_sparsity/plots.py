"""The experiments' figures and the report's trade-off figure, one line or colour per (norm,
block shape) configuration."""

from __future__ import annotations

import os

from dlrm_sparsity.analysis import AUC_DROP_BUDGETS, claimed_verdicts
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.runner.atomic import atomic_path
from dlrm_sparsity.variants import COMPACT, DENSE, MASKED, MASKED_SPARSE, SPARSE


def _pyplot():
    """matplotlib's pyplot, drawing to files only. Imported when a figure is drawn, not with
    the package: the processes that never draw (sharded ranks, sweep workers, the tests'
    many short runs) would hold it for nothing (about 30 MiB and a quarter second each)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _config_lines(ax, df: pd.DataFrame, y: str, label_suffix: str = "", **style) -> None:
    for (norm, block), part in df.groupby(["norm", "sparse_block_shape"], sort=True):
        part = part.sort_values("sparsity_level")
        ax.plot(part["sparsity_level"], part[y], marker="o", markersize=3,
                label=f"{norm} {block}{label_suffix}", **style)


def pareto_front(df: pd.DataFrame, cost: str, gain: str = "roc_auc") -> pd.DataFrame:
    """The points no other point beats on both: lower cost and higher gain."""
    best, keep = -float("inf"), []
    for index, row in df.sort_values([cost, gain], ascending=[True, False]).iterrows():
        if row[gain] > best:
            keep.append(index)
            best = row[gain]
    return df.loc[keep]


def _save(fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def plot_disk_savings(df: pd.DataFrame, path: str | os.PathLike) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _config_lines(ax, df, "zip_file_size")
    ax.set(xlabel="sparsity level", ylabel="zipped checkpoint (MB)",
           title="Disk usage of the pruned model")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="norm, block")
    _save(fig, path)


def plot_quality(df: pd.DataFrame, path: str | os.PathLike) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, column, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "roc_auc", "ROC AUC")):
        _config_lines(ax, df, column)
        ax.set(xlabel="sparsity level", ylabel=column, title=f"{title} on the test split")
        ax.grid(alpha=0.3)
    axes[0].legend(title="norm, block")
    _save(fig, path)


def plot_forward_time(df: pd.DataFrame, stages: pd.DataFrame, path: str | os.PathLike) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    ax = axes[0]
    for dlrm_type, style in ((DENSE, "-"), (SPARSE, "--")):
        part = df[df["dlrm_type"] == dlrm_type].copy()
        part["time_ms"] = part["time_median_s"] * 1e3
        _config_lines(ax, part, "time_ms", f", {dlrm_type.replace('_', ' ')}", linestyle=style)
    ax.set(xlabel="sparsity level", ylabel="forward time, median (ms)",
           title="DLRM forward: dense vs torch.sparse")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _plot_stages(axes[1], stages)
    _save(fig, path)


def _plot_stages(ax, stages: pd.DataFrame) -> None:
    """Stacked bars of median stage times, per variant, at the levels measured."""
    if stages.empty:
        ax.set_axis_off()
        return
    first = stages[stages["config"] == sorted(stages["config"].unique())[0]]
    table = first.pivot_table(index=["sparsity_level", "dlrm_type"], columns="stage",
                              values="time_median_s", aggfunc="median") * 1e3
    order = [s for s in ("bottom_mlp", "embedding", "interaction", "to_sparse_coo", "top_mlp")
             if s in table.columns]
    table = table[order]
    labels = [f"{lvl:g}\n{'sparse' if t == SPARSE else 'dense'}"
              for lvl, t in table.index]
    bottom = None
    for stage in order:
        ax.bar(labels, table[stage], bottom=bottom, label=stage)
        bottom = table[stage] if bottom is None else bottom + table[stage]
    ax.set(ylabel="median time (ms)", title=f"Where the time goes ({first['config'].iloc[0]})")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)


def plot_activation_sparsity(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """AUC against the activation level per model; forward time per variant, and where the
    compact variant's speed-up over dense passes 1."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    models = df.groupby(["norm", "sparse_block_shape", "sparsity_level"], sort=True)
    for (norm, block, emb), part in models:
        label = "dense model" if emb == 0.0 else f"{norm} {block}, embeddings {emb:g}"
        one = part[part["variant"] == MASKED].sort_values("activation_level")
        axes[0].plot(one["activation_level"], one["roc_auc"], marker="o", markersize=3,
                     label=label)
    axes[0].set(xlabel="activation sparsity level (columns of z masked)", ylabel="ROC AUC",
                title="Quality with the interaction output masked")
    axes[0].legend(fontsize=7)
    first = df[df["sparsity_level"] == df["sparsity_level"].min()]
    for variant, style in ((MASKED, "-"), (MASKED_SPARSE, "--"), (COMPACT, "-.")):
        part = first[first["variant"] == variant].sort_values("activation_level")
        axes[1].plot(part["activation_level"], part["time_median_s"] * 1e3, style, marker="o",
                     markersize=3, label=variant)
    compact = first[first["variant"] == COMPACT].sort_values("activation_level")
    faster = (compact[claimed_verdicts(compact).eq("faster")] if "ratio_verdict" in compact
              else compact[:0])
    if not faster.empty:
        level = faster["activation_level"].iloc[0]
        axes[1].axvline(level, color="grey", linewidth=0.8)
        axes[1].annotate(f"compact faster from {level:g}", (level, 0), xytext=(4, 4),
                         textcoords="offset points", fontsize=7)
    axes[1].set(xlabel="activation sparsity level", ylabel="forward time, median (ms)",
                title="Forward time of the masked model (least pruned)", yscale="log")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_tradeoffs(scored: pd.DataFrame, front: pd.DataFrame, memory: pd.DataFrame | None,
                   activation: pd.DataFrame | None, path: str | os.PathLike) -> None:
    """ROC AUC against the zipped size per config, the Pareto front marked; and, when those
    experiments ran, against the bytes held in memory and the compact forward's time."""
    panels = 1 + (memory is not None) + (activation is not None)
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.4), squeeze=False)
    ax = axes[0][0]
    for (norm, block), part in scored.groupby(["norm", "sparse_block_shape"], sort=True):
        ax.scatter(part["zip_file_size"], part["roc_auc"], s=14, label=f"{norm} {block}")
    front = front.sort_values("zip_file_size")
    ax.plot(front["zip_file_size"], front["roc_auc"], color="black", linewidth=0.8,
            label="Pareto front")
    ax.set(xlabel="zipped checkpoint (MB)", ylabel="ROC AUC", title="Quality against disk")
    ax.legend(fontsize=7)
    if memory is not None:  # experiment 4's formats, or the compression front's methods
        ax = axes[0][1]
        held = memory.dropna(subset=["roc_auc", "bytes"])
        kind = "method" if "method" in held else "format"
        for i, (name, part) in enumerate(held.groupby(kind, sort=False)):
            ax.scatter(part["bytes"] / 2**20, part["roc_auc"], s=10, label=name,
                       color=plt.cm.tab20(i % 20))
        if not held.empty:
            best = pareto_front(held, "bytes")
            ax.plot(best["bytes"] / 2**20, best["roc_auc"], color="black", linewidth=0.8,
                    label="Pareto front")
        ax.set(xlabel="embedding tables held (MiB)", ylabel="ROC AUC", xscale="log",
               title="Quality against memory" + (", every compression method"
                                                 if kind == "method" else ""))
        ax.legend(fontsize=6, ncol=2)
    if activation is not None:
        ax = axes[0][-1]
        compact = activation[activation["variant"] == COMPACT]
        for (norm, block, emb), part in compact.groupby(["norm", "sparse_block_shape",
                                                         "sparsity_level"], sort=True):
            label = "dense model" if emb == 0.0 else f"{norm} {block}, embeddings {emb:g}"
            ax.scatter(part["time_median_s"] * 1e3, part["roc_auc"], s=14, label=label)
        ax.set(xlabel="compact forward, median (ms)", ylabel="ROC AUC",
               title="Quality against forward time (activation sparsity)")
        ax.legend(fontsize=7)
    for row in axes:
        for a in row:
            a.grid(alpha=0.3)
    _save(fig, path)


def plot_memory_savings(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Bytes held against the sparsity level, one line per format and config; and ROC AUC
    against bytes held for every (model, format), the Pareto front drawn."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6))
    styles = ["-", "--", ":", "-."]
    colours = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(df["format"]))}
    configs = list(df.groupby(["norm", "sparse_block_shape"], sort=True).groups)
    for (fmt, norm, block), part in df.groupby(["format", "norm", "sparse_block_shape"],
                                               sort=False):
        part = part.sort_values("sparsity_level")
        style = styles[configs.index((norm, block)) % len(styles)]
        axes[0].plot(part["sparsity_level"], part["bytes_ratio"], style, color=colours[fmt],
                     marker="o", markersize=2,
                     label=fmt if (norm, block) == configs[0] else None)
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].set(xlabel="sparsity level", ylabel="bytes held / dense float32 tables",
                title="Memory of the embedding tables per format\n(line style: "
                      + ", ".join(f"{styles[i % 4]} {n} {b}" for i, (n, b) in
                                  enumerate(configs)) + ")", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    scored = df.dropna(subset=["roc_auc"])
    for fmt, part in scored.groupby("format", sort=False):
        axes[1].scatter(part["bytes"] / 2**20, part["roc_auc"], s=10, color=colours[fmt],
                        label=fmt)
    if not scored.empty:
        front = pareto_front(scored, "bytes")
        axes[1].plot(front["bytes"] / 2**20, front["roc_auc"], color="black", linewidth=0.8,
                     label="Pareto front")
    axes[1].set(xlabel="embedding tables held (MiB)", ylabel="ROC AUC", xscale="log",
                title="Quality against memory, every (model, format)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_compression_front(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """ROC AUC against the bytes the tables hold, one colour per method, the Pareto front
    across methods drawn and named; the right panel zooms on the drops up to twice the
    largest AUC budget, where a method is chosen."""
    scored = df.dropna(subset=["roc_auc", "bytes"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.0))
    markers = "osD^v<>Pp*Xh"
    front = pareto_front(scored, "bytes")
    base = scored.loc[scored["method"] == "dense", "roc_auc"]
    for ax, zoom in zip(axes, (False, True), strict=True):
        shown = scored if not zoom or base.empty else \
            scored[scored["roc_auc"] >= base.iloc[0] - 2 * AUC_DROP_BUDGETS[-1]]
        for i, (method, part) in enumerate(shown.groupby("method", sort=False)):
            ax.scatter(part["bytes"] / 2**20, part["roc_auc"], s=12, label=method,
                       marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20))
        line = front[front.index.isin(shown.index)]
        ax.plot(line["bytes"] / 2**20, line["roc_auc"], color="black", linewidth=0.8,
                label="Pareto front")
        if zoom:
            for _, row in line.iterrows():
                ax.annotate(f"{row['method']} {row['setting']}", (row["bytes"] / 2**20,
                            row["roc_auc"]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")
        ax.set(xlabel="embedding tables held (MiB)", ylabel="ROC AUC", xscale="log",
               title="Every setting" if not zoom else
               f"Within an AUC drop of {2 * AUC_DROP_BUDGETS[-1]:g} (front named)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    _save(fig, path)
