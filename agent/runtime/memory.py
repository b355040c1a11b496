"""What the controller remembers between ticks and across restarts: per miner (what it told it, whether it put it
to sleep, when it last switched, whether it obeys) and per dispatch (its status and compliance figures).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.core.timeline import TIMELINE_STATE_KEY
from hashflex.agent.io.records import MinerControl
from hashflex.agent.runtime.actuator import Change, Op
from hashflex.contract.status import DispatchDoc

OPEN_STATUSES = frozenset({"pending", "active"})


@dataclass(slots=True)
class MinerMemory:
    commanded_w: float | None = None  # last limit it accepted from us
    asleep_by_us: bool = False  # we put it to sleep (so a restart knows what it curtailed)
    last_transition: float = 0.0  # last sleep/wake we saw through (min on/off times)
    limits_unsupported: bool = False  # its firmware refused a power limit, or took it and drew above it: on/off
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
    woken_to_w: float | None = None  # the limit it accepted right after its last wake command (it comes up at it)
    # how far above its setting it drew at its last settled reading while running: still counted while a new
    # setting settles (a drifting miner drifts at the next one too), renewed by the next settled reading
    excess_w: float = 0.0
    excess_setting_w: float = 0.0  # the setting that settled reading was taken at
    last_read: tuple[float, float] = (-1e18, 0.0)  # its last settled reading while running (time, W): is it steady?
    # settling after a change: the first reading since (time, W); two readings in a row that agree mean it has
    # settled before confirm_after_s is up (`settled`)
    probe_at: float = -1e18
    probe_w: float = 0.0
    settled: bool = False
    # when it acknowledged a wake its power has not shown done yet (readout.still_waking; runtime only: after a
    # restart the telemetry's own hint decides)
    wake_sent_at: float | None = None

    def to_control(self, sending: Change | None = None) -> MinerControl:
        """The part that survives a restart: never less than the miner may draw. A command that raises its draw
        (`sending`: a wake, a higher limit) counts as done from before it goes out (the miner may take it and the
        agent die before its reply is stored: a restart that believed the old figures woke other miners into the
        room a booting one was about to take); a lower one counts once it is acknowledged."""
        control = MinerControl(
            asleep_by_us=self.asleep_by_us,
            commanded_w=self.commanded_w,
            since=self.last_transition,
            limits_unsupported=self.limits_unsupported,
            ignores_commands=self.ignores_commands,
            woken_to_w=self.woken_to_w,
            wake_pending=self.pending_op == Op.WAKE.value,
        )
        if sending is None or not raises_draw(sending, self.commanded_w):
            return control
        if sending.op is Op.WAKE:  # it may come up at its stored or stock level before any limit takes
            return dataclasses.replace(control, asleep_by_us=False, woken_to_w=None, wake_pending=True)
        return dataclasses.replace(control, commanded_w=float(sending.watts or 0))

    @classmethod
    def from_control(cls, c: MinerControl) -> MinerMemory:
        return cls(
            commanded_w=c.commanded_w,
            asleep_by_us=c.asleep_by_us and not c.wake_pending,
            last_transition=c.since,
            limits_unsupported=c.limits_unsupported,
            ignores_commands=c.ignores_commands,
            woken_to_w=c.woken_to_w,
            # a wake that may have gone out: confirmed (or re-sent) by telemetry as any acknowledged wake is;
            # the restoring controller dates it (pending_at)
            pending_op=Op.WAKE.value if c.wake_pending else None,
        )


def raises_draw(change: Change, commanded_w: float | None) -> bool:
    """Does this command let the miner draw more than the figures stored for it say?"""
    if change.op is Op.WAKE:
        return True
    return change.op is Op.SET_POWER and change.watts is not None and not change.decrease and (
        commanded_w is None or change.watts > commanded_w
    )


@dataclass(slots=True)
class DispatchRecord:
    dispatch: Dispatch
    status: str  # pending | active | expired | cancelled | failed
    received_at: float  # this revision's arrival
    channel: str = "mqtt"
    accepted_at: float | None = None  # when its first revision was accepted (a revision keeps it)
    commands_sent_at: float | None = None
    target_met_at: float | None = None
    max_overshoot_kw: float = 0.0
    closed_at: float | None = None
    close_reason: str | None = None

    @property
    def open(self) -> bool:
        return self.status in OPEN_STATUSES

    def progress(self) -> dict[str, Any]:
        return {
            "received_at": self.received_at,
            "accepted_at": self.accepted_at,
            "channel": self.channel,
            "commands_sent_at": self.commands_sent_at,
            "target_met_at": self.target_met_at,
            "max_overshoot_kw": self.max_overshoot_kw,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
        }

    @classmethod
    def from_stored(cls, dispatch: Dispatch, status: str, progress: dict[str, Any]) -> DispatchRecord:
        def num(key: str) -> float | None:
            v = progress.get(key)
            return float(v) if isinstance(v, int | float) else None

        return cls(
            dispatch=dispatch,
            status=status,
            received_at=num("received_at") or dispatch.issued_at,
            channel=str(progress.get("channel") or "mqtt"),
            accepted_at=num("accepted_at"),
            commands_sent_at=num("commands_sent_at"),
            target_met_at=num("target_met_at"),
            max_overshoot_kw=num("max_overshoot_kw") or 0.0,
            closed_at=num("closed_at"),
            close_reason=progress.get("close_reason"),
        )

    def moved(self, by_s: float) -> DispatchRecord:
        """This record on a time `by_s` ahead of the one it was stored on (core.timeline): its window and the times
        of its progress move with it; the issue time stays as the sender stamped it."""
        if not by_s:
            return self

        def move(t: float | None) -> float | None:
            return None if t is None else t + by_s

        d = self.dispatch
        return dataclasses.replace(
            self, dispatch=dataclasses.replace(d, start=d.start + by_s, end=move(d.end)),
            received_at=self.received_at + by_s, accepted_at=move(self.accepted_at),
            commands_sent_at=move(self.commands_sent_at), target_met_at=move(self.target_met_at),
            closed_at=move(self.closed_at),
        )  # fmt: skip

    def doc(self) -> DispatchDoc:
        d = self.dispatch
        level = None
        if d.target_kw is not None or d.baseline_kw is not None:
            level = round(d.level_kw(), 3)
        return {
            "id": d.id,
            "rev": d.rev,
            "source": d.source.value,
            "target_kw": d.target_kw,
            "curtail_kw": d.curtail_kw,
            "baseline_kw": d.baseline_kw,
            "level_kw": level,
            "ramp_kw_per_min": d.ramp_kw_per_min,
            "issued_at": iso(d.issued_at),
            "start": iso(d.start),
            "end": iso(d.end),
            "status": self.status,
            "received_at": iso(self.received_at),
            "accepted_at": iso(self.accepted_at),
            "commands_sent_at": iso(self.commands_sent_at),
            "target_met_at": iso(self.target_met_at),
            "time_to_target_s": (
                round(self.target_met_at - self.received_at, 3) if self.target_met_at is not None else None
            ),
            "max_overshoot_kw": round(self.max_overshoot_kw, 3),
            "closed_at": iso(self.closed_at),
            "close_reason": self.close_reason,
        }


def save_on_timeline(
    store: Any, doc: Mapping[str, float], controls: Mapping[str, MinerControl], records: Iterable[DispatchRecord]
) -> None:
    """Store what a restart moved onto its own time (core.timeline) and the record of that time, in one transaction:
    a run killed half-way leaves the last run's times and its record, which the next start moves again."""
    with store.transaction():
        if controls:
            store.save_controls(controls)
        for rec in records:
            store.save_dispatch(rec.dispatch, rec.status, **rec.progress())
        store.set_state(TIMELINE_STATE_KEY, dict(doc))


def ended_copy(dispatch: Dispatch, now: float) -> Dispatch:
    end = now if dispatch.end is None else min(dispatch.end, now)
    return dataclasses.replace(dispatch, end=end)


def is_override(record: DispatchRecord) -> bool:
    return record.dispatch.source is Source.OPERATOR
