"""One run at a time in an output folder.

A session holds a lock on its output folder (and on a dump folder outside it) for as long as
it runs: a second run into the same folder is refused in one line that names the holder,
instead of the two removing each other's temporaries and interleaving their rows. The lock is
the operating system's (filelock), so a run that is killed gives it up with its process; only
the holder clears temporaries a killed run left behind.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from dlrm_sparsity.errors import UserInputError

LOCK_FILE = ".dlrm_sparsity.lock"
OWNER_FILE = ".dlrm_sparsity.lock.owner"  # apart from the lock file, which a waiter truncates


class FolderLock:
    def __init__(self, folder: Path, command: str):
        self.folder, self.command = Path(folder), command
        self._lock = FileLock(self.folder / LOCK_FILE, timeout=0)

    def __enter__(self) -> "FolderLock":
        try:
            self._lock.acquire()
        except Timeout:
            raise UserInputError(f"{self.folder}: another run is writing there "
                                 f"({self.holder()}); wait for it to finish, or use another "
                                 "--output-dir") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                 "since": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}"}
        (self.folder / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
        return self

    def holder(self) -> str:
        """Who holds the lock, as its owner file says."""
        try:
            owner = json.loads((self.folder / OWNER_FILE).read_text(encoding="utf-8"))
            return (f"pid {owner['pid']} on {owner['host']} since {owner['since']}: "
                    f"{owner['command']}")
        except (OSError, ValueError, KeyError):
            return "a run that is starting"

    def __exit__(self, *exc) -> None:
        (self.folder / OWNER_FILE).unlink(missing_ok=True)
        self._lock.release()


def inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents
