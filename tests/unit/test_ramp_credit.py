"""Closedloop N3 in the pure core: the ramp-up allowance is a credit that builds up between ticks (a token bucket).

Before, the allowance was the rate × this tick's dt, gone if unspent; a miner woken counts at its full power at
once, so a rate below one miner's power per tick never woke anything again (a site cut to 0 stayed at 0). Now:
- over any window, the planned worst case rises by at most rate × window + the bucket's cap;
- a sleeping fleet always comes back, whatever the rate (one miner every few ticks at the slowest);
and every plan on the way passes the independent accounting of tests/unit/plan_checks.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.model import MinerState, MinerView, RunAction, SleepAction
from hashflex.agent.core.planning import plan, plan_sleep_only
from hashflex.agent.core.planning.worst_case import PlannerRules, largest_full_w
from hashflex.agent.core.ramp import RAMP_CREDIT_TICKS, ramp_credit_cap_kw, ramp_credit_kw, spend_ramp_credit
from hashflex.drivers.base import Family, PowerRange
from tests.unit.fleets import capabilities
from tests.unit.plan_checks import check_plan

RULES = PlannerRules(min_on_s=0.0, min_off_s=0.0, sleep_w=20.0)
WAKE_S = 30.0  # how long a woken miner takes to come up in these simulations
START = 1_000_000.0
RUNNING = (MinerState.HASHING, MinerState.THROTTLED)


# ---------------------------------------------------------------------------------------------- the bucket alone
def test_the_credit_builds_up_between_ticks_up_to_its_cap() -> None:
    assert ramp_credit_kw(0.0, None, 5.0, 10.0) is None  # no rate: no limit
    assert ramp_credit_kw(0.0, 20.0, 5.0, 10.0) == pytest.approx(20.0 * 5 / 60)
    assert ramp_credit_kw(1.0, 20.0, 5.0, 10.0) == pytest.approx(1.0 + 20.0 * 5 / 60)  # what was left carries
    assert ramp_credit_kw(9.5, 20.0, 5.0, 10.0) == pytest.approx(10.0)  # at most the cap
    assert ramp_credit_kw(0.0, 20.0, -5.0, 10.0) == 0.0  # a clock going backwards earns nothing
    assert spend_ramp_credit(3.0, 1.0) == pytest.approx(2.0)
    assert spend_ramp_credit(3.0, -4.0) == pytest.approx(3.0)  # a decrease is not credited
    assert spend_ramp_credit(3.0, 5.0) == 0.0  # (a plan that must rise above it: floors) never below 0
    assert spend_ramp_credit(None, 5.0) == 0.0


def test_the_cap_holds_one_largest_miner_or_a_tick_whichever_is_larger() -> None:
    # 20 kW/min at a 5 s tick is 1.67 kW a tick: the cap must still hold a whole 3.3 kW miner
    assert ramp_credit_cap_kw(20.0, 5.0, 3.3) == pytest.approx(3.3)
    # a fast ramp: a tick's worth, as the per-tick allowance gave (no jump of several ticks when a dispatch ends)
    assert RAMP_CREDIT_TICKS == 1.0
    assert ramp_credit_cap_kw(600.0, 5.0, 3.3) == pytest.approx(50.0)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.1, 200.0),
    tick_s=st.floats(0.5, 10.0),
    largest_kw=st.floats(0.0, 10.0),
    steps=st.lists(st.tuples(st.floats(0.0, 30.0), st.floats(-50.0, 50.0)), min_size=1, max_size=60),
)
def test_over_any_window_the_rise_is_at_most_rate_times_the_window_plus_the_cap(
    rate: float, tick_s: float, largest_kw: float, steps: list[tuple[float, float]]
) -> None:
    """Whatever the ticks' spacing and whatever each plan wants to add (it gets at most its allowance), the rises
    between any two ticks add up to no more than rate × the time between them + the cap."""
    cap = ramp_credit_cap_kw(rate, tick_s, largest_kw)
    credit, t = 0.0, 0.0
    times, rises = [0.0], [0.0]
    for dt, wanted in steps:
        allowance = ramp_credit_kw(credit, rate, dt, cap)
        assert allowance is not None
        assert 0.0 <= allowance <= cap + 1e-9
        added = min(wanted, allowance)  # what a plan may add (a decrease is what it wants)
        credit = spend_ramp_credit(allowance, added)
        t += dt
        times.append(t)
        rises.append(max(0.0, added))
    for a in range(len(times)):
        for b in range(a + 1, len(times)):
            risen = sum(rises[a + 1 : b + 1])
            assert risen <= rate * (times[b] - times[a]) / 60.0 + cap + 1e-6, (a, b, risen)


# ---------------------------------------------------------------------------------------------- with the planner
def _advance(views: list[MinerView], actions: dict[str, object], now: float) -> list[MinerView]:
    """What the fleet does with a plan: sleeps and limits take at once; a woken miner is WAKING for WAKE_S."""
    out: list[MinerView] = []
    for was in views:
        v = was
        a = actions.get(v.id)
        if v.state is MinerState.WAKING and now - v.last_transition >= WAKE_S:
            v = dataclasses.replace(v, state=MinerState.HASHING)
        if isinstance(a, SleepAction) and v.state is not MinerState.SLEEPING:
            v = dataclasses.replace(v, state=MinerState.SLEEPING, power_w=RULES.sleep_w, last_transition=now)
        elif isinstance(a, RunAction):
            if v.state is MinerState.SLEEPING:
                v = dataclasses.replace(v, state=MinerState.WAKING, commanded_w=float(a.watts), last_transition=now)
            else:
                v = dataclasses.replace(v, commanded_w=float(a.watts), power_w=float(a.watts))
        out.append(v)
    return out


def _asleep(i: int, cap: object, nominal_w: float) -> MinerView:
    return MinerView(
        id=f"m{i}",
        family=Family.WHATSMINER,
        capability=cap,
        nominal_w=nominal_w,  # type: ignore[arg-type]
        nominal_ths=100.0,
        state=MinerState.SLEEPING,
        power_w=RULES.sleep_w,
        commanded_w=None,
        last_transition=START - 10_000.0,
        asleep_by_us=True,
    )


def _run_fleet(
    views: list[MinerView],
    rate: float,
    tick_s: float,
    ticks: int,
    *,
    sleep_only: bool = False,
    old_allowance: bool = False,
) -> tuple[list[MinerView], list[tuple[float, float]], float]:
    """Tick the planner with the controller's ramp credit; → the fleet, (time, rise) per tick, the largest cap."""
    tree = CircuitTree(10_000.0)
    fn = plan_sleep_only if sleep_only else plan
    credit, now, top_cap = 0.0, START, 0.0
    rises: list[tuple[float, float]] = []
    target = sum(v.nominal_w for v in views) / 1000.0 * 1.5
    for _ in range(ticks):
        now += tick_s
        cap = ramp_credit_cap_kw(rate, tick_s, largest_full_w(views) / 1000.0)
        top_cap = max(top_cap, cap)
        allowance = ramp_credit_kw(0.0 if old_allowance else credit, rate, tick_s, cap)
        p = fn(target, views, tree, RULES, now, wake_budget=100, ramp_allowance_kw=allowance)
        check_plan(p, views, tree, RULES, now=now, target_kw=target, wake_budget=100, ramp_allowance_kw=allowance)
        credit = spend_ramp_credit(allowance, p.raised_kw)
        rises.append((now, p.raised_kw))
        views = _advance(views, p.actions, now)
        if all(v.state in RUNNING for v in views) and not any(v.commanded_w is None for v in views):
            break
    return views, rises, top_cap


def test_the_closed_loop_replay_comes_back_at_one_miner_every_two_ticks() -> None:
    """The closed-loop scenario: 3 Whatsminers of 3.25 kW asleep, 20 kW/min at a 5 s tick (1.67 kW a tick, less
    than one miner): the credit reaches one miner's full power on the second tick, so one wakes every ~2 ticks.
    Before, nothing woke, ever."""
    cap = PowerRange(1500, 3500, 5)
    views = [_asleep(i, cap, 3250.0) for i in range(3)]
    for sleep_only in (False, True):
        back, rises, _ = _run_fleet(views, 20.0, 5.0, 40, sleep_only=sleep_only)
        assert all(v.state in RUNNING for v in back), back
        first = next(i for i, (_, r) in enumerate(rises) if r > 0)
        assert first == 1  # the second tick (0-based index 1): 3.33 kW of credit ≥ 3.23 kW added
        assert len(rises) <= 3 * 2 + WAKE_S / 5 + 2
    # the old per-tick allowance: nothing ever wakes
    stuck, _, _ = _run_fleet(views, 20.0, 5.0, 100, old_allowance=True)
    assert all(v.state is MinerState.SLEEPING for v in stuck)


@st.composite
def _sleeping_fleets(draw: st.DrawFn) -> list[MinerView]:
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        nominal_w = float(draw(st.integers(1000, 4000)))
        out.append(_asleep(i, draw(capabilities(nominal_w)), nominal_w))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=_sleeping_fleets(),
    rate=st.floats(3.0, 60.0),
    tick_s=st.floats(1.0, 10.0),
    sleep_only=st.booleans(),
)
def test_a_sleeping_fleet_always_comes_back_within_the_ramp(
    fleet: list[MinerView], rate: float, tick_s: float, sleep_only: bool
) -> None:
    """Any fleet, asleep under a target above it, any rate (down to far below one miner per tick): every miner is
    back within (what the fleet adds) / rate + a tick per miner + a wake-up; every plan on the way keeps the
    planner's invariants; and over any window the planned rise is ≤ rate × window + the bucket's cap."""
    total_kw = sum(largest_full_w([v]) for v in fleet) / 1000.0
    bound_s = (
        total_kw / rate * 60.0
        + (len(fleet) + 2) * tick_s
        + 2 * WAKE_S
        + ramp_credit_cap_kw(rate, tick_s, largest_full_w(fleet) / 1000.0) / rate * 60.0
    )
    ticks = int(bound_s / tick_s) + 2
    back, rises, cap = _run_fleet(fleet, rate, tick_s, ticks, sleep_only=sleep_only)
    assert all(v.state in RUNNING for v in back), (len(rises), ticks, back)
    times = [START] + [t for t, _ in rises]
    for a in range(len(times)):
        for b in range(a + 1, len(times)):
            risen = sum(r for _, r in rises[a:b])
            assert risen <= rate * (times[b] - times[a]) / 60.0 + cap + 1e-6
