"""The timing budget: what a run plans, what each unit may take, what the guard may spend."""

import pytest

from dlrm_sparsity.budget import EXTENSION, FIRST_ROUNDS_SHARE, TimingBudget


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_run_that_fits_is_budgeted_what_it_needs():
    """60 units of 1 s in a 600 s budget: nothing is shortened, and the run is budgeted what
    its first rounds need plus room for extra rounds and the guard, not the whole cap."""
    budget = TimingBudget(600.0)
    budget.plan([1.0] * 60)
    assert budget.scale == 1.0
    assert budget.effective_s == pytest.approx(60 / FIRST_ROUNDS_SHARE / 0.8)
    assert budget.guard_total_s == pytest.approx(0.2 * budget.effective_s)
    assert budget.take_unit(1.0) == pytest.approx(min(EXTENSION, 1 / FIRST_ROUNDS_SHARE))


def test_a_run_that_does_not_fit_is_shortened_alike():
    budget = TimingBudget(60.0)
    budget.plan([2.0] * 60)  # 120 s of first rounds for 60 * 0.8 * 0.8 = 38.4 s
    assert budget.scale == pytest.approx(38.4 / 120)
    assert budget.effective_s == 60.0
    assert "shortened to 32%" in budget.plan_note()


def test_unspent_seconds_carry_over_and_an_overrun_takes_from_later_units():
    clock = Clock()
    budget = TimingBudget(100.0, clock=clock)
    budget.plan([1.0] * 4)  # effective 6.25 s: 5 s of rounds, 1.25 s of guard
    first = budget.take_unit(1.0)
    with budget.measuring():
        clock.now += 1.0  # a quick unit: the rest is shared by the others
    assert budget.take_unit(1.0) == pytest.approx(4.0 / 3)
    with budget.measuring():
        clock.now += 4.0  # an overrun: the others keep their first rounds, no more
    assert first == pytest.approx(1.25) and budget.take_unit(1.0) == 1.0


def test_the_guard_share_is_released_unit_by_unit():
    clock = Clock()
    budget = TimingBudget(1000.0, clock=clock)
    budget.plan([10.0] * 4)  # effective 62.5 s, guard 12.5 s, probe 2 s
    budget.measured_s = 100.0  # timing so far, enough not to cap the guard here
    assert budget.probe_s == 2.0
    assert budget.guard_left_s() == pytest.approx(2.0 + 10.5 / 4)
    with budget.guarding():
        clock.now += 5.0  # more than the probe: what is left waits for the next units
    assert budget.guard_left_s() == pytest.approx(2.0 + 10.5 / 4 - 5.0)
    for _ in range(4):
        budget.take_unit(10.0)
    assert budget.guard_left_s() == pytest.approx(12.5 - 5.0)
    assert "drift guard 5.0 s (5% of the rest, at most 20%)" in budget.summary()


def test_the_guard_keeps_to_its_share_of_what_the_run_timed():
    """Clear verdicts stop early, so a run times less than it was budgeted: the guard's
    readings, repeats and waits stay within a quarter of the rounds' time (20% of the whole),
    the noise probe booked apart."""
    clock = Clock()
    budget = TimingBudget(1000.0, clock=clock)
    budget.plan([10.0] * 4)  # budgeted 62.5 s, of which 12.5 s for the guard
    with budget.probing():
        clock.now += 1.5
    assert (budget.probe_spent_s, budget.guard_s) == (1.5, 1.5)
    budget.take_unit(10.0)
    with budget.measuring():
        clock.now += 4.0  # the first unit took 4 s, not the 10 s planned
    # a quarter of 4 s timed and of the next unit's 10 s, beside the probe
    assert budget.guard_left_s() == pytest.approx(1.5 + 0.25 * (4.0 + 10.0) - 1.5)


def test_a_budget_refuses_nonsense():
    with pytest.raises(ValueError, match="total_s > 0"):
        TimingBudget(0.0)
    with pytest.raises(ValueError, match="guard_share"):
        TimingBudget(10.0, guard_share=1.0)


def test_only_the_outermost_booking_counts():
    """A repeat is the guard's work, its rounds included: nothing is booked twice."""
    clock = Clock()
    budget = TimingBudget(100.0, clock=clock)
    with budget.guarding():
        clock.now += 1.0
        with budget.measuring():
            clock.now += 2.0
    with budget.measuring():
        clock.now += 4.0
    assert (budget.guard_s, budget.measured_s) == (3.0, 4.0)


def test_the_pace_of_slow_calls_raises_the_run_s_need_up_to_the_budget():
    """Units whose first rounds take twice the plan (one slow call per round cannot be cut):
    the rest are planned at that pace, and the run may take up to its budget, no more."""
    clock = Clock()
    budget = TimingBudget(20.0, clock=clock)
    budget.plan([1.0] * 4)  # needs 6.25 s at the plan's pace
    for _ in range(2):
        budget.take_unit(1.0)
        with budget.measuring():
            clock.now += 2.0
        budget.record(1.0, 2.0)
    assert budget.pace == 2.0 and budget.effective_s == pytest.approx(12.5)
    # its first rounds at that pace, and its half of the 2 s that the rounds' 10 s hold beyond
    # the 4 s spent and the 2 * 2 s of first rounds to come
    assert budget.take_unit(1.0) == pytest.approx(2.0 + 1.0)
    budget.plan([1.0] * 40)
    budget.record(1.0, 100.0)
    assert budget.effective_s == 20.0  # the cap


def run_at_the_floor(budget: TimingBudget, clock: Clock, units: int, call_s: float,
                     adapt: bool) -> list[int]:
    """units measurements of 2 variants that cannot be shortened: each round costs one call
    per variant whatever the plan says. Returns the first rounds each unit had."""
    budget.plan([1.0] * units)
    had = []
    for _ in range(units):
        rounds = budget.rounds_for(5) if adapt else 5
        budget.take_unit(1.0)
        took = 2 * call_s * (1 + rounds)  # a warm-up call and one call per round, per variant
        with budget.measuring():
            clock.now += took
        budget.record(1.0, took * 5 / rounds)
        had.append(rounds)
    return had


def test_a_run_at_the_floor_gets_fewer_rounds_and_ends_within_its_budget():
    """Blocks cannot be shorter than a call: at five rounds the run would overrun its
    budget by a fifth; given fewer rounds where needed, it ends within it, and says so."""
    clock = Clock()
    fixed = TimingBudget(60.0, clock=clock)
    run_at_the_floor(fixed, clock, units=40, call_s=0.12, adapt=False)
    assert fixed.measured_s > 1.15 * 60.0 * 0.8  # the rounds' part: 80% of the budget
    clock = Clock()
    budget = TimingBudget(60.0, clock=clock)
    had = run_at_the_floor(budget, clock, units=40, call_s=0.12, adapt=True)
    assert had[0] == 5 and min(had) == 3 and budget.fewer_rounds == had.count(3) + had.count(4)
    assert budget.measured_s <= 60.0 * 0.8 + 2 * 0.12 * 6  # within it, give or take one unit
    assert "unit(s) given fewer first rounds to stay within it (3 at least)" in budget.summary()


def test_a_run_that_fits_keeps_its_rounds_and_none_go_below_three():
    clock = Clock()
    budget = TimingBudget(600.0, clock=clock)
    assert run_at_the_floor(budget, clock, units=40, call_s=0.1, adapt=True) == [5] * 40
    assert budget.fewer_rounds == 0 and "fewer" not in budget.summary()
    clock = Clock()
    tiny = TimingBudget(1.0, clock=clock)
    assert set(run_at_the_floor(tiny, clock, units=10, call_s=0.1, adapt=True)[1:]) == {3}
    assert tiny.rounds_for(2) == 2  # asked for fewer than the least: as asked


def test_a_unit_beyond_the_plan_on_a_spent_budget_gets_the_fewest_rounds():
    """A repeat of the guard's takes a unit the plan did not count: with nothing planned left
    and the budget spent, the unit gets three rounds (once: a division by zero)."""
    clock = Clock()
    budget = TimingBudget(1.0, clock=clock)
    budget.plan([1.0])
    budget.take_unit(1.0)
    with budget.measuring():
        clock.now += 2.0
    assert budget.first_left_s == 0.0 and budget.rounds_for(5) == 3
