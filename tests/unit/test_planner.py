"""Table tests of the planner: each test names the requirement it proves, on a small hand-made fleet."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.model import Action, MinerState, MinerView, Plan, RunAction, SleepAction
from hashflex.agent.core.planning import PlannerRules, plan, plan_sleep_only
from hashflex.drivers.base import Capability, Family, OnOff, PowerRange, Presets
from tests.unit.plan_checks import check_plan

NOW = 1_000_000.0
LONG_AGO = NOW - 10_000.0
RANGE = PowerRange(1500, 3500, 5)
RULES = PlannerRules(sleep_w=20.0)


def miner(
    idx: int,
    *,
    cap: Capability = RANGE,
    nominal_w: float = 3250.0,
    nominal_ths: float = 110.0,
    state: MinerState = MinerState.HASHING,
    power_w: float | None = None,
    commanded_w: float | None = None,
    since: float = LONG_AGO,
    circuit: str | None = None,
    priority: int = 0,
    ignores: bool = False,
    family: Family = Family.LUXOS,
) -> MinerView:
    running = state in (MinerState.HASHING, MinerState.THROTTLED)
    return MinerView(
        id=f"m{idx}",
        family=family,
        capability=cap,
        nominal_w=nominal_w,
        nominal_ths=nominal_ths,
        state=state,
        power_w=power_w if power_w is not None or not running else (commanded_w or nominal_w),
        commanded_w=commanded_w,
        last_transition=since,
        circuit=circuit,
        priority=priority,
        ignores_commands=ignores,
    )


def run(
    target_kw: float,
    views: list[MinerView],
    *,
    tree: CircuitTree | None = None,
    rules: PlannerRules = RULES,
    wake_budget: int = 100,
    ramp: float | None = None,
    sleep_only: bool = False,
) -> Plan:
    tree = tree or CircuitTree(10_000.0)
    fn = plan_sleep_only if sleep_only else plan
    p = fn(target_kw, views, tree, rules, NOW, wake_budget=wake_budget, ramp_allowance_kw=ramp)
    check_plan(
        p, views, tree, rules, now=NOW, target_kw=target_kw, wake_budget=wake_budget, ramp_allowance_kw=ramp
    )  # every table case keeps the invariants
    return p


def asleep(p: Plan) -> set[str]:
    return {mid for mid, a in p.actions.items() if isinstance(a, SleepAction)}


def watts(a: Action) -> int:
    assert isinstance(a, RunAction)
    return a.watts


# ---------------------------------------------------------------------------------------------- efficiency
def test_many_underclocked_miners_beat_fewer_at_full_power() -> None:
    fleet = [miner(i) for i in range(10)]
    p = run(20.0, fleet)  # ~60 % of nominal
    base = run(20.0, fleet, sleep_only=True)
    assert not asleep(p), "at 60 % every miner should run, under-clocked"
    assert len(asleep(base)) == 4
    assert p.expected_ths > base.expected_ths * 1.05
    assert p.method == "optimal"
    assert p.baseline_ths == pytest.approx(base.expected_ths)


def test_least_efficient_miners_sleep_first() -> None:
    good = [miner(i, cap=OnOff(), nominal_w=3000, nominal_ths=150) for i in range(3)]  # 20 J/TH
    bad = [miner(i + 3, cap=OnOff(), nominal_w=3000, nominal_ths=75) for i in range(3)]  # 40 J/TH
    for sleep_only in (False, True):
        p = run(9.5, good + bad, sleep_only=sleep_only)
        assert asleep(p) == {"m3", "m4", "m5"}


def test_a_site_over_its_headroom_but_within_its_target_sleeps_no_running_miner_to_raise_others() -> None:
    """Soak 20261210 (seed 3865): a plan fills the room under the target less the headroom to the watt; at the
    next tick a reading counts the site a few watts above that. Taken for a cut, the optimiser re-ranked by ratio
    alone and slept the less efficient running miners to raise the efficient ones (carried out sleep first: the
    site dipped by 7 kW for 14 W). The headroom is the margin for that noise: the site fits, and the few watts come
    off the raises."""
    good = [miner(i, nominal_ths=150, commanded_w=2000, state=MinerState.THROTTLED) for i in range(4)]
    poor = [miner(i + 4, cap=OnOff(), nominal_w=1800, nominal_ths=20) for i in range(2)]  # on/off, 90 J/TH
    rules = PlannerRules(sleep_w=20.0, headroom_pct=1.0)
    present_kw = 4 * 2.0 + 2 * 1.8
    for target_kw in (present_kw, present_kw / 0.995):  # counted at the target, or half the headroom above it
        p = run(target_kw, good + poor, rules=rules)
        assert not asleep(p), (target_kw, p.actions)
        assert p.worst_case_kw <= target_kw * 0.99 + 1e-6
        assert all(watts(p.actions[v.id]) <= 2000 for v in good)  # the cut came off the raises, nothing raised
    assert asleep(run(present_kw * 0.9, good + poor, rules=rules)) == {"m4", "m5"}  # a cut: least efficient first


def test_a_waking_miner_is_kept_on_when_the_site_is_a_few_watts_into_its_headroom() -> None:
    """Soak of 2026-12-04 night, site 10000: three miners at their lowest run level and one waking at its limit,
    counted 3 W into the 1 % headroom (within the target). Slept for it, its wake-up was thrown away and the next
    plan woke another: while the site fits its hard limits, what is on keeps its first level within them."""
    floor_w = 1790  # the lowest run level of a 3,250 W range miner (55 % of nominal, on its run-level grid)
    running = [miner(i, commanded_w=floor_w, state=MinerState.THROTTLED) for i in range(3)]
    waking = miner(3, commanded_w=1800, state=MinerState.WAKING, since=NOW - 5.0)
    waking = dataclasses.replace(waking, woken_to_w=1800.0)
    rules = PlannerRules(sleep_w=20.0, headroom_pct=1.0)
    present_kw = (3 * floor_w + 1800) / 1000.0
    p = run(present_kw / 0.9995, [*running, waking], rules=rules)
    assert not asleep(p), p.actions
    assert p.worst_case_kw <= present_kw / 0.9995 + 1e-6


def test_sleep_only_plan_changes_no_power_limit() -> None:
    fleet = [miner(i, commanded_w=2500, state=MinerState.THROTTLED) for i in range(4)]
    p = run(6.0, fleet, sleep_only=True)
    assert {watts(a) for a in p.actions.values() if isinstance(a, RunAction)} == {2500}
    assert len(asleep(p)) == 2


def test_use_power_limits_false_plans_sleep_only() -> None:
    fleet = [miner(i) for i in range(10)]
    p = run(20.0, fleet, rules=PlannerRules(sleep_w=20.0, use_power_limits=False))
    assert p.method == "sleep_only"
    assert len(asleep(p)) == 4


def test_planner_never_commands_above_stock_power() -> None:
    fleet = [miner(i, cap=PowerRange(1500, 4000, 5), nominal_w=3250) for i in range(3)]
    p = run(100.0, fleet)
    assert all(watts(a) <= 3250 for a in p.actions.values())


# ---------------------------------------------------------------------------------------------- min on / off
def test_min_off_is_never_broken_even_with_room() -> None:
    fleet = [miner(0, state=MinerState.SLEEPING, since=NOW - 30), miner(1, state=MinerState.SLEEPING)]
    p = run(100.0, fleet)
    assert isinstance(p.actions["m0"], SleepAction)
    assert isinstance(p.actions["m1"], RunAction)


def test_min_on_kept_when_the_target_can_be_met_otherwise() -> None:
    fresh = miner(0, cap=OnOff(), nominal_w=3000, nominal_ths=60, since=NOW - 30)  # inefficient, just woken
    others = [miner(i + 1, cap=OnOff(), nominal_w=3000, nominal_ths=150) for i in range(3)]
    p = run(6.1, [fresh, *others])
    assert isinstance(p.actions["m0"], RunAction), "the optimiser must not choose to sleep a min-on miner"
    assert not p.min_on_overridden
    assert not any("min_on" in a for a in p.alarms)


def test_min_on_broken_only_when_the_target_cannot_be_met_otherwise() -> None:
    fresh = [miner(i, cap=OnOff(), nominal_w=3000, since=NOW - 30) for i in range(3)]
    p = run(6.5, fresh)
    assert len(asleep(p)) == 1
    assert len(p.min_on_overridden) == 1
    assert any(a.startswith("min_on_overridden") for a in p.alarms)
    assert p.worst_case_kw <= 6.5


def test_min_on_miner_is_throttled_before_it_is_slept() -> None:
    fresh = [miner(i, since=NOW - 30) for i in range(3)]  # range miners, may go to ~1790 W
    p = run(6.0, fresh)
    assert not p.min_on_overridden
    assert not asleep(p)
    assert p.worst_case_kw <= 6.0


# ---------------------------------------------------------------------------------------------- stagger, ramp
def test_wakes_never_exceed_the_wake_budget() -> None:
    fleet = [miner(i, state=MinerState.SLEEPING) for i in range(10)]
    p = run(100.0, fleet, wake_budget=3)
    assert len(fleet) - len(asleep(p)) == 3


def test_a_woken_miner_is_counted_at_full_power() -> None:
    # firmware not known to take a limit while asleep (LuxOS and Whatsminer do: tests/unit/test_wake_at_limit.py)
    p = run(100.0, [miner(0, state=MinerState.SLEEPING, commanded_w=2000, family=Family.OTHER)])
    assert watts(p.actions["m0"]) == 3250
    assert p.worst_case_kw == pytest.approx(3.25)


def test_wake_needs_room_for_full_power_not_the_planned_limit() -> None:
    p = run(3.0, [miner(0, state=MinerState.SLEEPING, family=Family.OTHER)])  # 3.25 kW on wake > 3.0 kW
    assert asleep(p) == {"m0"}


def test_ramp_allowance_limits_increases() -> None:
    fleet = [miner(i, state=MinerState.THROTTLED, commanded_w=2000) for i in range(10)]  # 20 kW now
    p = run(32.5, fleet, ramp=2.0)
    assert p.worst_case_kw <= 22.0 + 1e-9
    assert p.worst_case_kw > 21.5


def test_ramp_allowance_does_not_slow_a_decrease() -> None:
    fleet = [miner(i) for i in range(10)]
    p = run(10.0, fleet, ramp=0.0)
    assert p.worst_case_kw <= 10.0


def test_headroom_plans_below_the_target() -> None:
    fleet = [miner(i) for i in range(10)]
    p = run(20.0, fleet, rules=PlannerRules(sleep_w=20.0, headroom_pct=5.0))
    assert p.worst_case_kw <= 19.0 + 1e-9


# ---------------------------------------------------------------------------------------------- priority, circuits
def test_higher_priority_group_is_curtailed_last() -> None:
    hosted = [miner(i, priority=1, cap=OnOff(), nominal_ths=90) for i in range(3)]  # less efficient, but hosted
    own = [miner(i + 3, priority=0, cap=OnOff(), nominal_ths=120) for i in range(3)]
    p = run(10.0, hosted + own)
    assert asleep(p) == {"m3", "m4", "m5"}
    q = run(12.0, [miner(i, priority=i % 2) for i in range(6)])
    high = [watts(q.actions[f"m{i}"]) for i in (1, 3, 5)]
    assert high == [3250, 3250, 3250], "the hosted group keeps full power while the own group absorbs the cut"


def test_circuit_caps_are_respected_below_a_generous_target() -> None:
    tree = CircuitTree(100.0, [Circuit("pdu1", None, 5.0), Circuit("pdu2", None, 20.0)])
    fleet = [miner(i, circuit="pdu1" if i < 4 else "pdu2") for i in range(8)]
    p = run(100.0, fleet, tree=tree)
    assert p.circuit_worst_case_kw["pdu1"] <= 5.0
    assert p.circuit_worst_case_kw["pdu2"] == pytest.approx(13.0)


def test_nested_circuit_caps_bind_at_every_level() -> None:
    tree = CircuitTree(100.0, [Circuit("tx", None, 8.0), Circuit("pdu", "tx", 6.0)])
    fleet = [miner(i, circuit="pdu" if i < 3 else "tx") for i in range(6)]
    p = run(100.0, fleet, tree=tree)
    assert p.circuit_worst_case_kw["pdu"] <= 6.0
    assert p.circuit_worst_case_kw["tx"] <= 8.0


def test_unknown_circuit_raises_an_alarm_and_counts_against_the_site() -> None:
    p = run(5.0, [miner(0, circuit="nowhere"), miner(1)])
    assert any(a.startswith("unknown_circuit:nowhere") for a in p.alarms)
    assert p.worst_case_kw <= 5.0


# ---------------------------------------------------------------------------------------------- worst case
def test_unreachable_miner_counts_at_the_larger_of_last_known_and_full_power() -> None:
    hot = miner(0, state=MinerState.UNREACHABLE, power_w=3600)
    unknown = miner(1, state=MinerState.UNREACHABLE, power_w=None, commanded_w=2000)
    throttled = miner(2, state=MinerState.UNREACHABLE, power_w=1800, commanded_w=1800)
    p = run(100.0, [hot, unknown, throttled])
    assert p.worst_case_kw == pytest.approx(3.6 + 3.25 + 3.25)
    assert not p.actions
    assert set(p.uncontrolled) == {"m0", "m1", "m2"}


def test_miner_ignoring_commands_counts_at_what_it_draws() -> None:
    p = run(100.0, [miner(0, ignores=True, power_w=3400, commanded_w=2000)])
    assert p.worst_case_kw == pytest.approx(3.4)
    assert "m0" not in p.actions


def test_waking_miner_counts_at_full_power() -> None:
    p = run(100.0, [miner(0, state=MinerState.WAKING, commanded_w=2000, since=NOW - 10)])
    assert watts(p.actions["m0"]) == 2000
    assert p.worst_case_kw == pytest.approx(3.25)


def test_too_much_uncontrollable_load_curtails_everything_and_alarms() -> None:
    fleet = [
        miner(0, state=MinerState.UNREACHABLE),
        miner(1),
        miner(2, since=NOW - 5),
        miner(3, state=MinerState.WAKING, since=NOW - 5),
    ]
    p = run(3.0, fleet)
    assert any(a.startswith("cannot_meet:site") for a in p.alarms)
    assert asleep(p) == {"m1", "m2", "m3"}
    assert set(p.min_on_overridden) == {"m2", "m3"}


def test_infeasible_circuit_curtails_only_its_own_miners() -> None:
    tree = CircuitTree(100.0, [Circuit("bad", None, 1.0), Circuit("ok", None, 50.0)])
    fleet = [miner(0, circuit="bad", state=MinerState.UNREACHABLE), miner(1, circuit="bad"), miner(2, circuit="ok")]
    p = run(100.0, fleet, tree=tree)
    assert [a for a in p.alarms if a.startswith("cannot_meet")] == [p.alarms[0]]
    assert "cannot_meet:bad" in p.alarms[0]
    assert asleep(p) == {"m1"}
    assert isinstance(p.actions["m2"], RunAction)


def test_presets_miner_runs_only_at_a_preset() -> None:
    cap = Presets((2000, 2500, 3000, 3250))
    p = run(11.0, [miner(i, cap=cap) for i in range(4)])
    assert Counter(watts(a) for a in p.actions.values() if isinstance(a, RunAction)).keys() <= set(cap.watts)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("target", "views", "budget", "ramp", "message"),
    [
        (-1.0, [], 1, None, "target_kw"),
        (float("nan"), [], 1, None, "target_kw"),
        (1.0, [], -1, None, "wake_budget"),
        (1.0, [], 1, -2.0, "ramp_allowance_kw"),
        (1.0, [miner(0), miner(0)], 1, None, "unique"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(
    target: float, views: list[MinerView], budget: int, ramp: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan(target, views, CircuitTree(10.0), RULES, NOW, wake_budget=budget, ramp_allowance_kw=ramp)


def test_headroom_applies_to_the_target_not_to_circuit_caps() -> None:
    tree = CircuitTree(100.0, [Circuit("pdu", None, 13.0)])  # sized for exactly its four miners
    p = run(100.0, [miner(i, circuit="pdu") for i in range(4)], tree=tree, rules=PlannerRules(headroom_pct=5.0))
    assert p.circuit_worst_case_kw["pdu"] == pytest.approx(13.0)


def test_under_a_ramp_lowering_running_miners_does_not_pay_for_a_wake() -> None:
    """Two miners at full power and two asleep, the site at its target: the optimal plan lowers the two to wake a
    third at part power (more hashrate), a 2.15 kW wake funded by 2.09 kW lowered, within any ramp by the net change.
    The lower limits land in seconds and the wake over a minute, so the site would dip and climb back faster than
    the ramp (soak 20261213, seed 8462): the rise, summed over miners, is held to the allowance. Under 1 kW nothing
    is lowered and nothing wakes; with enough credit the rebalance goes ahead, and it spends what it raises."""
    views = [
        miner(0, commanded_w=3250.0),
        miner(1, commanded_w=3250.0),
        miner(2, state=MinerState.SLEEPING, power_w=20.0),
        miner(3, state=MinerState.SLEEPING, power_w=20.0),
    ]
    free = run(6.6, views)
    assert len(asleep(free)) == 1
    held = run(6.6, views, ramp=1.0)
    assert asleep(held) == {"m2", "m3"}
    assert watts(held.actions["m0"]) == watts(held.actions["m1"]) == 3250  # nothing lowered for a wake it cannot pay
    assert held.raised_kw == 0.0
    paid = run(6.6, views, ramp=3.5)
    assert paid.actions == free.actions
    assert paid.raised_kw == pytest.approx(2.15)  # what the controller's ramp credit is spent by (net: 0.06 kW)
