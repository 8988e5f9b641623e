"""How the suite times a forward pass: torch.utils.benchmark underneath, and what it lacks.

torch.utils.benchmark gives the Timer (its default timer synchronises the accelerator before
every reading), blocked_autorange and Measurement (median, IQR). Kept here: a warm-up long
enough to price a slow statement, a floor on the number of runs so that every figure has a
spread, a fixed-block mode for sweeps of hundreds of short measurements, and a steady CPU
allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import timeit
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils.common import TaskSpec, set_torch_threads
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
    both are needed (benchmarks/bench_timing_stability.py). At 64 MiB the threshold keeps a
    batch's activations on the heap while embedding tables larger than that are still mapped
    on their own and given back to the system when freed.
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


def measure_fixed(fn: Callable[[], object], label: str, timing: Timing,
                  timer: Callable[[], float] = synchronising_timer) -> benchmark.Measurement:
    """min_runs blocks whose length the warm-up's price of a call sets, so that they fill
    min_run_time together. blocked_autorange first grows its block tenfold until the timer's
    own overhead is under 1e-4 of it, which makes a 1 ms statement cost 0.4 s to measure
    however small min_run_time is; a sweep of hundreds of short measurements (the memory
    experiment) takes the timer's overhead (about a microsecond) instead."""
    with torch.inference_mode():
        per_call = _warm_up(fn, timing, 0, timer)
        number = max(1, round(timing.min_run_time / timing.min_runs / max(per_call, 1e-9)))
        # the stdlib's timeit on the same synchronising timer: Timer.timeit would call fn
        # twice more before every block, which triples a slow statement's cost
        clock = timeit.Timer(fn, timer=timer)
        with set_torch_threads(timing.threads):
            raw = [clock.timeit(number) for _ in range(timing.min_runs)]
    return benchmark.Measurement(number, raw, TaskSpec("fn()", "pass", label=label,
                                                       num_threads=timing.threads))


def timing_columns(m: benchmark.Measurement) -> dict:
    """A Measurement as CSV columns (seconds per call)."""
    return {"time_median_s": m.median, "time_iqr_s": m.iqr, "time_mean_s": m.mean,
            "n_runs": len(m.times), "number_per_run": m.number_per_run}
