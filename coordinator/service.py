"""The coordinator service: the program core (`program`) wired to the site fabric, a durable store and the leader
lease. asyncio; the broker and the store are behind two small ports (`Fabric`, `ProgramStore`) so this module
imports neither aiomqtt nor nats (their owners: `coordinator.fabric`, `coordinator.store`, `coordinator.lease`).

Topics (MQTT, root `hashflex`; the names are hashflex.contract.topics):
    <root>/<site>/availability    in   the agents' retained online/offline (last will)
    <root>/<site>/flex            in   the agents' retained flexibility (hashflex.contract.flex)
    <root>/<site>/reply/<verb>    in   the agents' replies to site dispatches and cancels
    <root>/<site>/cmd/<verb>      out  site dispatches and cancels, signed with the coordinator's key (QoS 1)
    <root>/<site>/heartbeat       out  signed heartbeats (the agents' fail-safe covers losing the coordinator)
    <root>/program/<id>/cmd/<verb>    in   program commands from the grid (hold, shed, cancel, cap)
    <root>/program/<id>/reply/<verb>  out  one reply per program command
    <root>/program/<id>/state         out  retained program status (levels, shares, delivered, short, alarms)

Every instance follows the fabric (it keeps the sites' picture current); only the lease holder acts: it answers
program commands, steps the program, saves the state before sending what the step decided, sends heartbeats. A
new leader loads the state and waits `settle_s` for the sites' retained documents before its first step ("reads
the sites before it acts"). Sends are idempotent (`program.pending_commands`): a share is re-sent every
`resend_s` until its site acknowledges that revision. An accepted program command, and a site's availability
changing (its last will, or its return), wake the loop at once: the shares go out now, not at the next step.

The leader also keeps the coordinator's audit chain (`coordinator.audit`): each program command with its verdict,
each allocation and re-dispatch, each program dispatch's compliance when it ends. Records are queued in order and
appended after the state they describe is durable; an append that fails is retried next step, in order; one
refused because the chain moved (another instance appended) is retried on the new head while this instance still
leads, and dropped (logged) once it does not: the chain is never forked. `snapshot` is what the metrics read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.cancel import raise_if_cancelled, within
from hashflex.contract.flex import parse_flex
from hashflex.contract.reply import Reply
from hashflex.contract.requests import HEARTBEAT_VERB, load_json
from hashflex.contract.signing import sign_command
from hashflex.contract.topics import ProgramTopics, Topics
from hashflex.coordinator.audit import ChainConflict, CoordinatorKind, Tracker, command_data, step_events
from hashflex.coordinator.program import (
    Accepted,
    GateRules,
    ProgramRules,
    ProgramState,
    Refusal,
    Repeat,
    SiteCommand,
    SiteConfig,
    SiteView,
    StateConflict,
    StepResult,
    acknowledge,
    apply,
    failure_of,
    parse_program_command,
    step,
)

log = get_logger("coordinator")


class Fabric(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...


class ProgramStore(Protocol):
    async def load(self) -> ProgramState | None: ...

    async def save(self, state: ProgramState) -> None:
        """Durable, or StateConflict (`program.StateConflict`) when another instance wrote since the last load."""
        ...


class AuditLog(Protocol):
    async def append(self, ts: float, kind: str, data: Mapping[str, Any]) -> object: ...


MAX_AUDIT_QUEUE = 10_000  # records waiting for the store (a long outage): the oldest are dropped, said in the log


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    program_id: str
    sites: tuple[SiteConfig, ...]
    grid_keys: tuple[Ed25519PublicKey, ...]
    signing_key: Ed25519PrivateKey
    root: str = "hashflex"
    step_s: float = 1.0
    resend_s: float = 5.0
    heartbeat_s: float = 10.0
    settle_s: float = 2.0
    rules: ProgramRules = field(default_factory=ProgramRules)
    gate: GateRules = field(default_factory=GateRules)


@dataclass(slots=True)
class _Site:
    online: bool = False  # its retained availability as last delivered
    flex_doc: Any = None  # the newest flexibility document heard (by its own `at`)
    flex_at: float | None = None  # when that was received (this clock)
    # MQTT orders a site's messages on one connection only: across a reconnect, a QoS 1 redelivery or a cluster
    # node's copy of the retained messages, its old "online" and its last document can arrive after its last will.
    # A lost site is back once it sends a document computed after the newest one heard before it was lost.
    lost_after: float | None = None  # that newest document's `at` when the will came (None: not lost)

    @property
    def counted_online(self) -> bool:
        return self.online and self.lost_after is None


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        fabric: Fabric,
        store: ProgramStore,
        is_leader: Callable[[], bool],
        *,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
        holder: str = "",
    ) -> None:
        self.cfg = cfg
        self.fabric = fabric
        self.store = store
        self.is_leader = is_leader
        self.clock = clock
        self.audit = audit
        self.holder = holder
        self._audit_queue: collections.deque[tuple[float, str, dict[str, Any]]] = collections.deque()
        self._audit_lock = asyncio.Lock()
        self._tracker = Tracker()
        self._announced = False  # this term's `leading` record is queued
        self._wake = asyncio.Event()
        # counters since this process started (Prometheus counters), by audit kind and program command outcome
        self.counts: dict[str, int] = {}
        self.snapshot: dict[str, Any] = {"leader": False, "status": None, "sites": {}, "counts": {}}
        self.state = ProgramState(cfg.program_id)
        self.sites: dict[str, _Site] = {s.site_id: _Site() for s in cfg.sites}
        self.last: StepResult | None = None
        self._sent_at: dict[tuple[str, str, int, str], float] = {}  # (site, dispatch, rev, verb) → last send
        self._beat_at = -math.inf
        self._leading_since: float | None = None
        self._loaded = False
        self._lock = asyncio.Lock()  # program commands and steps change the state one at a time
        self._program_max_w = math.fsum(s.cap_w for s in cfg.sites)

    # -------------------------------------------------------------------------------------------- topics
    def subscriptions(self) -> list[str]:
        every_site = Topics.of_site(self.cfg.root, "+")
        return [every_site.availability, every_site.flex, every_site.reply("+"), self._program.commands]

    @property
    def _program(self) -> ProgramTopics:
        return ProgramTopics(self.cfg.root, self.cfg.program_id)

    # ------------------------------------------------------------------------------------------- inbound
    async def on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One message from the fabric. Never raises for bad input (it is logged)."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != self.cfg.root:
            return
        if parts[1] == "program":
            if len(parts) == 5 and parts[2] == self.cfg.program_id and parts[3] == "cmd" and not retained:
                await self._program_command(parts[4], payload)
            return
        site = self.sites.get(parts[1])
        if site is None:
            return
        kind = parts[2]
        if kind == "availability":
            was = site.counted_online
            site.online = payload.strip() == b"online"
            if not site.online and site.lost_after is None:
                site.lost_after = -math.inf if site.flex_doc is None else site.flex_doc.at
            if site.counted_online != was:
                self._wake.set()  # a site lost (its last will) or back: its shortfall re-allocated at once
        elif kind == "flex":
            try:
                doc = parse_flex(load_json(payload))
            except ValueError as exc:
                log.warning("site flexibility refused", site=parts[1], error=str(exc)[:200])
                return
            if site.flex_doc is not None and doc.at <= site.flex_doc.at:
                return  # delivered late (a redelivery, a node's retained copy): the newer one stands
            was = site.counted_online
            site.flex_doc, site.flex_at = doc, self.clock()
            if site.lost_after is not None and doc.at > site.lost_after:
                site.lost_after = None
            if site.counted_online != was:
                self._wake.set()
        elif kind == "reply" and len(parts) == 4:
            await self._site_reply(parts[1], parts[3], payload)

    async def _program_command(self, verb: str, payload: bytes) -> None:
        if not self.is_leader():
            return  # the leader answers; a follower would answer twice
        async with self._lock:
            await self._ensure_loaded()
            now = self.clock()
            self._announce(now)
            out = parse_program_command(
                verb,
                payload,
                state=self.state,
                grid_keys=self.cfg.grid_keys,
                now=now,
                program_max_w=self._program_max_w,
                rules=self.cfg.gate,
            )
            if isinstance(out, Refusal):
                reply = out.reply
                log.warning("program command refused", verb=verb, id=out.id, code=out.code, reason=out.message)
                self._record(
                    now,
                    CoordinatorKind.PROGRAM_COMMAND,
                    command_data(verb, "refused", id=out.id, code=out.code, message=out.message),
                )
            elif isinstance(out, Repeat):
                reply = out.reply
                self._record(now, CoordinatorKind.PROGRAM_COMMAND, command_data(verb, "repeat", id=out.request.id))
            else:
                assert isinstance(out, Accepted)
                new, reply = apply(self.state, out, now=now, present_w=self._present_total())
                try:
                    await self.store.save(new)  # durable before the grid hears "ok"
                except StateConflict as exc:  # deposed meanwhile: no answer (the grid's retry reaches the leader)
                    self._lost_state(exc, "program command")
                    return
                self.state = new
                log.info("program command accepted", verb=verb, id=out.request.id, revision=new.revision)
                self._record(
                    now,
                    CoordinatorKind.PROGRAM_COMMAND,
                    command_data(verb, "accepted", id=out.request.id, document=out.raw, revision=new.revision),
                )
                self._wake.set()  # its shares go out now, not at the next step
            self._count("command_" + {Refusal: "refused", Repeat: "repeat"}.get(type(out), "accepted"))
        await self._flush_audit()
        await self.fabric.publish(self._program.reply(verb), reply.to_json(), qos=1)

    async def _site_reply(self, site_id: str, verb: str, payload: bytes) -> None:
        """A site's answer to a site dispatch: the leader records the acknowledgement. Every instance hears the
        replies, but only the leader writes the state: a follower (or a deposed leader still holding the last
        step of its term) would write over the leader's state, be refused, and log a failure per reply."""
        if not self.is_leader():
            return
        try:
            raw = load_json(payload)
            reply = Reply.from_dict(raw) if isinstance(raw, dict) else None
        except ValueError:
            reply = None
        if reply is None or not self.last:
            return
        async with self._lock:
            if not self.is_leader() or self.last is None:  # deposed while waiting for the lock
                return
            for cmd in self.last.commands:
                if cmd.site_id != site_id or cmd.verb != verb or cmd.doc.get("id") != reply.id:
                    continue
                if verb == "dispatch" and reply.is_ok and (reply.data.get("dispatch") or {}).get("rev") != cmd.rev:
                    continue
                if not reply.is_ok:
                    log.warning(
                        "site refused a site dispatch",
                        site=site_id,
                        id=reply.id,
                        rev=cmd.rev,
                        code=reply.error_code,
                        reason=reply.error_message,
                    )
                new = acknowledge(self.state, site_id, cmd, reply)
                if new is not self.state:
                    try:
                        await self.store.save(new)
                    except StateConflict as exc:
                        self._lost_state(exc, "site reply")
                        return
                    self.state = new

    def _lost_state(self, exc: StateConflict, during: str) -> None:
        """Another instance wrote the state (this one lost the lease, or is about to learn it has): nothing is
        decided on the old state; the next term, or the next step, reads it again first."""
        log.warning(
            "program state written by another instance; reading it again before acting", during=during, error=str(exc)
        )
        self._loaded = False
        self.last = None

    # -------------------------------------------------------------------------------------------- acting
    def views(self) -> dict[str, SiteView]:
        out: dict[str, SiteView] = {}
        for sid, s in self.sites.items():
            present = None if s.flex_doc is None else s.flex_doc.present_w
            out[sid] = SiteView(sid, s.counted_online, s.flex_doc, s.flex_at, present)
        return out

    def _present_total(self) -> float:
        return math.fsum(v.present_w or 0.0 for v in self.views().values())

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            stored = await self.store.load()
            if stored is not None:
                self.state = stored
            self._loaded = True

    async def tick(self) -> StepResult | None:
        """One step if this instance leads (and has waited `settle_s` since it became leader)."""
        now = self.clock()
        if not self.is_leader():
            if self._audit_queue:  # decided while leading: appended if the chain has not moved, else dropped
                await self._flush_audit()
            self._leading_since, self._loaded = None, False  # a later term reloads the replicated state
            self.last = None  # this term's step is not a follower's to act on (site replies)
            self._announced = False
            self._tracker = Tracker()
            self._update_snapshot(now, None)
            return None
        if self._leading_since is None:
            self._leading_since = now
            self.last = None
            self._announced = False
            log.info("leading: reading the sites before acting", settle_s=self.cfg.settle_s)
        if now - self._leading_since < self.cfg.settle_s:
            if not self._announced:
                async with self._lock:
                    await self._ensure_loaded()
                    self._announce(now)
                await self._flush_audit()
            self._update_snapshot(now, None)
            return None
        async with self._lock:
            await self._ensure_loaded()
            self._announce(now)
            before = self.state
            result = step(before, self.cfg.sites, self.views(), now=now, rules=self.cfg.rules)
            if result.state != before:
                try:
                    await self.store.save(result.state)  # decided, durable, then sent
                except StateConflict as exc:  # nothing of this step is sent or recorded
                    self._lost_state(exc, "step")
                    return None
            self.state = result.state
            self.last = result
            events, self._tracker = step_events(before, result, self._tracker, now=now)
            for kind, data in events:
                self._record(now, kind, data)
        for alarm in result.alarms:
            log.warning("program alarm", alarm=alarm)
        self._update_snapshot(now, result)
        await self._flush_audit()  # the records of what is now durable, before anything is sent
        await self._send(result.commands, now)
        await self._heartbeats(now)
        doc = status_doc(result, now)
        await self.fabric.publish(self._program.state, json.dumps(doc).encode(), retain=True)
        return result

    # --------------------------------------------------------------------------------------------- audit
    def _announce(self, now: float) -> None:
        """The first record of a term (the state loaded): who leads from here, from which state revision."""
        if not self._announced:
            self._announced = True
            self._record(
                now,
                CoordinatorKind.LEADING,
                {"holder": self.holder, "revision": self.state.revision, "dispatches": sorted(self.state.dispatches)},
            )

    def _record(self, ts: float, kind: str, data: dict[str, Any]) -> None:
        self._count(kind)
        if self.audit is None:
            return
        if len(self._audit_queue) >= MAX_AUDIT_QUEUE:
            dropped = self._audit_queue.popleft()
            log.error("audit record dropped: the store has been unreachable too long", kind=dropped[1], ts=dropped[0])
        self._audit_queue.append((ts, kind, data))

    async def _flush_audit(self) -> None:
        """Append the queued records in order (one writer at a time); keep what fails for the next step."""
        if self.audit is None:
            return
        async with self._audit_lock:
            conflicts = 0
            while self._audit_queue:
                ts, kind, data = self._audit_queue[0]
                try:
                    await self.audit.append(ts, kind, data)
                except ChainConflict as exc:
                    conflicts += 1
                    if not self.is_leader() or conflicts > 3:
                        log.warning(
                            "audit records not chained: another instance writes the chain",
                            records=len(self._audit_queue),
                            error=str(exc),
                        )
                        self._audit_queue.clear()
                        return
                    continue  # the log re-reads the head; the record is rebuilt on it
                except ValueError as exc:  # a record that cannot be kept (not plain JSON): never blocks the rest
                    log.error("audit record refused", kind=kind, error=str(exc)[:200])
                except Exception as exc:  # the store is unreachable: kept, in order, for the next step
                    log.warning(
                        "audit append failed; retried next step", error=repr(exc)[:200], queued=len(self._audit_queue)
                    )
                    return
                self._audit_queue.popleft()

    # ------------------------------------------------------------------------------------------- metrics
    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _update_snapshot(self, now: float, result: StepResult | None) -> None:
        """What a scrape reads (built here, on the event loop; replaced whole, never mutated)."""
        sites: dict[str, dict[str, Any]] = {}
        views = self.views()
        for cfg in self.cfg.sites:
            view = views.get(cfg.site_id)
            failure = failure_of(cfg, view, None, now, self.cfg.rules)
            sites[cfg.site_id] = {
                "state": "ok" if failure is None else failure[0],
                "present_w": None if view is None else view.present_w,
            }
        status = status_doc(result, now) if result is not None else None
        if status is None and self.is_leader() and self.last is not None:
            status = status_doc(self.last, now)
        for d in (status or {}).get("dispatches", []):  # late on its share: known to the program step only
            for s in d["sites"]:
                if s["failure"] == "not_met" and sites.get(s["site"], {}).get("state") == "ok":
                    sites[s["site"]]["state"] = "not_met"
        self.snapshot = {
            "leader": self.is_leader(),
            "status": status,
            "sites": sites,
            "counts": dict(self.counts),
            "ts": now,
        }

    async def _send(self, commands: Sequence[SiteCommand], now: float) -> None:
        """Every site's command at once: one after the other, each waiting for the broker's acknowledgement, the
        30th of 30 left 0.96 s after the first (bench_program, a loaded host). The first failure is raised once
        all were tried (the step retries on its next round)."""
        due: list[SiteCommand] = []
        for cmd in commands:
            key = (cmd.site_id, cmd.dispatch_id, cmd.rev, cmd.verb)
            if now - self._sent_at.get(key, -math.inf) < self.cfg.resend_s:
                continue
            self._sent_at[key] = now
            due.append(cmd)
        results = await asyncio.gather(*(self._send_one(cmd) for cmd in due), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _send_one(self, cmd: SiteCommand) -> None:
        signed = sign_command(cmd.doc, self.cfg.signing_key)
        topic = Topics.of_site(self.cfg.root, cmd.site_id).command(cmd.verb)
        await self.fabric.publish(topic, json.dumps(signed).encode(), qos=1)
        log.info(
            "site dispatch sent",
            site=cmd.site_id,
            verb=cmd.verb,
            id=cmd.doc["id"],
            rev=cmd.rev,
            target_kw=cmd.doc.get("target_kw"),
        )

    async def _heartbeats(self, now: float) -> None:
        if now - self._beat_at < self.cfg.heartbeat_s:
            return
        self._beat_at = now
        for s in self.cfg.sites:
            beat = sign_command({"site": s.site_id, "verb": HEARTBEAT_VERB, "issued_at": now}, self.cfg.signing_key)
            topic = Topics.of_site(self.cfg.root, s.site_id).heartbeat
            await self.fabric.publish(topic, json.dumps(beat).encode(), qos=1)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store or broker failure: logged, retried next step
                log.exception("coordinator step failed")
            raise_if_cancelled()  # one a library's wait_for swallowed in the step (Python 3.11)
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), self.cfg.step_s)
            self._wake.clear()


def status_doc(result: StepResult, now: float | None = None) -> dict[str, Any]:
    """The retained program status: per program dispatch its revision, window and state, its level, Σ counted,
    unmet, and every site's share (acknowledged or not). `state`: pending (its window is still to come), sending
    (a share not yet acknowledged), short (cannot be met), met (Σ metered at or under the level), or delivering."""
    dispatches = []
    for r in result.reports:
        d = result.state.dispatches.get(r.dispatch_id)
        shares = result.state.assignments.get(r.dispatch_id, {})
        heard = [s.present_w for s in r.sites if s.present_w is not None]
        metered = math.fsum(heard) if heard else None  # no site heard: unknown, not 0 W
        acked = [shares[s.site_id].acked for s in r.sites if s.site_id in shares]
        if r.level_now_w is None and d is not None and now is not None and now < d.start:
            state = "pending"
        elif not all(acked):
            state = "sending"
        elif r.unmet_w > 0:
            state = "short"
        elif r.level_now_w is not None and metered is not None and metered <= r.level_now_w:
            state = "met"
        else:
            state = "delivering"
        dispatches.append(
            {
                "id": r.dispatch_id,
                "kind": r.kind,
                "rev": None if d is None else d.rev,
                "start": None if d is None else d.start,
                "end": None if d is None else d.end,
                "state": state,
                "level_w": r.level_w,
                "level_now_w": r.level_now_w,
                "allocated_w": r.allocated_w,
                "metered_w": metered,
                "unmet_w": r.unmet_w,
                "lost_ths": r.lost_ths,
                "sites": [
                    {
                        "site": s.site_id,
                        "share_w": s.target_w,
                        "counted_w": s.counted_w,
                        "present_w": s.present_w,
                        "failure": s.failure,
                        "reason": s.reason,
                        "rev": s.rev,
                        "acked": None if s.site_id not in shares else shares[s.site_id].acked,
                    }
                    for s in r.sites
                ],
            }
        )
    return {
        "program": result.state.program_id,
        "revision": result.state.revision,
        "alarms": list(result.alarms),
        "dispatches": dispatches,
    }
