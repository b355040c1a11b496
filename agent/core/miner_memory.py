"""What the agent remembers of each miner between ticks: what it told it, whether it put it to sleep, when it last
switched, whether it obeys, and how its readings settle. Written only through agent.core.observe's decisions and
the command results the controller takes in; the part that survives a restart is agent.io.records.MinerControl
(agent.runtime.memory converts)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class MinerMemory:
    commanded_w: float | None = None  # last limit it accepted from us
    asleep_by_us: bool = False  # we put it to sleep (so a restart knows what it curtailed)
    last_transition: float = 0.0  # last sleep/wake we saw through (min on/off times)
    limits_unsupported: bool = False  # its firmware refused a power limit: on/off
    # it took limits and kept drawing above them (a drifting PSU): on/off, counted at its draw, until a reading
    # shows it under its limit again (`closed_loop._watch_setting`)
    overdraws_limit: bool = False
    ignores_commands: bool = False  # acknowledged, then did not act, repeatedly: counted at its real draw
    # a command it acknowledged and telemetry has not yet confirmed
    pending_op: str | None = None
    pending_w: int | None = None
    pending_at: float = 0.0
    recommands: int = 0  # re-sends of the pending command
    resend_due: bool = False  # telemetry did not confirm it in time: send it again
    retry_at: float = 0.0  # a miner that ignores commands is tried again at this time
    # a command that failed (refused, timed out, no answer) is not re-sent before `failed_retry_at`: the back-off
    # doubles with each failure in a row (`failures`), up to a bound, and a command that succeeds resets it.
    # Runtime only: a restart tries again at once.
    failures: int = 0
    failed_op: str | None = None
    failed_retry_at: float = -1e18
    limited_at: float = -1e18  # when it last acknowledged a power limit (firmware re-tunes for a moment after)
    lowered_at: float = -1e18  # when it last acknowledged a lower limit (a raise waits a moment after: no flapping)
    off_seen_at: float | None = None  # first reading that showed it off when we had not slept it
    # when it acknowledged a command that changed its setting (a re-send of the same one does not count): its
    # readings show what it draws at that setting from confirm_after_s later
    changed_at: float = -1e18
    # the limit it had before the one it acknowledged last (None: none known, or a wake): while it settles at the new
    # one it may read anywhere between the two, and that is no drift
    left_w: float | None = None
    woken_to_w: float | None = None  # the limit it accepted right after its last wake command (it comes up at it)
    # how far above its setting it drew at its last settled reading while running: still counted while a new
    # setting settles (a drifting miner drifts at the next one too), renewed by the next settled reading
    excess_w: float = 0.0
    excess_setting_w: float = 0.0  # the setting that settled reading was taken at
    excess_at: float = -1e18  # when a steady reading last set `excess_w` (before its last switch on: its peers')
    excess_read_at: float = -1e18  # when any settled reading last set it (a climbing one: a floor; for its peers)
    last_read: tuple[float, float] = (-1e18, 0.0)  # its last settled reading while running (time, W): is it steady?
    # settling after a change: the first reading since (time, W); two readings in a row that agree mean it has
    # settled before confirm_after_s is up (`settled`)
    probe_at: float = -1e18
    probe_w: float = 0.0
    settled: bool = False
    # when it acknowledged a wake its power has not shown done yet (observe.still_waking; runtime only: after a
    # restart the telemetry's own hint decides)
    wake_sent_at: float | None = None
    # whether it was last seen on (True) or off (False), by telemetry or by a command it acknowledged; None: not
    # seen yet in this run. A change seen starts its min on/off time (observe: the agent did not cause it)
    seen_on: bool | None = None

    def copy(self) -> MinerMemory:
        new = _new_memory(MinerMemory)
        for name in _FIELDS:
            setattr(new, name, getattr(self, name))
        return new


_new_memory = object.__new__
_FIELDS: tuple[str, ...] = MinerMemory.__slots__
