"""Property tests of the planners: random fleets, capabilities, faults, circuits, targets and rules.

Each property is checked against an independent re-computation of the accounting (plan_checks.py).
"""

from __future__ import annotations

from hypothesis import given, settings

from hashflex.agent.core.model import MinerState, SleepAction
from hashflex.agent.core.planning import plan_sleep_only
from tests.unit.fleets import PROPS, Case, cases
from tests.unit.plan_checks import EPS_W, cannot_meet_nodes, node_caps_w, node_sums, worst_w


@PROPS
@given(cases())
def test_plan_keeps_every_invariant_for_random_fleets_with_faults(case: Case) -> None:
    """Worst case ≤ target and every circuit cap (or an alarm and all curtailed), min off never broken, min on
    only when required, wakes ≤ budget, ramp respected, hashrate claimed = hashrate of the actions."""
    p = case.planned()
    case.check(p)


@PROPS
@given(cases())
def test_sleep_only_plan_keeps_every_invariant_for_random_fleets_with_faults(case: Case) -> None:
    p = case.planned(plan_sleep_only)
    assert all(
        isinstance(a, SleepAction) or a.watts == _present_or_stock(case, mid)
        for mid, a in p.actions.items()
        if _state(case, mid) is not MinerState.SLEEPING
    ), "sleep-only must not change any running miner's limit"
    case.check(p)


@PROPS
@given(cases())
def test_hashrate_never_below_the_sleep_only_baseline(case: Case) -> None:
    p = case.planned()
    base = case.planned(plan_sleep_only)
    assert p.baseline_ths is not None
    assert abs(p.baseline_ths - base.expected_ths) < 1e-6 * max(1.0, base.expected_ths)
    fewer_overrides = len(p.min_on_overridden) < len(base.min_on_overridden)
    assert p.expected_ths >= base.expected_ths - 1e-9 * max(1.0, base.expected_ths) or fewer_overrides


@PROPS
@given(cases(faults=False))
def test_fully_controllable_fleet_meets_every_cap_unless_sleep_draw_alone_exceeds_it(case: Case) -> None:
    """Without faults the only thing that can make a node infeasible is the sleep draw of its own miners."""
    p = case.planned()
    worst = [worst_w(v, p, case.rules) for v in case.views]
    loads = node_sums(case.tree, case.views, worst)
    caps = node_caps_w(case.tree, case.target_kw)
    asleep = node_sums(case.tree, case.views, [case.rules.sleep_w] * len(case.views))
    failing = cannot_meet_nodes(p)
    for nd, node in enumerate(case.tree.ids):
        if asleep[nd] <= caps[nd] - EPS_W:
            assert node not in failing, (node, p.alarms)
            assert loads[nd] <= caps[nd] + EPS_W


@settings(PROPS, max_examples=100)
@given(cases())
def test_plan_is_deterministic(case: Case) -> None:
    assert case.planned() == case.planned()


def _state(case: Case, miner_id: str) -> MinerState:
    return next(v.state for v in case.views if v.id == miner_id)


def _present_or_stock(case: Case, miner_id: str) -> int:
    from hashflex.agent.core.efficiency import stock_w

    v = next(v for v in case.views if v.id == miner_id)
    return int(v.commanded_w) if v.commanded_w is not None else stock_w(v.capability, v.nominal_w)
