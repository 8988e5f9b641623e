"""The CSV contract between the scripts, resumable sweeps, and reproducibility columns."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch

from atomic_io import ProgressLog, atomic_path
from errors import UserInputError

METADATA_COLUMNS = ["norm", "sparse_block_shape", "sparsity_level", "step_time_sec",
                    "zip_file_size", "path"]
KEY_COLUMNS = ["norm", "sparse_block_shape", "sparsity_level"]


def row_key(row) -> tuple[str, str, float]:
    return (str(row["norm"]), str(row["sparse_block_shape"]), float(row["sparsity_level"]))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def reusable(old: dict | None, wanted: dict, keys) -> bool:
    """May an earlier row stand for this one? It must exist, hold no error, and match on keys.

    Rows come back from CSVs and JSON logs, so values compare as text, and an empty cell (NaN)
    equals None.
    """
    if old is None or not _missing(old.get("error")):
        return False
    for key in keys:
        a, b = old.get(key), wanted.get(key)
        if _missing(a) or _missing(b):
            if not (_missing(a) and _missing(b)):
                return False
        elif str(a) != str(b):
            return False
    return True


def environment(device: torch.device) -> dict:
    """What makes a figure reproducible: where and with what it was measured."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": f"{device.type}:{name or platform.machine()}",
            "torch_version": torch.__version__, "num_threads": torch.get_num_threads()}


def write_csv(rows: Iterable[dict], path: str | os.PathLike, first_columns: list[str]
              ) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    ordered = [c for c in first_columns if c in df.columns]
    df = df[ordered + [c for c in df.columns if c not in ordered]]
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def read_metadata(path: str | os.PathLike) -> pd.DataFrame:
    """sparse_model_metadata.csv with `path` resolved against the CSV's folder."""
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


def earlier_rows(csv_path: Path) -> list[dict]:
    """The rows of an earlier run's CSV; none if it is missing or unreadable (then redone)."""
    if not csv_path.is_file():
        return []
    try:
        rows = pd.read_csv(csv_path).to_dict("records")
        for row in rows:
            row_key(row)  # a CSV without the grid columns is not ours
        return rows
    except (pd.errors.EmptyDataError, pd.errors.ParserError, KeyError, ValueError):
        return []


class ResumeState:
    """Rows finished by earlier runs (final CSV and progress logs), reusable if still valid.

    Rows are kept per grid key and, where a key has several rows (one per dlrm_type in the
    forward-time CSV), per that column too; later rows replace earlier ones.
    """

    def __init__(self, csv_path: Path, rank: int, overwrite: bool):
        self.log = ProgressLog(csv_path, rank)
        self.previous: dict[tuple, dict[str, dict]] = {}
        if overwrite:
            return
        for row in earlier_rows(csv_path):
            self._keep(row)
        for row in self.log.read():
            self._keep(row)

    def _keep(self, row: dict) -> None:
        variant = row.get("dlrm_type")
        self.previous.setdefault(row_key(row), {})[str(variant) if variant else ""] = row

    def lookup(self, key: tuple) -> dict | None:
        return self.previous.get(key, {}).get("")

    def previous_rows(self, key: tuple) -> list[dict]:
        return list(self.previous.get(key, {}).values())

    def record(self, row: dict) -> None:
        self.log.append(row)
