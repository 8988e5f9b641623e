"""One run of an experiment script: torchrun, the output folder, errors and the exit code.

    def main(argv=None):
        args = parse_args(argv)
        with Session(argv, args.output_dir, args.device, args.overwrite) as run:
            ...                                  # the experiment, top to bottom
            result = run.sweep(items, compute, tables=TABLES, label="scoring")
            run.finish(result, TABLES, plot=(plot_quality, "accuracy.png"), summary=summary)

A UserInputError anywhere inside becomes one line on stderr and exit code 2; so does an item
that failed (after the others finished). Under torchrun the process group lives as long as the
session, and a session opened inside another (the demo's disk step run before the metrics)
shares it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from dlrm_sparsity.device import environment, resolve_device
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.runner.atomic import remove_stale_temporaries
from dlrm_sparsity.runner.cli import exit_for
from dlrm_sparsity.runner.distributed import DistContext, init_distributed
from dlrm_sparsity.runner.outputs import KEY_COLUMNS
from dlrm_sparsity.runner.sweep import SweepResult, Table, run_sweep, write_outputs


def ensure_writable(folder: Path, what: str) -> Path:
    """Create folder if needed; a UserInputError if it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{folder}: cannot create the {what} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"{folder}: the {what} is not writable")
    return folder


def describe(argv: Sequence[str] | None) -> str:
    """The command line, for the reproducibility columns of the CSVs."""
    return " ".join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))


class Session:
    def __init__(self, argv: Sequence[str] | None, output_dir: str | os.PathLike,
                 device: str | None = None, overwrite: bool = False):
        self.command = describe(argv)
        self.output_dir = Path(output_dir)
        self.device_name, self.overwrite = device, overwrite
        self.exit_code = 0
        self.ctx = DistContext()

    def __enter__(self) -> "Session":
        try:
            self.ctx = init_distributed(self.device_name)
            self.device = resolve_device(self.device_name)
            ensure_writable(self.output_dir, "output folder")
            if self.ctx.is_main:  # before any rank writes: temporaries of a killed run
                remove_stale_temporaries(self.output_dir)
            self.ctx.barrier()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.ctx.close()
        if exc is not None:
            exit_for(exc)
        elif self.exit_code:
            raise SystemExit(self.exit_code)
        return False

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def environment(self) -> dict:
        """The columns every measured row carries: device, torch, threads, the command."""
        return {**environment(self.device), "command": self.command}

    def sweep(self, items, compute, *, tables: Sequence[Table], label: str,
              key_columns: Sequence[str] = KEY_COLUMNS, **options) -> SweepResult:
        """run_sweep over this session's ranks and output folder (see sweep.py)."""
        return run_sweep(self.ctx, self.output_dir, self.overwrite, items, compute,
                         tables=tables, key_columns=key_columns, label=label, **options)

    def finish(self, result: SweepResult, tables: Sequence[Table], **options) -> None:
        """Write the outputs (see sweep.write_outputs); a failed item sets exit code 2."""
        code = write_outputs(self.ctx, self.output_dir, result, tables, **options)
        self.exit_code = max(self.exit_code, code)
