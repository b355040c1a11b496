"""Ramp and stagger helpers: how fast the site's level may move, and how many miners may wake now.

How the controller uses them each tick (dt = time since the previous tick):
    level = arbitration.ramped_level(inputs, now, dt, ramps, from_kw=previous_level).kw  # each input on its own path
    allowance = ramp_credit_kw(credit, control.ramp_up_kw_per_min, dt, ramp_credit_cap_kw(rate, tick_s, largest))
    p = plan(level, ..., ramp_allowance_kw=allowance, wake_budget=wake_budget(wake_times, now, stagger))
    credit = spend_ramp_credit(allowance, p.raised_kw)  # the rises summed over miners: lowering pays for none
Increases are limited inside the planner (relative to what the fleet may draw now) by a credit that builds up
between ticks (a token bucket), so a rate slower than one miner's full power per tick still wakes miners, one
every few ticks, and over any window the rise stays within rate × window + the bucket's cap. Decreases are immediate
unless a dispatch asks for a ramp, and then only that dispatch's own contribution ramps (`ramp_step` is its path):
every other input, and the cap, still binds at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def ramp_allowance_kw(up_kw_per_min: float | None, dt_s: float) -> float | None:
    """What the ramp-up rate earns in `dt_s` (None = no limit). On its own this is no allowance: a rate slower than
    one miner per tick would never wake anything (closedloop N3); the controller spends `ramp_credit_kw`."""
    if up_kw_per_min is None:
        return None
    return max(0.0, up_kw_per_min) * max(0.0, dt_s) / 60.0


# the ramp credit holds at least this many ticks' worth of the rate. One: what the per-tick allowance gave the first
# tick after a quiet spell, so a fast ramp (a miner or more a tick) behaves as before; more would let the site jump
# by that many ticks' worth the moment a dispatch ends (tests/integration/test_scenarios.py, "ramps back")
RAMP_CREDIT_TICKS = 1.0


def ramp_credit_cap_kw(up_kw_per_min: float, tick_s: float, largest_full_kw: float) -> float:
    """The most ramp credit that may build up: a tick's worth of the rate, or one miner's full power (the step a
    wake adds to the worst case), whichever is larger. Below one miner the fleet could never come back; far above
    it a quiet hour would allow a jump of an hour's worth at once."""
    per_tick = max(0.0, up_kw_per_min) * max(0.0, tick_s) / 60.0
    return max(RAMP_CREDIT_TICKS * per_tick, largest_full_kw, 0.0)


def ramp_credit_kw(left_kw: float, up_kw_per_min: float | None, dt_s: float, cap_kw: float) -> float | None:
    """How much the site's planned worst case may rise this tick (None = no limit): a token bucket. What the last
    tick left unspent (`left_kw`), plus what the rate earns in `dt_s`, at most `cap_kw` (`ramp_credit_cap_kw`).

    Over any window of T seconds, the planned worst case rises by at most rate × T + cap_kw in total, while a rise
    bigger than one tick's worth (a whole miner woken at its full power) is still reached within a few ticks."""
    earned = ramp_allowance_kw(up_kw_per_min, dt_s)
    if earned is None:
        return None
    return min(max(0.0, cap_kw), max(0.0, left_kw) + earned)


def spend_ramp_credit(credit_kw: float | None, added_kw: float) -> float:
    """The credit left after a plan that raises miners by `added_kw` in all (`Plan.raised_kw`: what it gives back by
    lowering miners is not credited, in the plan or later: a plan that sleeps a miner and the next that wakes it pay
    twice, and so does one that lowers one miner to wake another)."""
    if credit_kw is None:
        return 0.0
    return max(0.0, credit_kw - max(0.0, added_kw))


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
