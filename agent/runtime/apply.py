"""How each accepted command changes the site's control state: a grid dispatch (new, or a higher revision), a
cancel, a run-time cap, an operator override (curtail) and resume. Called by the controller's task only (it is the
one writer), for commands that passed validation and the idempotency check; the change, the stored reply and the
audit record are committed in one transaction before the reply goes out, and events follow the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

from hashflex.agent.commands import REQUEST_DIGEST, Command, Repeat, answer_repeat, check_order
from hashflex.agent.config import AgentConfig
from hashflex.agent.core import failsafe as fs
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.model import Dispatch, Plan, Source
from hashflex.agent.core.timeline import sender_window
from hashflex.agent.io.records import DispatchRecord
from hashflex.agent.io.store import StoreError, StoreUnavailable, clear_safe_start
from hashflex.agent.logging import get_logger
from hashflex.agent.protocol import Channel
from hashflex.agent.runtime.caps import Caps
from hashflex.agent.runtime.crashpoints import crash_point
from hashflex.agent.runtime.dispatches import SAFE_START_ID, DispatchBook
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.metering import MeterControl, counted_present_kw
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import ControlStore, RuntimeMetrics, SnapshotSource
from hashflex.contract.reply import BAD_REQUEST, CONFLICT, STALE_REVISION, UNKNOWN_DISPATCH, Reply
from hashflex.contract.requests import (
    OPERATOR_ID_PREFIX,
    CancelRequest,
    CapRequest,
    CurtailRequest,
    DispatchRequest,
    ResumeRequest,
)


class Clock(Protocol):
    def time(self) -> float: ...


class CommandHost(Protocol):
    """What a command may read and change of the control loop (agent.runtime.controller.Controller)."""

    cfg: AgentConfig
    store: ControlStore
    persist: WriteBehind
    events: EventLog
    caps: Caps
    book: DispatchBook
    failsafe: fs.FailsafeState | None
    fleet: SnapshotSource
    plan: Plan | None

    @property
    def alarms(self) -> dict[str, str]: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def meter(self) -> MeterControl | None: ...
    @property
    def metrics(self) -> RuntimeMetrics | None: ...
    def trigger(self) -> None: ...


log = get_logger("apply")

STORE_UNAVAILABLE = "store_unavailable"  # error code: the command could not be stored, so it was not applied

Events = list[tuple[str, dict[str, Any]]]


def apply_command(ctl: CommandHost, cmd: Command) -> Reply:
    """Apply one validated command: change, reply and audit record in one transaction, then events.

    A command the state store cannot record now (full, locked, read-only: StoreError) is refused with
    `store_unavailable`: nothing of it is applied (the controller's memory is put back as it was), no `ok` goes
    out, and the sender's retry with the same id is applied once the store takes writes again. It is stored only
    behind the loop's own queued records (the write-behind is flushed first), so the chain keeps their order."""
    try:
        if not ctl.persist.flush(force=True):
            raise StoreUnavailable(ctl.persist.error or "the state store refuses writes")
        return _apply_command(ctl, cmd)
    except StoreError as exc:
        return _store_refused(ctl, cmd, exc)


def _apply_command(ctl: CommandHost, cmd: Command) -> Reply:
    key = cmd.idempotency_key
    if key is not None:  # a repeat that raced the first one through the inbox
        stored = ctl.store.get_reply(key)
        if stored is not None:
            answer = answer_repeat(cmd.request, stored)
            return answer.reply if isinstance(answer, Repeat) else answer
    now = ctl.clock.time()
    req = cmd.request
    events: Events = []
    with _all_or_nothing(ctl):
        # a command issued before a newer one of its kind that was already applied is stale (checked here, in the
        # write transaction, so two commands racing through the inbox are ordered too)
        stale = check_order(cmd, ctl.store.newest_issued)
        if stale is not None:
            reply = stale
        elif isinstance(req, DispatchRequest):
            reply = _dispatch(ctl, req, cmd, now, events)
        elif isinstance(req, CancelRequest):
            reply = _cancel(ctl, req, now, events)
        elif isinstance(req, CapRequest):
            reply = _cap(ctl, req, cmd, now, events)
        elif isinstance(req, CurtailRequest):
            reply = _curtail(ctl, req, cmd, now, events)
        elif isinstance(req, ResumeRequest):
            reply = _resume(ctl, req, now, events)
        else:  # pragma: no cover - parse_request only marks the verbs above as mutating
            raise ValueError(f"verb {cmd.verb!r} does not change anything")
        if reply.is_ok and cmd.order_key is not None and req.issued_at is not None:
            ctl.store.set_newest_issued(cmd.order_key, req.issued_at, now)
        if key is not None:
            ctl.store.put_reply(key, cmd.verb, {**reply.to_dict(), REQUEST_DIGEST: cmd.digest}, now)
        ctl.store.append_audit(
            AuditKind.COMMAND,
            {
                "verb": cmd.verb,
                "id": req.id,
                "channel": cmd.channel.value,
                "status": reply.status,
                "code": reply.error_code,
                "message": reply.error_message,
                "request": req.model_dump(mode="json", exclude_none=True),
            },
            now,
        )
        crash_point("mid_write")
    crash_point("accepted")
    if isinstance(req, ResumeRequest) and reply.is_ok:
        _forget_safe_start(ctl)
    for event_type, data in events:
        ctl.events.emit(event_type, **data)
    if reply.is_ok:
        ctl.events.emit("accepted", verb=cmd.verb, id=req.id, channel=cmd.channel.value)
        if cmd.channel is Channel.MQTT and req.kind in ("grid", "cap") and ctl.failsafe is not None:
            ctl.failsafe = fs.command(ctl.failsafe, now)  # a fresh grid command [LPC-916]
        ctl.trigger()
    else:
        ctl.events.emit(
            "rejected",
            verb=cmd.verb,
            id=req.id,
            channel=cmd.channel.value,
            code=reply.error_code,
            message=reply.error_message,
        )
        if ctl.metrics is not None and reply.error_code:
            ctl.metrics.count_rejected(reply.error_code)
    if ctl.metrics is not None and cmd.verb == "dispatch":
        ctl.metrics.count_dispatch("accepted" if reply.is_ok else "rejected")
    return reply


@contextlib.contextmanager
def _all_or_nothing(ctl: CommandHost) -> Iterator[None]:
    """The command's transaction; when it does not commit (the store refuses, or anything raises), the controller's
    memory is put back as it was before: nothing is applied that was not committed."""
    records = {i: (r, dataclasses.replace(r)) for i, r in ctl.book.records.items()}
    caps = dataclasses.replace(ctl.caps)
    alarms = dict(ctl.alarms)
    try:
        with ctl.store.transaction():
            yield
    except BaseException:
        ctl.book.records.clear()
        for i, (rec, before) in records.items():
            for f in dataclasses.fields(rec):
                setattr(rec, f.name, getattr(before, f.name))
            ctl.book.records[i] = rec
        ctl.caps.grid_kw, ctl.caps.operator_kw = caps.grid_kw, caps.operator_kw
        ctl.alarms.clear()
        ctl.alarms.update(alarms)
        raise


def _store_refused(ctl: CommandHost, cmd: Command, exc: StoreError) -> Reply:
    req = cmd.request
    message = f"the state store cannot record this command now ({exc}); nothing was applied: retry later"
    log.warning("command refused: state store unavailable", verb=cmd.verb, id=req.id, error=str(exc))
    # audited behind the loop's own queued records once the store takes writes again (and, queued, it keeps the
    # store_unavailable alarm up until then)
    ctl.persist.audit(
        AuditKind.COMMAND,
        {
            "verb": cmd.verb,
            "id": req.id,
            "channel": cmd.channel.value,
            "status": "error",
            "code": STORE_UNAVAILABLE,
            "message": message,
        },
        ctl.clock.time(),
    )
    ctl.events.emit(
        "rejected", verb=cmd.verb, id=req.id, channel=cmd.channel.value, code=STORE_UNAVAILABLE, message=message
    )
    if ctl.metrics is not None:
        ctl.metrics.count_rejected(STORE_UNAVAILABLE)
    return Reply.error(req.id, STORE_UNAVAILABLE, message)


def _counted_present_kw(ctl: CommandHost) -> float:
    """The site's power now as the last plan counted it: a curtail's or a dispatch's baseline."""
    return counted_present_kw(ctl.fleet.latest(), ctl.plan, None if ctl.meter is None else ctl.meter.last)


def _forget_safe_start(ctl: CommandHost) -> None:
    """The operator resumed (committed): the next start is a normal one."""
    try:
        clear_safe_start(ctl.cfg.state_path)
    except OSError as exc:  # the next start is then safe again: the safe side
        log.error("safe start marker not removed", error=str(exc))


def _dispatch(ctl: CommandHost, req: DispatchRequest, cmd: Command, now: float, events: Events) -> Reply:
    existing = ctl.book.records.get(req.id)
    if existing is None:
        with contextlib.suppress(Exception):
            existing = ctl.store.get_dispatch(req.id)  # closed, and forgotten by the book
    if existing is not None:
        if not existing.open:
            return Reply.error(
                req.id,
                CONFLICT,
                f"dispatch {req.id!r} is already {existing.status}; a closed dispatch cannot be revised: send a new id",
            )
        if req.rev <= existing.dispatch.rev:
            return Reply.error(
                req.id,
                STALE_REVISION,
                f"dispatch {req.id!r} is at revision {existing.dispatch.rev}; send a higher rev to replace it",
            )
    # the site's power now: what "curtail by X" is taken from, and the baseline of the flexibility delivered. A
    # revision keeps the baseline its first revision measured: the site now is already curtailed by the dispatch
    # being revised, and "by X" means by X from where the site was before the event
    if existing is not None and existing.dispatch.baseline_kw is not None:
        baseline = existing.dispatch.baseline_kw
    else:
        baseline = round(_counted_present_kw(ctl), 3)
    # the window on the agent's time, whole on the grid's clock and on ours (timeline.sender_window)
    start, end = sender_window(req.start, req.end, offset_s=cmd.sender_offset_s)
    if (start, end) != (req.start, req.end):
        log.warning(
            "grid clock and the agent's disagree: dispatch window widened",
            dispatch=req.id,
            agent_ahead_s=round(cmd.sender_offset_s or 0.0, 1),
            start=req.start,
            end=req.end,
        )
    start = now if start is None else start
    d = Dispatch(
        id=req.id,
        source=Source.GRID,
        issued_at=req.issued_at,
        start=start,
        end=end,
        target_kw=req.target_kw,
        curtail_kw=req.curtail_kw,
        ramp_kw_per_min=req.ramp_kw_per_min,
        rev=req.rev,
        baseline_kw=baseline,
    )
    first_accepted = existing.accepted_at if existing is not None and existing.accepted_at is not None else now
    rec = DispatchRecord(
        d, "active" if start <= now else "pending", now, channel=cmd.channel.value, accepted_at=first_accepted
    )
    ctl.book.add(rec)
    return Reply.ok(req.id, {"dispatch": rec.doc()})


def _cancel(ctl: CommandHost, req: CancelRequest, now: float, events: Events) -> Reply:
    rec = ctl.book.get(req.dispatch_id)
    if rec is None or rec.dispatch.source is not Source.GRID:
        return Reply.error(req.id, UNKNOWN_DISPATCH, f"no grid dispatch with id {req.dispatch_id!r} is known")
    if rec.open:
        ctl.book.close(rec, now, "cancelled", f"cancelled by {req.id}", events=events)
    return Reply.ok(req.id, {"dispatch_id": rec.dispatch.id, "status": rec.status})


def _cap(ctl: CommandHost, req: CapRequest, cmd: Command, now: float, events: Events) -> Reply:
    """A cap from the grid (signed, over MQTT) or from the site's operator (the local socket): two inputs, each
    replaced only by its own source, the lower binds. So a local `hashflex cap 1000kW` never lifts a grid cap of
    400 kW; only an explicit `lift_grid_cap` on the local socket clears the grid's, and it is audited as such."""
    lift = req.lift_grid_cap
    grid = cmd.channel is not Channel.LOCAL
    if lift and grid:
        return Reply.error(
            req.id,
            BAD_REQUEST,
            "lift_grid_cap is an operator's act on the site's own control socket; the grid sets its cap directly",
        )
    caps = ctl.caps
    old = caps.effective_kw()
    old_grid = caps.grid_kw
    cap = None if req.cap_kw >= caps.licensed_kw else req.cap_kw
    if grid:
        caps.grid_kw = cap
    else:
        caps.operator_kw = cap
        if lift:
            caps.grid_kw = None
    caps.save(ctl.store)
    new = caps.effective_kw()
    change: dict[str, Any] = {
        "from_kw": old,
        "to_kw": new,
        "by": req.id,
        "channel": cmd.channel.value,
        "source": "grid" if grid else "operator",
        "asked_kw": req.cap_kw,
        "grid_cap_kw": caps.grid_kw,
        "operator_cap_kw": caps.operator_kw,
    }
    if lift:
        change["lifted_grid_cap_kw"] = old_grid
    ctl.store.append_audit(AuditKind.CAP_CHANGE, change, now)
    events.append(("cap_changed", change))
    if lift and old_grid is not None:
        log.warning("grid cap lifted by the operator", lifted_kw=old_grid, operator_cap_kw=caps.operator_kw, by=req.id)
    data: dict[str, Any] = {
        "cap_kw": new,
        "licensed_cap_kw": caps.licensed_kw,
        "grid_cap_kw": caps.grid_kw,
        "operator_cap_kw": caps.operator_kw,
    }
    if lift:
        data["lifted_grid_cap_kw"] = old_grid
    return Reply.ok(req.id, data)


def _curtail(ctl: CommandHost, req: CurtailRequest, cmd: Command, now: float, events: Events) -> Reply:
    # operator overrides have their own id namespace (the grid may not use the prefix): a grid dispatch and an
    # override with the same id are two different things and never replace or block each other
    did = OPERATOR_ID_PREFIX + (req.id or uuid.uuid4().hex[:12])
    if did in ctl.book.records:
        return Reply.error(req.id, CONFLICT, f"an override with id {did!r} already exists; use a new id")
    # a new override replaces the operator's earlier ones (they stacked silently, the lowest binding) unless it asks
    # to be added; the safe start is not the operator's own level and still needs `resume`. Audited as cancelled
    replaced: list[str] = []
    if not req.add:
        for rec in ctl.book.open_records():
            if rec.dispatch.source is Source.OPERATOR and rec.dispatch.id != SAFE_START_ID:
                ctl.book.close(rec, now, "cancelled", f"replaced by {did}", events=events)
                replaced.append(rec.dispatch.id)
    baseline = round(_counted_present_kw(ctl), 3)
    d = Dispatch(
        id=did,
        source=Source.OPERATOR,
        issued_at=req.issued_at or now,
        start=now,
        end=None if req.for_s is None else now + req.for_s,
        target_kw=req.to_kw,
        curtail_kw=req.by_kw,
        baseline_kw=baseline,
    )
    rec = DispatchRecord(d, "active", now, channel=cmd.channel.value, accepted_at=now)
    ctl.book.add(rec)
    return Reply.ok(req.id, {"dispatch": rec.doc(), "replaced": replaced})


def _resume(ctl: CommandHost, req: ResumeRequest, now: float, events: Events) -> Reply:
    ended: list[str] = []
    for rec in ctl.book.open_records():
        if rec.dispatch.source is Source.OPERATOR:
            ctl.book.close(rec, now, "cancelled", "resumed by the operator", events=events)
            ended.append(rec.dispatch.id)
    if SAFE_START_ID in ended:
        ctl.alarms.pop("safe_start", None)
    return Reply.ok(req.id, {"cancelled": ended})
