"""How the suite times a forward pass: torch.utils.benchmark underneath, and what it lacks.

torch.utils.benchmark gives the Timer (its default timer synchronises the accelerator before
every reading), blocked_autorange and Measurement (median, IQR). Kept here: a warm-up long
enough to price a slow statement, a floor on the number of runs so that every figure has a
spread, paired rounds of the variants compared with rounds added until their verdict is clear
(adaptive_autorange's idea, per ratio), and a steady CPU allocator. The drift guard is in
drift.py, the run's budget in budget.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import timeit
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

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


@functools.cache  # find_library runs `ldconfig -p` in a child process: once, not per call
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


_MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(*tensors: torch.Tensor) -> None:
    """Let the system take back the resident pages of tensors read through a private file map
    (torch.load(mmap=True)) now; they are read from the file again when next touched. Only
    for such tensors, never written: on a private map a written page would be lost. A tensor
    in anonymous memory (a table put together from a folder's shards, a copy) is left alone:
    there the pages would read as zeros, and the allocator's own bookkeeping with them.
    The kernel's list of maps is read once for all the tensors. Elsewhere than Linux,
    nothing."""
    spans = [_page_span(t) for t in tensors if t.device.type == "cpu" and t.numel()]
    if not spans:
        return
    maps = _file_maps()
    for start, end in spans:
        if not _file_mapped(start, end, maps):
            continue
        try:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                            _MADV_DONTNEED)
        except (OSError, AttributeError, TypeError):
            pass


def _page_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The whole pages a tensor's data lies in, as [start, end) addresses."""
    page = resource.getpagesize()
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(),
                                                                strict=True))  # a view's reach
    start = tensor.data_ptr() // page * page  # the map starts on a page: still inside it
    return start, -(-(tensor.data_ptr() + span * tensor.element_size()) // page) * page


def _file_maps() -> list[tuple[int, int, bool]]:
    """The process's maps (/proc/self/maps), sorted by address: (low, high, of a file: one
    with an inode); none where the list cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        found.append((low, high, len(fields) >= 5 and fields[4] != "0"))
    return found


def _file_mapped(start: int, end: int, maps: list[tuple[int, int, bool]]) -> bool:
    """Whether the addresses [start, end) lie wholly in maps of files, in order, without a gap.
    torch does not say whether a storage is mapped (its filename is None for torch.load's
    maps), so the kernel's list is asked."""
    covered = start
    for low, high, of_file in maps:
        if high <= covered:
            continue
        if low > covered or not of_file:
            return False  # a gap, or anonymous memory
        covered = high
        if covered >= end:
            return True
    return False


def warm_up(fn: Callable[[], object], timing: Timing, called: int,
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
        per_call = warm_up(fn, timing, called, timer)
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


ROUNDS = 5  # a measurement's first rounds
MAX_ROUNDS = 40  # rounds added for an undecided verdict stop here at the latest
# an early look after this many rounds stops a measurement whose every round puts each variant
# beyond twice the least effect on one side of its base: a stricter bar for an earlier look, as
# group-sequential designs set it, so that a clear difference (torch.sparse at 1.4x to 11x the
# dense time) does not pay for rounds that cannot change its verdict
EARLY_ROUNDS = 3
# a ratio within this of 1 is no claim: "same" needs its interval inside [1/(1+e), 1+e], and
# "faster"/"slower" an interval that excludes 1 and a ratio beyond it. Without such a region a
# 1% difference is "slower" on a quiet machine and "same" on a busy one.
MIN_EFFECT = 0.05
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def round_order(labels: Sequence[str], round_index: int) -> list[str]:
    """The variants' order in one round: the list rotated by one more place each round, so
    that each variant is timed first, last and between the others equally often."""
    shift = round_index % len(labels)
    return list(labels[shift:]) + list(labels[:shift])


@dataclass(frozen=True)
class Ratio:
    """One variant's time over another's (`ratio`, from Paired.ratio), and a 95% interval from
    a bootstrap over the rounds (the rounds resampled with replacement)."""

    ratio: float
    low: float
    high: float
    min_effect: float = MIN_EFFECT

    def _claim(self) -> str | None:
        up, down = 1.0 + self.min_effect, 1.0 / (1.0 + self.min_effect)
        if self.low > 1.0 and self.ratio >= up:
            return "slower"
        if self.high < 1.0 and self.ratio <= down:
            return "faster"
        if down <= self.low and self.high <= up:
            return "same"
        return None

    @property
    def decided(self) -> bool:
        """Whether the interval settles the verdict (more rounds would not change it)."""
        return self._claim() is not None

    @property
    def verdict(self) -> str:
        """"slower" or "faster" only where the interval excludes 1 and the ratio differs from
        1 by at least min_effect; else "same" (within min_effect, or undecided)."""
        return self._claim() or "same"


@dataclass(frozen=True)
class Paired:
    """Variants of one computation timed in alternating rounds: per variant, the seconds per
    call of its block in every round (in round order), and the calls per block."""

    times: dict[str, list[float]]
    numbers: dict[str, int]
    min_effect: float = MIN_EFFECT
    first_rounds_s: float = 0.0  # what the warm-up and the first rounds took, on the timer

    def median(self, label: str) -> float:
        return float(np.median(self.times[label]))

    def iqr(self, label: str) -> float:
        q1, q3 = np.percentile(self.times[label], [25, 75])
        return float(q3 - q1)

    def mean(self, label: str) -> float:
        return float(np.mean(self.times[label]))

    def ratio(self, label: str, base: str) -> Ratio:
        """label's time over base's: the ratio of each one's fastest block over the rounds,
        and a 95% interval from a bootstrap that resamples whole rounds (both blocks of a
        round together). Interference only ever slows a block down, so the fastest of a few
        is the least disturbed (Chen and Revels, "Robust benchmarking in noisy environments",
        2016); the rounds interleave the variants, so both fastest blocks come from the same
        stretch of the machine's time, and a slow minute slows both sides alike."""
        a, b = np.asarray(self.times[label]), np.asarray(self.times[base])
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        picks = rng.integers(0, len(a), (BOOTSTRAP_SAMPLES, len(a)))
        low, high = np.percentile(a[picks].min(axis=1) / b[picks].min(axis=1), [2.5, 97.5])
        return Ratio(float(a.min() / b.min()), float(low), float(high), self.min_effect)

    def decided(self, base: str) -> bool:
        """Whether every variant's ratio to base has a clear verdict."""
        return all(self.ratio(v, base).decided for v in self.times if v != base)

    def clear_early(self, base: str) -> bool:
        """Whether every round so far puts every variant at least twice min_effect away from
        base, all on one side (the early look's bar)."""
        far = 1.0 + 2.0 * self.min_effect
        for v in self.times:
            per_round = np.asarray(self.times[v]) / np.asarray(self.times[base])
            if v != base and not ((per_round >= far).all() or (per_round <= 1 / far).all()):
                return False
        return True

    def columns(self, label: str, base: str | None = None) -> dict:
        """One variant's CSV columns; with base, its ratio to base and the interval."""
        found = {"time_median_s": self.median(label), "time_iqr_s": self.iqr(label),
                 "time_mean_s": self.mean(label), "n_runs": len(self.times[label]),
                 "number_per_run": self.numbers[label]}
        if base is not None:
            r = self.ratio(label, base)
            found.update(ratio=r.ratio, ratio_low=r.low, ratio_high=r.high,
                         ratio_verdict=r.verdict, ratio_decided=r.decided)
        return found


def measure_paired(calls: Mapping[str, Callable[[], object]], timing: Timing,
                   rounds: int = ROUNDS, called: int = 0,
                   timer: Callable[[], float] = synchronising_timer, *,
                   base: str | None = None, max_s: float | None = None,
                   min_effect: float = MIN_EFFECT, max_rounds: int = MAX_ROUNDS) -> Paired:
    """Each variant warmed up, then timed in `rounds` rounds of one block each, in an order
    rotated every round (round_order). A block lasts about min_run_time / rounds (one call at
    least), so each variant gets about min_run_time of timed calls in the first rounds.

    With base: the first rounds stop after EARLY_ROUNDS (when `rounds` is more) if every one
    puts each variant beyond twice min_effect on one side of base (Paired.clear_early). With
    base and max_s: rounds are added one at a time while a ratio to base is undecided, as long
    as the next round still fits in max_s seconds from the start (warm-up included), up to
    max_rounds: sequential, so a clear verdict stops at once."""
    labels = list(calls)
    start = timer()
    with torch.inference_mode():
        per_call = {v: warm_up(calls[v], timing, called, timer) for v in labels}
        numbers = {v: max(1, round(timing.min_run_time / rounds / max(per_call[v], 1e-9)))
                   for v in labels}
        # the stdlib's timeit on the synchronising timer: Timer.timeit would call each
        # function twice more before every block, which triples a slow statement's cost
        clocks = {v: timeit.Timer(calls[v], timer=timer) for v in labels}
        times: dict[str, list[float]] = {v: [] for v in labels}
        paired, first_rounds_s = Paired(times, numbers, min_effect), 0.0
        with set_torch_threads(timing.threads):
            timed_from, done, first = timer(), 0, True
            while first or (base is not None and max_s is not None and done < max_rounds
                            and not paired.decided(base)
                            and timer() - start + (timer() - timed_from) / done <= max_s):
                for v in round_order(labels, done):
                    times[v].append(clocks[v].timeit(numbers[v]) / numbers[v])
                done += 1
                early = (base is not None and done == EARLY_ROUNDS < rounds
                         and paired.clear_early(base))
                if first and (done == rounds or early):
                    first, first_rounds_s = False, timer() - start
    return Paired(times, numbers, min_effect, first_rounds_s)
