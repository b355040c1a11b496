"""Ramp and wake-stagger helpers."""

from __future__ import annotations

import pytest

from hashflex.agent.core.ramp import WakeStaggerRule, prune_wake_times, ramp_allowance_kw, ramp_step, wake_budget


@pytest.mark.parametrize(
    ("current", "target", "dt", "up", "down", "ceiling", "expected"),
    [
        (100.0, 500.0, 60.0, 120.0, None, None, 220.0),  # up at 120 kW/min for a minute
        (100.0, 150.0, 60.0, 120.0, None, None, 150.0),  # never past the target
        (500.0, 100.0, 30.0, 120.0, None, None, 100.0),  # decreases are immediate unless asked
        (500.0, 100.0, 30.0, None, 200.0, None, 400.0),  # a dispatch asked for a ramp down
        (500.0, 100.0, 30.0, None, 200.0, 300.0, 300.0),  # but never above the cap
        (100.0, 500.0, 5.0, None, None, None, 500.0),  # no rate: one step
        (100.0, 500.0, -5.0, 60.0, None, None, 100.0),  # a clock going backwards moves nothing
    ],
)
def test_ramp_step(
    *,
    current: float,
    target: float,
    dt: float,
    up: float | None,
    down: float | None,
    ceiling: float | None,
    expected: float,
) -> None:
    level = ramp_step(current, target, dt, up_kw_per_min=up, down_kw_per_min=down, ceiling_kw=ceiling)
    assert level == pytest.approx(expected)


def test_ramp_allowance() -> None:
    assert ramp_allowance_kw(None, 5.0) is None
    assert ramp_allowance_kw(120.0, 5.0) == pytest.approx(10.0)
    assert ramp_allowance_kw(120.0, -1.0) == 0.0


def test_wake_budget_counts_wakes_inside_the_sliding_interval() -> None:
    rule = WakeStaggerRule(max_per_interval=5, interval_s=10.0)
    history = [100.0, 101.0, 105.0, 109.5, 112.0]
    assert wake_budget(history, 110.0, rule) == 2  # 101, 105, 109.5 count; 100 is exactly 10 s old
    assert wake_budget([], 110.0, rule) == 5
    assert wake_budget([109.0] * 9, 110.0, rule) == 0
    assert prune_wake_times(history, 110.0, rule) == (101.0, 105.0, 109.5)


def test_wake_stagger_rule_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_per_interval"):
        WakeStaggerRule(max_per_interval=0)
