"""What carries over from one run to the next, and the clock it is kept on: the start-up restore (caps, the miners'
control memory, open dispatches, the grid link, the safe start) and, while running, the records the next run will
need (the grid link's state, how far the wall clock is from this run's time).

What the last run stored is on its time, which the wall may have stepped away from while it ran: moved onto this
run's (core.timeline), or an override would end early, or late, after a wall-clock step. While running, the agent
keeps its own time (SteadyClock): a wall-clock step is alarmed, never followed at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hashflex.agent.core import failsafe as fs
from hashflex.agent.core import timeline
from hashflex.agent.io.records import MinerControl
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.alarms import AlarmBoard
from hashflex.agent.runtime.caps import Caps
from hashflex.agent.runtime.clock import SteadyClock, boot_clock
from hashflex.agent.runtime.commanding import Commander
from hashflex.agent.runtime.dispatches import DispatchBook
from hashflex.agent.runtime.frequency import STATE_KEY as FREQUENCY_STATE_KEY
from hashflex.agent.runtime.frequency import FrequencyResponse
from hashflex.agent.runtime.level import RAMPS_STATE_KEY, PlanningLevel
from hashflex.agent.runtime.memory import memory_from, save_on_timeline
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import ControlStore

log = get_logger("controller")

FAILSAFE_STATE_KEY = "failsafe"  # the grid link as this run leaves it for the next (failsafe.link_doc)


def restore(
    *,
    store: ControlStore,
    persist: WriteBehind,
    clock: SteadyClock,
    caps: Caps,
    book: DispatchBook,
    commands: Commander,
    alarms: AlarmBoard,
    fs_rules: fs.FailsafeRules,
    present_kw: float,
    pin_energy: Callable[[float], object],
    safe_start: str | None,
    planning: PlanningLevel,
    frequency: FrequencyResponse | None = None,
) -> fs.FailsafeState:
    """Load the last run's state (after the first sweep, before the first tick); returns the grid link's state.
    `safe_start`: why this start holds the site (an override until an operator resumes), or None. The planning
    level starts at what the site draws now (within the caps), uncorrected."""
    now = clock.time()
    caps.load(store)
    shift = timeline.shift_s(
        store.get_state(timeline.TIMELINE_STATE_KEY, None),
        wall_offset_s=clock.wall_offset_s(),
        threshold_s=clock.step_threshold_s,
    )
    moved_controls: dict[str, MinerControl] = {}
    ahead_s = 0.0  # how far times recorded by the last run are ahead of the clock now: the wall went back
    for ip, stored_control in store.load_controls().items():
        control = dataclasses.replace(stored_control, since=stored_control.since + shift)
        if shift:
            moved_controls[ip] = control
        mem = commands.memory[ip] = memory_from(control)
        if mem.pending_op is not None:
            mem.pending_at = now  # a wake the last run may have sent: telemetry confirms it from now on
        if mem.last_transition > now:  # its min on/off time runs from now, not from a time still to come
            ahead_s = max(ahead_s, mem.last_transition - now)
            mem.last_transition = now
    moved, behind_s = book.restore(now, shift)
    ahead_s = max(ahead_s, behind_s)
    doc = timeline.timeline_doc(clock.wall_offset_s())
    persist.write("timeline", lambda s: save_on_timeline(s, doc, moved_controls, moved))
    if shift:
        alarms.raise_alarm(
            "clock_step",
            f"the wall clock was {shift:+.0f} s from the last run's time (it stepped "
            "while the agent ran); the dispatch windows, overrides and min on/off times that run "
            "stored keep its time, moved onto the wall's: check the gateway's time (NTP)",
        )
    pin_energy(now - now % 60)  # what the last run recorded is complete up to this minute
    # an under-frequency event the last run held holds on, from the first plan, until its restore rule is met
    saved_event = store.get_state(FREQUENCY_STATE_KEY, None)
    if frequency is not None:
        frequency.resume(saved_event, shift_s=shift, now=now)
    elif saved_event is not None:
        log.warning("an under-frequency event was held when the agent stopped; frequency response is off now")
        persist.call("delete_state", FREQUENCY_STATE_KEY)
    # within the heartbeat timeout of a healthy link the site carries on uncurtailed (failsafe.resume)
    saved_link = fs.link_from_doc(store.get_state(FAILSAFE_STATE_KEY, None))
    failsafe = fs.resume(
        now,
        clock.wall(),
        fs_rules,
        min(present_kw, caps.effective_kw()),
        saved_link,
        boot=boot_clock(clock),
        jump_tolerance_s=clock.step_threshold_s * clock.scale,
    )
    if saved_link is not None and not failsafe.active and failsafe.last_heartbeat is not None:
        log.info(
            "grid link resumed: healthy when the agent stopped, no fail-safe",
            heartbeat_age_s=round(now - failsafe.last_heartbeat, 1),
        )
    if safe_start is not None:
        level = fs_rules.level_kw if fs_rules.level_kw is not None else present_kw
        level = min(level, caps.effective_kw())
        why = f"{safe_start}; holding {level:.1f} kW until an operator runs `hashflex resume`"
        alarms.raise_alarm("safe_start", why)
        book.hold_safe_start(now, level)  # (also remembered outside the store: app.open_store)
    if ahead_s > clock.step_threshold_s:
        alarms.raise_alarm(
            "clock_step",
            f"the wall clock is {ahead_s:.0f} s behind times the last run recorded (it "
            "went back while the agent was down); bound dispatches stay bound, min on/off times run "
            "from now: check the gateway's time (NTP)",
        )
    planning.level_kw = min(present_kw, caps.effective_kw())
    planning.bias_kw = 0.0
    planning.restore_ramps(store.get_state(RAMPS_STATE_KEY, None), shift_s=shift, now=now)
    log.info(
        "state restored",
        dispatches=len(book.open_records()),
        controls=len(commands.memory),
        grid_cap_kw=caps.grid_kw,
        operator_cap_kw=caps.operator_kw,
        failsafe=failsafe.active,
        present_kw=round(present_kw, 2),
    )
    return failsafe


class TimeKeeper:
    """While running: alarms a wall-clock step, and records the grid link and the wall's offset for the next run."""

    def __init__(self, clock: SteadyClock, persist: WriteBehind, alarms: AlarmBoard) -> None:
        self.clock = clock
        self.persist = persist
        self.alarms = alarms
        self.step_s: float | None = None  # the wall-clock step alarmed, if any
        self._link_saved: tuple[bool, float | None, bool] | None = None  # what the last link record showed

    def check_clock(self) -> None:
        """Alarm on a wall-clock step: the agent keeps its own time (SteadyClock), so nothing un-binds or fires
        early, but an operator must know the gateway's clock jumped (and that dispatch windows keep the old one)."""
        offset = self.clock.wall_offset_s()
        threshold = self.clock.step_threshold_s
        if abs(offset) > threshold:
            if self.step_s is None or abs(offset - self.step_s) > threshold:
                self.step_s = offset
                self._save_timeline(offset)
                self.alarms.raise_alarm(
                    "clock_step",
                    f"the wall clock stepped {offset:+.0f} s from the agent's time; timers and dispatch windows keep "
                    f"the agent's time, which follows the wall at most {self.clock.max_slew * 100:.2g} % (a restart "
                    "adopts the wall clock and moves them onto it): check the gateway's time (NTP)",
                )
        elif self.step_s is not None:  # (the alarm restore raises for a clock behind the store stays)
            self.step_s = None
            self._save_timeline(offset)
            self.alarms.drop("clock_step")
            log.info("wall clock back in step with the agent's time", offset_s=round(offset, 3))

    def _save_timeline(self, wall_offset_s: float) -> None:
        """Record how far the wall is from this run's time: the next run reads this run's times with it."""
        self.persist.call(
            "set_state", timeline.TIMELINE_STATE_KEY, timeline.timeline_doc(wall_offset_s), self.clock.time()
        )

    def save_link(self, f: fs.FailsafeState | None, now: float) -> None:
        """Record the grid link for the next run (failsafe.resume), in wall time, when what it shows changed: once
        a heartbeat (the tick after it), on entering or leaving the fail-safe, and on a wall-clock step."""
        shown = None if f is None else (f.active, f.last_heartbeat, self.step_s is not None)
        if f is None or shown == self._link_saved:
            return
        self._link_saved = shown
        link = fs.saved_link(
            f, now, self.clock.wall(), clock_stepped=self.step_s is not None, boot=boot_clock(self.clock)
        )
        self.persist.call("set_state", FAILSAFE_STATE_KEY, fs.link_doc(link), now)
