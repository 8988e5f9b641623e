"""What a report is made from: each experiment's CSV in an output folder, as it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.runner.sweep import ok_rows


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
    Experiment("compression", "evaluate_compression.py", "compression_front.csv",
               "compression_front.png"),
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

    def scored_with_size(self) -> pd.DataFrame | None:
        """Each scored model with its zip size (metrics joined with the metadata)."""
        quality, disk = self.ok("quality"), self.ok("disk")
        if quality is None or disk is None:
            return quality
        keys = ["norm", "sparse_block_shape", "sparsity_level"]
        return quality.merge(disk[keys + ["zip_file_size", "zip_file_size_bytes"]], on=keys,
                             how="left")
