"""The grid-link fail-safe: a pure state machine fed with heartbeats, commands and the time.

Modelled on the EEBUS use case "Limitation of Power Consumption" (LPC) as evcc's hems/eebus and EVerest's
LpcUseCaseHandler implement it; the clause numbers below are that spec's:
- [LPC-901/1] a controllable system starts already limited by its fail-safe limit → `hold_at_start`.
- [LPC-911/912] no heartbeat for the heartbeat timeout (the spec uses 120 s; the field 2–4 min) → fail-safe.
- [LPC-916] leave the fail-safe when the heartbeat is back AND a fresh command arrived after entering it.
- [LPC-921] or when the heartbeat has been back, unbroken, for the release window without any command.
Unlike [LPC-922] there is no exit on a timer without heartbeat: a mining site keeps its safe level until the
grid is heard again (a curtailed mine costs revenue, an uncontrolled one can cost the grid).

The fail-safe only applies where a grid link is configured (`FailsafeRules.applies`). Level: a kW value, or
None for "hold" — the last effective target, captured when the fail-safe is entered and held while it lasts.
Call `evaluate` every tick (after feeding `heartbeat` / `command`); compare `active` before and after to emit
failsafe_entered / failsafe_exited events.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FailsafeRules:
    enabled: bool = True
    grid_link: bool = True  # a grid link (MQTT with grid keys) is configured
    heartbeat_timeout_s: float = 180.0
    level_kw: float | None = None  # None = hold the last effective target
    hold_at_start: bool = True
    release_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= 0 or self.release_after_s <= 0:
            raise ValueError("heartbeat_timeout_s and release_after_s must be positive")
        if self.level_kw is not None and self.level_kw < 0:
            raise ValueError("fail-safe level must be 'hold' (None) or a non-negative kW")

    @property
    def applies(self) -> bool:
        return self.enabled and self.grid_link


@dataclass(frozen=True, slots=True)
class FailsafeState:
    active: bool
    since: float  # when the current phase (active or not) began
    reason: str  # "startup" | "heartbeat_lost" while active; "" otherwise
    started_at: float  # agent start: the heartbeat clock runs from here until the first heartbeat
    last_heartbeat: float | None = None
    last_command: float | None = None
    heartbeat_back_at: float | None = None  # first heartbeat of the current unbroken run heard while active
    max_gap_s: float = 0.0  # longest gap between heartbeats since heartbeat_back_at
    level_kw: float | None = None  # the limit while active


def start(now: float, rules: FailsafeRules, hold_kw: float) -> FailsafeState:
    """The state at agent start [LPC-901/1]: already in fail-safe when configured to hold until the grid is heard."""
    if rules.applies and rules.hold_at_start:
        return FailsafeState(True, now, "startup", now, level_kw=_level(rules, hold_kw))
    return FailsafeState(False, now, "", now)


def heartbeat(state: FailsafeState, now: float) -> FailsafeState:
    """A heartbeat from the grid side was received at `now`."""
    gap = 0.0 if state.last_heartbeat is None else max(0.0, now - state.last_heartbeat)
    back_at, max_gap = state.heartbeat_back_at, state.max_gap_s
    if state.active:
        if back_at is None:
            back_at, max_gap = now, 0.0
        else:
            max_gap = max(max_gap, gap)
    return dataclasses.replace(state, last_heartbeat=now, heartbeat_back_at=back_at, max_gap_s=max_gap)


def command(state: FailsafeState, now: float) -> FailsafeState:
    """A fresh, valid grid command (dispatch, cancel or cap) was accepted at `now`."""
    return dataclasses.replace(state, last_command=now)


def heartbeat_fresh(state: FailsafeState, now: float, rules: FailsafeRules) -> bool:
    return state.last_heartbeat is not None and now - state.last_heartbeat < rules.heartbeat_timeout_s


def evaluate(state: FailsafeState, now: float, rules: FailsafeRules, hold_kw: float) -> FailsafeState:
    """Advance the machine to `now`. `hold_kw` is what "hold" means now: the last effective target."""
    if not rules.applies:
        return (
            state
            if not state.active
            else FailsafeState(False, now, "", state.started_at, state.last_heartbeat, state.last_command)
        )
    fresh = heartbeat_fresh(state, now, rules)
    if not state.active:
        heard_at = state.last_heartbeat if state.last_heartbeat is not None else state.started_at
        if now - heard_at >= rules.heartbeat_timeout_s:  # [LPC-911/912]
            return dataclasses.replace(
                state,
                active=True,
                since=now,
                reason="heartbeat_lost",
                heartbeat_back_at=None,
                max_gap_s=0.0,
                level_kw=_level(rules, hold_kw),
            )
        return state
    back_at = state.heartbeat_back_at
    if not fresh or state.max_gap_s >= rules.heartbeat_timeout_s:
        # the heartbeat went away again (or had a gap we did not see): the run restarts at the next heartbeat
        back_at = state.last_heartbeat if fresh else None
        state = dataclasses.replace(state, heartbeat_back_at=back_at, max_gap_s=0.0)
    if back_at is None:
        return state
    commanded = state.last_command is not None and state.last_command >= state.since  # [LPC-916]
    released = now - back_at >= rules.release_after_s  # [LPC-921]
    if commanded or released:
        return dataclasses.replace(
            state, active=False, since=now, reason="", heartbeat_back_at=None, max_gap_s=0.0, level_kw=None
        )
    return state


def limit_kw(state: FailsafeState) -> float | None:
    """The fail-safe limit to hand to arbitration, or None when the fail-safe is not active."""
    return state.level_kw if state.active else None


def _level(rules: FailsafeRules, hold_kw: float) -> float:
    return max(0.0, hold_kw) if rules.level_kw is None else rules.level_kw
