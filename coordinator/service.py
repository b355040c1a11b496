"""The coordinator service: the program core (`program`) wired to the site fabric, a durable store and the leader
lease. asyncio; the broker and the store are behind two small ports (`Fabric`, `ProgramStore`) so this module
imports neither aiomqtt nor nats (their owners: `coordinator.fabric`, `coordinator.store`, `coordinator.lease`).

Topics (MQTT, root `hashflex`):
    <root>/<site>/availability    in   the agents' retained online/offline (last will)
    <root>/<site>/flex            in   the agents' retained flexibility (agent.core.flexibility)
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
`resend_s` until its site acknowledges that revision.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hashflex.agent.commands import load_json
from hashflex.agent.core.flexibility import parse_flex
from hashflex.agent.core.signing import sign_command
from hashflex.agent.logging import get_logger
from hashflex.agent.protocol import Reply
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
    StepResult,
    acknowledge,
    apply,
    parse_program_command,
    step,
)

log = get_logger("coordinator")


class Fabric(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...


class ProgramStore(Protocol):
    async def load(self) -> ProgramState | None: ...

    async def save(self, state: ProgramState) -> None: ...


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
    online: bool = False
    flex_doc: Any = None
    flex_at: float | None = None


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        fabric: Fabric,
        store: ProgramStore,
        is_leader: Callable[[], bool],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.fabric = fabric
        self.store = store
        self.is_leader = is_leader
        self.clock = clock
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
        r = self.cfg.root
        return [f"{r}/+/availability", f"{r}/+/flex", f"{r}/+/reply/+", f"{r}/program/{self.cfg.program_id}/cmd/+"]

    def _program_topic(self, tail: str) -> str:
        return f"{self.cfg.root}/program/{self.cfg.program_id}/{tail}"

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
            site.online = payload.strip() == b"online"
        elif kind == "flex":
            try:
                site.flex_doc = parse_flex(load_json(payload))
                site.flex_at = self.clock()
            except ValueError as exc:
                log.warning("site flexibility refused", site=parts[1], error=str(exc)[:200])
        elif kind == "reply" and len(parts) == 4:
            await self._site_reply(parts[1], parts[3], payload)

    async def _program_command(self, verb: str, payload: bytes) -> None:
        if not self.is_leader():
            return  # the leader answers; a follower would answer twice
        async with self._lock:
            await self._ensure_loaded()
            now = self.clock()
            out = parse_program_command(
                verb, payload, state=self.state, grid_keys=self.cfg.grid_keys, now=now,
                program_max_w=self._program_max_w, rules=self.cfg.gate,
            )  # fmt: skip
            if isinstance(out, Refusal):
                reply = out.reply
                log.warning("program command refused", verb=verb, id=out.id, code=out.code, reason=out.message)
            elif isinstance(out, Repeat):
                reply = out.reply
            else:
                assert isinstance(out, Accepted)
                new, reply = apply(self.state, out, now=now, present_w=self._present_total())
                await self.store.save(new)  # durable before the grid hears "ok"
                self.state = new
                log.info("program command accepted", verb=verb, id=out.request.id, revision=new.revision)
        await self.fabric.publish(self._program_topic(f"reply/{verb}"), reply.to_json(), qos=1)

    async def _site_reply(self, site_id: str, verb: str, payload: bytes) -> None:
        try:
            raw = load_json(payload)
            reply = Reply.from_dict(raw) if isinstance(raw, dict) else None
        except ValueError:
            reply = None
        if reply is None or not self.last:
            return
        async with self._lock:
            for cmd in self.last.commands:
                if cmd.site_id != site_id or cmd.verb != verb or cmd.doc.get("id") != reply.id:
                    continue
                if verb == "dispatch" and reply.is_ok and (reply.data.get("dispatch") or {}).get("rev") != cmd.rev:
                    continue
                if not reply.is_ok:
                    log.warning("site refused a site dispatch", site=site_id, id=reply.id, rev=cmd.rev,
                                code=reply.error_code, reason=reply.error_message)  # fmt: skip
                new = acknowledge(self.state, site_id, cmd, reply)
                if new is not self.state:
                    await self.store.save(new)
                    self.state = new

    # -------------------------------------------------------------------------------------------- acting
    def views(self) -> dict[str, SiteView]:
        out: dict[str, SiteView] = {}
        for sid, s in self.sites.items():
            present = None if s.flex_doc is None else s.flex_doc.present_w
            out[sid] = SiteView(sid, s.online, s.flex_doc, s.flex_at, present)
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
            self._leading_since, self._loaded = None, False  # a later term reloads the replicated state
            return None
        if self._leading_since is None:
            self._leading_since = now
            log.info("leading: reading the sites before acting", settle_s=self.cfg.settle_s)
        if now - self._leading_since < self.cfg.settle_s:
            return None
        async with self._lock:
            await self._ensure_loaded()
            result = step(self.state, self.cfg.sites, self.views(), now=now, rules=self.cfg.rules)
            if result.state != self.state:
                await self.store.save(result.state)  # decided, durable, then sent
            self.state = result.state
            self.last = result
        for alarm in result.alarms:
            log.warning("program alarm", alarm=alarm)
        await self._send(result.commands, now)
        await self._heartbeats(now)
        await self.fabric.publish(self._program_topic("state"), json.dumps(status_doc(result)).encode(), retain=True)
        return result

    async def _send(self, commands: Sequence[SiteCommand], now: float) -> None:
        for cmd in commands:
            key = (cmd.site_id, cmd.dispatch_id, cmd.rev, cmd.verb)
            if now - self._sent_at.get(key, -math.inf) < self.cfg.resend_s:
                continue
            self._sent_at[key] = now
            signed = sign_command(cmd.doc, self.cfg.signing_key)
            topic = f"{self.cfg.root}/{cmd.site_id}/cmd/{cmd.verb}"
            await self.fabric.publish(topic, json.dumps(signed).encode(), qos=1)
            log.info("site dispatch sent", site=cmd.site_id, verb=cmd.verb, id=cmd.doc["id"], rev=cmd.rev,
                     target_kw=cmd.doc.get("target_kw"))  # fmt: skip

    async def _heartbeats(self, now: float) -> None:
        if now - self._beat_at < self.cfg.heartbeat_s:
            return
        self._beat_at = now
        for s in self.cfg.sites:
            beat = sign_command({"site": s.site_id, "verb": "heartbeat", "issued_at": now}, self.cfg.signing_key)
            await self.fabric.publish(f"{self.cfg.root}/{s.site_id}/heartbeat", json.dumps(beat).encode(), qos=1)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a store or broker failure: logged, retried next step
                log.exception("coordinator step failed")
            await asyncio.sleep(self.cfg.step_s)


def status_doc(result: StepResult) -> dict[str, Any]:
    """The retained program status: per program dispatch its level, Σ counted, unmet, and every site's share."""
    return {
        "program": result.state.program_id,
        "revision": result.state.revision,
        "alarms": list(result.alarms),
        "dispatches": [
            {
                "id": r.dispatch_id, "kind": r.kind, "level_w": r.level_w, "level_now_w": r.level_now_w,
                "allocated_w": r.allocated_w, "unmet_w": r.unmet_w, "lost_ths": r.lost_ths,
                "sites": [
                    {"site": s.site_id, "share_w": s.target_w, "counted_w": s.counted_w, "present_w": s.present_w,
                     "failure": s.failure, "reason": s.reason, "rev": s.rev}
                    for s in r.sites
                ],
            }
            for r in result.reports
        ],
    }  # fmt: skip
