"""How the suite times a forward pass: torch.utils.benchmark underneath, and what it lacks.

torch.utils.benchmark gives the Timer (its default timer synchronises the accelerator before
every reading), blocked_autorange and Measurement (median, IQR). Kept here: a warm-up long
enough to price a slow statement, a floor on the number of runs so that every figure has a
spread, paired rounds of the variants compared, a drift guard, and a steady CPU
allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import timeit
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils.common import set_torch_threads
from torch.utils.benchmark.utils.timer import timer as synchronising_timer

AGREEMENT_TOLERANCE = 1e-5  # variants of one forward must agree to this (max |difference|)
MIN_RUNS = 3

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass(frozen=True)
class Timing:
    """How long and on how many threads a measurement runs."""

    threads: int
    min_run_time: float
    warmup_s: float = 0.1
    min_runs: int = MIN_RUNS


def _libc() -> ctypes.CDLL:
    """The C library, for its allocator's settings (raises where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


def steady_cpu_allocator() -> bool:
    """Serve large CPU tensors from the heap instead of fresh mmaps; True if it took effect.

    A 16384-sample forward allocates tensors of tens of MB. glibc's dynamic mmap threshold
    serves them either from reused heap memory or from new, page-faulting mappings, switching
    between the two unpredictably, so the same forward takes one of two times. A fixed
    threshold, and no trimming of the heap's top, make every run pay the same, lower cost;
    both are needed (benchmarks/bench_timing_stability.py --allocator-modes). At 64 MiB the
    threshold keeps a batch's activations on the heap while embedding tables larger than that
    are still mapped on their own and given back to the system when freed.
    """
    try:
        libc = _libc()
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**20) and
                    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False  # not glibc: nothing to set


def trim_heap() -> None:
    """Give the heap's free pages back to the system now (glibc's malloc_trim; elsewhere
    nothing). The steady setting never trims by itself, so that timings stay steady; between
    two measurements a trim costs no timing, and keeps what one step freed from adding to the
    next step's peak."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: nothing to trim


def _warm_up(fn: Callable[[], object], timing: Timing, called: int,
             timer: Callable[[], float]) -> float:
    """At least two calls, counting `called` that the caller already made (allocator growth,
    lazy init, kernel choice), for warmup_s; the price of one call."""
    start, calls = timer(), 0
    while calls + called < 2 or (timer() - start < timing.warmup_s and calls < 100):
        fn()
        calls += 1
    return (timer() - start) / max(calls, 1)


def measure(fn: Callable[[], object], label: str, timing: Timing, called: int = 0,
            timer: Callable[[], float] = synchronising_timer) -> benchmark.Measurement:
    """Warm up, then time fn in blocks (blocked_autorange), at least min_runs blocks. The
    warm-up's price of a call stretches min_run_time so that slow statements still get
    min_runs runs, and so a median and a spread."""
    with torch.inference_mode():
        per_call = _warm_up(fn, timing, called, timer)
        t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label,
                            num_threads=timing.threads, timer=timer)
        m = t.blocked_autorange(min_run_time=max(timing.min_run_time,
                                                 timing.min_runs * per_call))
        raw = list(m.raw_times)
        while len(raw) < timing.min_runs:  # fast statements: a few long blocks; add blocks
            raw += t.timeit(m.number_per_run).raw_times
    return benchmark.Measurement(m.number_per_run, raw, m.task_spec, m.metadata)


def timing_columns(m: benchmark.Measurement) -> dict:
    """A Measurement as CSV columns (seconds per call)."""
    return {"time_median_s": m.median, "time_iqr_s": m.iqr, "time_mean_s": m.mean,
            "n_runs": len(m.times), "number_per_run": m.number_per_run}


ROUNDS = 5
WAIT_STEP_S = 0.25  # between the drift guard's readings while it waits for calm
# a run may always wait this long, and beyond it no longer than it has measured
WAIT_FLOOR_S = 60.0
# a reading of the reference lasts this long at least: a block of a few microseconds (a tiny
# model, or a short --min-run-time) is mostly the clock's own noise, not the machine's
GUARD_BLOCK_S = 0.01
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def round_order(labels: Sequence[str], round_index: int) -> list[str]:
    """The variants' order in one round: the list rotated by one more place each round, so
    that each variant is timed first, last and between the others equally often."""
    shift = round_index % len(labels)
    return list(labels[shift:]) + list(labels[:shift])


@dataclass(frozen=True)
class Ratio:
    """One variant's time over another's: the median of the per-round ratios, and a 95%
    interval from a bootstrap over the rounds (the rounds resampled with replacement)."""

    median: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """"slower" or "faster" only where the interval excludes 1."""
        return "slower" if self.low > 1.0 else "faster" if self.high < 1.0 else "same"


@dataclass(frozen=True)
class Paired:
    """Variants of one computation timed in alternating rounds: per variant, the seconds per
    call of its block in every round (in round order), and the calls per block."""

    times: dict[str, list[float]]
    numbers: dict[str, int]

    def median(self, label: str) -> float:
        return float(np.median(self.times[label]))

    def iqr(self, label: str) -> float:
        q1, q3 = np.percentile(self.times[label], [25, 75])
        return float(q3 - q1)

    def mean(self, label: str) -> float:
        return float(np.mean(self.times[label]))

    def ratio(self, label: str, base: str) -> Ratio:
        """label's time over base's, round by round: neighbouring blocks, so that a slow
        minute of the machine slows both sides of each ratio."""
        per_round = np.asarray(self.times[label]) / np.asarray(self.times[base])
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        picks = rng.integers(0, len(per_round), (BOOTSTRAP_SAMPLES, len(per_round)))
        low, high = np.percentile(np.median(per_round[picks], axis=1), [2.5, 97.5])
        return Ratio(float(np.median(per_round)), float(low), float(high))

    def columns(self, label: str, base: str | None = None) -> dict:
        """One variant's CSV columns; with base, its ratio to base and the interval."""
        found = {"time_median_s": self.median(label), "time_iqr_s": self.iqr(label),
                 "time_mean_s": self.mean(label), "n_runs": len(self.times[label]),
                 "number_per_run": self.numbers[label]}
        if base is not None:
            r = self.ratio(label, base)
            found.update(ratio_median=r.median, ratio_low=r.low, ratio_high=r.high,
                         ratio_verdict=r.verdict)
        return found


def measure_paired(calls: Mapping[str, Callable[[], object]], timing: Timing,
                   rounds: int = ROUNDS, called: int = 0,
                   timer: Callable[[], float] = synchronising_timer) -> Paired:
    """Each variant warmed up, then timed in `rounds` rounds of one block each, in an order
    rotated every round (round_order). A block lasts about min_run_time / rounds (one call at
    least), so each variant gets about min_run_time of timed calls in all."""
    labels = list(calls)
    with torch.inference_mode():
        per_call = {v: _warm_up(calls[v], timing, called, timer) for v in labels}
        numbers = {v: max(1, round(timing.min_run_time / rounds / max(per_call[v], 1e-9)))
                   for v in labels}
        # the stdlib's timeit on the synchronising timer: Timer.timeit would call each
        # function twice more before every block, which triples a slow statement's cost
        clocks = {v: timeit.Timer(calls[v], timer=timer) for v in labels}
        times: dict[str, list[float]] = {v: [] for v in labels}
        with set_torch_threads(timing.threads):
            for r in range(rounds):
                for v in round_order(labels, r):
                    times[v].append(clocks[v].timeit(numbers[v]) / numbers[v])
    return Paired(times, numbers)


T = TypeVar("T")


class DriftGuard:
    """A fixed reference (the unpruned dense model's forward on the timed batch) read before
    and after every measurement. A measurement taken while the reference was more than
    `margin` off its run median is taken again, up to `retries` times, each time once the
    reference is back within the margin (waiting, in all over the run, at most `wait_s`, and
    beyond a minute no longer than the guarded measurements have taken so far); if it is still
    disturbed it is kept and flagged. The run median is
    that of the readings around the measurements kept undisturbed (and of five at the start):
    a long disturbance does not become the norm."""

    def __init__(self, reference: Callable[[], object] | None, timing: Timing,
                 margin: float = 0.10, retries: int = 2, wait_s: float = 120.0,
                 timer: Callable[[], float] = synchronising_timer):
        """reference None: no guard (every measurement kept as it is, with no columns).
        wait_s: the most the run waits, in all, for a disturbance to pass before a retry."""
        self.margin, self.retries, self.wait_s = margin, retries, wait_s
        self.waited_s = self.measured_s = 0.0
        self.readings: list[float] = []  # every reading
        self.baseline: list[float] = []  # the readings the run median is taken over
        self.measured_again = 0
        self.flagged = 0
        if reference is None:
            return
        with torch.inference_mode():
            per_call = _warm_up(reference, timing, 0, timer)
        block_s = max(timing.min_run_time / ROUNDS, GUARD_BLOCK_S)
        self.number = max(1, round(block_s / max(per_call, 1e-9)))
        self.clock = timeit.Timer(reference, timer=timer)
        self.threads = timing.threads
        for _ in range(5):  # the run's first median
            self.baseline.append(self.read())

    def read(self) -> float:
        """One block of the reference: seconds per call, kept among the readings."""
        with torch.inference_mode(), set_torch_threads(self.threads):
            seconds = self.clock.timeit(self.number) / self.number
        self.readings.append(seconds)
        return seconds

    def drift(self, seconds: float) -> float:
        """How much slower a reading is than the run median (0.1: 10%; 0 if not slower). Only
        slowness counts: a load slows the reference down, while a reading faster than the
        median means the median was taken on a slower machine (one still warming up)."""
        return max(0.0, seconds / float(np.median(self.baseline)) - 1.0)

    def guarded(self, measure: Callable[[], T]) -> tuple[T, dict]:
        """measure() with the reference read around it; its result and the guard's columns:
        the reference's seconds and largest drift around the kept attempt, the attempts made
        again, and whether it stayed disturbed."""
        if not self.readings:  # no reference: no guard
            return measure(), {}
        again = 0
        while True:
            before, start = self.read(), time.monotonic()
            result = measure()
            self.measured_s += time.monotonic() - start
            after = self.read()
            drift = max(self.drift(before), self.drift(after))
            if drift <= self.margin or again == self.retries:
                break
            again += 1
            self.wait_for_calm()
        disturbed = drift > self.margin
        if not disturbed:
            self.baseline += [before, after]
        self.measured_again += again
        self.flagged += disturbed
        return result, {"reference_s": (before + after) / 2, "reference_drift": drift,
                        "measured_again": again, "disturbed": disturbed}

    @property
    def wait_left_s(self) -> float:
        return min(self.wait_s, self.measured_s + WAIT_FLOOR_S) - self.waited_s

    def wait_for_calm(self) -> None:
        """Before measuring again: read the reference every WAIT_STEP_S until it is back within
        the margin, for at most what is left of the run's wait budget (a machine that stays
        busy spends the budget, then its points are measured and flagged at once)."""
        start = time.monotonic()
        while self.wait_left_s > 0 and self.drift(self.read()) > self.margin:
            time.sleep(min(WAIT_STEP_S, self.wait_left_s))
            self.waited_s += time.monotonic() - start
            start = time.monotonic()

    def spread(self) -> float:
        """The reference's max / min over the run."""
        return max(self.readings) / min(self.readings)

    def summary(self) -> str:
        if not self.readings:
            return "drift guard: off (no reference model could be loaded)"
        return (f"drift guard: reference {np.median(self.baseline) * 1e3:.2f} ms (median of "
                f"{len(self.baseline)} undisturbed readings), max/min {self.spread():.2f} over "
                f"all {len(self.readings)}; {self.measured_again} measurement(s) taken again, "
                f"{self.flagged} flagged "
                f"as disturbed (> {self.margin:.0%} off)")
