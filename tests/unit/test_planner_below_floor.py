"""The last resort for a room no run level fits (agent.core.planning.optimal._below_floor) under a ramp limit: the
ramp holds back the site's room (there in a tick or two), not a circuit's (soak 20261204, site 544)."""

from __future__ import annotations

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.model import MinerState, MinerView, RunAction, SleepAction
from hashflex.agent.core.planning import PlannerRules, plan
from hashflex.drivers.base import Family, OnOff, PowerRange
from tests.unit.plan_checks import check_plan

NOW = 1_000_000.0
RULES = PlannerRules(sleep_w=20.0, headroom_pct=1.0)
M50S = PowerRange(1700, 3276, 1)  # its run levels start at the curve's floor, 0.55 x 3276 = 1802 W


def silent(idx: int, circuit: str) -> MinerView:
    """A configured address no miner answered at: held at miners.unknown_w."""
    return MinerView(f"u{idx}", Family.OTHER, OnOff(), 4000.0, 0.0, MinerState.UNREACHABLE, None, None, circuit=circuit)


def asleep(idx: int, circuit: str | None) -> MinerView:
    return MinerView(
        f"w{idx}",
        Family.WHATSMINER,
        M50S,
        3276.0,
        126.0,
        MinerState.SLEEPING,
        power_w=18.0,
        commanded_w=3276.0,
        asleep_by_us=True,
        last_transition=NOW - 1000.0,
        circuit=circuit,
        measured_w=18.0,
    )


def planned(views: list[MinerView], tree: CircuitTree, target_kw: float, ramp_kw: float | None) -> dict[str, object]:
    p = plan(target_kw, views, tree, RULES, NOW, wake_budget=1, ramp_allowance_kw=ramp_kw)
    check_plan(p, views, tree, RULES, now=NOW, target_kw=target_kw, wake_budget=1, ramp_allowance_kw=ramp_kw)
    return dict(p.actions)


def test_a_circuit_room_under_every_run_level_is_used_below_the_floor_under_a_ramp_too() -> None:
    """Site 544: a PDU of 9.83 kW with two silent addresses (8 kW) and three sleeping M50S: 1.77 kW left, under the
    1.8 kW run floor. The site was ramping back up (200 kW/min, 16.7 kW of allowance left), and every plan under a
    ramp skipped the below-floor step: the circuit's room, which no ramp will widen, stayed empty for good."""
    tree = CircuitTree(82.862, [Circuit("c1", None, 9.828)])
    views = [silent(1, "c1"), silent(2, "c1"), asleep(1, "c1"), asleep(2, "c1"), asleep(3, "c1")]
    for ramp_kw in (None, 16.666):
        actions = planned(views, tree, 82.862, ramp_kw)
        woken = [a for a in actions.values() if isinstance(a, RunAction)]
        assert len(woken) == 1, (ramp_kw, actions)
        assert 1700 <= woken[0].watts < 1802


def test_the_site_room_a_ramp_holds_back_is_not_filled_below_the_floor() -> None:
    """No circuit: the ramp's allowance (1 kW) is all that keeps the miner from a run level; it is there in a tick or
    two, and a miner woken below its floor now would throw a wake-up away on the least efficient level."""
    tree = CircuitTree(82.862)
    actions = planned([asleep(1, None)], tree, 82.862, 1.75)
    assert isinstance(actions["w1"], SleepAction)
