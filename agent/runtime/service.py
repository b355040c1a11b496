"""The one CommandHandler behind every transport (MQTT, the local control socket).

parse (agent.commands) → idempotency (a repeated id gets its stored reply, and is never applied twice, even after
the dispatch was cancelled or has ended) → apply through the controller, the one writer, which persists the
change, the reply and the audit record in one transaction before the reply is returned → event.

Refused input gets an error reply, an audit record and a `rejected` event, and changes nothing else. Read verbs
(status, miners, preview, dispatches, events, ping) are answered from the controller's current picture.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.commands import (
    INTERNAL,
    UNAVAILABLE,
    Command,
    DispatchesRequest,
    EventsRequest,
    MinersRequest,
    PreviewRequest,
    Repeat,
    parse_request,
)
from agent.config import AgentConfig
from agent.logging import get_logger
from agent.protocol import Channel, Reply
from agent.runtime.clock import Clock
from agent.runtime.events import EventLog, iso

log = get_logger("commands")


class Applier(Protocol):
    """What the service needs from the controller (agent.runtime.controller.Controller)."""

    @property
    def cap_kw(self) -> float: ...

    async def submit(self, command: Command) -> Reply: ...

    def stored_reply(self, key: str) -> dict[str, Any] | None: ...

    def status(self) -> dict[str, Any]: ...

    def miner_rows(self, state: str | None, sort: str, desc: bool, limit: int | None) -> list[dict[str, Any]]: ...

    def preview(self, target_kw: float) -> dict[str, Any]: ...

    def dispatch_docs(self, include_closed: bool) -> list[dict[str, Any]]: ...

    def record_refusal(self, verb: str, channel: Channel, reply: Reply, payload: bytes) -> None: ...


class MetricsSink(Protocol):
    def count_rejected(self, reason: str) -> None: ...


class CommandService:
    def __init__(
        self,
        cfg: AgentConfig,
        controller: Applier,
        events: EventLog,
        *,
        clock: Clock,
        grid_keys: Sequence[Ed25519PublicKey],
        operator_keys: Sequence[Ed25519PublicKey],
        metrics: MetricsSink | None = None,
        submit_timeout_s: float = 30.0,
    ) -> None:
        self._cfg = cfg
        self._controller = controller
        self._events = events
        self._clock = clock
        self._grid_keys = list(grid_keys)
        self._operator_keys = list(operator_keys)
        self._metrics = metrics
        self._submit_timeout_s = submit_timeout_s

    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        now = self._clock.time()
        parsed = parse_request(
            verb,
            payload,
            channel,
            grid_keys=self._grid_keys,
            operator_keys=self._operator_keys,
            now=now,
            rules=self._cfg.dispatch,
            max_bytes=self._cfg.mqtt.max_payload_bytes,
            cap_kw=self._controller.cap_kw,
            retained=retained,
            stored_reply=self._controller.stored_reply,
        )
        if isinstance(parsed, Reply):
            self._refused(verb, channel, parsed, payload)
            return parsed
        if isinstance(parsed, Repeat):
            log.info("repeated command answered from the store", verb=verb, id=parsed.request.id,
                     channel=channel.value)  # fmt: skip
            return parsed.reply
        if not parsed.mutating:
            return self._read(parsed)
        self._events.emit("received", verb=verb, id=parsed.id, channel=channel.value)
        started = time.monotonic()
        try:
            reply = await self._controller.submit(parsed)
        except TimeoutError:
            reply = Reply.error(parsed.id, UNAVAILABLE, "the control loop did not take the command in time; retry")
        except Exception:
            log.exception("applying a command failed", verb=verb, id=parsed.id)
            reply = Reply.error(parsed.id, INTERNAL, "the agent failed to apply this command; see its log")
        log.info(
            "command", verb=verb, id=parsed.id, channel=channel.value, status=reply.status, code=reply.error_code,
            dur_ms=round((time.monotonic() - started) * 1000, 1),
        )  # fmt: skip
        if not reply.is_ok and self._metrics is not None and reply.error_code:
            self._metrics.count_rejected(reply.error_code)
        return reply

    # ------------------------------------------------------------------------------------------------ reads
    def _read(self, cmd: Command) -> Reply:
        req = cmd.request
        c = self._controller
        if cmd.verb == "ping":
            return Reply.ok(req.id, {"pong": True, "ts": iso(self._clock.time())})
        if cmd.verb == "status":
            return Reply.ok(req.id, c.status())
        if isinstance(req, MinersRequest):
            return Reply.ok(req.id, {"miners": c.miner_rows(req.state, req.sort, req.desc, req.limit)})
        if isinstance(req, PreviewRequest):
            return Reply.ok(req.id, c.preview(req.target_kw))
        if isinstance(req, DispatchesRequest):
            return Reply.ok(req.id, {"dispatches": c.dispatch_docs(req.all)})
        if isinstance(req, EventsRequest):
            return Reply.ok(req.id, {"events": self._events.recent(req.limit)})
        return Reply.error(req.id, INTERNAL, f"verb {cmd.verb!r} has no reader")

    # --------------------------------------------------------------------------------------------- refusals
    def _refused(self, verb: str, channel: Channel, reply: Reply, payload: bytes) -> None:
        log.warning(
            "command refused", verb=verb, channel=channel.value, id=reply.id, code=reply.error_code,
            reason=reply.error_message,
        )  # fmt: skip
        if self._metrics is not None and reply.error_code:
            self._metrics.count_rejected(reply.error_code)
        self._events.emit(
            "rejected", verb=verb, id=reply.id, channel=channel.value, code=reply.error_code,
            message=reply.error_message,
        )  # fmt: skip
        try:
            self._controller.record_refusal(verb, channel, reply, payload)
        except Exception:  # the refusal stands even if the audit cannot be written; the store alarms itself
            log.exception("could not audit a refused command", verb=verb)


def payload_digest(payload: bytes, limit: int = 2048) -> dict[str, Any]:
    """What the audit keeps of a refused payload: the document if it is small JSON, else its size."""
    if len(payload) <= limit:
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"raw": payload[:256].decode("utf-8", "replace"), "size": len(payload)}
        return {"document": doc}
    return {"size": len(payload)}
