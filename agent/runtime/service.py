"""The one CommandHandler behind every transport (MQTT, the local control socket).

parse (agent.commands) → idempotency (a repeated id gets its stored reply, and is never applied twice, even after
the dispatch was cancelled or has ended) → apply through the controller, the one writer, which persists the
change, the reply and the audit record in one transaction before the reply is returned → event.

Refused input gets an error reply and a `rejected` event, and changes nothing else. Refusals are audited as counts
per code and channel, one record per interval (REFUSAL_INTERVAL_S) with a digest sample of what was refused, never a
record (or a synchronous write) per refusal: a publisher flooding bad commands must not fill the state disk. The
refusal path cannot raise. Read verbs (status, miners, preview, dispatches, events, ping) are answered from the
controller's current picture.

Heartbeats pass through here too (`heartbeat`): only a signed (`hashflex-sig-v2`), fresh heartbeat for this site,
newer than the last one accepted, reaches the fail-safe.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hashflex.agent.commands import Command, Repeat, parse_heartbeat, parse_request
from hashflex.agent.config import AgentConfig
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.core.timeline import SenderClock
from hashflex.agent.logging import get_logger
from hashflex.agent.protocol import Channel
from hashflex.agent.runtime.clock import Clock
from hashflex.agent.runtime.events import EventLog
from hashflex.contract import signing
from hashflex.contract.reply import INTERNAL, UNAVAILABLE, Reply
from hashflex.contract.requests import DispatchesRequest, EventsRequest, MinersRequest, PreviewRequest, load_json
from hashflex.contract.status import DispatchDoc, StatusDoc

log = get_logger("commands")


class Applier(Protocol):
    """What the service needs from the controller (agent.runtime.controller.Controller): the one writer."""

    async def submit(self, command: Command) -> Reply: ...

    def heartbeat(self, payload: bytes) -> None: ...


class Reader(Protocol):
    """The read verbs' answers (agent.runtime.readout.SiteReader)."""

    def status(self) -> StatusDoc: ...

    def miner_rows(self, state: str | None, sort: str, desc: bool, limit: int | None) -> list[dict[str, Any]]: ...

    def preview(self, target_kw: float) -> dict[str, Any]: ...

    def dispatch_docs(self, include_closed: bool) -> list[DispatchDoc]: ...


class CommandRecords(Protocol):
    """What the service reads and writes itself in the state store (agent.io.store.Store): the stored reply to a
    repeated command, and the refusal records."""

    def get_reply(self, cmd_id: str) -> dict[str, Any] | None: ...

    def append_audit(self, kind: str, data: Mapping[str, Any], ts: float) -> str: ...


class MetricsSink(Protocol):
    def count_rejected(self, reason: str) -> None: ...


REFUSAL_INTERVAL_S = 60.0  # site seconds per aggregated refusal record
REFUSAL_SAMPLE = 8  # refused requests described (by digest) in each record


def _printable(text: str | None, limit: int = 64) -> str | None:
    """Sender-chosen text as the audit can always store it (a lone surrogate would make every later write fail)."""
    if text is None:
        return None
    return text[:limit].encode("utf-8", "replace").decode("utf-8")


class RefusalAudit:
    """Refusals counted per channel and code over an interval, written as ONE audit record when it closes.

    `add` is O(1), in memory, and cannot raise; the record is written by `flush` (on a timer, or by the next refusal
    once the interval is over). A record that cannot be written keeps its counts for the next one.
    """

    def __init__(
        self, write: Callable[[dict[str, Any]], None], clock: Clock, interval_s: float = REFUSAL_INTERVAL_S
    ) -> None:
        self._write = write
        self._clock = clock
        self.interval_s = interval_s
        self._counts: dict[str, dict[str, int]] = {}
        self._sample: list[dict[str, Any]] = []
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.records_written = 0

    @property
    def pending(self) -> int:
        return sum(n for codes in self._counts.values() for n in codes.values())

    def add(self, verb: str, channel: Channel, reply: Reply, payload: bytes) -> bool:
        """Count one refusal; True when it is the first of its channel and code in this interval (log it loudly)."""
        try:
            now = self._clock.time()
            if self._since is not None and now - self._since >= self.interval_s:
                self.flush()
            if self._since is None:
                self._since = now
                self._arm()
            codes = self._counts.setdefault(channel.value, {})
            code = reply.error_code or "unknown"
            first = code not in codes
            codes[code] = codes.get(code, 0) + 1
            if len(self._sample) < REFUSAL_SAMPLE:
                self._sample.append(
                    {
                        "verb": _printable(verb),
                        "id": _printable(reply.id),
                        "channel": channel.value,
                        "code": code,
                        "size": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest(),
                    }
                )
            return first
        except Exception:  # counting must never turn a refusal into a crash
            log.exception("could not count a refused command")
            return False

    def flush(self) -> None:
        """Write the interval's record now (if anything was refused). Never raises."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._since is None:
            return
        try:
            now = self._clock.time()
            summary = {
                # "verb"/"id" as in a single command's record (none here), so readers filtering by them skip it
                "verb": None,
                "id": None,
                "refusals": self.pending,
                "from": iso(self._since),
                "to": iso(now),
                "by_channel": {ch: dict(sorted(codes.items())) for ch, codes in sorted(self._counts.items())},
                "sample": list(self._sample),
            }
            self._write(summary)
        except Exception:  # the store alarms itself; the counts are kept and go into the next record
            log.exception("could not audit refused commands; counts kept for the next record", pending=self.pending)
            self._arm()
            return
        self.records_written += 1
        self._counts, self._sample, self._since = {}, [], None

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next refusal after the interval flushes
        if self._timer is None:
            self._timer = loop.call_later(self._clock.to_wall(self.interval_s), self.flush)


class CommandService:
    def __init__(
        self,
        cfg: AgentConfig,
        controller: Applier,
        events: EventLog,
        *,
        reader: Reader,
        store: CommandRecords,
        clock: Clock,
        grid_keys: Sequence[Ed25519PublicKey],
        operator_keys: Sequence[Ed25519PublicKey],
        metrics: MetricsSink | None = None,
        submit_timeout_s: float = 30.0,
    ) -> None:
        self._cfg = cfg
        self._controller = controller
        self._reader = reader
        self._store = store
        self._events = events
        self._clock = clock
        self._grid_keys = list(grid_keys)
        self._operator_keys = list(operator_keys)
        self._metrics = metrics
        self._submit_timeout_s = submit_timeout_s
        self.refusals = RefusalAudit(self._record_refusal, clock)
        self._last_heartbeat: float | None = None  # issue time of the newest heartbeat accepted
        self.grid_clock = SenderClock()  # the grid's clock as its signed heartbeats and commands show it
        self.heartbeats_ignored = 0

    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        now = self._clock.time()
        try:
            parsed = parse_request(
                verb,
                payload,
                channel,
                grid_keys=self._grid_keys,
                operator_keys=self._operator_keys,
                now=now,
                rules=self._cfg.dispatch,
                max_bytes=self._cfg.mqtt.max_payload_bytes,
                cap_kw=self._cfg.site.cap_kw,  # the licensed cap: no command may ask for more
                site_id=self._cfg.site.id,
                retained=retained,
                stored_reply=self._store.get_reply,
                grid_clock=self.grid_clock,
            )
        except Exception:  # parsing never raises; the stored-reply lookup can (the store is unwell): retry later
            log.exception("could not check a request against the store", verb=verb[:64])
            return Reply.error(None, UNAVAILABLE, "the agent cannot check this request against its store now; retry")
        if isinstance(parsed, Reply):
            self._refused(verb, channel, parsed, payload)
            return parsed
        if isinstance(parsed, Repeat):
            log.info("repeated command answered from the store", verb=verb, id=parsed.request.id, channel=channel.value)
            return parsed.reply
        if not parsed.mutating:
            return self._read(parsed)
        if parsed.source == "grid" and parsed.request.issued_at is not None:
            self.grid_clock.observe(now, parsed.request.issued_at)
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
            "command",
            verb=verb,
            id=parsed.id,
            channel=channel.value,
            status=reply.status,
            code=reply.error_code,
            dur_ms=round((time.monotonic() - started) * 1000, 1),
        )
        if not reply.is_ok and self._metrics is not None and reply.error_code:
            self._metrics.count_rejected(reply.error_code)
        return reply

    # ------------------------------------------------------------------------------------------------ reads
    def _read(self, cmd: Command) -> Reply:
        req = cmd.request
        c = self._reader
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
    def _record_refusal(self, summary: dict[str, Any]) -> None:
        """One audit record for an interval's refused commands (RefusalAudit)."""
        self._store.append_audit(AuditKind.COMMAND, {"status": "refused", **summary}, self._clock.time())

    def _refused(self, verb: str, channel: Channel, reply: Reply, payload: bytes) -> None:
        """Count, log (loudly once per code and channel per interval), event. Cannot raise: the reply stands."""
        first = self.refusals.add(verb, channel, reply, payload)
        try:
            (log.warning if first else log.debug)(
                "command refused",
                verb=verb[:64],
                channel=channel.value,
                id=reply.id,
                code=reply.error_code,
                reason=reply.error_message,
            )
            if self._metrics is not None and reply.error_code:
                self._metrics.count_rejected(reply.error_code)
            self._events.emit(
                "rejected",
                verb=verb[:64],
                id=reply.id,
                channel=channel.value,
                code=reply.error_code,
                message=reply.error_message,
            )
        except Exception:
            log.exception("could not report a refused command", verb=verb[:64])

    # -------------------------------------------------------------------------------------------- heartbeat
    def heartbeat(self, payload: bytes) -> None:
        """HeartbeatSink: only a signed, fresh heartbeat for this site, newer than the last, reaches the controller.
        Never raises."""
        try:
            rules, failsafe = self._cfg.dispatch, self._cfg.failsafe
            now = self._clock.time()
            verdict = parse_heartbeat(
                payload,
                grid_keys=self._grid_keys,
                site_id=self._cfg.site.id,
                now=now,
                max_age_s=min(rules.max_age_s, failsafe.heartbeat_timeout_s),
                max_skew_s=rules.max_skew_s,
                newest=self._last_heartbeat,
            )
        except Exception:
            log.exception("heartbeat check failed; heartbeat ignored")
            return
        if isinstance(verdict, str):
            self.heartbeats_ignored += 1
            level = log.warning if self.heartbeats_ignored == 1 or self.heartbeats_ignored % 1000 == 0 else log.debug
            level("heartbeat ignored", reason=verdict, ignored=self.heartbeats_ignored)
            return
        self._last_heartbeat = verdict
        self.grid_clock.observe(now, verdict)
        self._controller.heartbeat(payload)

    def authentic(self, payload: bytes) -> bool:
        """Does `payload` carry a valid signature by a configured grid or operator key? (The MQTT link asks this of
        what it receives while its inbox is over its bound: unauthenticated traffic is then dropped.) Never raises."""
        try:
            doc = load_json(payload)
            return isinstance(doc, dict) and signing.verify_command(doc, [*self._grid_keys, *self._operator_keys])
        except Exception:
            return False
