"""Waking a miner straight to its planned limit (issue 11 finding 8).

Firmware that accepts a power limit while asleep and comes up at it (LuxOS `profileset`, Whatsminer power limit)
is told its limit before the wake: the plan counts such a wake at its planned limit, not at stock power, so the
room under a limit smaller than one miner's stock power is used by a throttled wake. A miner whose firmware cannot
be woken at a limit (stock Antminer: on/off; families not known to) is still counted at full power. The actuator
sets the limit first and wakes only if the miner took it: a miner that did not stays asleep and counts as such.
"""

from __future__ import annotations

import pytest

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.model import Change, MinerState, MinerView, Op, Plan, RunAction, SleepAction
from hashflex.agent.core.planning import PlannerRules, plan, plan_sleep_only
from hashflex.agent.runtime.actuator import Actuator, diff
from hashflex.drivers.base import (
    Capability,
    Failed,
    Family,
    Identity,
    OnOff,
    PowerRange,
    Presets,
    Result,
    wakes_at_limit,
)
from tests.unit.handles import RecordingHandle
from tests.unit.plan_checks import check_plan

NOW = 1_000_000.0
RULES = PlannerRules(sleep_w=20.0, min_on_s=0.0, min_off_s=0.0)
RANGE = PowerRange(1000, 3500, 5)
PROFILES = Presets((1200, 1800, 2400, 3250))


def asleep(idx: int, family: Family, cap: Capability, *, commanded_w: float | None = None) -> MinerView:
    return MinerView(
        id=f"m{idx}",
        family=family,
        capability=cap,
        nominal_w=3250.0,
        nominal_ths=110.0,
        state=MinerState.SLEEPING,
        power_w=20.0,
        commanded_w=commanded_w,
        last_transition=NOW - 10_000.0,
    )


def run(target_kw: float, views: list[MinerView], *, sleep_only: bool = False) -> Plan:
    tree = CircuitTree(100.0)
    fn = plan_sleep_only if sleep_only else plan
    p = fn(target_kw, views, tree, RULES, NOW, wake_budget=1, ramp_allowance_kw=None)
    check_plan(p, views, tree, RULES, now=NOW, target_kw=target_kw, wake_budget=1, ramp_allowance_kw=None)
    return p


def woken(p: Plan) -> dict[str, int]:
    return {mid: a.watts for mid, a in p.actions.items() if isinstance(a, RunAction)}


def test_the_family_fact_lives_in_the_driver_layer() -> None:
    assert wakes_at_limit(Family.LUXOS, PROFILES)
    assert wakes_at_limit(Family.WHATSMINER, RANGE)
    assert not wakes_at_limit(Family.ANTMINER, OnOff())
    assert not wakes_at_limit(Family.LUXOS, OnOff())  # limits refused: on/off from then on
    assert not wakes_at_limit(Family.OTHER, RANGE)


@pytest.mark.parametrize("family", [Family.WHATSMINER, Family.LUXOS])
def test_room_smaller_than_one_stock_miner_wakes_one_at_a_limit(family: Family) -> None:
    # the closedloop shrink: 2 miners asleep under 1.87 kW, each 3.25 kW at stock (was: nothing woken, 0.04 kW)
    views = [asleep(0, family, RANGE), asleep(1, family, RANGE)]
    p = run(1.87, views)
    (watts,) = woken(p).values()
    assert watts <= 1870 - 20  # the room beside the other one asleep
    assert watts >= RANGE.min_w
    assert p.worst_case_kw <= 1.87 + 1e-9
    assert p.worst_case_kw == pytest.approx((watts + 20) / 1000)


def test_presets_miner_is_woken_at_the_highest_preset_that_fits() -> None:
    views = [asleep(0, Family.LUXOS, PROFILES), asleep(1, Family.LUXOS, PROFILES)]
    p = run(2.0, views)
    assert sorted(woken(p).values()) == [1800]
    assert p.worst_case_kw <= 2.0


def test_a_miner_that_cannot_wake_at_a_limit_still_counts_at_full_power() -> None:
    for family, cap in ((Family.ANTMINER, OnOff()), (Family.OTHER, RANGE)):
        p = run(1.87, [asleep(0, family, cap), asleep(1, family, cap)])
        assert woken(p) == {}
        assert p.worst_case_kw == pytest.approx(0.04)


def test_sleep_only_plan_wakes_at_stock_counted_at_stock() -> None:
    views = [asleep(0, Family.WHATSMINER, RANGE, commanded_w=1500.0), asleep(1, Family.WHATSMINER, RANGE)]
    p = run(3.3, views, sleep_only=True)
    assert sorted(woken(p).values()) == [3250]  # no power-limit changes in this plan: the stock level
    assert p.worst_case_kw == pytest.approx(3.27)


# ---------------------------------------------------------------------------------------------- actuator
class FamilyHandle(RecordingHandle):
    def __init__(self, ip: str, log: list[tuple[str, str, float]], family: Family, *, limit_fails: bool = False):
        super().__init__(ip, log)
        self.family, self.limit_fails = family, limit_fails

    @property
    def identity(self) -> Identity:
        return Identity(self.ip, self.family, "x", "M50", "1", "C", RANGE, 3250.0, 110.0)

    async def set_power(self, watts: int) -> Result:
        result = await super().set_power(watts)
        return Failed("profileset refused", retryable=False) if self.limit_fails else result


def test_a_wake_of_such_a_miner_always_carries_its_limit() -> None:
    a, b = asleep(0, Family.LUXOS, RANGE, commanded_w=2000.0), asleep(1, Family.OTHER, RANGE, commanded_w=2000.0)
    views = {"a": a, "b": b}
    changes = {c.ip: c for c in diff({"a": RunAction(2000), "b": RunAction(2000)}, views)}
    assert changes["a"] == Change("a", Op.WAKE, 2000)  # the stored limit may not be ours: set it, then wake
    assert changes["b"] == Change("b", Op.WAKE, None)  # it wakes at what it had (counted at full power anyway)
    # without power limits: a plain wake
    assert diff({"a": RunAction(2000)}, {"a": views["a"]}, use_power_limits=False) == [Change("a", Op.WAKE, None)]
    assert diff({"a": SleepAction()}, {"a": views["a"]}) == []


async def test_the_limit_is_set_before_the_wake() -> None:
    log: list[tuple[str, str, float]] = []
    h = FamilyHandle("m", log, Family.WHATSMINER)
    report = await Actuator({"m": h}.__getitem__, concurrency=1, command_timeout_s=1.0).apply(
        [Change("m", Op.WAKE, 1800)]
    )
    assert [op for _ip, op, _t in log] == ["set_power:1800", "wake"]
    (r,) = report.results
    assert (r.op, r.outcome, r.watts) == (Op.WAKE, "ok", 1800)
    assert "limit not set" not in r.detail  # the controller records woken_to_w = 1800 from this


async def test_a_refused_limit_means_no_wake() -> None:
    log: list[tuple[str, str, float]] = []
    h = FamilyHandle("m", log, Family.LUXOS, limit_fails=True)
    report = await Actuator({"m": h}.__getitem__, concurrency=1, command_timeout_s=1.0).apply(
        [Change("m", Op.WAKE, 1800)]
    )
    assert [op for _ip, op, _t in log] == ["set_power:1800"]  # never woken: it stays asleep, counted asleep
    (r,) = report.results
    assert (r.op, r.outcome) == (Op.WAKE, "failed")
    assert "profileset refused" in r.detail


async def test_other_families_still_wake_first() -> None:
    log: list[tuple[str, str, float]] = []
    h = FamilyHandle("m", log, Family.OTHER)
    await Actuator({"m": h}.__getitem__, concurrency=1, command_timeout_s=1.0).apply([Change("m", Op.WAKE, 1800)])
    assert [op for _ip, op, _t in log] == ["wake", "set_power:1800"]
