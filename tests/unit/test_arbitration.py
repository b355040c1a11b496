"""Table tests of arbitration: every input → one target, the binding input, and the event rules."""

from __future__ import annotations

from datetime import UTC
from zoneinfo import ZoneInfo

import pytest

from hashflex.agent.core.arbitration import (
    ArbitrationInputs,
    ArbitrationRules,
    arbitrate,
    cancelled,
    effective_cap_kw,
    event_windows,
    retention_s,
)
from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.core.schedule import ScheduleRule

T0 = 1_704_067_200.0  # Monday 2024-01-01 00:00 UTC
NO_RULES = ArbitrationRules(debounce_s=0.0)


def grid(
    did: str,
    start: float,
    end: float | None,
    kw: float | None = None,
    *,
    curtail_kw: float | None = None,
    baseline_kw: float | None = None,
    ramp_kw_per_min: float | None = None,
    rev: int = 0,
) -> Dispatch:
    return Dispatch(
        id=did,
        source=Source.GRID,
        issued_at=T0 + start,
        start=T0 + start,
        end=None if end is None else T0 + end,
        target_kw=kw,
        curtail_kw=curtail_kw,
        baseline_kw=baseline_kw,
        ramp_kw_per_min=ramp_kw_per_min,
        rev=rev,
    )


def operator(did: str, start: float, end: float | None, kw: float) -> Dispatch:
    return Dispatch(
        id=did,
        source=Source.OPERATOR,
        issued_at=T0 + start,
        start=T0 + start,
        end=None if end is None else T0 + end,
        target_kw=kw,
    )


def at(t: float, *dispatches: Dispatch, rules: ArbitrationRules = NO_RULES, **inputs: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"licensed_cap_kw": 1000.0, "dispatches": dispatches, "rules": rules, **inputs}
    return arbitrate(ArbitrationInputs(**args), T0 + t)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- cap
def test_licensed_cap_binds_when_nothing_else_does() -> None:
    t = at(0)
    assert (t.kw, t.source, t.binding_id, t.cap_kw, t.reason) == (1000.0, Source.CAP, None, 1000.0, "cap")


@pytest.mark.parametrize("source", ["grid", "operator"])
@pytest.mark.parametrize(
    ("runtime", "cap", "lowered"),
    [(600.0, 600.0, True), (1500.0, 1000.0, False), (None, 1000.0, False), (-5.0, 0.0, True)],
)
def test_runtime_cap_may_only_lower_the_licensed_cap(
    source: str, runtime: float | None, cap: float, lowered: bool
) -> None:
    t = at(0, **{f"{source}_cap_kw": runtime})
    assert (t.kw, t.cap_kw, t.binding_id) == (cap, cap, source if lowered else None)
    assert effective_cap_kw(1000.0, runtime) == cap


@pytest.mark.parametrize(
    ("grid_cap", "operator_cap", "cap", "binding"),
    [(400.0, 1000.0, 400.0, "grid"), (400.0, 300.0, 300.0, "operator"), (400.0, 400.0, 400.0, "grid")],
)
def test_grid_and_operator_caps_are_separate_inputs_and_the_lower_binds(
    grid_cap: float, operator_cap: float, cap: float, binding: str
) -> None:
    t = at(0, grid_cap_kw=grid_cap, operator_cap_kw=operator_cap)
    assert (t.kw, t.cap_kw, t.binding_id, t.reason) == (cap, cap, binding, f"cap:{binding}")


def test_a_dispatch_above_the_cap_is_held_to_the_cap() -> None:
    t = at(10, grid("g", 0, 100, 1500.0))
    assert t.kw == 1000.0
    assert t.source is Source.CAP


# ---------------------------------------------------------------------------------------------- dispatches
def test_most_restrictive_dispatch_wins() -> None:
    ds = (grid("a", 0, 100, 700.0), grid("b", 0, 100, 400.0), operator("o", 0, 100, 500.0))
    t = at(10, *ds)
    assert (t.kw, t.source, t.binding_id, t.reason) == (400.0, Source.GRID, "b", "grid:b")


def test_each_dispatch_expires_on_its_own() -> None:
    ds = (grid("short", 0, 50, 300.0), grid("long", 0, 200, 600.0))
    assert at(49, *ds).binding_id == "short"
    assert (at(50, *ds).kw, at(50, *ds).binding_id) == (600.0, "long")
    assert at(200, *ds).source is Source.CAP


def test_a_pending_dispatch_does_not_bind_before_its_start() -> None:
    assert at(10, grid("later", 60, 120, 100.0)).source is Source.CAP
    assert at(60, grid("later", 60, 120, 100.0)).kw == 100.0


def test_curtail_kw_is_relative_to_the_baseline_at_acceptance() -> None:
    d = grid("c", 0, 100, None, curtail_kw=300.0, baseline_kw=900.0)
    assert at(10, d).kw == 600.0
    deep = grid("deep", 0, 100, None, curtail_kw=5000.0, baseline_kw=900.0)
    assert at(10, deep).kw == 0.0


def test_curtail_kw_without_a_baseline_is_refused() -> None:
    with pytest.raises(ValueError, match="baseline_kw"):
        at(10, grid("c", 0, 100, None, curtail_kw=300.0))


def test_latest_revision_of_a_dispatch_wins() -> None:
    ds = (grid("x", 0, 100, 300.0, rev=1), grid("x", 0, 100, 800.0, rev=2))
    assert at(10, *ds).kw == 800.0
    assert at(10, *reversed(ds)).kw == 800.0


def test_ramp_of_the_binding_dispatch_is_passed_on() -> None:
    t = at(10, grid("r", 0, 100, 300.0, ramp_kw_per_min=50.0), grid("n", 0, 100, 500.0))
    assert t.ramp_kw_per_min == 50.0
    assert at(10, grid("n", 0, 100, 500.0)).ramp_kw_per_min is None


def test_ties_report_the_grid_before_operator_schedule_and_cap() -> None:
    window = ScheduleRule.from_hhmm("all", "00:00", "00:00", ["mon"], 500.0, UTC)
    t = at(10, operator("o", 0, 100, 500.0), grid("g", 0, 100, 500.0), schedule=[window])
    assert t.source is Source.GRID
    t = at(10, operator("o", 0, 100, 500.0), schedule=[window])
    assert t.source is Source.OPERATOR


# ---------------------------------------------------------------------------------------------- event rules
def test_debounce_holds_a_resume_right_after_a_curtail() -> None:
    rules = ArbitrationRules(debounce_s=5.0)
    d = cancelled(operator("o", 0, None, 200.0), T0 + 3)  # curtail, then resume 3 s later
    t = at(4, d, rules=rules)
    assert (t.kw, t.detail) == (200.0, "release_debounce")
    assert at(7.9, d, rules=rules).kw == 200.0
    assert at(8, d, rules=rules).source is Source.CAP


def test_a_curtailment_applies_at_once_whatever_the_debounce() -> None:
    assert at(0, grid("g", 0, 100, 100.0), rules=ArbitrationRules(debounce_s=60.0)).kw == 100.0


def test_minimum_hold_keeps_a_cancelled_curtailment() -> None:
    rules = ArbitrationRules(debounce_s=0.0, min_hold_s=60.0)
    d = cancelled(grid("g", 0, 600, 100.0), T0 + 10)
    t = at(30, d, rules=rules)
    assert (t.kw, t.detail) == (100.0, "min_hold")
    assert at(60, d, rules=rules).source is Source.CAP


def test_minimum_hold_does_not_revive_a_dispatch_cancelled_before_its_start() -> None:
    rules = ArbitrationRules(debounce_s=5.0, min_hold_s=60.0)
    d = cancelled(grid("g", 100, 600, 100.0), T0 + 10)
    assert at(120, d, rules=rules).source is Source.CAP
    assert event_windows([d], rules)["g"].phase(T0 + 120) == "ended"


def test_cooldown_defers_a_grid_event_that_follows_too_soon() -> None:
    rules = ArbitrationRules(debounce_s=0.0, cooldown_s=60.0)
    ds = (grid("a", 0, 100, 300.0), grid("b", 120, 400, 200.0))
    assert at(130, *ds, rules=rules).source is Source.CAP
    assert at(160, *ds, rules=rules).binding_id == "b"
    w = event_windows(ds, rules)["b"]
    assert w.deferred
    assert w.start == T0 + 160
    assert w.phase(T0 + 130) == "deferred"


def test_cooldown_never_defers_overlapping_or_operator_events() -> None:
    rules = ArbitrationRules(debounce_s=0.0, cooldown_s=600.0)
    overlap = (grid("a", 0, 100, 300.0), grid("b", 50, 400, 200.0))
    assert at(60, *overlap, rules=rules).binding_id == "b"
    after = (grid("a", 0, 100, 300.0), operator("o", 120, 400, 200.0))
    assert at(130, *after, rules=rules).binding_id == "o"


def test_maximum_event_length_cuts_a_grid_dispatch_only() -> None:
    rules = ArbitrationRules(debounce_s=0.0, max_event_s=3600.0)
    assert at(3599, grid("g", 0, None, 100.0), rules=rules).kw == 100.0
    assert at(3600, grid("g", 0, None, 100.0), rules=rules).source is Source.CAP
    assert at(7200, operator("o", 0, None, 100.0), rules=rules).kw == 100.0


def test_event_phases_and_retention() -> None:
    rules = ArbitrationRules(debounce_s=5.0, min_hold_s=10.0, cooldown_s=20.0)
    w = event_windows([grid("g", 100, 200, 1.0)], rules)["g"]
    phases = [w.phase(T0 + t) for t in (50, 150, 202, 205)]
    assert phases == ["pending", "active", "holding", "ended"]
    assert retention_s(rules) == 35.0


def test_cancel_never_moves_an_end_later() -> None:
    d = grid("g", 0, 100, 1.0)
    assert cancelled(d, T0 + 500).end == T0 + 100
    assert cancelled(d, T0 + 50).end == T0 + 50


# ---------------------------------------------------------------------------------------------- schedule, fail-safe
def test_schedule_window_binds_while_active() -> None:
    evening = ScheduleRule.from_hhmm("evening", "18:00", "22:00", ["mon"], 400.0, ZoneInfo("Asia/Karachi"))
    t = arbitrate(ArbitrationInputs(1000.0, schedule=[evening]), T0 + 14 * 3600)  # 19:00 local
    assert (t.kw, t.source, t.binding_id) == (400.0, Source.SCHEDULE, "evening")
    assert arbitrate(ArbitrationInputs(1000.0, schedule=[evening]), T0 + 18 * 3600).source is Source.CAP


def test_failsafe_level_binds_when_lowest_and_is_always_flagged() -> None:
    t = at(10, failsafe_kw=250.0)
    assert (t.kw, t.source, t.failsafe, t.reason) == (250.0, Source.FAILSAFE, True, "failsafe")
    t = at(10, grid("g", 0, 100, 100.0), failsafe_kw=250.0)
    assert (t.kw, t.source, t.failsafe) == (100.0, Source.GRID, True)
    assert not at(10).failsafe
