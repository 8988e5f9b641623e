"""The machine's noise, and a drift guard whose margin is set by it and whose cost is capped.

A fixed reference (the unpruned dense model's forward on the timed batch) is read for a few
seconds when a timed run starts: how much slower than their median its readings run is the
machine's noise, written into every row. A point is then measured with the reference read
before and after it; one taken while the reference was slower than the run median by more than
the margin (twice the noise, unless given) is measured again once the reference is back within
it. The noise is re-read from every reading as the run goes: a machine that settles into a
slower state for minutes is noisier than its first seconds showed, not disturbed for the rest
of the run. Every reading, repeat and wait is paid from the guard's share of the run's
TimingBudget: when that is spent, points are measured as they are, and said to be unguarded.
"""

from __future__ import annotations

import time
import timeit
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.benchmark.utils.common import set_torch_threads
from torch.utils.benchmark.utils.timer import timer as synchronising_timer

from dlrm_sparsity.budget import TimingBudget
from dlrm_sparsity.timing import Timing, warm_up

MIN_MARGIN = 0.05  # a reading this close to the median is never a disturbance
MARGIN_PER_NOISE = 2.0  # the margin: this many times the noise's 90th percentile
MIN_PROBE_READINGS = 5
WAIT_STEP_S = 0.25  # between readings while the guard waits for calm
# a reading lasts this long at least: a block of a few microseconds is mostly the clock's
# own noise, not the machine's
GUARD_BLOCK_S = 0.01

T = TypeVar("T")


@dataclass(frozen=True)
class Noise:
    """How much slower than their median a fixed computation's readings ran: at the 90th
    percentile (p90) and at the slowest (worst), as fractions (0.1: 10% slower)."""

    p90: float
    worst: float
    readings: int

    @classmethod
    def of(cls, readings: Sequence[float]) -> "Noise":
        slower = np.asarray(readings) / np.median(readings) - 1.0
        return cls(max(0.0, float(np.percentile(slower, 90))), max(0.0, float(slower.max())),
                   len(readings))

    def describe(self) -> str:
        return f"+{self.p90:.1%} at the 90th percentile, +{self.worst:.1%} at worst"


class DriftGuard:
    """The reference read around every measurement, within the budget's guard share.

    reference None: no guard (every measurement is kept as it is, with no columns).
    margin None: twice the noise (its 90th percentile) over the readings so far, at least
    MIN_MARGIN.
    """

    def __init__(self, reference: Callable[[], object] | None, budget: TimingBudget,
                 timing: Timing, block_s: float, margin: float | None = None,
                 retries: int = 2, timer: Callable[[], float] = synchronising_timer):
        self.budget, self.retries, self.threads = budget, retries, timing.threads
        self.readings: list[float] = []  # every reading
        self.baseline: list[float] = []  # the readings the run median is taken over
        self.measured_again = self.flagged = self.unguarded = 0
        self.noise: Noise | None = None  # at the start
        self.fixed_margin = margin
        if reference is None:
            return
        start = budget.clock()
        with budget.probing():  # its warm-up and readings within budget.probe_s
            with torch.inference_mode():
                per_call = warm_up(reference, timing, 0, timer)
            self.number = max(1, round(max(block_s, GUARD_BLOCK_S) / max(per_call, 1e-9)))
            self.clock = timeit.Timer(reference, timer=timer)
            reads_from = budget.clock()
            while (len(self.readings) < MIN_PROBE_READINGS
                   or budget.clock() - start + self.readings[-1] * self.number
                   <= budget.probe_s):
                self._read()
        self.noise = Noise.of(self.readings)
        self.baseline = list(self.readings)
        self.read_s = (budget.clock() - reads_from) / len(self.readings)

    def _read(self) -> float:
        """One block of the reference: seconds per call, kept among the readings."""
        with torch.inference_mode(), set_torch_threads(self.threads):
            seconds = self.clock.timeit(self.number) / self.number
        self.readings.append(seconds)
        return seconds

    @property
    def margin(self) -> float:
        """How much slower than the run median a reading may be before it is a disturbance."""
        if self.fixed_margin is not None:
            return self.fixed_margin
        return max(MIN_MARGIN, MARGIN_PER_NOISE * Noise.of(self.readings).p90)

    def drift(self, seconds: float) -> float:
        """How much slower a reading is than the run median (0.1: 10%; 0 if not slower). Only
        slowness counts: a load slows the reference down, while a reading faster than the
        median means the median was taken on a slower machine (one still warming up)."""
        return max(0.0, seconds / float(np.median(self.baseline)) - 1.0)

    def run_columns(self) -> dict:
        """The columns every guarded row shares: the noise measured at the start, and what its
        measurement took."""
        return {"machine_noise_p90": self.noise.p90, "machine_noise_worst": self.noise.worst,
                "noise_probe_s": self.budget.probe_spent_s}

    def guarded(self, measure: Callable[[], T]) -> tuple[T, dict]:
        """measure() (which books its own rounds) with the reference read around it; its
        result and the guard's columns: the reference's seconds and largest drift around the
        kept attempt, the attempts made again, whether it stayed disturbed or was guarded at
        all, and the seconds the point's measurement and the guard took."""
        if self.noise is None:  # no reference: no guard
            return measure(), {}
        spent = (self.budget.measured_s, self.budget.guard_s)
        result, columns = self._guarded(measure)
        return result, {**self.run_columns(), **columns,
                        "measure_s": self.budget.measured_s - spent[0],
                        "guard_s": self.budget.guard_s - spent[1]}

    def _guarded(self, measure: Callable[[], T]) -> tuple[T, dict]:
        if self.budget.guard_left_s() < 2 * self.read_s:  # the guard's share is spent
            self.unguarded += 1
            return measure(), {"guarded": False, "measured_again": 0, "disturbed": False}
        with self.budget.guarding():
            before = self._read()
        start = self.budget.clock()
        result = measure()  # its rounds book themselves; untimed work in it is no timing
        took = self.budget.clock() - start
        with self.budget.guarding():
            after = self._read()
        drift, again, margin = max(self.drift(before), self.drift(after)), 0, self.margin
        while (drift > margin and again < self.retries
               and self.budget.guard_left_s() >= took + 2 * self.read_s):
            again += 1
            self.wait_for_calm(self.budget.guard_left_s() - took - 2 * self.read_s, margin)
            with self.budget.guarding():  # a repeat is the guard's extra work
                before, result, after = self._read(), measure(), self._read()
            drift = max(self.drift(before), self.drift(after))
        disturbed = drift > margin
        if not disturbed:
            self.baseline += [before, after]
        self.measured_again += again
        self.flagged += disturbed
        return result, {"guarded": True, "reference_s": (before + after) / 2,
                        "reference_drift": drift, "drift_margin": margin,
                        "measured_again": again, "disturbed": disturbed}

    def wait_for_calm(self, limit_s: float, margin: float) -> None:
        """Before measuring again: read the reference every WAIT_STEP_S until it is back within
        the margin, for at most limit_s (a machine that stays busy spends it, and the point is
        then measured again at once)."""
        with self.budget.guarding():
            start = self.budget.clock()
            while (self.budget.clock() - start < limit_s
                   and self.drift(self._read()) > margin):
                time.sleep(max(0.0, min(WAIT_STEP_S, limit_s - (self.budget.clock() - start))))

    def summary(self) -> str:
        if self.noise is None:
            return "drift guard: off (no reference model could be loaded)"
        run = Noise.of(self.readings)
        return (f"machine noise: the reference (the unpruned dense forward, "
                f"{np.median(self.baseline) * 1e3:.2f} ms) read {self.noise.describe()} over "
                f"{self.noise.readings} readings at the start, {run.describe()} over all "
                f"{run.readings}; drift guard margin {self.margin:.0%} at the end: "
                f"{self.measured_again} measurement(s) taken again, {self.flagged} flagged "
                f"as disturbed, {self.unguarded} unguarded (its share of the budget spent)")
