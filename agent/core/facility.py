"""Facility loads that follow miners: a circuit's cooling (fans, pumps on a drive; a relay) set from its miners.

Pure: the runtime (agent/runtime/facility.py) passes the miners' states, the wakes the planner wants and the time,
and applies the setpoint this returns through the driver. What operators do, and what this does:

- **Up first, then the miners.** A wake on a circuit is held until its cooling has been running (acknowledged at no
  less than its minimum speed) for `up_lead_s`: pumps need their flow, a hall its air, before miners draw heat.
  The planner's wanted wakes raise the setpoint at once (to the speed for the miners running, waking and wanted);
  the wake goes out once the device acknowledged that speed and has been running for the lead. A circuit whose
  cooling already runs only waits for the acknowledged raise (speed follows the load; the drive ramps in seconds
  while a miner takes minutes to reach full power), so a staggered wake of many miners is not held once per batch.
  The agent cannot know a wake in advance (dispatches and the planner decide at the tick), so "before the wake" is
  kept by holding the wake, not by forecasting it: this is why `ready_for_wake` exists.
- **Down late.** A lower setpoint waits until the demand has been below the current one for `down_after_s` (a
  dispatch that sleeps miners for a minute does not cycle the drive), and then goes to the highest demand seen in
  that wait, never below what the miners running now need.
- **Never below the minimum while miners run**: running, waking and unreachable miners (an unreachable one may be
  hashing) all count; `min_pct` holds while any does.

A relay is a drive with two speeds: on (100) while any miner runs or is wanted, else off (0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["drive", "relay"]


@dataclass(frozen=True, slots=True)
class CoolingRule:
    circuit: str
    kind: Kind
    min_pct: float  # the lowest speed while any miner of the circuit runs (relay: 100)
    idle_pct: float  # the speed with every miner asleep (relay: 0)
    curve: tuple[tuple[float, float], ...]  # (share of the circuit's miners on, speed %), share ascending
    down_after_s: float
    up_lead_s: float

    def __post_init__(self) -> None:
        numbers = [self.min_pct, self.idle_pct, self.down_after_s, self.up_lead_s, *(x for p in self.curve for x in p)]
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError(f"cooling rule for {self.circuit!r}: every number must be finite")
        if self.down_after_s < 0 or self.up_lead_s < 0:
            raise ValueError(f"cooling rule for {self.circuit!r}: delays must be >= 0")
        if not 0 <= self.idle_pct <= self.min_pct <= 100:
            raise ValueError(f"cooling rule for {self.circuit!r}: need 0 <= idle_pct <= min_pct <= 100")


@dataclass(frozen=True, slots=True)
class CircuitMiners:
    """A circuit's miners (its own and its descendants') at one tick."""

    total: int  # every miner the circuit feeds
    on: int  # hashing, throttled, waking or unreachable: drawing, or may be
    wanted: int = 0  # wakes the planner wants on it now (held until its cooling is ready)


@dataclass(frozen=True, slots=True)
class CoolingState:
    setpoint_pct: float  # what the device is to run at
    below_since: float | None = None  # since when the demand has been below the setpoint
    below_max_pct: float = 0.0  # the highest demand seen since then
    acked_pct: float | None = None  # what the device last acknowledged (None: nothing yet)
    running_since: float | None = None  # since when it has been acknowledged at >= min_pct without a break


def demand_pct(rule: CoolingRule, miners: CircuitMiners) -> float:
    """The speed the miners on (and the wakes wanted) need: the curve at their share, at least the minimum."""
    n = miners.on + miners.wanted
    if n <= 0:
        return rule.idle_pct
    if rule.kind == "relay":
        return 100.0
    share = min(1.0, n / miners.total) if miners.total > 0 else 1.0
    return max(rule.min_pct, min(100.0, _interpolate(rule.curve, share)))


def _interpolate(curve: tuple[tuple[float, float], ...], x: float) -> float:
    if not curve:
        return 100.0  # no curve: full speed whenever any miner runs
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def initial(rule: CoolingRule, miners: CircuitMiners) -> CoolingState:
    """At start the device's speed is unknown: it is set to what the miners on need (nothing stepped down)."""
    return CoolingState(setpoint_pct=max(demand_pct(rule, miners), rule.idle_pct))


def step(rule: CoolingRule, state: CoolingState, miners: CircuitMiners, now: float) -> CoolingState:
    """The setpoint now. Up at once; down only after the demand has been lower for `down_after_s`."""
    want = demand_pct(rule, miners)
    if want >= state.setpoint_pct:
        return replace(state, setpoint_pct=want, below_since=None, below_max_pct=0.0)
    if state.below_since is None:
        return replace(state, below_since=now, below_max_pct=want)
    highest = max(state.below_max_pct, want)
    if now - state.below_since >= rule.down_after_s:
        if want < highest:  # still lower than where it steps to: the next step's wait starts now
            return replace(state, setpoint_pct=highest, below_since=now, below_max_pct=want)
        return replace(state, setpoint_pct=highest, below_since=None, below_max_pct=0.0)
    return replace(state, below_max_pct=highest)


def acknowledged(rule: CoolingRule, state: CoolingState, pct: float, now: float) -> CoolingState:
    """The device took `pct` at `now` (a write it acknowledged, or a read-back of it)."""
    running = pct >= rule.min_pct and pct > 0
    if not running:
        since = None
    elif state.running_since is None or state.acked_pct is None or state.acked_pct < rule.min_pct:
        since = now
    else:
        since = state.running_since
    return replace(state, acked_pct=pct, running_since=since)


def lost(state: CoolingState) -> CoolingState:
    """The device did not answer: what it runs at is unknown until it acknowledges again."""
    return replace(state, acked_pct=None, running_since=None)


def ready_for_wake(rule: CoolingRule, state: CoolingState, miners: CircuitMiners, now: float) -> bool:
    """May the wanted wakes go out: the device acknowledged the speed they need and has run for `up_lead_s`."""
    if state.acked_pct is None or state.running_since is None:
        return False
    return state.acked_pct >= demand_pct(rule, miners) and now - state.running_since >= rule.up_lead_s
