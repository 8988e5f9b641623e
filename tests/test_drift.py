"""The noise probe and the drift guard, on the fake machine of test_timing: its margin comes
from the noise it measures, and everything it does is paid from the budget's guard share."""

import pytest
from test_timing import TIMING, Machine

from dlrm_sparsity import drift
from dlrm_sparsity.budget import TimingBudget
from dlrm_sparsity.drift import MIN_MARGIN, DriftGuard, Noise


def budget_on(m: Machine, total_s: float = 100.0, units: int = 10,
              unit_s: float = 1.0) -> TimingBudget:
    budget = TimingBudget(total_s, clock=m.clock)
    budget.plan([unit_s] * units)
    return budget


def guard_on(m: Machine, budget: TimingBudget | None = None, reference=None,
             **options) -> DriftGuard:
    budget = budget or budget_on(m)
    return DriftGuard(reference or m.work("reference", 0.01), budget, TIMING, block_s=0.01,
                      timer=m.clock, **options)


def unit(guard: DriftGuard, seconds: float, m: Machine, each=None):
    """One unit of measurement: take its share, then a point whose rounds cost `seconds` on
    the clock (booked as measuring, as Experiment.paired does)."""
    guard.budget.take_unit(1.0)

    def point():
        if each:
            each()
        with guard.budget.measuring():
            m.now += seconds
    return guard.guarded(point)


def test_the_noise_of_a_quiet_machine_sets_the_least_margin():
    m = Machine()
    guard = guard_on(m)
    assert guard.noise.p90 == pytest.approx(0.0) and guard.margin == MIN_MARGIN
    assert guard.budget.guard_s > 0 and len(guard.readings) >= drift.MIN_PROBE_READINGS


def test_a_noisy_machine_gets_a_margin_of_twice_its_noise():
    """One reading in four runs 30% slow: the 90th percentile of the probe is +30%, so a
    reading is a disturbance only beyond +60%; and the noise is in every row."""
    m = Machine()
    count = [0]
    inner = m.work("reference", 0.01)

    def reference():
        count[0] += 1
        m.slowdown = 1.3 if count[0] % 4 == 0 else 1.0
        inner()
        m.slowdown = 1.0
    guard = guard_on(m, reference=reference)
    assert guard.noise.p90 == pytest.approx(0.3) and guard.margin == pytest.approx(0.6)
    _, columns = unit(guard, 0.1, m)
    assert columns["machine_noise_p90"] == pytest.approx(0.3)
    assert columns["drift_margin"] == pytest.approx(0.6) and not columns["disturbed"]
    assert Noise.of([1.0, 1.0, 2.0]).describe() == "+80.0% at the 90th percentile, +100.0% at worst"


def test_a_disturbed_point_is_measured_again_and_a_clean_one_kept():
    m = Machine()
    guard = guard_on(m)
    attempts = []

    def load_once():  # a load during the first attempt, gone by the second
        attempts.append(1)
        if len(attempts) == 1:
            m.load_for(0.15, 2.0)
    _, columns = unit(guard, 0.1, m, load_once)
    assert len(attempts) == 2 and columns["measured_again"] == 1 and not columns["disturbed"]
    assert (guard.measured_again, guard.flagged) == (1, 0)


def test_the_guard_never_spends_more_than_its_share(monkeypatch):
    """A load that never stops, beyond a fixed margin: every point is disturbed. A repeat costs
    a whole point, so the guard's share pays for two of the twenty it would make; the rest are
    kept and flagged, and the run stays within its budget."""
    monkeypatch.setattr(drift, "WAIT_STEP_S", 0.0)
    m = Machine()
    budget = budget_on(m, total_s=20.0, units=10, unit_s=1.0)
    guard = guard_on(m, budget, margin=0.1)
    m.slowdown = 1.5  # every call from now on is slower than the probe's median
    for _ in range(10):
        unit(guard, 1.0, m)
    assert guard.flagged == 10 and 0 < guard.measured_again <= 3
    assert budget.guard_s <= budget.guard_total_s + 2 * guard.read_s
    assert budget.spent_s <= budget.effective_s * 1.05


def test_points_go_unguarded_once_the_share_is_spent():
    m = Machine()
    budget = TimingBudget(20.0, guard_share=0.001, clock=m.clock)
    budget.plan([1.0] * 3)  # the probe's five readings alone spend the share
    guard = guard_on(m, budget)
    _, columns = unit(guard, 1.0, m)
    assert columns["guarded"] is False and guard.unguarded == 1
    assert "1 unguarded" in guard.summary() and "machine noise" in guard.summary()


def test_the_guard_waits_for_a_load_to_pass_before_measuring_again(monkeypatch):
    monkeypatch.setattr(drift, "WAIT_STEP_S", 0.0)
    m = Machine()
    guard = guard_on(m)
    attempts = []

    def load_once():
        attempts.append(1)
        if len(attempts) == 1:
            m.load_for(0.2, 2.0)  # outlasts the point: the guard reads until it is gone
    readings = len(guard.readings)
    _, columns = unit(guard, 0.1, m, load_once)
    assert len(attempts) == 2 and columns["measured_again"] == 1 and not columns["disturbed"]
    assert len(guard.readings) > readings + 4 + 2  # both attempts' readings and the waiting


def test_without_a_reference_the_guard_measures_once_and_says_it_is_off():
    m = Machine()
    guard = DriftGuard(None, budget_on(m), TIMING, block_s=0.01)
    assert guard.guarded(lambda: 7) == (7, {})
    assert guard.summary() == "drift guard: off (no reference model could be loaded)"


def test_a_reference_faster_than_its_median_is_no_disturbance():
    """The first readings of a run can be slow (a machine warming up): a faster reference
    later is calm, and its readings join the run median."""
    m = Machine()
    m.slowdown = 1.3
    guard = guard_on(m)
    m.slowdown = 1.0
    baseline = len(guard.baseline)
    _, columns = unit(guard, 0.1, m)
    assert columns["reference_drift"] == 0.0 and not columns["disturbed"]
    assert len(guard.baseline) == baseline + 2


def test_a_machine_settling_into_a_slower_state_is_noisy_not_disturbed_for_good(monkeypatch):
    """The probe sees a quiet machine; then the machine runs 50% slower for good (another
    tenant's long job). The first points are disturbed and measured again; as the readings
    show the machine's new noise, the margin widens, and later points are kept clean instead
    of all being flagged."""
    monkeypatch.setattr(drift, "WAIT_STEP_S", 0.0)
    m = Machine()
    guard = guard_on(m, budget_on(m, units=40))
    assert guard.margin == MIN_MARGIN
    m.slowdown = 1.5
    flags = [unit(guard, 0.1, m)[1]["disturbed"] for _ in range(40)]
    assert flags[0] and not any(flags[-10:])
    assert guard.margin > 0.5


def test_a_fixed_margin_stays_fixed():
    m = Machine()
    guard = guard_on(m, margin=0.3)
    m.slowdown = 1.2
    _, columns = unit(guard, 0.1, m)
    assert guard.margin == 0.3 and columns["drift_margin"] == 0.3 and not columns["disturbed"]
