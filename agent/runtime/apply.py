"""How each accepted command changes the site's control state: a grid dispatch (new, or a higher revision), a
cancel, a run-time cap, an operator override (curtail) and resume. Called by the controller's task only (it is the
one writer), for commands that passed validation and the idempotency check; the change, the stored reply and the
audit record are committed in one transaction before the reply goes out, and events follow the commit.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Any

from agent.commands import (
    CONFLICT,
    REQUEST_DIGEST,
    STALE_REVISION,
    UNKNOWN_DISPATCH,
    CancelRequest,
    CapRequest,
    Command,
    CurtailRequest,
    DispatchRequest,
    Repeat,
    ResumeRequest,
    answer_repeat,
)
from agent.core import failsafe as fs
from agent.core.audit import AuditKind
from agent.core.model import Dispatch, Source
from agent.protocol import Channel, Reply
from agent.runtime.crashpoints import crash_point
from agent.runtime.memory import DispatchRecord

if TYPE_CHECKING:
    from agent.runtime.controller import Controller

SAFE_START_ID = "safe-start"  # the override a safe start holds until an operator resumes

Events = list[tuple[str, dict[str, Any]]]


def apply_command(ctl: Controller, cmd: Command) -> Reply:
    """Apply one validated command: change, reply and audit record in one transaction, then events."""
    key = cmd.idempotency_key
    if key is not None:  # a repeat that raced the first one through the inbox
        stored = ctl.stored_reply(key)
        if stored is not None:
            answer = answer_repeat(cmd.request, stored)
            return answer.reply if isinstance(answer, Repeat) else answer
    now = ctl.clock.time()
    req = cmd.request
    events: Events = []
    with ctl.store.transaction():
        if isinstance(req, DispatchRequest):
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
        if key is not None:
            ctl.store.put_reply(key, cmd.verb, {**reply.to_dict(), REQUEST_DIGEST: cmd.digest}, now)
        ctl.store.append_audit(
            AuditKind.COMMAND,
            {"verb": cmd.verb, "id": req.id, "channel": cmd.channel.value, "status": reply.status,
             "code": reply.error_code, "message": reply.error_message,
             "request": req.model_dump(mode="json", exclude_none=True)},
            now,
        )  # fmt: skip
        crash_point("mid_write")
    crash_point("accepted")
    for event_type, data in events:
        ctl.events.emit(event_type, **data)
    if reply.is_ok:
        ctl.events.emit("accepted", verb=cmd.verb, id=req.id, channel=cmd.channel.value)
        if cmd.channel is Channel.MQTT and req.kind in ("grid", "cap") and ctl.failsafe is not None:
            ctl.failsafe = fs.command(ctl.failsafe, now)  # a fresh grid command [LPC-916]
        ctl.trigger()
    else:
        ctl.events.emit(
            "rejected", verb=cmd.verb, id=req.id, channel=cmd.channel.value, code=reply.error_code,
            message=reply.error_message,
        )  # fmt: skip
        if ctl.metrics is not None and reply.error_code:
            ctl.metrics.count_rejected(reply.error_code)
    if ctl.metrics is not None and cmd.verb == "dispatch":
        ctl.metrics.count_dispatch("accepted" if reply.is_ok else "rejected")
    return reply

def _dispatch(
    ctl: Controller, req: DispatchRequest, cmd: Command, now: float, events: Events
) -> Reply:
    existing = ctl.dispatches.get(req.id)
    if existing is None:
        with contextlib.suppress(Exception):
            existing = _load_closed(ctl, req.id)
    if existing is not None:
        if not existing.open:
            return Reply.error(
                req.id, CONFLICT,
                f"dispatch {req.id!r} is already {existing.status}; a closed dispatch cannot be revised: "
                "send a new id",
            )  # fmt: skip
        if req.rev <= existing.dispatch.rev:
            return Reply.error(
                req.id, STALE_REVISION,
                f"dispatch {req.id!r} is at revision {existing.dispatch.rev}; send a higher rev to replace it",
            )  # fmt: skip
    # the site's power now: what "curtail by X" is taken from, and the baseline of the flexibility delivered
    baseline = round(ctl.fleet.latest().power_w / 1000.0, 3)
    start = req.start if req.start is not None else now
    d = Dispatch(
        id=req.id, source=Source.GRID, issued_at=req.issued_at, start=start, end=req.end,
        target_kw=req.target_kw, curtail_kw=req.curtail_kw, ramp_kw_per_min=req.ramp_kw_per_min,
        priority=req.priority, rev=req.rev, baseline_kw=baseline,
    )  # fmt: skip
    rec = DispatchRecord(d, "active" if start <= now else "pending", now, channel=cmd.channel.value)
    if existing is not None:  # a revision keeps its reception time only if it binds the same way
        rec.received_at = now
    ctl.dispatches[d.id] = rec
    ctl.store.save_dispatch(d, rec.status, **rec.progress())
    return Reply.ok(req.id, {"dispatch": rec.doc()})

def _load_closed(ctl: Controller, dispatch_id: str) -> DispatchRecord | None:
    for d, status, progress in ctl.store.load_dispatches(active_only=False):
        if d.id == dispatch_id:
            return DispatchRecord.from_stored(d, status, dict(progress or {}))
    return None

def _cancel(ctl: Controller, req: CancelRequest, now: float, events: Events) -> Reply:
    rec = ctl.dispatches.get(req.dispatch_id)
    if rec is None:
        rec = _load_closed(ctl, req.dispatch_id)
    if rec is None or rec.dispatch.source is not Source.GRID:
        return Reply.error(req.id, UNKNOWN_DISPATCH, f"no grid dispatch with id {req.dispatch_id!r} is known")
    if rec.open:
        ctl.close_dispatch(rec, now, "cancelled", f"cancelled by {req.id}", events=events)
    return Reply.ok(req.id, {"dispatch_id": rec.dispatch.id, "status": rec.status})

def _cap(
    ctl: Controller, req: CapRequest, cmd: Command, now: float, events: Events
) -> Reply:
    old = ctl.effective_cap_kw()
    ctl.runtime_cap_kw = None if req.cap_kw >= ctl.licensed_cap_kw else req.cap_kw
    ctl.store.set_state("runtime_cap_kw", ctl.runtime_cap_kw)
    new = ctl.effective_cap_kw()
    change = {"from_kw": old, "to_kw": new, "by": req.id, "channel": cmd.channel.value}
    ctl.store.append_audit(AuditKind.CAP_CHANGE, change, now)
    events.append(("cap_changed", change))
    return Reply.ok(req.id, {"cap_kw": new, "licensed_cap_kw": ctl.licensed_cap_kw})

def _curtail(
    ctl: Controller, req: CurtailRequest, cmd: Command, now: float, events: Events
) -> Reply:
    did = req.id or f"op-{uuid.uuid4().hex[:12]}"
    if did in ctl.dispatches:
        return Reply.error(req.id, CONFLICT, f"an override with id {did!r} already exists; use a new id")
    baseline = round(ctl.fleet.latest().power_w / 1000.0, 3)
    d = Dispatch(
        id=did, source=Source.OPERATOR, issued_at=req.issued_at or now, start=now,
        end=None if req.for_s is None else now + req.for_s, target_kw=req.to_kw, curtail_kw=req.by_kw,
        baseline_kw=baseline,
    )  # fmt: skip
    rec = DispatchRecord(d, "active", now, channel=cmd.channel.value)
    ctl.dispatches[did] = rec
    ctl.store.save_dispatch(d, rec.status, **rec.progress())
    return Reply.ok(req.id, {"dispatch": rec.doc()})

def _resume(ctl: Controller, req: ResumeRequest, now: float, events: Events) -> Reply:
    ended: list[str] = []
    for rec in list(ctl.dispatches.values()):
        if rec.open and rec.dispatch.source is Source.OPERATOR:
            ctl.close_dispatch(rec, now, "cancelled", "resumed by the operator", events=events)
            ended.append(rec.dispatch.id)
    if SAFE_START_ID in ended:
        ctl.alarms.pop("safe_start", None)
    return Reply.ok(req.id, {"cancelled": ended})
