"""Helpers of the benchmark scripts: peak-memory sampling and a timed, sampled phase."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the suite's modules


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    peak_rss_bytes: int = 0  # highest resident size seen during the phase
    start_rss_bytes: int = 0
    cpu_s: float = 0.0  # CPU seconds of the whole process (all threads) during the phase

    @property
    def peak_growth_bytes(self) -> int:
        return self.peak_rss_bytes - self.start_rss_bytes


@contextmanager
def measured(name: str, interval_s: float = 0.005) -> Iterator[Phase]:
    """Wall time, CPU time and peak RSS of a block (RSS sampled every few ms on a thread)."""
    phase = Phase(name, start_rss_bytes=rss_bytes())
    phase.peak_rss_bytes = phase.start_rss_bytes
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            phase.peak_rss_bytes = max(phase.peak_rss_bytes, rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield phase
    finally:
        phase.wall_s = time.perf_counter() - start
        phase.cpu_s = time.process_time() - cpu_start
        done.set()
        sampler.join()
        phase.peak_rss_bytes = max(phase.peak_rss_bytes, rss_bytes())


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
