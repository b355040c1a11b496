"""Issue 11, findings 2 and 8, in the pure core: what a miner really draws is counted (per circuit, not only at the
site), and a waking miner that accepted a limit is counted at it.

Each test states the requirement it proves on a small hand-made fleet; every plan also passes the independent
accounting of tests/unit/plan_checks.py (which re-derives the rules from the planning/worst_case.py docstring).
"""

from __future__ import annotations

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.model import MinerState, MinerView, Plan, RunAction, SleepAction
from hashflex.agent.core.planning import plan, plan_sleep_only
from hashflex.agent.core.planning.worst_case import PlannerRules, excess_w
from hashflex.agent.core.snapshot import reading_hint as state_hint
from hashflex.drivers.base import Family, Identity, PowerRange, Presets, Reading
from tests.unit.plan_checks import check_plan

NOW = 1_000_000.0
LONG_AGO = NOW - 10_000.0
RANGE = PowerRange(1500, 3500, 5)
RULES = PlannerRules(sleep_w=20.0)


def view(
    idx: int,
    *,
    state: MinerState = MinerState.THROTTLED,
    commanded_w: float | None = 2500.0,
    measured_w: float | None = None,
    woken_to_w: float | None = None,
    circuit: str | None = "pdu1",
    since: float = LONG_AGO,
) -> MinerView:
    return MinerView(
        id=f"m{idx}",
        family=Family.WHATSMINER,
        capability=RANGE,
        nominal_w=3250.0,
        nominal_ths=110.0,
        state=state,
        power_w=measured_w,
        commanded_w=commanded_w,
        last_transition=since,
        circuit=circuit,
        measured_w=measured_w,
        woken_to_w=woken_to_w,
    )


def run(
    target_kw: float, views: list[MinerView], tree: CircuitTree, *, sleep_only: bool = False, wake_budget: int = 100
) -> Plan:
    fn = plan_sleep_only if sleep_only else plan
    p = fn(target_kw, views, tree, RULES, NOW, wake_budget=wake_budget, ramp_allowance_kw=None)
    check_plan(p, views, tree, RULES, now=NOW, target_kw=target_kw, wake_budget=wake_budget, ramp_allowance_kw=None)
    return p


def planned_w(p: Plan, v: MinerView) -> float:
    a = p.actions[v.id]
    return RULES.sleep_w if isinstance(a, SleepAction) else float(a.watts) if isinstance(a, RunAction) else 0.0


# ---------------------------------------------------------------------------------------------- finding 2
def test_drifting_miners_behind_a_pdu_are_counted_at_their_measured_draw_on_the_circuit() -> None:
    """Six miners at 2,500 W behind a 15 kW PDU, each drawing 30 % above its limit (and saying so): the PDU really
    draws 19.5 kW. The plan must count each at no less than it measures and bring the PDU's worst case under its cap;
    counting them at their limits (15 kW: "fits") leaves the PDU 30 % over indefinitely."""
    tree = CircuitTree(1000.0, [Circuit("pdu1", None, 15.0)])
    views = [view(i, measured_w=3250.0) for i in range(6)]
    for sleep_only in (False, True):
        p = run(1000.0, views, tree, sleep_only=sleep_only)
        # the drift carries over to whatever level each miner keeps: 750 W of excess each is counted on the PDU
        assert p.circuit_worst_case_kw["pdu1"] <= 15.0 + 1e-6, (sleep_only, p.circuit_worst_case_kw)
        assert p.circuit_worst_case_kw["pdu1"] >= sum(planned_w(p, v) for v in views) / 1000 + 6 * 0.75 - 1e-6
        # something had to give: the limits the plan keeps add up to well under the 15 kW they did
        assert sum(planned_w(p, v) for v in views) <= 15_000 - 6 * 750 + 1e-6


def test_worst_case_is_never_below_measured_power() -> None:
    """Whatever the plan keeps unchanged, its worst case is at least what those miners measure."""
    tree = CircuitTree(1000.0)
    views = [view(i, measured_w=2500.0 * (1.0 + 0.05 * i), circuit=None) for i in range(8)]
    for sleep_only in (False, True):  # kept, or raised to stock: the excess each showed still counts on top
        p = run(1000.0, views, tree, sleep_only=sleep_only)
        assert p.worst_case_kw * 1000 >= sum(v.measured_w or 0.0 for v in views) - 1e-6
        assert (
            p.worst_case_kw * 1000
            >= sum(planned_w(p, v) for v in views) + sum((v.measured_w or 0.0) - 2500.0 for v in views) - 1e-6
        )


def test_a_miner_measured_under_its_limit_is_counted_at_its_limit() -> None:
    """max(planned, measured): drawing less than its limit frees nothing (it may draw up to the limit any time)."""
    tree = CircuitTree(1000.0, [Circuit("pdu1", None, 15.0)])
    views = [view(i, measured_w=2000.0) for i in range(6)]
    p = run(1000.0, views, tree)
    assert abs(p.circuit_worst_case_kw["pdu1"] - 15.0) < 1e-6
    assert all(planned_w(p, v) == 2500.0 for v in views)


def test_excess_helper_matches_the_plan_accounting() -> None:
    """The controller's site-level correction subtracts what the plan already counts per miner (no double cut)."""
    drifting = view(1, measured_w=3250.0)
    asleep = view(2, state=MinerState.SLEEPING, measured_w=45.0)
    waking = view(3, state=MinerState.WAKING, measured_w=4000.0)
    stock = view(4, state=MinerState.HASHING, commanded_w=None, measured_w=3300.0)
    assert excess_w(drifting, RULES.sleep_w) == 750.0
    assert excess_w(asleep, RULES.sleep_w) == 25.0
    assert excess_w(waking, RULES.sleep_w) == 0.0
    assert excess_w(stock, RULES.sleep_w) == 50.0
    tree = CircuitTree(1000.0)
    views = [drifting, asleep, stock]
    p = run(1000.0, views, tree)
    counted = sum(planned_w(p, v) for v in views)
    assert abs(p.worst_case_kw * 1000 - counted - (750.0 + 25.0 + 50.0)) < 1e-6


# ---------------------------------------------------------------------------------------------- finding 8
def test_a_waking_miner_that_accepted_a_limit_counts_at_that_limit() -> None:
    """After a fast sleep-only cut the optimal plan woke miners at 2,000 W limits they accepted. Counted at full
    power (3,250 W) while they come back, the plan leaves 1,250 W per miner unused for minutes; counted at the
    limit they were told, the room goes to the site: here one more sleeping miner is woken."""
    tree = CircuitTree(1000.0)
    told = [view(i, state=MinerState.WAKING, commanded_w=2000.0, woken_to_w=2000.0, circuit=None) for i in range(4)]
    asleep = [view(10 + i, state=MinerState.SLEEPING, commanded_w=None, circuit=None) for i in range(3)]
    target_kw = 4 * 2.0 + 3.25 + 0.1  # the four at their limits and room for one more at full power
    p = run(target_kw, told + asleep, tree)
    assert abs(p.worst_case_kw - target_kw) <= 0.1 + 1e-6, p.worst_case_kw
    woken = [v for v in asleep if isinstance(p.actions[v.id], RunAction)]
    assert len(woken) == 1, p.actions
    for v in told:
        assert planned_w(p, v) == 2000.0


def test_a_waking_miner_without_an_accepted_limit_still_counts_at_full_power() -> None:
    """A miner that woke with no limit confirmed comes back at its stored or stock profile: full power."""
    tree = CircuitTree(1000.0)
    waking = [view(i, state=MinerState.WAKING, commanded_w=2000.0, circuit=None) for i in range(4)]
    p = run(100.0, waking, tree)
    assert abs(p.worst_case_kw - 4 * 3.25) < 1e-6


def test_a_booting_miner_reads_as_waking_not_asleep() -> None:
    """A woken miner spends the first third of its wake-up booting at a few % of its power: read as asleep (the
    old 20 % threshold), it was counted at 20 W while coming up, and its wake judged not carried out."""
    ident = Identity(
        "10.0.0.1", Family.LUXOS, "Bitmain", "S19k Pro", "luxos", "X", Presets((1554, 2760)), 2760.0, 120.0
    )
    booting = Reading(ts=NOW, power_w=0.028 * 2760, hashrate_ths=0.0, mining=False, power_limit_w=1554.0)
    asleep = Reading(ts=NOW, power_w=26.0, hashrate_ths=0.0, mining=False, power_limit_w=1554.0)
    assert state_hint(ident, booting, booting.power_w or 0.0) == "waking"
    assert state_hint(ident, asleep, asleep.power_w or 0.0) == "sleeping"
