"""The report's answer: for each AUC budget, how far each config can be pruned and the best
point for each resource (disk, forward time, memory, activation sparsity), and the smallest
compression across methods."""

from __future__ import annotations

from dlrm_sparsity.analysis import (
    FLAGGED,
    MODEL,
    claimed_verdicts,
    front_choice,
    highest_within,
    noise_note,
    smallest_within,
    within_budget,
)
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.report.results import Results
from dlrm_sparsity.variants import COMPACT, DENSE, SPARSE


def config_name(norm: str, block: str) -> str:
    return f"{norm} {block}"


def answer(results: Results, budgets: tuple[float, ...]) -> list[str]:
    scored = results.scored_with_size()
    if scored is None or "auc_drop" not in scored:
        return ["The quality experiment has not run (`evaluate_model_metrics.py`), so no "
                "pruning can be judged against an AUC budget yet.", ""]
    lines = []
    for budget in budgets:
        lines.append(f"**AUC drop at most {budget}:**")
        lines += highest_levels(scored, budget)
        lines += smallest_zip(scored, budget)
        lines += forward_answer(results.ok("forward"), within_budget(scored, budget))
        lines += activation_answer(results.ok("activation"), budget)
        lines += smallest_compression(results.ok("compression"), budget) or \
            smallest_in_memory(results.ok("memory"), budget)
        lines.append("")
    return lines


def highest_levels(scored: pd.DataFrame, budget: float) -> list[str]:
    lines = []
    for (norm, block), top in highest_within(scored, budget).items():
        if top is None:
            lines.append(f"- {config_name(norm, block)}: no level stays within budget")
            continue
        size = (f", zip {top['zip_file_size']:.2f} MB" if pd.notna(top.get("zip_file_size"))
                else "")
        lines.append(f"- {config_name(norm, block)}: up to level {top['sparsity_level']:g} "
                     f"(AUC {top['roc_auc']:.4f}{size})")
    return lines


def smallest_zip(scored: pd.DataFrame, budget: float) -> list[str]:
    if "zip_file_size" not in scored:
        return []
    best = smallest_within(scored, budget, "zip_file_size")
    if best is None:
        return []
    return [f"- smallest zip: {config_name(best['norm'], best['sparse_block_shape'])} at level "
            f"{best['sparsity_level']:g}, {best['zip_file_size']:.2f} MB, "
            f"AUC {best['roc_auc']:.4f}"]


def forward_answer(forward: pd.DataFrame | None, within: pd.DataFrame) -> list[str]:
    """Which variant to run: the seed's torch.sparse variant only where its interval says it
    is faster; the dense forwards of pruned models are one computation, never ranked."""
    if forward is None or "ratio_verdict" not in forward:
        return []
    sparse = forward[forward["dlrm_type"] == SPARSE].merge(within[MODEL], on=MODEL)
    if sparse.empty:
        return []
    faster = sparse[claimed_verdicts(sparse) == "faster"]
    if faster.empty:
        dense = forward[forward["dlrm_type"] == DENSE]["time_median_s"]
        return [f"- forward pass: run the dense model; the seed's torch.sparse variant is "
                f"faster at none of the {len(sparse)} models within budget (95% intervals), "
                f"and pruning does not speed up the dense forward ({dense.median() * 1e3:.2f} "
                f"ms median, batch {int(forward['batch_size'].iloc[0])}){noise_note(forward)}"]
    best = faster.loc[faster["ratio_high"].idxmin()]
    return [f"- forward pass: the seed's torch.sparse variant is faster than dense at "
            f"{len(faster)} of {len(sparse)} models within budget; most at "
            f"{config_name(best['norm'], best['sparse_block_shape'])} level "
            f"{best['sparsity_level']:g}: {best['ratio']:.2f}x the dense time "
            f"[{best['ratio_low']:.2f}, {best['ratio_high']:.2f}]{noise_note(forward)}"]


def activation_answer(df: pd.DataFrame | None, budget: float) -> list[str]:
    """Per model, the highest activation level within budget of the unpruned model unmasked:
    on a pruned model, the masking's drop comes on top of the pruning's."""
    if df is None:
        return []
    if "auc_drop_vs_level0" not in df or df["auc_drop_vs_level0"].isna().all():
        return ["- activation sparsity: no unpruned model in `activation_sparsity.csv` to "
                "measure the AUC drops against"]
    lines = []
    compact = df[df["variant"] == COMPACT]
    verdicts = (claimed_verdicts(compact) if "ratio_verdict" in compact
                else pd.Series("", index=compact.index))
    found = highest_within(compact, budget, MODEL, "activation_level", "auc_drop_vs_level0")
    for (norm, block, emb), top in found.items():
        if top is None:
            continue
        model = "the dense model" if emb == 0.0 else f"{config_name(norm, block)} at {emb:g}"
        verdict = verdicts.loc[top.name]
        if verdict == "faster":
            speed = (f"the compact forward takes {top['ratio']:.2f}x the masked dense one's "
                     f"time [{top['ratio_low']:.2f}, {top['ratio_high']:.2f}]")
        elif verdict == FLAGGED:  # no claim either way from a measurement the noise spoiled
            speed = ("the compact forward's time was disturbed by the machine and is not "
                     "claimed from (rerun to measure it)")
        else:
            speed = "the compact forward is not faster than the masked dense one beyond noise"
        speed += noise_note(df)
        lines.append(f"- activation sparsity on {model}: up to level "
                     f"{top['activation_level']:g} (AUC {top['roc_auc']:.4f}, a drop of "
                     f"{top['auc_drop_vs_level0']:.4f} from the unpruned model), where {speed}")
    return lines


def smallest_compression(front: pd.DataFrame | None, budget: float) -> list[str]:
    """Across every compression method: the smallest tables within budget, and where the best
    DataNormSparsifier point stands beside them."""
    if front is None or "auc_drop" not in front:
        return []
    best, datanorm = front_choice(front.dropna(subset=["bytes", "roc_auc"]), budget)
    if best is None:
        return ["- smallest in memory across compression methods: none within budget"]
    beside = ("no DataNormSparsifier point is within budget" if datanorm is None else
              f"the best DataNormSparsifier point ({datanorm['method']}, {datanorm['setting']})"
              f" holds {datanorm['bytes'] / best['bytes']:.2f}x its bytes "
              f"(AUC {datanorm['roc_auc']:.4f})")
    return [f"- smallest in memory across compression methods: {best['method']} "
            f"({best['setting']}), {best['bytes'] / 2**20:.2f} MiB ({best['bytes_ratio']:.3f} "
            f"of the dense tables), AUC {best['roc_auc']:.4f}; {beside}"]


def smallest_in_memory(memory: pd.DataFrame | None, budget: float) -> list[str]:
    if memory is None:
        return ["- smallest in memory: experiment 4 (memory savings) has not run"]
    if "auc_drop_vs_level0" not in memory:
        return []
    best = smallest_within(memory, budget, "bytes", "auc_drop_vs_level0")
    if best is None:
        return []
    return [f"- smallest in memory: {config_name(best['norm'], best['sparse_block_shape'])} "
            f"at level {best['sparsity_level']:g} stored as {best['format']}, "
            f"{best['bytes'] / 2**20:.2f} MiB ({best['bytes_ratio']:.3f} of the dense tables), "
            f"AUC {best['roc_auc']:.4f}"]
