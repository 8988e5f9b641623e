"""A timed run's budget: the most seconds it may spend timing, stated once.

torch.utils.benchmark's adaptive_autorange stops on a precision target within a time cap; a
whole run needs the same over many points, and a drift guard that cannot eat the run. One
TimingBudget per run is that cap, and both the rounds and the guard draw from it:

- the rounds: each unit of measurement (a point's paired rounds, a stage breakdown) states what
  its first rounds take at the requested --min-run-time; if all of them do not fit in
  FIRST_ROUNDS_SHARE of the rounds' part, every unit is shortened alike (`scale`). What the
  first rounds really take (`pace`: a slow call cannot be cut below one per round) is learnt
  as units end. Rounds added for an undecided verdict draw on what is left beyond every unit's
  first rounds, at most EXTENSION times a unit's first rounds in all;
- fewer rounds: a unit cannot be shortened below one call per variant and round, so where
  the units left would overrun the budget at the pace seen even so, each gets fewer first
  rounds (FEWEST_ROUNDS at least): on a slow or busy machine the run still ends within its
  budget, and the rows say how many rounds each had (n_runs);
- the guard (reference readings, repeats, waits): its share, released unit by unit, so an
  early storm cannot spend what later points need, and never more than that share of what the
  run has timed. The noise probe at the start (probing()) is booked apart.

A run that needs less than the budget is budgeted what it needs (`effective_s`), so that the
guard's share is a share of the run, not of a cap the run never reaches.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Sequence

GUARD_SHARE = 0.20  # the drift guard's part of a run's timing, at most
FIRST_ROUNDS_SHARE = 0.80  # the first rounds' part of the rounds' seconds; the rest: extras
EXTENSION = 3.0  # a unit's rounds in all take at most this many times its first rounds
NOISE_PROBE_S = 2.0  # the longest noise probe at a run's start
PROBE_SHARE = 0.25  # and at most this part of the guard's share
FEWEST_ROUNDS = 3  # a unit's first rounds are never cut below this (timing's early look)


class TimingBudget:
    """Seconds of timing for a whole run: `total_s` at most, `guard_share` of it for the guard.

    plan(...) once the units are known, take_unit(...) before each; the seconds spent are booked
    with measuring() or guarding() on `clock`; only the outermost booking counts.
    """

    def __init__(self, total_s: float, guard_share: float = GUARD_SHARE,
                 clock: Callable[[], float] = time.perf_counter):
        if not total_s > 0 or not 0 <= guard_share < 1:
            raise ValueError(f"a timing budget needs total_s > 0 and 0 <= guard_share < 1, got "
                             f"{total_s} and {guard_share}")
        self.total_s, self.guard_share, self.clock = total_s, guard_share, clock
        self.measured_s = self.guard_s = 0.0
        self.probe_spent_s = 0.0  # of guard_s, the noise probe's
        self._booking_now = False
        self.units = self.units_left = 0
        self.need_s = self.first_left_s = 0.0
        self.planned_done_s = self.first_done_s = 0.0
        self.scale = 1.0
        self.fewer_rounds = 0  # units given fewer first rounds than asked

    def plan(self, first_rounds_s: Sequence[float]) -> None:
        """The run's units, each given by what its first rounds take at the requested length."""
        self.need_s = float(sum(first_rounds_s))
        self.units = self.units_left = len(first_rounds_s)
        rounds_s = self.total_s * (1.0 - self.guard_share)
        self.scale = min(1.0, FIRST_ROUNDS_SHARE * rounds_s / self.need_s) if self.need_s else 1.0
        self.first_left_s = self.need_s * self.scale

    @property
    def pace(self) -> float:
        """What the first rounds of the units done took over what the plan said (at least 1):
        a unit takes one call per variant and round however short its blocks are asked to be,
        which no plan made before the first call can know."""
        return max(1.0, self.first_done_s / self.planned_done_s) if self.planned_done_s else 1.0

    def record(self, planned_s: float, first_rounds_s: float) -> None:
        """A unit planned at planned_s (at the requested length) whose first rounds took
        first_rounds_s: the pace of the rest."""
        self.planned_done_s += planned_s * self.scale
        self.first_done_s += first_rounds_s

    @property
    def effective_s(self) -> float:
        """What the run is budgeted: what its first rounds need at the pace seen, with room for
        extra rounds and the guard, and never more than total_s."""
        need = self.need_s * self.scale * self.pace
        return min(self.total_s, need / FIRST_ROUNDS_SHARE / (1.0 - self.guard_share))

    @property
    def rounds_total_s(self) -> float:
        return self.effective_s * (1.0 - self.guard_share)

    @property
    def guard_total_s(self) -> float:
        return self.effective_s * self.guard_share

    def take_unit(self, first_rounds_s: float) -> float:
        """Start a unit whose first rounds take first_rounds_s at the requested length: the
        most seconds it may take, extra rounds included: its first rounds at the pace seen,
        and its share of what the rounds' part holds beyond every unit's first rounds."""
        first = first_rounds_s * self.scale * self.pace
        self.first_left_s = max(0.0, self.first_left_s - first_rounds_s * self.scale)
        self.units_left = max(0, self.units_left - 1)
        others = self.first_left_s * self.pace
        spare = self.rounds_total_s - self.measured_s - others - first
        share = spare * first / (first + others) if first + others > 0 else 0.0
        return first + max(0.0, min((EXTENSION - 1.0) * first, share))

    def rounds_for(self, rounds: int) -> int:
        """The first rounds the next unit gets: `rounds`, or fewer (FEWEST_ROUNDS at least)
        where the first rounds of the units left, this one among them, would overrun what is
        left of the rounds' part of total_s at the pace seen. Call before take_unit; record
        the unit's first rounds scaled to what all `rounds` would have taken, so that the
        pace stays a pace of full units (Experiment.paired does)."""
        left_s = self.total_s * (1.0 - self.guard_share) - self.measured_s
        projected_s = self.first_left_s * self.pace
        if rounds <= FEWEST_ROUNDS or projected_s <= left_s:
            return rounds
        self.fewer_rounds += 1
        if left_s <= 0.0:  # spent (a repeat takes a unit the plan did not count)
            return FEWEST_ROUNDS
        return max(FEWEST_ROUNDS, int(rounds * left_s / projected_s))

    @property
    def probe_s(self) -> float:
        """How long the noise probe at the start reads the reference."""
        return min(NOISE_PROBE_S, PROBE_SHARE * self.guard_total_s)

    def guard_left_s(self) -> float:
        """What the guard may still spend now: its share of the budget, released unit by unit
        (the one about to start included), and its readings, repeats and waits never more than
        guard_share of the timing so far and the next unit's, so that a run that times less
        than it was budgeted (clear verdicts stop early) keeps the guard to its share. The
        noise probe, the run's measurement of the machine, is booked apart."""
        started = min(1.0, (self.units - self.units_left + 1) / max(self.units, 1))
        released = self.probe_s + (self.guard_total_s - self.probe_s) * started
        unit_s = self.need_s * self.scale * self.pace / max(self.units, 1)
        earned = (self.probe_spent_s + self.guard_share / (1.0 - self.guard_share)
                  * (self.measured_s + unit_s))
        return min(released, earned) - self.guard_s

    def measuring(self) -> ContextManager[None]:
        """Book the block as the rounds' time (unless a block around it is booked already)."""
        return self._booking("measured_s")

    def guarding(self) -> ContextManager[None]:
        """Book the block as the guard's time: a repeat is the guard's, rounds and all."""
        return self._booking("guard_s")

    def probing(self) -> ContextManager[None]:
        """Book the block as the noise probe's: the guard's time, outside its cap."""
        return self._booking("guard_s", "probe_spent_s")

    @contextmanager
    def _booking(self, *accounts: str) -> Iterator[None]:
        if self._booking_now:  # the outermost booking takes the whole block
            yield
            return
        self._booking_now, start = True, self.clock()
        try:
            yield
        finally:
            for account in accounts:
                setattr(self, account, getattr(self, account) + self.clock() - start)
            self._booking_now = False

    @property
    def spent_s(self) -> float:
        return self.measured_s + self.guard_s

    def plan_note(self) -> str:
        shortened = (f"; the first rounds shortened to {self.scale:.0%} of --min-run-time to fit"
                     if self.scale < 1.0 else "")
        return (f"timing budget: {self.total_s:g} s at most (--time-budget), "
                f"{self.effective_s:.0f} s for {self.units} unit(s) of this run, the drift "
                f"guard's part at most {self.guard_share:.0%}{shortened}")

    def summary(self) -> str:
        extra = max(0.0, self.guard_s - self.probe_spent_s)  # clock rounding aside
        timing = self.measured_s + extra
        over = (" (over: a unit takes one call per variant and round at least)"
                if self.spent_s > self.total_s * 1.05 else "")
        fewer = (f"; {self.fewer_rounds} unit(s) given fewer first rounds to stay within it "
                 f"({FEWEST_ROUNDS} at least)" if self.fewer_rounds else "")
        return (f"timing: {self.spent_s:.1f} s of a {self.total_s:g} s budget{over} (this run "
                f"needed {self.effective_s:.0f} s at the pace its first rounds took, "
                f"{self.pace:.2f}x the plan): noise probe {self.probe_spent_s:.1f} s, rounds "
                f"{self.measured_s:.1f} s, drift guard {extra:.1f} s "
                f"({extra / timing if timing else 0.0:.0%} of the rest, at most "
                f"{self.guard_share:.0%}){fewer}")
