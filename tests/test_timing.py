"""The timing harness: paired rounds in a rotated order, ratios with intervals, the drift guard.

A fake clock stands in for the machine: every call of a timed function advances it by that
function's cost times the machine's current slowdown, so disturbances are injected exactly.
"""

import time

import pytest

from dlrm_sparsity import timing
from dlrm_sparsity.timing import DriftGuard, Paired, Timing, measure_paired, round_order


class Machine:
    def __init__(self):
        self.now, self.slowdown, self.calls = 0.0, 1.0, []
        self.load = (float("inf"), float("inf"), 1.0)  # from, until, slowdown

    def clock(self) -> float:
        return self.now

    def load_for(self, seconds: float, slowdown: float):
        """A competing load from now on, for that many seconds of the clock."""
        self.load = (self.now, self.now + seconds, slowdown)

    def work(self, label: str, seconds: float):
        def call():
            self.calls.append(label)
            start, until, slowdown = self.load
            loaded = slowdown if start <= self.now < until else 1.0
            self.now += seconds * self.slowdown * loaded
        return call


TIMING = Timing(threads=1, min_run_time=0.05, warmup_s=0.01)


def test_each_round_rotates_the_order_by_one():
    assert [round_order("abc", r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_paired_rounds_time_the_variants_in_the_rotated_order():
    m = Machine()
    calls = {"dense": m.work("dense", 0.01), "sparse": m.work("sparse", 0.02)}
    paired = measure_paired(calls, TIMING, rounds=4, timer=m.clock)
    assert paired.numbers == {"dense": 1, "sparse": 1}  # blocks of 0.05 / 4 s: one call each
    timed = m.calls[-8:]  # after the warm-up: one block per variant per round
    assert timed == ["dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse", "dense"]
    assert paired.times["sparse"] == pytest.approx([0.02] * 4)
    r = paired.ratio("sparse", "dense")
    assert (r.median, r.low, r.high) == pytest.approx((2.0, 2.0, 2.0)) and r.verdict == "slower"


def test_a_slow_minute_cancels_out_of_the_paired_ratio():
    """The machine is 3x slower for the two middle rounds: both variants' blocks slow down
    together, so every per-round ratio is still 2, while the medians alone would mislead."""
    m = Machine()
    calls = {"dense": m.work("dense", 0.01), "sparse": m.work("sparse", 0.02)}

    def slow_middle(label):  # the third to sixth timed blocks run slow
        inner = calls[label]

        def call():
            timed = len(m.calls) - warmup_calls
            m.slowdown = 3.0 if 2 <= timed < 6 else 1.0
            inner()
        return call
    warmup_calls = 0
    m.calls = []
    probe = measure_paired(calls, TIMING, rounds=4, timer=m.clock)  # learn the warm-up count
    warmup_calls = len(m.calls) - 8
    m.calls = []
    paired = measure_paired({v: slow_middle(v) for v in calls}, TIMING, rounds=4,
                            timer=m.clock)
    assert max(paired.times["dense"]) == pytest.approx(0.03) and probe.median("dense") > 0
    assert paired.ratio("sparse", "dense").median == pytest.approx(2.0)


def test_an_interval_that_holds_one_is_no_verdict():
    paired = Paired({"a": [1.0, 1.0, 1.0, 1.0, 1.0], "b": [0.9, 1.1, 0.95, 1.05, 1.0]},
                    {"a": 1, "b": 1})
    r = paired.ratio("b", "a")
    assert r.low < 1.0 < r.high and r.verdict == "same"
    assert paired.columns("b", "a")["ratio_verdict"] == "same"


def guard_on(m: Machine, **options) -> DriftGuard:
    return DriftGuard(m.work("reference", 0.01), TIMING, timer=m.clock, **options)


def test_the_guard_measures_a_disturbed_point_again_and_keeps_a_clean_one():
    m = Machine()
    guard = guard_on(m)
    attempts = []

    def point():  # a load starts during the first attempt and is gone by the second
        attempts.append(1)
        if len(attempts) == 1:
            m.load_for(0.015, 2.0)  # the reading after this attempt runs at half speed
        return len(attempts)
    result, columns = guard.guarded(point)
    assert result == 2 and columns["measured_again"] == 1 and not columns["disturbed"]
    assert columns["reference_drift"] <= 0.10
    assert (guard.measured_again, guard.flagged) == (1, 0)


def test_the_guard_flags_a_point_that_stays_disturbed_after_its_retries():
    m = Machine()
    guard = guard_on(m, retries=2, wait_s=0.3)  # the load outlasts the run's wait budget
    calls = []

    def point():
        calls.append(1)
        m.load_for(float("inf"), 1.5)  # a load that never stops
    _, columns = guard.guarded(point)
    assert len(calls) == 3 and columns["measured_again"] == 2 and columns["disturbed"]
    assert columns["reference_drift"] > 0.10
    assert guard.flagged == 1 and "1 flagged as disturbed" in guard.summary()
    assert guard.wait_left_s <= 0  # spent once: the next disturbed point does not wait
    start = time.monotonic()
    guard.guarded(point)
    assert time.monotonic() - start < 0.2 and guard.flagged == 2


def test_the_guard_waits_for_a_load_to_pass_before_measuring_again(monkeypatch):
    """A load that outlasts the point's own readings: the guard reads the reference until the
    load is gone (ten readings 0.01 s apart), then the retry is clean."""
    monkeypatch.setattr(timing, "WAIT_STEP_S", 0.01)
    m = Machine()
    guard = guard_on(m, wait_s=5.0)
    attempts = []

    def point():
        attempts.append(1)
        if len(attempts) == 1:
            m.load_for(0.2, 2.0)  # about ten of the reference's readings
    _, columns = guard.guarded(point)
    assert len(attempts) == 2 and columns["measured_again"] == 1 and not columns["disturbed"]
    assert len(guard.readings) > 5 + 2 + 2 + 3  # the start, both attempts, and the waiting


def test_a_quiet_machine_passes_the_guard_at_once():
    m = Machine()
    guard = guard_on(m)
    _, columns = guard.guarded(lambda: None)
    assert columns == {"reference_s": pytest.approx(0.01), "reference_drift": 0.0,
                       "measured_again": 0, "disturbed": False}
    assert guard.spread() == pytest.approx(1.0)


def test_without_a_reference_the_guard_measures_once_and_says_it_is_off():
    guard = DriftGuard(None, TIMING)
    assert guard.guarded(lambda: 7) == (7, {})
    assert guard.summary() == "drift guard: off (no reference model could be loaded)"


def test_a_reference_faster_than_its_median_is_no_disturbance():
    """The first readings of a run can be slow (a machine warming up): a faster reference
    later is calm, and its readings join the run median."""
    m = Machine()
    m.slowdown = 1.3
    guard = guard_on(m)
    m.slowdown = 1.0
    _, columns = guard.guarded(lambda: None)
    assert columns["reference_drift"] == 0.0 and not columns["disturbed"]
    assert len(guard.baseline) == 5 + 2
