"""One rule for reusing the rows of an earlier run, the same for every experiment.

An item's rows are kept only when an earlier run finished the same key with the same signature:
a hash of everything that determines those rows (the checkpoint's sha256, the data's
fingerprint, the flags that change results). Earlier rows come from the final CSVs of a
finished run and from the progress log of a killed one; rows with an error are never kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dlrm_sparsity.runner.atomic import ProgressLog
from dlrm_sparsity.runner.outputs import earlier_rows

SIGNATURE = "signature"  # the column that holds it in every CSV


def signature_of(determinants: Mapping) -> str:
    """A short hash of what determines a row; values compare as their JSON text."""
    text = json.dumps(dict(determinants), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canonical(value) -> float | str:
    """Key values as CSVs and JSON give them back: numbers as floats, the rest as text."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return str(value)


def key_of(row: Mapping, key_columns: Sequence[str]) -> tuple:
    return tuple(canonical(row[c]) for c in key_columns)


def failed(row: Mapping) -> bool:
    error = row.get("error")
    return not (error is None or (isinstance(error, float) and math.isnan(error)))


class Resume:
    """The finished items of earlier runs, per (key, signature), with their rows per table."""

    def __init__(self, csv_paths: Sequence[Path], key_columns: Sequence[str], rank: int,
                 overwrite: bool):
        self.key_columns = list(key_columns)
        self.log = ProgressLog(csv_paths[0], rank)
        self.done: dict[tuple, list[list[dict]]] = {}
        if overwrite:
            return
        self._read_csvs(csv_paths)
        for entry in self.log.read():
            self.done[(tuple(entry["key"]), entry["signature"])] = entry["tables"]

    def _read_csvs(self, csv_paths: Sequence[Path]) -> None:
        found: dict[tuple, list[list[dict]]] = {}
        for t, path in enumerate(csv_paths):
            for row in earlier_rows(path, self.key_columns):
                if SIGNATURE in row and isinstance(row[SIGNATURE], str):
                    id_ = (key_of(row, self.key_columns), row[SIGNATURE])
                    found.setdefault(id_, [[] for _ in csv_paths])[t].append(row)
        # an item is finished when its main table has rows (its other tables may have none)
        self.done.update({id_: tables for id_, tables in found.items() if tables[0]})

    def lookup(self, key: tuple, signature: str) -> list[list[dict]] | None:
        tables = self.done.get((key, signature))
        if tables is None or any(failed(r) for rows in tables for r in rows):
            return None
        return tables

    def record(self, key: tuple, signature: str, tables: list[list[dict]]) -> None:
        self.log.append({"key": list(key), "signature": signature, "tables": tables})

    def close(self) -> None:
        """Once the final CSVs are written, the progress logs are no longer needed."""
        self.log.remove()
