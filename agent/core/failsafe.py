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
failsafe_entered / failsafe_exited events. `release` says what releases an active fail-safe and when.

Across a restart: the runtime records the link as it stands (`saved_link`, in wall-clock time) and starts from
`resume` instead of `start`: within the heartbeat timeout of a healthy link a restart does not curtail the site.
"""

from __future__ import annotations

import dataclasses
import math
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


# ------------------------------------------------------------------------------------------------ across a restart
# The agent's clock (runtime/clock.py SteadyClock) starts again at the wall clock in every process, so nothing
# measured on it survives a restart: what a run leaves for the next one is in wall-clock time, and the next run
# trusts it only where the wall clock cannot have misled it.


@dataclass(frozen=True, slots=True)
class SavedLink:
    """What a run records about the grid link (on every change) for the run after it."""

    active: bool  # the fail-safe held the site when this was written
    last_heartbeat_wall: float | None  # wall time of the last heartbeat heard (None: none heard)
    saved_wall: float  # wall time when this was written
    clock_stepped: bool = False  # the wall clock was out of step with the agent's time when this was written
    boot_id: str | None = None  # the host's boot, and seconds since it on the agent's clock scale: a clock that
    boot_s: float | None = None  # does not step, to check the wall clock's account of the time the agent was down


def saved_link(
    state: FailsafeState,
    now: float,
    wall_now: float,
    *,
    clock_stepped: bool = False,
    boot: tuple[str, float] | None = None,
) -> SavedLink:
    """`state` (on the agent's clock, read at `now`) as a record in wall-clock time (the wall read at `wall_now`)."""
    beat = None if state.last_heartbeat is None else wall_now - max(0.0, now - state.last_heartbeat)
    boot_id, boot_s = (None, None) if boot is None else boot
    return SavedLink(state.active, beat, wall_now, clock_stepped, boot_id, boot_s)


def resume(
    now: float,
    wall_now: float,
    rules: FailsafeRules,
    hold_kw: float,
    saved: SavedLink | None,
    *,
    boot: tuple[str, float] | None = None,
    jump_tolerance_s: float = 2.0,
) -> FailsafeState:
    """The state at agent start, given what the last run recorded (`saved`; None on a first start).

    An agent restarted within the heartbeat timeout of a healthy link (not in fail-safe when it stopped, a heartbeat
    heard, and no more than the timeout since it by the wall clock) carries on where it was: no fail-safe, and the
    timeout keeps counting from that heartbeat. Anything else is a start [LPC-901/1] (`start`): a first start, a link
    that was lost or in fail-safe before the stop, a stop longer than the timeout, and any doubt about the wall clock
    (it went back since the record, or was out of step when it was written, or, on the same boot, disagrees with the
    boot clock by more than `jump_tolerance_s` about how long the agent was down): a curtailed site costs revenue,
    an uncontrolled one can cost the grid.
    """
    if not resumable(saved, wall_now, rules, boot=boot, jump_tolerance_s=jump_tolerance_s):
        return start(now, rules, hold_kw)
    assert saved is not None
    assert saved.last_heartbeat_wall is not None
    age = wall_now - saved.last_heartbeat_wall
    return FailsafeState(False, now, "", now, last_heartbeat=now - age)


def resumable(
    saved: SavedLink | None,
    wall_now: float,
    rules: FailsafeRules,
    *,
    boot: tuple[str, float] | None = None,
    jump_tolerance_s: float = 2.0,
) -> bool:
    """Whether `resume` carries the last run's healthy link over (see there)."""
    if not rules.applies or saved is None or saved.active or saved.clock_stepped or saved.last_heartbeat_wall is None:
        return False
    down_s = wall_now - saved.saved_wall
    age = wall_now - saved.last_heartbeat_wall
    if down_s < 0 or saved.last_heartbeat_wall > saved.saved_wall or not 0 <= age < rules.heartbeat_timeout_s:
        return False  # the wall clock went back (or the record is from the future): no account of the time down
    if boot is None or saved.boot_s is None or boot[0] != saved.boot_id:
        return True  # another boot (or no boot clock): the wall clock's account is all there is
    # on the same boot, the boot clock (it never steps) must agree with the wall about the time the agent was down
    return abs((boot[1] - saved.boot_s) - down_s) <= jump_tolerance_s


def release(state: FailsafeState, now: float, rules: FailsafeRules) -> tuple[str | None, float | None]:
    """What releases an active fail-safe, and when it releases by itself: (released_by, releases_at).

    released_by: "grid_command" — the heartbeat is back: a fresh grid command releases it at once [LPC-916], and
    it releases by itself at releases_at if the heartbeat holds until then [LPC-921]; "next_heartbeat" — a fresh
    command came while the grid was not heard: the next heartbeat releases it; "heartbeat" — the grid is not heard:
    nothing releases it before a heartbeat (then a grid command, or release_after_s of heartbeats). (None, None)
    when no fail-safe is active.
    """
    if not state.active:
        return None, None
    back_at = state.heartbeat_back_at
    if back_at is None or not heartbeat_fresh(state, now, rules) or state.max_gap_s >= rules.heartbeat_timeout_s:
        commanded = state.last_command is not None and state.last_command >= state.since
        return ("next_heartbeat" if commanded else "heartbeat"), None
    return "grid_command", back_at + rules.release_after_s


def link_doc(saved: SavedLink) -> dict[str, object]:
    """`saved` as a JSON document (the store's key/value state)."""
    return {
        "active": saved.active,
        "last_heartbeat_wall": saved.last_heartbeat_wall,
        "saved_wall": saved.saved_wall,
        "clock_stepped": saved.clock_stepped,
        "boot_id": saved.boot_id,
        "boot_s": saved.boot_s,
    }


def link_from_doc(doc: object) -> SavedLink | None:
    """The record `link_doc` wrote, or None for anything else (absent, from another version, damaged): a start."""
    if not isinstance(doc, dict):
        return None

    def num(key: str) -> float | None:
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return None

    active, stepped, boot_id, saved_wall = (
        doc.get("active"),
        doc.get("clock_stepped"),
        doc.get("boot_id"),
        num("saved_wall"),
    )
    if not isinstance(active, bool) or not isinstance(stepped, bool) or saved_wall is None:
        return None
    boot = boot_id if isinstance(boot_id, str) else None
    return SavedLink(active, num("last_heartbeat_wall"), saved_wall, stepped, boot, num("boot_s"))
