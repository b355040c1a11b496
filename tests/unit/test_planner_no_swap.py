"""Property tests: a plan never throws a wake-up away (closed-loop finding N4), and never cuts deeper than its limit.

A miner's wake-up is minutes without hashrate. A plan that sleeps a miner that is on (running, or still waking)
while it wakes a sleeping one swaps a wake-up in progress (or a running miner) for a new one: repeated each tick,
four swaps took a site from 9.9 kW to 1.5 kW under a constant 15.2 kW cap. Both planners, random fleets with
faults and circuits (fleets.py):
- no plan sleeps a controllable miner that is on while it wakes a sleeping one;
- under an unchanged limit, the next plan (its predecessor's wakes still waking, its sleeps asleep) does not swap
  a miner that is still waking for a sleeping one (N4's sequence: a sleep-only plan woke miners in its order, the
  optimal plan on the next tick swapped them for more efficient ones; each plan alone was within one miner of the
  limit, the swaps added up);
- with no circuit below the site, no plan's worst case is below the least of (what the fleet is counted at now,
  each running miner at no more than its stock level, which is the most the optimiser commands) and the planning
  limit (target or site cap, less the headroom), by more than one miner's worth (its full power less its sleep
  draw): the greedy stops short of the limit by less than the one grant that did not fit.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.efficiency import stock_w
from hashflex.agent.core.model import MinerState, MinerView, Plan, RunAction, SleepAction
from hashflex.agent.core.planning import plan, plan_sleep_only
from hashflex.drivers.base import wakes_at_limit
from tests.unit.fleets import NOW, PROPS, Case, cases
from tests.unit.plan_checks import EPS_W, RUNNING, full_w, node_sums, uncontrolled, worst_w


def _both(case: Case) -> list[Plan]:
    return [_plan(fn, case, case.views, NOW) for fn in (plan, plan_sleep_only)]


def _on(v: MinerView) -> bool:
    return not uncontrolled(v) and v.state in (*RUNNING, MinerState.WAKING)


@PROPS
@given(cases())
def test_no_plan_sleeps_a_miner_that_is_on_while_it_wakes_a_sleeping_one(case: Case) -> None:
    for p in _both(case):
        slept = [v.id for v in case.views if _on(v) and isinstance(p.actions[v.id], SleepAction)]
        woken = [
            v.id
            for v in case.views
            if not uncontrolled(v) and v.state is MinerState.SLEEPING and isinstance(p.actions[v.id], RunAction)
        ]
        waking_slept = [i for i in slept if next(v for v in case.views if v.id == i).state is MinerState.WAKING]
        assert not (slept and woken), (p.method, "slept", slept, "of which waking", waking_slept, "woken", woken)


@PROPS
@given(cases())
def test_no_plan_cuts_deeper_than_its_limit_requires_plus_one_miner(case: Case) -> None:
    site_kw = case.tree.caps_kw()[0]
    case = dataclasses.replace(case, tree=CircuitTree(site_kw, []))  # the site only: its limit is the one binding
    rules = case.rules
    limit_w = min(case.target_kw, site_kw) * 1000.0 * (1.0 - rules.headroom_pct / 100.0)
    keepable = 0.0  # the fleet now, a running miner at no more than the most the optimiser commands (stock)
    one_miner = 0.0
    for v in case.views:
        if uncontrolled(v):
            continue
        one_miner = max(one_miner, full_w(v) + v.wake_excess_w - rules.sleep_w)
        if v.state is MinerState.SLEEPING:
            keepable += rules.sleep_w
        elif v.state is MinerState.WAKING:
            keepable += full_w(v)
        else:
            stock = float(stock_w(v.capability, v.nominal_w))
            keepable += min(stock, v.commanded_w) if v.commanded_w is not None else stock
    for p in _both(case):
        worst = [worst_w(v, p, rules) for v in case.views]
        fixed = sum(w for v, w in zip(case.views, worst, strict=True) if uncontrolled(v))
        load = node_sums(case.tree, case.views, worst)[0]
        floor = min(keepable + fixed, limit_w) - one_miner
        assert load >= floor - EPS_W, (p.method, load, keepable + fixed, limit_w, one_miner)


@PROPS
@given(cases())
def test_under_an_unchanged_limit_the_next_plan_swaps_no_waking_miner_for_a_sleeping_one(case: Case) -> None:
    for fn in (plan, plan_sleep_only):
        first = _plan(fn, case, case.views, NOW)
        after = [_apply(v, first, case) for v in case.views]
        second = _plan(plan, case, after, NOW + 2.0)  # the controller's next tick: the optimal plan
        slept = [
            v.id
            for v in after
            if _on(v) and v.state is MinerState.WAKING and isinstance(second.actions[v.id], SleepAction)
        ]
        woken = [
            v.id
            for v in after
            if not uncontrolled(v) and v.state is MinerState.SLEEPING and isinstance(second.actions[v.id], RunAction)
        ]
        assert not (slept and woken), (first.method, "then slept", slept, "and woke", woken)


def _plan(fn, case: Case, views: list[MinerView], now: float) -> Plan:  # type: ignore[no-untyped-def]
    return fn(
        case.target_kw,
        views,
        case.tree,
        case.rules,
        now,
        wake_budget=case.wake_budget,
        ramp_allowance_kw=case.ramp_allowance_kw,
    )


def _apply(v: MinerView, p: Plan, case: Case) -> MinerView:
    """The miner once plan p's commands took (a wake-up lasts minutes: a woken miner is still waking)."""
    if uncontrolled(v):
        return v
    a = p.actions[v.id]
    if isinstance(a, SleepAction):
        if v.state is MinerState.SLEEPING:
            return v
        return dataclasses.replace(v, state=MinerState.SLEEPING, power_w=case.rules.sleep_w, last_transition=NOW)
    if v.state is MinerState.SLEEPING:
        if case.rules.use_power_limits and wakes_at_limit(v.family, v.capability):  # limit set, then woken
            woken = float(a.watts)  # the controller records the limit it took with the wake (woken_to_w)
            return dataclasses.replace(
                v,
                state=MinerState.WAKING,
                power_w=case.rules.sleep_w,
                last_transition=NOW,
                commanded_w=woken,
                woken_to_w=woken,
            )
        return dataclasses.replace(v, state=MinerState.WAKING, power_w=case.rules.sleep_w, last_transition=NOW)
    if v.state is MinerState.WAKING:
        return v  # still coming up (its run level takes hold once it is up)
    state = MinerState.THROTTLED if a.watts < stock_w(v.capability, v.nominal_w) - 1 else MinerState.HASHING
    return dataclasses.replace(v, state=state, power_w=float(a.watts), commanded_w=float(a.watts))
