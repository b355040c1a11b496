"""The dispatch book: every dispatch and override the controller knows, and their lifecycle (pending → active →
expired, cancelled or failed), compliance figures (commands sent, target met, overshoot) and persistence.

The controller's task is its only writer: the loop advances it each tick, agent/runtime/apply.py adds and closes
dispatches for commands (inside the command's transaction), and the read side lists it. Closing records the
dispatch and its compliance audit together; the loop's own closes go through the write-behind (a store that refuses
writes must not stop the loop), a command's commit with the command or not at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hashflex.agent.core.arbitration import ArbitrationRules, event_windows, retention_s
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.io.records import DispatchRecord
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.crashpoints import crash_point
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.memory import ended_copy
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import DispatchStore, RuntimeMetrics
from hashflex.contract.status import DispatchDoc

log = get_logger("controller")

SAFE_START_ID = "safe-start"  # the override a safe start holds until an operator resumes
_COMPLIANCE_FIELDS = (
    "level_kw",
    "received_at",
    "commands_sent_at",
    "target_met_at",
    "time_to_target_s",
    "max_overshoot_kw",
)

Events = list[tuple[str, dict[str, Any]]]


class DispatchBook:
    def __init__(
        self,
        *,
        store: DispatchStore,
        persist: WriteBehind,
        events: EventLog,
        rules: ArbitrationRules,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self.store = store
        self.persist = persist
        self.events = events
        self.rules = rules
        self.metrics = metrics
        self.records: dict[str, DispatchRecord] = {}

    # ----------------------------------------------------------------------------------------- reading
    def get(self, dispatch_id: str) -> DispatchRecord | None:
        """A dispatch held here, or else as stored (closed ones are forgotten here once out of arbitration's
        reach; the store keeps them)."""
        rec = self.records.get(dispatch_id)
        return rec if rec is not None else self.store.get_dispatch(dispatch_id)

    def open_records(self) -> list[DispatchRecord]:
        return [r for r in self.records.values() if r.open]

    def for_arbitration(self) -> list[Dispatch]:
        """What arbitration weighs: every dispatch held, closed ones too (holds, debounce), but no failed one."""
        return [r.dispatch for r in self.records.values() if r.status != "failed"]

    def unmet(self) -> bool:
        return any(r.open and r.target_met_at is None for r in self.records.values())

    def binding(self, now: float) -> list[DispatchRecord]:
        windows = event_windows([r.dispatch for r in self.records.values()], self.rules)
        return [
            r
            for r in self.records.values()
            if r.open and r.dispatch.id in windows and windows[r.dispatch.id].binds_at(now)
        ]

    def docs(self, include_closed: bool) -> list[DispatchDoc]:
        if not include_closed:
            return [r.doc() for r in self.open_records()]
        seen = {stored.dispatch.id: stored.doc() for stored in self.store.load_dispatches(active_only=False)}
        seen.update({r.dispatch.id: r.doc() for r in self.records.values()})
        return sorted(seen.values(), key=lambda doc: doc["received_at"] or "")

    # ----------------------------------------------------------------------------------------- changing
    def add(self, rec: DispatchRecord) -> None:
        """A new dispatch or revision, stored in the caller's transaction (a command's)."""
        self.records[rec.dispatch.id] = rec
        self.store.save_dispatch(rec.dispatch, rec.status, **rec.progress())

    def hold_safe_start(self, now: float, level_kw: float) -> None:
        """The safe start's override at `level_kw` (written behind: the store may be what is broken)."""
        d = Dispatch(SAFE_START_ID, Source.OPERATOR, now, now, None, target_kw=round(level_kw, 3))
        rec = DispatchRecord(d, "active", now, channel="agent", accepted_at=now)
        self.records[d.id] = rec
        self.persist.call("save_dispatch", d, rec.status, **rec.progress())

    def restore(self, now: float, shift_s: float) -> tuple[list[DispatchRecord], float]:
        """Load the open dispatches the last run stored, moved `shift_s` onto this run's time (core.timeline);
        close those that expired while the agent was down. Returns the ones moved (to store again) and how far
        the wall clock is behind an active one's start (it went back while the agent was down)."""
        ahead_s = 0.0
        for stored in self.store.load_dispatches(active_only=True):
            rec = stored.moved(shift_s)
            d = rec.dispatch
            if rec.status == "active" and d.start > now:
                # it was binding when the last run stopped: a wall clock that went back must not un-bind it (the
                # store keeps the start the grid gave; this run holds it from now)
                ahead_s = max(ahead_s, d.start - now)
                rec.dispatch = dataclasses.replace(d, start=now)
            self.records[d.id] = rec
            if rec.open and d.expired_at(now):
                self.close(rec, now, "expired", "expired while the agent was down", commit=True)
        return (self.open_records() if shift_s else []), ahead_s

    def close(
        self,
        rec: DispatchRecord,
        now: float,
        status: str,
        reason: str,
        *,
        events: Events | None = None,
        commit: bool = False,
    ) -> None:
        """End a dispatch (cancelled, expired, failed), persist it and audit its compliance."""
        if status == "cancelled":
            rec.dispatch = ended_copy(rec.dispatch, now)  # arbitration still sees it for holds and debounce
        rec.status, rec.closed_at, rec.close_reason = status, now, reason
        data: dict[str, Any] = {
            "id": rec.dispatch.id,
            "source": rec.dispatch.source.value,
            "status": status,
            "reason": reason,
        }
        data.update({k: v for k, v in rec.doc().items() if k in _COMPLIANCE_FIELDS})

        dispatch, progress, record = rec.dispatch, rec.progress(), dict(data)

        def write(store: DispatchStore) -> None:
            store.save_dispatch(dispatch, status, **progress)
            crash_point("closing")
            store.append_audit(AuditKind.COMPLIANCE, record, now)

        def write_together(store: DispatchStore) -> None:
            with store.transaction():
                write(store)

        if commit:  # the loop's own close (expired): write-behind, so a refusing store does not stop the loop
            self.persist.write(f"close {rec.dispatch.id}", write_together)
        else:  # inside a command's transaction: commits with the command, or the command is refused
            write(self.store)
        event = {"cancelled": "cancelled", "expired": "expired"}.get(status, "failed")
        if events is None:
            self.events.emit(event, **data)
        else:
            events.append((event, data))
        if self.metrics is not None:
            self.metrics.count_dispatch(status)
        log.info("dispatch closed", **data)

    def advance(self, now: float) -> None:
        """A tick: pending ones whose window opened become active, ended ones expire, and closed ones out of
        arbitration's reach are forgotten here (the store keeps them)."""
        keep_s = retention_s(self.rules)
        for rec in list(self.records.values()):
            if rec.open:
                if rec.dispatch.expired_at(now):
                    self.close(rec, now, "expired", "window ended", commit=True)
                elif rec.status == "pending" and rec.dispatch.active_at(now):
                    rec.status = "active"
                    self.persist.call("update_dispatch", rec.dispatch.id, status="active")
            elif rec.closed_at is not None and now - rec.closed_at > keep_s and rec.dispatch.id in self.records:
                end = rec.dispatch.end if rec.dispatch.end is not None else rec.closed_at
                if now - max(end, rec.closed_at) > keep_s:
                    del self.records[rec.dispatch.id]

    def mark_commands_sent(self, now: float, sent: int, in_flight: int) -> None:
        for rec in self.binding(now):
            if rec.commands_sent_at is None:
                rec.commands_sent_at = now
                self.persist.call("update_dispatch", rec.dispatch.id, commands_sent_at=now)
                self.events.emit("commands_sent", id=rec.dispatch.id, commands=sent, in_flight=in_flight)

    def track(self, snap_ts: float, site_kw: float, now: float, tolerance_kw: float) -> None:
        """Compliance of the binding dispatches against the site's power (`site_kw`, read at `snap_ts`): when the
        target was first met, and the largest overshoot after it."""
        for rec in self.binding(now):
            d = rec.dispatch
            if snap_ts < rec.received_at or (d.target_kw is None and d.baseline_kw is None):
                continue
            level = d.level_kw()
            if rec.target_met_at is None:
                if site_kw <= level + tolerance_kw:
                    rec.target_met_at = snap_ts
                    self.persist.call("update_dispatch", d.id, target_met_at=snap_ts)
                    secs = snap_ts - rec.received_at
                    self.events.emit(
                        "target_reached",
                        id=d.id,
                        level_kw=round(level, 3),
                        power_kw=round(site_kw, 3),
                        after_s=round(secs, 3),
                    )
                    if self.metrics is not None:
                        self.metrics.observe_time_to_target(secs)
                continue
            over = site_kw - level
            if over > rec.max_overshoot_kw + 1e-3:
                rec.max_overshoot_kw = over
                self.persist.call("update_dispatch", d.id, max_overshoot_kw=over)
