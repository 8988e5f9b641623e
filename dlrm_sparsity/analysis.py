"""The decisions drawn from the experiments' rows, each written once: drops against a base
row, the AUC budgets, the highest level within a budget, the smallest within a budget, the
level from which a format is smaller, and the level from which a variant is faster. The
scripts' summaries and the report call these; neither decides anything itself."""

from __future__ import annotations

import operator
from typing import Callable, Sequence

from dlrm_sparsity.lazy import pandas as pd

AUC_DROP_BUDGETS = (0.005, 0.01)  # the drops every summary and the report answer for
_BUDGET_TOLERANCE = 1e-12  # drops are differences of floats: a drop of 0.005 is within 0.005
CONFIG = ["norm", "sparse_block_shape"]
MODEL = CONFIG + ["sparsity_level"]


def against_base(df: pd.DataFrame, groups: Sequence[str], is_base: pd.Series, column: str,
                 op: Callable = operator.sub) -> pd.Series:
    """op(base, row) of column for every row, where base is the first row of the row's group
    that is_base marks and that has a value there (nan where the group has none)."""
    base = df[is_base & df[column].notna()] if column in df else df.iloc[:0]
    if base.empty:
        return pd.Series(float("nan"), index=df.index)
    if not groups:
        return op(base[column].iloc[0], df[column])
    first = base.drop_duplicates(list(groups)).set_index(list(groups))[column]
    keys = pd.MultiIndex.from_frame(df[list(groups)])
    values = first.reindex(keys).to_numpy() if len(groups) > 1 else \
        first.reindex(df[groups[0]]).to_numpy()
    return op(pd.Series(values, index=df.index, dtype=float), df[column])


def within_budget(df: pd.DataFrame, budget: float, drop: str = "auc_drop") -> pd.DataFrame:
    """The rows whose AUC drop stays within budget: the one rule for every summary."""
    return df[df[drop] <= budget + _BUDGET_TOLERANCE]


def highest_within(df: pd.DataFrame, budget: float, groups: Sequence[str] = CONFIG,
                   level: str = "sparsity_level", drop: str = "auc_drop"
                   ) -> dict[tuple, pd.Series | None]:
    """Per group, the row at the highest level whose drop stays within budget (None where no
    level does)."""
    found = {}
    for key, part in df.dropna(subset=[drop]).groupby(list(groups)):
        ok = within_budget(part, budget, drop)
        found[key] = ok.loc[ok[level].idxmax()] if not ok.empty else None
    return found


def smallest_within(df: pd.DataFrame, budget: float, cost: str,
                    drop: str = "auc_drop") -> pd.Series | None:
    """The row of least cost among those within budget (None where none is)."""
    ok = within_budget(df.dropna(subset=[cost]), budget, drop)
    return ok.loc[ok[cost].idxmin()] if not ok.empty else None


def front_choice(df: pd.DataFrame, budget: float, cost: str = "bytes"
                 ) -> tuple[pd.Series | None, pd.Series | None]:
    """Across compression methods: the smallest setting within budget, and the smallest of the
    seed's DataNormSparsifier points (methods datanorm*) within it (None where none is)."""
    return (smallest_within(df, budget, cost),
            smallest_within(df[df["method"].str.startswith("datanorm")], budget, cost))


def first_level_below(df: pd.DataFrame, column: str, limit: float = 1.0,
                      groups: Sequence[str] = CONFIG) -> dict[tuple, float | None]:
    """Per group, the lowest level whose column is below limit (None where none is)."""
    found = {}
    for key, part in df.groupby(list(groups)):
        below = part[part[column] < limit]["sparsity_level"]
        found[key] = float(below.min()) if len(below) else None
    return found


FLAGGED = "flagged"  # the claimed verdict of a point the drift guard could not clean


def claimed_verdicts(df: pd.DataFrame, column: str = "ratio_verdict") -> pd.Series:
    """The verdicts a summary may claim: each row's, but FLAGGED where the drift guard kept
    the point disturbed (a measurement that could not be made clean is never claimed from)."""
    verdicts = df[column].copy()
    if "disturbed" in df:
        verdicts[df["disturbed"].eq(True)] = FLAGGED
    return verdicts


def verdict_counts(df: pd.DataFrame, column: str = "ratio_verdict") -> str:
    """How many rows' claimed verdicts put a variant above, around or below its base, and how
    many are not claimed from."""
    counts = claimed_verdicts(df, column).value_counts()
    text = ", ".join(f"{what} at {counts.get(v, 0)}" for v, what in (
        ("slower", "slower"), ("same", "not distinguishable"), ("faster", "faster")))
    flagged = counts.get(FLAGGED, 0)
    return text + (f", disturbed (not claimed from) at {flagged}" if flagged else "")


def machine_noise(df: pd.DataFrame) -> float | None:
    """The machine's noise the run measured at its start (the largest, if rows of several runs
    are kept): the 90th percentile of how much slower than their median a fixed reference
    read. None where nothing was measured."""
    if "machine_noise_p90" not in df or df["machine_noise_p90"].isna().all():
        return None
    return float(df["machine_noise_p90"].max())


def noise_note(df: pd.DataFrame) -> str:
    """What stands beside every timing claim: the noise of the machine it was measured on."""
    noise = machine_noise(df)
    return "" if noise is None else f" (machine noise +{noise:.1%} at the 90th percentile)"


def faster_from(faster: pd.Series) -> float | None:
    """The lowest level (the index, sorted) from which a variant is faster (the boolean
    values: its verdict) at that level and every level above (a dip lower down does not
    count); None if not at the top."""
    slower = faster[~faster.astype(bool)]
    above = faster.index[faster.index > slower.index.max()] if len(slower) else faster.index
    return float(above.min()) if len(above) else None
