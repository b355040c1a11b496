"""Closedloop N1 in the pure core: a miner we cannot read is counted where its own firmware may step it unasked.

LuxOS ships with ATM (automatic tuning) enabled, and ATM moves the profile by itself up to the highest preset. A
LuxOS miner that stops answering may be there while nobody sees it, so its worst case is its highest preset, not
its stock level. Every plan also passes the independent accounting of tests/unit/plan_checks.py.
"""

from __future__ import annotations

import pytest

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.efficiency import self_step_ceiling_w, stock_w
from hashflex.agent.core.model import MinerState, MinerView, Plan, RunAction
from hashflex.agent.core.planning import PlannerRules, plan, plan_sleep_only
from hashflex.drivers.base import Capability, Family, OnOff, PowerRange, Presets
from tests.unit.plan_checks import check_plan

NOW = 1_000_000.0
LONG_AGO = NOW - 10_000.0
RULES = PlannerRules(sleep_w=20.0)
# the simulator's LuxOS S19: stock 2,760 W, ATM may take it three profiles up, to 3,325 W (+20 %)
LUX = Presets((1397, 1554, 1715, 1881, 2050, 2222, 2398, 2578, 2760, 2946, 3134, 3325))
LUX_NOMINAL = 2760.0
WM = PowerRange(1500, 3500, 5)


def view(
    idx: int,
    *,
    cap: Capability = LUX,
    nominal_w: float = LUX_NOMINAL,
    state: MinerState = MinerState.HASHING,
    power_w: float | None = None,
    commanded_w: float | None = None,
    ignores: bool = False,
    circuit: str | None = None,
) -> MinerView:
    return MinerView(
        id=f"m{idx}",
        family=Family.LUXOS if isinstance(cap, Presets) else Family.WHATSMINER,
        capability=cap,
        nominal_w=nominal_w,
        nominal_ths=100.0,
        state=state,
        power_w=power_w,
        commanded_w=commanded_w,
        last_transition=LONG_AGO,
        circuit=circuit,
        ignores_commands=ignores,
    )


def run(target_kw: float, views: list[MinerView], tree: CircuitTree | None = None, *, sleep_only: bool = False) -> Plan:
    tree = tree or CircuitTree(1000.0)
    fn = plan_sleep_only if sleep_only else plan
    p = fn(target_kw, views, tree, RULES, NOW, wake_budget=100, ramp_allowance_kw=None)
    check_plan(p, views, tree, RULES, now=NOW, target_kw=target_kw, wake_budget=100, ramp_allowance_kw=None)
    return p


def test_the_self_step_ceiling_is_the_highest_preset_and_stock_for_everything_else() -> None:
    assert stock_w(LUX, LUX_NOMINAL) == 2760
    assert self_step_ceiling_w(LUX, LUX_NOMINAL) == 3325
    # presets all below nominal: the ceiling is still the highest preset (= stock)
    assert self_step_ceiling_w(Presets((1000, 2000)), 2500.0) == 2000
    # presets all above nominal: stock is the lowest preset, the firmware may still reach the highest
    assert self_step_ceiling_w(Presets((3000, 3500)), 2500.0) == 3500
    # a range or on/off miner holds the limit it was given: its ceiling is its stock level
    assert self_step_ceiling_w(WM, 3250.0) == stock_w(WM, 3250.0) == 3250
    assert self_step_ceiling_w(OnOff(), 3250.0) == 3250


@pytest.mark.parametrize("last_known_w", [None, 2400.0, 2760.0])
def test_an_unreachable_luxos_miner_counts_at_its_highest_preset(last_known_w: float | None) -> None:
    """Last seen at (or below) stock, then silent: ATM may have stepped it to 3,325 W since. Counted at
    max(stock, last known) = 2,760 W it was 565 W short (the closed-loop suite measured the site 3 % over a
    dispatch for as long as it lasted)."""
    p = run(100.0, [view(0, state=MinerState.UNREACHABLE, power_w=last_known_w, commanded_w=2400.0)])
    assert p.worst_case_kw == pytest.approx(3.325)
    assert p.uncontrolled == ("m0",)


def test_an_unreachable_luxos_miner_last_seen_above_its_ceiling_counts_at_what_it_drew() -> None:
    p = run(100.0, [view(0, state=MinerState.UNREACHABLE, power_w=3400.0)])
    assert p.worst_case_kw == pytest.approx(3.4)


def test_a_luxos_miner_that_ignores_commands_counts_at_its_draw_when_known_else_at_its_highest_preset() -> None:
    """It can be read: what it draws is what it draws (ATM's steps show). Unknown draw: the ceiling."""
    assert run(100.0, [view(0, ignores=True, power_w=2900.0)]).worst_case_kw == pytest.approx(2.9)
    assert run(100.0, [view(0, ignores=True, power_w=None)]).worst_case_kw == pytest.approx(3.325)


def test_an_unreachable_range_miner_still_counts_at_its_stock_level() -> None:
    """A Whatsminer's firmware holds the limit it was given; its range reaching 3,500 W does not raise its count."""
    p = run(100.0, [view(0, cap=WM, nominal_w=3250.0, state=MinerState.UNREACHABLE, commanded_w=2000.0)])
    assert p.worst_case_kw == pytest.approx(3.25)


@pytest.mark.parametrize("sleep_only", [False, True])
def test_the_rest_of_the_fleet_makes_room_for_the_ceiling_at_the_site_and_on_its_circuit(sleep_only: bool) -> None:
    """One silent LuxOS miner and three Whatsminers at stock behind a 13 kW PDU, dispatched to 12 kW: the plan
    keeps the worst case, with the LuxOS miner at 3,325 W, under both; at 2,760 W it would keep 565 W too much."""
    tree = CircuitTree(1000.0, [Circuit("pdu1", None, 13.0)])
    fleet = [view(0, state=MinerState.UNREACHABLE, power_w=2760.0, circuit="pdu1")]
    fleet += [view(i, cap=WM, nominal_w=3250.0, power_w=3250.0, circuit="pdu1") for i in (1, 2, 3)]
    p = run(12.0, fleet, tree, sleep_only=sleep_only)
    assert p.worst_case_kw <= 12.0 + 1e-9
    assert p.circuit_worst_case_kw["pdu1"] <= 13.0 + 1e-9
    kept = sum(a.watts for a in p.actions.values() if isinstance(a, RunAction))
    assert kept <= 12_000 - 3325
