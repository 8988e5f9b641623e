"""One run of an experiment script: torchrun, the output folder, errors and the exit code.

    def main(argv=None):
        args = parse_args(argv)
        with Session(argv, args.output_dir, args.device, args.overwrite) as run:
            ...                                  # the experiment, top to bottom
            result = run.sweep(items, compute, tables=TABLES, label="scoring")
            run.finish(result, TABLES, plot=(plot_quality, "accuracy.png"), summary=summary)

A UserInputError anywhere inside becomes one line on stderr and exit code 2; so does an item
that failed (after the others finished). Under torchrun the process group lives as long as the
session. The session holds its output folder's lock (lock.py) from start to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from dlrm_sparsity.device import environment, resolve_device
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.runner.atomic import remove_stale_temporaries
from dlrm_sparsity.runner.cli import exit_for
from dlrm_sparsity.runner.distributed import DistContext, init_distributed
from dlrm_sparsity.runner.lock import FolderLock, inside
from dlrm_sparsity.runner.outputs import KEY_COLUMNS
from dlrm_sparsity.runner.sweep import Sweep, SweepResult, Table, run_sweep, write_outputs


def ensure_writable(folder: Path, what: str) -> Path:
    """Create folder if needed; a UserInputError if it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{folder}: cannot create the {what} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"{folder}: the {what} is not writable")
    return folder


@lru_cache(maxsize=1)
def suite_commit() -> str:
    """The suite's git commit when it runs from a checkout, else "unknown"."""
    repo = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], timeout=10,
                              capture_output=True, text=True, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


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
        self.locks = ExitStack()
        self.locked: list[Path] = []

    def __enter__(self) -> "Session":
        try:
            self.ctx = init_distributed(self.device_name)
            self.device = resolve_device(self.device_name)
            ensure_writable(self.output_dir, "output folder")
            self.lock(self.output_dir)
            if self.ctx.is_main:  # before any rank writes: temporaries of a killed run
                remove_stale_temporaries(self.output_dir)
            self.ctx.barrier()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.locks.close()
        self.ctx.close()
        if exc is not None:  # an error every rank met through on_main: rank 0 says it
            exit_for(exc, say=not getattr(exc, "from_main", False))
        elif self.exit_code:
            raise SystemExit(self.exit_code)
        return False

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def lock(self, folder: Path) -> None:
        """Hold folder's lock until the session ends (rank 0 for all ranks; nothing to do for
        a folder inside one already held). A UserInputError names the run that holds it."""
        if not self.ctx.is_main or any(inside(folder, held) for held in self.locked):
            return
        self.locks.enter_context(FolderLock(folder, self.command))
        self.locked.append(Path(folder))

    def provenance(self, threads: int | None = None, batch_size: int | None = None) -> dict:
        """The columns every row of every CSV carries: where, with what and how it was made."""
        env = environment(self.device)
        return {"device": env["device"], "torch_version": env["torch_version"],
                "num_threads": env["num_threads"] if threads is None else threads,
                "batch_size": batch_size, "suite_commit": suite_commit(),
                "command": self.command}

    def sweep(self, items, compute, *, tables: Sequence[Table], label: str,
              key_columns: Sequence[str] = KEY_COLUMNS, **options) -> SweepResult:
        """A Sweep (see sweep.py) over this session's ranks and output folder."""
        return run_sweep(self.ctx, self.output_dir, self.overwrite,
                         Sweep(items, compute, tables, label, key_columns, **options))

    def finish(self, result: SweepResult, tables: Sequence[Table], **options) -> None:
        """Write the outputs (see sweep.write_outputs); a failed item sets exit code 2."""
        code = write_outputs(self.ctx, self.output_dir, result, tables, **options)
        self.exit_code = max(self.exit_code, code)
