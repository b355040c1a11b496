"""Independent re-computation of a plan's accounting, and the invariants every plan must hold.

Deliberately written from the documented rules (agent/core/planning/worst_case.py docstring), not from the planner's
internals, so a planner bug that also corrupts its own accounting still fails here.
"""

from __future__ import annotations

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.efficiency import run_levels, stock_w
from hashflex.agent.core.model import MinerState, MinerView, Plan, RunAction, SleepAction
from hashflex.agent.core.planning import PlannerRules
from hashflex.drivers.base import OnOff, PowerRange, Presets, wakes_at_limit

EPS_W = 1e-3
RUNNING = (MinerState.HASHING, MinerState.THROTTLED)


def full_w(v: MinerView) -> float:
    if v.state is MinerState.WAKING and v.woken_to_w:
        return v.woken_to_w  # it accepted this limit after its wake command: it comes up at it
    return max(v.nominal_w, stock_w(v.capability, v.nominal_w), v.commanded_w or 0.0)


def unread_w(v: MinerView) -> float:
    """An uncontrolled miner whose draw is unknown: full power, or where its own firmware may step it unasked if
    that is higher (a Presets miner: its highest preset, LuxOS ATM's ceiling)."""
    ceiling = max(v.capability.watts) if isinstance(v.capability, Presets) else 0.0
    return max(full_w(v), ceiling)


def excess(v: MinerView, rules: PlannerRules) -> float:
    """Measured above what its present state counts: counted on top, whatever the plan does with it."""
    if uncontrolled(v) or v.measured_w is None:
        return 0.0
    return max(0.0, v.measured_w - _present_w(v, rules))


def uncontrolled(v: MinerView) -> bool:
    return v.state is MinerState.UNREACHABLE or v.ignores_commands


def worst_w(v: MinerView, plan: Plan, rules: PlannerRules) -> float:
    if uncontrolled(v):
        if v.state is MinerState.UNREACHABLE:
            return max(unread_w(v), v.power_w or 0.0)
        return unread_w(v) if v.power_w is None else v.power_w
    return _planned_w(v, plan, rules) + excess(v, rules)


def _planned_w(v: MinerView, plan: Plan, rules: PlannerRules) -> float:
    action = plan.actions[v.id]
    if isinstance(action, SleepAction):
        return rules.sleep_w
    if v.state is MinerState.SLEEPING:  # woken now, counted with the excess it showed when it last ran
        if rules.use_power_limits and wakes_at_limit(v.family, v.capability):
            return float(action.watts) + v.wake_excess_w  # told its limit before the wake: it comes up at it
        full = max(v.nominal_w, stock_w(v.capability, v.nominal_w), v.commanded_w or 0.0)
        return full + v.wake_excess_w  # at full power
    if v.state is MinerState.WAKING:
        return full_w(v)  # still waking: full power (or the limit it woke to)
    return float(action.watts)


def least_w(v: MinerView, plan: Plan, rules: PlannerRules, now: float) -> float:
    """The least the miner could draw given min on/off and the plan's own overrides."""
    if uncontrolled(v):
        return worst_w(v, plan, rules)
    return _least_planned_w(v, plan, rules, now) + excess(v, rules)


def _least_planned_w(v: MinerView, plan: Plan, rules: PlannerRules, now: float) -> float:
    in_min_on = now - v.last_transition < rules.min_on_s
    if v.id in plan.min_on_overridden or not in_min_on or v.state not in (*RUNNING, MinerState.WAKING):
        return rules.sleep_w
    if v.state is MinerState.WAKING:
        return full_w(v)
    if plan.method == "sleep_only":  # cannot throttle: keeps its present level
        return float(v.commanded_w) if v.commanded_w is not None else float(stock_w(v.capability, v.nominal_w))
    return float(run_levels(v.capability, v.nominal_w, rules.curve, rules.levels_per_range)[0])


def node_sums(tree: CircuitTree, views: list[MinerView], values: list[float]) -> list[float]:
    totals = [0.0] * len(tree.ids)
    for v, w in zip(views, values, strict=True):
        for nd in tree.path(v.circuit if tree.knows(v.circuit) else None):
            totals[nd] += w
    return totals


def node_caps_w(tree: CircuitTree, target_kw: float) -> list[float]:
    caps = [c * 1000.0 for c in tree.caps_kw()]
    caps[0] = min(caps[0], target_kw * 1000.0)
    return caps


def allowed_level(v: MinerView, watts: int) -> bool:
    cap = v.capability
    if isinstance(cap, PowerRange):
        return cap.min_w <= watts <= cap.max_w and (watts - cap.min_w) % max(1, cap.step_w) == 0
    if isinstance(cap, Presets):
        return watts in cap.watts
    assert isinstance(cap, OnOff)
    return watts == round(v.nominal_w)


def expected_ths(v: MinerView, plan: Plan, rules: PlannerRules) -> float:
    if uncontrolled(v):
        if v.state is MinerState.UNREACHABLE:
            return 0.0
        drawn = unread_w(v) if v.power_w is None else v.power_w
        return rules.curve.ths_at(drawn, v.nominal_w, v.nominal_ths)
    action = plan.actions[v.id]
    if isinstance(action, SleepAction):
        return 0.0
    return rules.curve.ths_at(action.watts, v.nominal_w, v.nominal_ths)


def cannot_meet_nodes(plan: Plan) -> set[str]:
    return {a.split(":")[1] for a in plan.alarms if a.startswith("cannot_meet:")}


def check_plan(
    plan: Plan,
    views: list[MinerView],
    tree: CircuitTree,
    rules: PlannerRules,
    *,
    now: float,
    target_kw: float,
    wake_budget: int,
    ramp_allowance_kw: float | None,
) -> None:
    ids = tree.ids
    # every controllable miner has an action; uncontrolled ones have none
    for v in views:
        assert (v.id in plan.actions) != uncontrolled(v), v
    assert set(plan.uncontrolled) == {v.id for v in views if uncontrolled(v)}
    # actions are levels the hardware accepts, never above stock (unless it is the present command)
    for v in views:
        a = plan.actions.get(v.id)
        if isinstance(a, RunAction):
            assert allowed_level(v, a.watts) or a.watts == v.commanded_w, (v, a)
            assert a.watts <= max(stock_w(v.capability, v.nominal_w), v.commanded_w or 0), (v, a)
    worst = [worst_w(v, plan, rules) for v in views]
    loads = node_sums(tree, views, worst)
    caps = node_caps_w(tree, target_kw)
    assert abs(plan.worst_case_kw * 1000 - loads[0]) < 1e-3 * max(1.0, loads[0]) + EPS_W
    for nd, node in enumerate(ids):
        assert abs(plan.circuit_worst_case_kw[node] * 1000 - loads[nd]) < 1e-6 * max(1.0, loads[nd]) + EPS_W
    # the cap invariant: worst case ≤ every cap, unless an alarm says it cannot be, and then all is curtailed
    failing = cannot_meet_nodes(plan)
    for nd, node in enumerate(ids):
        if loads[nd] > caps[nd] + EPS_W:
            assert node in failing, (node, loads[nd], caps[nd], plan.alarms)
    for node in failing:
        nd = ids.index(node)
        for v in views:
            if nd in tree.path(v.circuit if tree.knows(v.circuit) else None) and not uncontrolled(v):
                assert isinstance(plan.actions[v.id], SleepAction), (node, v)
    # min off is absolute
    for v in views:
        if v.state is MinerState.SLEEPING and not uncontrolled(v) and now - v.last_transition < rules.min_off_s:
            assert isinstance(plan.actions[v.id], SleepAction), v
    # min on: broken only for listed miners, each of which was needed to meet some cap
    overridden = set(plan.min_on_overridden)
    least = [least_w(v, plan, rules, now) for v in views]
    least_loads = node_sums(tree, views, least)
    for v in views:
        protected = v.state in (*RUNNING, MinerState.WAKING) and now - v.last_transition < rules.min_on_s
        if protected and not uncontrolled(v) and isinstance(plan.actions[v.id], SleepAction):
            assert v.id in overridden, v
        if v.id in overridden:
            assert protected
            assert any("min_on_overridden" in a for a in plan.alarms)
            # optimal plans: even with everything else at its least, it did not fit; sleep-only plans (which
            # cannot throttle): it did not fit beside what the plan runs
            base = least_loads if plan.method == "optimal" else loads
            back = _unprotected_least(v, plan, rules) - rules.sleep_w
            path = tree.path(v.circuit if tree.knows(v.circuit) else None)
            assert any(base[nd] + back > caps[nd] + EPS_W for nd in path) or failing, v
    # the wake stagger
    woken = sum(1 for v in views if v.state is MinerState.SLEEPING and isinstance(plan.actions.get(v.id), RunAction))
    assert woken <= wake_budget
    # the ramp: no rise beyond what the fleet may draw now + the allowance (or the least it can draw); the plan
    # states what it rose from
    present = sum(_present_w(v, rules) for v in views)
    present += sum(excess(v, rules) for v in views)
    assert abs(plan.ramp_from_kw * 1000 - present) < 1e-6 * max(1.0, present) + EPS_W, (plan.ramp_from_kw, present)
    if ramp_allowance_kw is not None:
        assert loads[0] <= max(present + ramp_allowance_kw * 1000, least_loads[0]) + EPS_W
    # and gross: the rises summed over miners (what the ramp credit is spent by) within the allowance, whatever the
    # plan lowers elsewhere (a lower limit lands in seconds, a wake over a minute: planning/ramp_hold.py)
    raised = sum(max(0.0, _planned_w(v, plan, rules) - _present_w(v, rules)) for v in views if not uncontrolled(v))
    assert abs(plan.raised_kw * 1000 - raised) < 1e-6 * max(1.0, raised) + EPS_W, (plan.raised_kw, raised)
    if ramp_allowance_kw is not None:
        assert raised <= ramp_allowance_kw * 1000 + EPS_W, (raised, ramp_allowance_kw)
    # hashrate claimed is the hashrate of the actions
    claimed = sum(expected_ths(v, plan, rules) for v in views)
    assert abs(plan.expected_ths - claimed) < 1e-6 * max(1.0, claimed), (plan.expected_ths, claimed)


def _unprotected_least(v: MinerView, plan: Plan, rules: PlannerRules) -> float:
    """The least an overridden miner would draw had it been kept on."""
    if v.state is MinerState.WAKING:
        return full_w(v)
    if plan.method == "sleep_only":
        return float(v.commanded_w) if v.commanded_w is not None else float(stock_w(v.capability, v.nominal_w))
    return float(run_levels(v.capability, v.nominal_w, rules.curve, rules.levels_per_range)[0])


def _present_w(v: MinerView, rules: PlannerRules) -> float:
    if uncontrolled(v):
        if v.state is MinerState.UNREACHABLE:
            return max(unread_w(v), v.power_w or 0.0)
        return unread_w(v) if v.power_w is None else v.power_w
    if v.state is MinerState.SLEEPING:
        return rules.sleep_w
    if v.state is MinerState.WAKING:
        return full_w(v)
    return float(v.commanded_w) if v.commanded_w is not None else float(stock_w(v.capability, v.nominal_w))
