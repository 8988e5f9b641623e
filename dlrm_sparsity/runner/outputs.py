"""The CSV contract between the scripts: the metadata CSV's columns, writing and reading CSVs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.runner.atomic import atomic_path

METADATA_CSV = "sparse_model_metadata.csv"
METADATA_COLUMNS = ["norm", "sparse_block_shape", "sparsity_level", "step_time_sec",
                    "zip_file_size", "path"]
KEY_COLUMNS = ["norm", "sparse_block_shape", "sparsity_level"]


def write_csv(rows: Iterable[dict], path: str | os.PathLike, first_columns: Sequence[str]
              ) -> pd.DataFrame:
    """Rows as a CSV (atomically), the named columns first; returns the frame written."""
    df = pd.DataFrame(list(rows))
    ordered = [c for c in first_columns if c in df.columns]
    df = df[ordered + [c for c in df.columns if c not in ordered]]
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def read_metadata(path: str | os.PathLike) -> pd.DataFrame:
    """sparse_model_metadata.csv with `path` resolved against the CSV's folder (`checkpoint`).

    Also reads the seed's own metadata CSV (absolute paths, whole MB, no sha256 column).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: metadata CSV not found (run evaluate_disk_savings.py "
                             "first, or pass --sparse_model_metadata)")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise UserInputError(f"{path}: metadata CSV is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: not a readable CSV ({str(exc).strip()})") from None
    missing = [c for c in KEY_COLUMNS + ["path"] if c not in df.columns]
    if missing:
        raise UserInputError(f"{path}: metadata CSV lacks the column(s) {', '.join(missing)}")
    if df.empty:
        raise UserInputError(f"{path}: metadata CSV has no rows")
    df["checkpoint"] = [str(p) if os.path.isabs(str(p)) else str(path.parent / str(p))
                        for p in df["path"]]
    return df


def earlier_rows(csv_path: Path, key_columns: Sequence[str]) -> list[dict]:
    """The rows of an earlier run's CSV; none if it is missing, unreadable or not ours."""
    if not csv_path.is_file():
        return []
    try:
        df = pd.read_csv(csv_path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return []
    if any(c not in df.columns for c in key_columns):
        return []
    return df.to_dict("records")
