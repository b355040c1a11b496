"""Ramp and stagger helpers: how fast the site's level may move, and how many miners may wake now.

How the controller uses them each tick (dt = time since the previous tick):
    level = ramp_step(previous_level, target.kw, dt, down_kw_per_min=target.ramp_kw_per_min, ceiling_kw=target.cap_kw)
    plan(level, ..., ramp_allowance_kw=ramp_allowance_kw(control.ramp_up_kw_per_min, dt),
         wake_budget=wake_budget(wake_times, now, stagger))
Increases are limited inside the planner (relative to what the fleet may draw now); decreases are immediate
unless the binding dispatch asks for a ramp, and even then never slower than the cap allows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def ramp_allowance_kw(up_kw_per_min: float | None, dt_s: float) -> float | None:
    """How much the site's planned worst case may rise this tick (None = no limit)."""
    if up_kw_per_min is None:
        return None
    return max(0.0, up_kw_per_min) * max(0.0, dt_s) / 60.0


def ramp_step(
    current_kw: float,
    target_kw: float,
    dt_s: float,
    *,
    up_kw_per_min: float | None = None,
    down_kw_per_min: float | None = None,
    ceiling_kw: float | None = None,
) -> float:
    """The level for this tick: `target_kw` approached from `current_kw` at most at the given rates.

    A rate of None moves in one step. The result never exceeds `ceiling_kw` (the cap), so a ramped decrease
    cannot keep the site above its cap.
    """
    dt_min = max(0.0, dt_s) / 60.0
    if target_kw >= current_kw:
        level = target_kw if up_kw_per_min is None else min(target_kw, current_kw + up_kw_per_min * dt_min)
    else:
        level = target_kw if down_kw_per_min is None else max(target_kw, current_kw - down_kw_per_min * dt_min)
    return level if ceiling_kw is None else min(level, ceiling_kw)


@dataclass(frozen=True, slots=True)
class WakeStaggerRule:
    max_per_interval: int = 200
    interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_per_interval < 1 or self.interval_s <= 0:
            raise ValueError("max_per_interval must be ≥ 1 and interval_s > 0")


def wake_budget(wake_times: Iterable[float], now: float, rule: WakeStaggerRule) -> int:
    """How many miners may be woken now: the rule's allowance minus the wakes inside the sliding interval."""
    recent = sum(1 for t in wake_times if now - rule.interval_s < t <= now)
    return max(0, rule.max_per_interval - recent)


def prune_wake_times(wake_times: Iterable[float], now: float, rule: WakeStaggerRule) -> tuple[float, ...]:
    """The wake times that still count (the runtime keeps this short list between ticks)."""
    return tuple(t for t in wake_times if now - rule.interval_s < t <= now)
