"""The site's flexibility (agent/core/flexibility.py): properties over random fleets, hand-worked fleets, the
document's round trip, refusals of non-finite input, and when it is republished."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.failsafe import FailsafeState
from hashflex.agent.core.flexibility import DEPTHS, MAX_DEPTHS, FlexPublishPolicy, flexibility
from hashflex.agent.core.model import MinerState, MinerView
from hashflex.agent.core.planning import PlannerRules, plan
from hashflex.agent.core.ramp import WakeStaggerRule
from hashflex.contract.flex import FLEX_SCHEMA, Flexibility, parse_flex
from hashflex.drivers.base import Family, OnOff
from tests.unit.fleets import NOW, Case, cases

PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _flex(case: Case, present_share: float, **kw: object) -> Flexibility:
    fleet_w = sum(v.nominal_w for v in case.views)
    args: dict[str, object] = {
        "site_id": "s1",
        "tree": case.tree,
        "rules": case.rules,
        "now": NOW,
        "cap_w": case.tree.caps_kw()[0] * 1000.0,
        "target_w": case.target_kw * 1000.0,
        "present_w": fleet_w * present_share,
        "metered": False,
        "readings_at": NOW - 3.0,
    }
    args.update(kw)
    return flexibility(case.views, **args)  # type: ignore[arg-type]


@PROPS
@given(cases(), st.floats(0.0, 1.5), st.floats(0.0, 5e4))
def test_least_present_most(case: Case, present_share: float, other_w: float) -> None:
    f = _flex(case, present_share, other_load_w=other_w)
    assert [r.within_s for r in f.reach] == [0.0, 60.0, 300.0]
    for r in f.reach:
        assert 0.0 <= r.floor_w <= f.present_w <= f.most_w
    # the most it may draw: the lower of the cap and the healthy fleet, unless it is drawing more already
    assert f.most_w == max(f.present_w, min(f.cap_w, f.fleet_max_w))
    assert f.floor_within(0.0) == f.reach[0].floor_w
    assert f.floor_within(299.0) == f.reach[1].floor_w


@PROPS
@given(cases(), st.floats(0.0, 1.5))
def test_reach_floors_monotone(case: Case, present_share: float) -> None:
    f = _flex(case, present_share)
    floors = [r.floor_w for r in f.reach]
    assert floors[0] >= floors[1] >= floors[2]


@PROPS
# depths a float's last bit apart shed the same watts: distinct depths are at least 1e-4 apart
@given(
    cases(max_miners=20),
    st.lists(st.integers(100, 10_000).map(lambda n: n / 10_000), min_size=1, max_size=6, unique=True),
)
def test_loss_curve_monotone(case: Case, depths: list[float]) -> None:
    f = _flex(case, 1.0, depths=depths)
    assert [p.depth for p in f.loss] == sorted(set(depths))
    for a, b in pairwise(f.loss):
        assert b.shed_w > a.shed_w or f.cap_w == 0.0
        assert b.lost_ths >= a.lost_ths
    for p in f.loss:
        assert 0.0 <= p.lost_ths <= f.ths_at_cap + 1e-9
        assert p.shed_w == pytest.approx(p.depth * f.cap_w)
    assert 0.0 <= f.ths_now <= f.ths_at_cap


@PROPS
@given(cases(faults=False, max_miners=20))
def test_full_shed_loses_all_hashrate(case: Case) -> None:
    """Shedding the whole cap sleeps every (healthy, controllable) miner: all the hashrate at the cap is lost."""
    f = _flex(case, 1.0, depths=(1.0,))
    controllable = [v for v in case.views if not v.ignores_commands]
    assert len(controllable) == len(case.views)
    assert f.loss[-1].lost_ths == pytest.approx(f.ths_at_cap, rel=1e-9, abs=1e-9)


def _onoff(i: int, *, on_since: float, nominal_w: float = 3000.0, state: MinerState = MinerState.HASHING) -> MinerView:
    return MinerView(
        id=f"m{i}",
        family=Family.ANTMINER,
        capability=OnOff(),
        nominal_w=nominal_w,
        nominal_ths=100.0,
        state=state,
        power_w=nominal_w if state is MinerState.HASHING else 20.0,
        commanded_w=None,
        last_transition=on_since,
    )


def test_min_on_keeps_miners_on_until_it_runs_out() -> None:
    """Four on/off miners: two on for an hour, one woken 30 s ago, one 250 s ago; min-on 120 s; sleep 20 W.
    Now: the two may sleep, the young ones stay on (an on/off miner's lowest level is its full power). Within 60 s:
    the 30-s one is still inside min-on (90 s < 120 s), the 250-s one is free. Within 5 min: all may sleep."""
    rules = PlannerRules(min_on_s=120.0, min_off_s=120.0, sleep_w=20.0)
    views = [
        _onoff(0, on_since=NOW - 3600),
        _onoff(1, on_since=NOW - 3600),
        _onoff(2, on_since=NOW - 30),
        _onoff(3, on_since=NOW - 100),
    ]
    f = flexibility(
        views,
        site_id="s",
        tree=CircuitTree(12.0),
        rules=rules,
        now=NOW,
        cap_w=12_000.0,
        target_w=12_000.0,
        present_w=12_000.0,
        metered=False,
        readings_at=NOW,
    )
    assert [r.floor_w for r in f.reach] == [2 * 20 + 2 * 3000, 20 * 3 + 3000, 4 * 20]
    assert f.most_w == 12_000.0
    assert f.fleet_max_w == 12_000.0
    # the loss curve is the planner's, at targets below the cap (steady state: no min-on lock)
    steady = NOW + 120.0
    at_cap = plan(12.0, views, CircuitTree(12.0), rules, steady, wake_budget=4).expected_ths
    half = plan(6.0, views, CircuitTree(12.0), rules, steady, wake_budget=4).expected_ths
    assert f.ths_at_cap == pytest.approx(at_cap) == pytest.approx(400.0)
    # at half the cap only one miner fits: two at 3000 W plus two asleep at 20 W would be 6040 W > 6000 W
    point = next(p for p in f.loss if p.depth == 0.5)
    assert point.lost_ths == pytest.approx(at_cap - half) == pytest.approx(300.0)
    assert point.ths_per_mw == pytest.approx(300.0 / 0.006)


def test_meter_other_load_and_failsafe() -> None:
    """A metered site: the non-miner load is in every floor and in the most; the fail-safe is reported."""
    rules = PlannerRules(min_on_s=0.0, min_off_s=0.0, sleep_w=0.0)
    views = [_onoff(i, on_since=NOW - 3600) for i in range(3)]
    fs = FailsafeState(True, NOW - 10, "heartbeat_lost", NOW - 1000, level_kw=5.0)
    f = flexibility(
        views,
        site_id="s",
        tree=CircuitTree(100.0),
        rules=rules,
        now=NOW,
        cap_w=100_000.0,
        target_w=5000.0,
        present_w=10_500.0,
        metered=True,
        other_load_w=1500.0,
        failsafe=fs,
        readings_at=NOW - 100,
        stale_after_s=30.0,
    )
    assert [r.floor_w for r in f.reach] == [1500.0] * 3
    assert f.most_w == 10_500.0  # the healthy fleet at full power plus the other load, under the cap
    assert f.failsafe_active
    assert f.failsafe_reason == "heartbeat_lost"
    assert f.failsafe_level_w == 5000.0
    assert f.stale
    assert f.readings_age_s == 100.0
    doc = f.to_dict()
    assert doc["failsafe"] == {"active": True, "reason": "heartbeat_lost", "level_w": 5000.0}
    assert doc["readings"]["stale"] is True


@PROPS
@given(cases(max_miners=12), st.floats(0.0, 1.5))
def test_document_round_trip(case: Case, present_share: float) -> None:
    f = _flex(case, present_share, ramp_up_w_per_s=500.0, stagger=WakeStaggerRule(5, 10.0))
    doc = json.loads(json.dumps(f.to_dict(), allow_nan=False))
    assert doc["schema"] == FLEX_SCHEMA
    assert parse_flex(doc) == f


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, "12", True, None])
@pytest.mark.parametrize("name", ["present_w", "cap_w", "target_w", "now", "other_load_w", "readings_at"])
def test_non_finite_input_refused(name: str, bad: object) -> None:
    views = [_onoff(0, on_since=NOW - 3600)]
    args: dict[str, object] = {
        "site_id": "s",
        "tree": CircuitTree(10.0),
        "rules": PlannerRules(),
        "now": NOW,
        "cap_w": 10_000.0,
        "target_w": 10_000.0,
        "present_w": 3000.0,
        "metered": False,
        "readings_at": NOW,
    }
    if bad is None and name == "readings_at":
        flexibility(views, **args)  # type: ignore[arg-type]  # no readings yet is allowed (and stale)
        return
    if isinstance(bad, float) and bad == -1.0 and name in ("now", "readings_at"):
        return  # times may be any finite number
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        flexibility(views, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["power_w", "nominal_w", "measured_w", "commanded_w", "last_transition"])
def test_non_finite_view_refused(field: str) -> None:
    view = replace(_onoff(0, on_since=NOW), **{field: math.nan})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        flexibility(
            [view],
            site_id="s",
            tree=CircuitTree(10.0),
            rules=PlannerRules(),
            now=NOW,
            cap_w=1e4,
            target_w=1e4,
            present_w=0.0,
            metered=False,
        )


def test_depths_bounded_and_in_range() -> None:
    common: dict[str, object] = {
        "site_id": "s",
        "tree": CircuitTree(10.0),
        "rules": PlannerRules(),
        "now": NOW,
        "cap_w": 1e4,
        "target_w": 1e4,
        "present_w": 0.0,
        "metered": False,
    }
    with pytest.raises(ValueError, match="at most"):
        flexibility([], depths=[0.05 * k for k in range(1, MAX_DEPTHS + 2)], **common)  # type: ignore[arg-type]
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="depths"):
            flexibility([], depths=[bad], **common)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("present_w",), math.inf, "present_w must be finite"),
        (("most_w",), 1.0, "most_w must not be below present_w"),
        (("reach", 0, "floor_w"), math.nan, r"reach\[0\].floor_w must be finite"),
        (("hashrate", "loss", 1, "lost_ths"), 0.0, "non-decreasing lost_ths"),  # the curve decreasing
        (("schema",), "hashflex.flex/0", "schema must be"),
        (("ramp", "wake_max_per_interval"), 0, "wake_max_per_interval"),
        (("failsafe", "active"), "yes", "failsafe.active"),
    ],
)
def test_parse_refuses_bad_documents(path: tuple[object, ...], value: object, message: str) -> None:
    views = [_onoff(i, on_since=NOW - 3600) for i in range(4)]
    f = flexibility(
        views,
        site_id="s",
        tree=CircuitTree(12.0),
        rules=PlannerRules(),
        now=NOW,
        cap_w=12_000.0,
        target_w=12_000.0,
        present_w=12_000.0,
        metered=False,
        readings_at=NOW,
    )
    doc = json.loads(json.dumps(f.to_dict()))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        parse_flex(doc)


def test_publish_policy() -> None:
    views = [_onoff(i, on_since=NOW - 3600, nominal_w=3000.0) for i in range(100)]
    base = flexibility(
        views,
        site_id="s",
        tree=CircuitTree(300.0),
        rules=PlannerRules(),
        now=NOW,
        cap_w=300_000.0,
        target_w=300_000.0,
        present_w=250_000.0,
        metered=True,
        readings_at=NOW,
        depths=DEPTHS[:2],
    )
    policy = FlexPublishPolicy()
    assert policy.due(base, NOW)
    policy.published(base, NOW)
    noise = replace(base, present_w=base.present_w + 2000.0)  # under 1 % of the cap
    assert not policy.due(noise, NOW + 5)
    assert policy.due(noise, NOW + 30)  # refreshed at least every 30 s
    assert policy.due(replace(base, present_w=base.present_w + 5000.0), NOW + 5)
    assert policy.due(replace(base, failsafe_active=True), NOW + 5)
    assert policy.due(replace(base, stale=True), NOW + 5)
    assert policy.due(base, NOW - 1)  # the clock went back: publish rather than go silent
