"""Files that appear under their final name only when complete, and a crash-safe progress log.

Every output of the suite (zips, CSVs, plots, processed data) is written through
`atomic_path`, so a killed run never leaves a truncated file under a final name. Long sweeps
append each finished row to a `ProgressLog` so a rerun can resume where the last one stopped.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it to final_path only on success.

    A crash or an exception leaves nothing under the final name (and removes the temporary).
    """
    final_path = Path(final_path)
    tmp = _create_temporary(final_path)
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_temporary(final_path: Path) -> Path:
    """An empty new file beside final_path, with the permissions any new file gets.

    Created with mode 0o666 so that the kernel applies the process umask itself: reading the
    umask (os.umask(0) then os.umask(old)) is not thread-safe, and a thread that interleaves
    there leaves the umask at 0 for the whole process.
    """
    for _ in range(100):
        tmp = final_path.parent / f".{final_path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{final_path}: could not create a temporary file beside it")


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete temporaries that a killed run left behind (names made by atomic_path)."""
    folder = Path(folder)
    pattern = ".*.tmp"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = 0
    for path in found:
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class ProgressLog:
    """Append-only JSON-lines logs of finished rows beside an output file, one per rank.

    Each row is flushed and fsynced as it finishes; a line torn by a crash is ignored on
    reading. Reading collects every rank's log, so a resumed run may use another world size.
    The logs are removed once the final output has been written.
    """

    def __init__(self, output_path: str | os.PathLike, rank: int = 0):
        output_path = Path(output_path)
        self.folder = output_path.parent
        self.prefix = f".{output_path.name}.progress"
        self.path = self.folder / f"{self.prefix}.rank{rank}.jsonl"

    def _all_logs(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}.rank*.jsonl"))

    def read(self) -> list[dict]:
        rows = []
        for path in self._all_logs():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # torn last line of a killed run
        return rows

    def append(self, row: dict) -> None:
        line = (json.dumps(row, default=_plain) + "\n").encode("utf-8")
        with open(self.path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # end a line torn by a crash before appending
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        for path in self._all_logs():
            path.unlink(missing_ok=True)


def _plain(value):
    """numpy scalars as the Python numbers they hold; anything else as text."""
    return value.item() if hasattr(value, "item") else str(value)
