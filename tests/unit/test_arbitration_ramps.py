"""Ramps per input (issue 11, finding 3): a ramp slows its own input only; the level is the minimum of the inputs,
each ramped on its own, so a slow grid ramp never holds the site above any other limit."""

from __future__ import annotations

from datetime import UTC

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashflex.agent.core.arbitration import (
    ArbitrationInputs,
    ArbitrationRules,
    RampState,
    event_windows,
    ramp_key,
    ramped_level,
)
from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.core.schedule import ScheduleRule

T0 = 1_704_067_200.0  # Monday 2024-01-01 00:00 UTC
RULES = ArbitrationRules(debounce_s=0.0)
CAP = 1000.0


def dispatch(
    did: str,
    kw: float,
    *,
    source: Source = Source.GRID,
    ramp: float | None = None,
    start: float = 0.0,
    end: float | None = None,
) -> Dispatch:
    return Dispatch(
        did, source, T0 + start, T0 + start, None if end is None else T0 + end, target_kw=kw, ramp_kw_per_min=ramp
    )


def run(inputs: ArbitrationInputs, *, from_kw: float, seconds: float, dt: float = 1.0) -> list[float]:
    """The level every `dt` for `seconds`, each tick starting from the last one's level and ramp state."""
    level, state, out = from_kw, {}, []
    t = 0.0
    while t <= seconds:
        r = ramped_level(inputs, T0 + t, dt, state, from_kw=level)
        level, state = r.kw, r.ramps
        out.append(level)
        t += dt
    return out


def test_an_unramped_operator_curtail_binds_at_once_under_a_slow_grid_ramp() -> None:
    # the case: a grid dispatch to 500 kW at 1 kW/min from 999 kW, then `curtail --to 800kW`
    slow = dispatch("g", 500.0, ramp=1.0)
    inputs = ArbitrationInputs(CAP, dispatches=[slow, dispatch("op", 800.0, source=Source.OPERATOR)], rules=RULES)
    levels = run(inputs, from_kw=999.0, seconds=120)
    assert levels[0] == 800.0
    assert max(levels) == 800.0
    # without the curtail, the grid dispatch ramps down at its own rate
    alone = run(ArbitrationInputs(CAP, dispatches=[slow], rules=RULES), from_kw=999.0, seconds=120)
    assert alone[-1 - 60] - alone[-1] == pytest.approx(1.0)  # 1 kW in a minute


def test_every_kind_of_unramped_limit_binds_at_once_under_a_ramp() -> None:
    slow = dispatch("g", 500.0, ramp=1.0)
    window = ScheduleRule.from_hhmm("tou", "00:00", "00:00", ["mon"], 800.0, UTC)
    cases = {
        "schedule": ArbitrationInputs(CAP, dispatches=[slow], schedule=[window], rules=RULES),
        "failsafe": ArbitrationInputs(CAP, dispatches=[slow], failsafe_kw=700.0, rules=RULES),
        "second grid dispatch": ArbitrationInputs(CAP, dispatches=[slow, dispatch("g2", 600.0)], rules=RULES),
        "grid cap": ArbitrationInputs(CAP, grid_cap_kw=650.0, dispatches=[slow], rules=RULES),
        "operator cap": ArbitrationInputs(CAP, operator_cap_kw=750.0, dispatches=[slow], rules=RULES),
    }
    expected = {
        "schedule": 800.0,
        "failsafe": 700.0,
        "second grid dispatch": 600.0,
        "grid cap": 650.0,
        "operator cap": 750.0,
    }
    for name, inputs in cases.items():
        first = ramped_level(inputs, T0 + 10, 1.0, {}, from_kw=999.0)
        assert first.kw == expected[name], name


def test_curtail_to_zero_wins_over_a_ramped_grid_dispatch_at_zero() -> None:
    # the case Hypothesis shrank it to
    inputs = ArbitrationInputs(
        CAP, dispatches=[dispatch("g", 0.0, ramp=1.0), dispatch("op", 0.0, source=Source.OPERATOR)], rules=RULES
    )
    r = ramped_level(inputs, T0 + 1, 1.0, {}, from_kw=CAP)
    assert r.kw == 0.0
    assert r.binding == "operator:op"
    assert r.ramps[ramp_key(Source.GRID, "g")] > 0.0  # the grid's own path is still on its way down


def test_the_ramped_input_keeps_its_path_while_another_limit_binds_below_it() -> None:
    slow = dispatch("g", 500.0, ramp=60.0)  # 1 kW/s
    op = dispatch("op", 300.0, source=Source.OPERATOR, end=100.0)  # ends after 100 s: the grid path is then lower
    levels = run(ArbitrationInputs(CAP, dispatches=[slow, op], rules=RULES), from_kw=1000.0, seconds=600)
    assert levels[99] == 300.0
    assert levels[100] == 900.0  # 1000 − 100 s × 1 kW/s: where the grid's own path is, not back at its start
    assert levels[-1] == 500.0


def test_a_ramped_input_that_rises_applies_its_new_level_at_once() -> None:
    # increases are the planner's to limit (ramp allowance); the path never holds a site below its own level
    inputs = ArbitrationInputs(CAP, dispatches=[dispatch("g", 700.0, ramp=1.0)], rules=RULES)
    r = ramped_level(inputs, T0 + 1, 1.0, {ramp_key(Source.GRID, "g"): 200.0}, from_kw=200.0)
    assert r.kw == 700.0
    assert not r.ramping


def test_state_keeps_only_inputs_that_still_bind_and_ramp() -> None:
    inputs = ArbitrationInputs(CAP, dispatches=[dispatch("g", 500.0, ramp=5.0, end=10.0)], rules=RULES)
    assert ramp_key(Source.GRID, "g") in ramped_level(inputs, T0 + 5, 1.0, {}, from_kw=900.0).ramps
    assert ramped_level(inputs, T0 + 20, 1.0, {"grid:g": 800.0}, from_kw=800.0).ramps == {}


# ---------------------------------------------------------------------------------------------- properties
_dispatches = st.lists(
    st.builds(
        dispatch,
        did=st.sampled_from(["a", "b", "c", "d", "e"]),
        kw=st.floats(0.0, 1200.0),
        source=st.sampled_from([Source.GRID, Source.OPERATOR]),
        ramp=st.none() | st.floats(0.5, 200.0),
        start=st.floats(0.0, 600.0),
        end=st.none() | st.floats(601.0, 1800.0),
    ),
    max_size=5,
    unique_by=lambda d: d.id,
)


@settings(max_examples=300, deadline=None)
@given(
    ds=_dispatches,
    failsafe=st.none() | st.floats(0.0, 1200.0),
    grid_cap=st.none() | st.floats(0.0, 1200.0),
    from_kw=st.floats(0.0, CAP),
    dts=st.lists(st.floats(0.0, 120.0), min_size=1, max_size=40),
)
def test_level_is_the_minimum_of_inputs_each_ramped_on_its_own(
    ds: list[Dispatch], failsafe: float | None, grid_cap: float | None, from_kw: float, dts: list[float]
) -> None:
    inputs = ArbitrationInputs(CAP, grid_cap_kw=grid_cap, dispatches=ds, failsafe_kw=failsafe, rules=RULES)
    cap = min(CAP, CAP if grid_cap is None else grid_cap)
    windows = event_windows(ds, RULES)
    level, state = from_kw, dict[str, float]()
    # each ramped input's own path: where it started (the level when it first bound) and when
    origin: dict[str, tuple[float, float]] = {}
    t = 0.0
    for dt in dts:
        t += dt
        now = T0 + t
        prior: RampState = dict(state)
        r = ramped_level(inputs, now, dt, prior, from_kw=level)
        binding = [d for d in ds if windows[d.id].binds_at(now)]
        expected = cap if failsafe is None else min(cap, failsafe)
        for d in binding:
            kw = d.level_kw()
            if d.ramp_kw_per_min is None:
                # an unramped input binds at once: the level is never above it
                assert r.kw <= kw + 1e-9
                expected = min(expected, kw)
                continue
            key = ramp_key(d.source, d.id)
            if key not in origin:
                # from last tick's level, or where a path already on its way has got to by now if that is lower,
                # starting when it began to bind (or at last tick, if later)
                moving = [r.ramps[k] for k in prior if k in r.ramps]
                origin[key] = (min([prior.get(key, level), *moving]), max(windows[d.id].start, now - dt))
            start_kw, since = origin[key]
            path = max(kw, start_kw - d.ramp_kw_per_min * (now - since) / 60.0) if kw < start_kw else kw
            # the ramped input's contribution is its own path: never below it (and never above it)
            assert abs(r.ramps[key] - path) <= 1e-6 * max(1.0, start_kw)
            expected = min(expected, r.ramps[key])
        for key in [k for k in origin if k not in r.ramps]:
            del origin[key]  # stopped binding: a later binding starts a new path
        assert r.kw <= cap + 1e-9
        if failsafe is not None:
            assert r.kw <= failsafe + 1e-9
        assert abs(r.kw - expected) <= 1e-9
        level, state = r.kw, r.ramps


def test_a_ramp_that_starts_while_another_ramps_down_starts_where_that_one_has_got_to() -> None:
    """Soak of 2026-12-04 night, site 78: a second ramped dispatch came in between two ticks while a fast one ramped
    the site down; its path started from the last tick's level, 3.7 kW above where the fast one had got to, and once
    the fast one ended the level rose by that much."""
    fast = dispatch("fast", 0.0, ramp=120.0)  # 2 kW/s
    slow = dispatch("slow", 0.0, ramp=0.6)
    inputs = ArbitrationInputs(CAP, dispatches=[fast, slow], rules=RULES)
    r = ramped_level(inputs, T0 + 1, 2.0, {ramp_key(Source.GRID, "fast"): 20.0}, from_kw=20.0)
    assert r.ramps[ramp_key(Source.GRID, "fast")] == 16.0
    assert r.ramps[ramp_key(Source.GRID, "slow")] <= 16.0  # not 20 kW, last tick's level
