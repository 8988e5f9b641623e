"""The timing harness: paired rounds in a rotated order, ratios with intervals, rounds added
until a verdict is clear.

A fake clock stands in for the machine: every call of a timed function advances it by that
function's cost times the machine's current slowdown, so disturbances are injected exactly.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_sparsity.timing import (
    EARLY_ROUNDS,
    Paired,
    Ratio,
    Timing,
    drop_mapped_pages,
    measure_paired,
    round_order,
)


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
    assert (r.ratio, r.low, r.high) == pytest.approx((2.0, 2.0, 2.0)) and r.verdict == "slower"


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
    assert paired.ratio("sparse", "dense").ratio == pytest.approx(2.0)


def test_an_interval_that_holds_one_is_no_verdict():
    """Bursts hit each variant in rounds the other is clean: the fastest blocks are equal, and
    rounds resampled without one's clean round put either variant ahead."""
    paired = Paired({"a": [1.0, 1.1, 1.2, 1.1, 1.05], "b": [1.1, 1.0, 1.05, 1.2, 1.1]},
                    {"a": 1, "b": 1})
    r = paired.ratio("b", "a")
    assert r.ratio == 1.0 and r.low < 1.0 < r.high and r.verdict == "same"
    assert paired.columns("b", "a")["ratio_verdict"] == "same"


def noisy(m: Machine, label: str, seconds: float, pattern: list[float]):
    """A call whose cost cycles through pattern (the machine's noise, per call)."""
    inner, count = m.work(label, seconds), [0]

    def call():
        m.slowdown = pattern[count[0] % len(pattern)]
        count[0] += 1
        inner()
        m.slowdown = 1.0
    return call


def test_a_difference_below_the_least_effect_is_the_same_not_slower():
    """A tight interval just above 1 excludes 1, but a 2% difference is no claim: the same on
    a quiet machine as on a busy one, where its interval would hold 1."""
    assert Ratio(1.02, 1.01, 1.03).verdict == "same" and Ratio(1.02, 1.01, 1.03).decided
    assert Ratio(1.10, 1.06, 1.14).verdict == "slower"
    assert Ratio(0.5, 0.45, 0.55).verdict == "faster"
    wide = Ratio(1.04, 0.98, 1.12)  # could be either: undecided, reported as no claim
    assert not wide.decided and wide.verdict == "same"
    assert Ratio(1.02, 1.01, 1.03, min_effect=0.0).verdict == "slower"  # the plain rule


def costs(m: Machine, seconds: list[float], then: float):
    """A call that costs each of seconds in turn on the machine's clock, then `then`."""
    left = iter(seconds)

    def call():
        m.now += next(left, then)
    return call


WARM = 2  # the warm-up's calls at TIMING's settings


def test_rounds_are_added_until_the_verdict_is_clear():
    """A 10% slower variant whose first five rounds have one clean block each, in different
    rounds: rounds resampled without either one say anything from 0.92x to 1.45x, so rounds
    (clean ones) are added one at a time until the interval is clear."""
    m = Machine()
    calls = {"dense": costs(m, [0.01] * WARM + [0.013, 0.01, 0.013, 0.012, 0.013], 0.01),
             "sparse": costs(m, [0.011] * WARM + [0.011, 0.0145, 0.0145, 0.0145, 0.0145],
                             0.011)}
    paired = measure_paired(calls, TIMING, rounds=5, timer=m.clock, base="dense", max_s=10.0)
    r = paired.ratio("sparse", "dense")
    assert len(paired.times["dense"]) > 5 and r.decided and r.verdict == "slower"
    assert r.ratio == pytest.approx(1.1)
    shorter = Paired({v: t[:-1] for v, t in paired.times.items()}, paired.numbers)
    assert not shorter.ratio("sparse", "dense").decided  # it stopped at the first clear one


def test_bursts_that_only_slow_blocks_down_leave_the_ratio_alone():
    """Interference only ever slows a block: three of five torch.sparse blocks hit by a burst
    (2x) double the median of the per-round ratios, not the ratio of the fastest blocks."""
    times = {"dense": [0.01] * 5, "sparse": [0.04, 0.02, 0.04, 0.04, 0.02]}
    r = Paired(times, {"dense": 1, "sparse": 1}).ratio("sparse", "dense")
    assert r.ratio == pytest.approx(2.0) and r.low == pytest.approx(2.0)
    assert np.median(np.divide(times["sparse"], times["dense"])) == pytest.approx(4.0)


def test_a_clear_verdict_stops_at_the_early_look():
    """Twice the dense time in every round: clear after three rounds, the rest not taken."""
    m = Machine()
    calls = {"dense": m.work("dense", 0.01), "sparse": m.work("sparse", 0.02)}
    start = m.clock()
    paired = measure_paired(calls, TIMING, rounds=5, timer=m.clock, base="dense", max_s=10.0)
    assert len(paired.times["sparse"]) == EARLY_ROUNDS
    assert paired.ratio("sparse", "dense").verdict == "slower"
    # no rounds added: the first rounds are the whole measurement, warm-up included
    assert paired.first_rounds_s == pytest.approx(m.clock() - start)
    assert paired.first_rounds_s > EARLY_ROUNDS * 0.03


def test_the_early_look_needs_twice_the_least_effect_in_every_round():
    """7% slower: clear by the end, but not beyond the early look's 10% bar, so the first
    rounds are all taken; and without a base there is no early look at all."""
    m = Machine()
    calls = {"dense": m.work("dense", 0.01), "sparse": m.work("sparse", 0.0107)}
    paired = measure_paired(calls, TIMING, rounds=5, timer=m.clock, base="dense", max_s=10.0)
    assert len(paired.times["sparse"]) == 5
    assert paired.ratio("sparse", "dense").verdict == "slower"
    far = {"dense": m.work("dense", 0.01), "sparse": m.work("sparse", 0.05)}
    assert len(measure_paired(far, TIMING, rounds=5, timer=m.clock).times["sparse"]) == 5


def test_added_rounds_stop_at_the_measurement_s_time_limit():
    """Bursts on the variants in turn, never both clean in one round: undecided after five
    rounds, clear after six. Rounds are added only while the next fits in max_s (here the five
    rounds take 0.175 s and a sixth would end at 0.2 s), none without max_s."""
    m = Machine()

    def alternating():
        return {"dense": noisy(m, "dense", 0.01, [1.0, 1.5]),
                "sparse": noisy(m, "sparse", 0.01, [1.5, 1.0])}
    start = m.clock()
    limited = measure_paired(alternating(), TIMING, rounds=5, timer=m.clock, base="dense",
                             max_s=0.18)
    assert m.clock() - start <= 0.18 and len(limited.times["dense"]) == 5
    assert not limited.decided("dense")
    ample = measure_paired(alternating(), TIMING, rounds=5, timer=m.clock, base="dense",
                           max_s=10.0)
    assert ample.decided("dense") and len(ample.times["dense"]) == 6
    unlimited = measure_paired(alternating(), TIMING, rounds=5, timer=m.clock, base="dense")
    assert len(unlimited.times["dense"]) == 5


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's RssFile")
def test_a_mapped_tensors_dropped_pages_leave_memory_and_read_back_from_the_file(tmp_path):
    def rss_file_kib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("RssFile:")[1].split()[0])

    table = torch.randn(500_000, 16)  # 32 MB
    torch.save({"w": table}, tmp_path / "m.pt")
    mapped = torch.load(tmp_path / "m.pt", mmap=True)["w"]
    assert torch.equal(mapped, table)  # every page read in
    before = rss_file_kib()
    anonymous = table.clone()  # not a file's: left alone (its pages would read as zeros)
    drop_mapped_pages(mapped[:1000], anonymous, mapped)  # one read of the maps for all three
    assert before - rss_file_kib() > 0.9 * table.nbytes / 1024
    assert torch.equal(mapped, table)  # read again from the file
    assert torch.equal(anonymous, table)
