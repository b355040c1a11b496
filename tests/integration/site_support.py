"""A simulated site over TCP with its whole agent (`hashflex run`, MQTT on) and a grid-side MQTT 5 client recording
everything under the site's root: the fixture of the end-to-end MQTT tests (test_mqtt_e2e.py, test_failsafe_restart.py).

    async with running_site(tmp_path, mosquitto, base_ip="127.40.0.1", miners=10) as site:
        await site.ok("dispatch", site.signed({"id": "d1", "target_kw": 20, "end": ...}))
        await site.wait_kw(lambda kw: kw <= 20, 30, "down to 20 kW")

Clocks are scaled (sim --speed K, agent --time-scale K): site time passes K times faster than the wall.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentConfigFiles, AgentProcess, sign_for, write_agent_config
from tests.broker import HOST, Mosquitto
from tests.mqtt_support import Observer, payload_bytes, wait_until

K = 10.0  # sim --speed and agent --time-scale: one wall second is ten site seconds
MIX = "luxos:40,whatsminer:40,antminer:20"  # power limits (LuxOS profiles, Whatsminer watts) and on/off only


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class Site:
    """One simulated site, its agent (MQTT on), and a grid-side MQTT 5 client recording everything under the root."""

    sim: SimProcess
    agent: AgentProcess
    files: AgentConfigFiles
    grid: Observer
    root: str
    full_kw: float  # the site's draw with every miner hashing at stock
    operator_key: Ed25519PrivateKey

    # ---------------------------------------------------------------------------------------- commands
    def signed(
        self, doc: Mapping[str, Any], *, issued_at: float | None = None, verb: str | None = None
    ) -> dict[str, Any]:
        """Grid-signed for this site (hashflex-sig-v2), issued now on the agent's (scaled) clock unless told
        otherwise."""
        return self.agent.signed(doc, issued_at=issued_at, verb=verb)

    @property
    def site_id(self) -> str:
        return str(self.files.doc["site"]["id"])

    def operator_signed(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        verb = "curtail" if "to_kw" in doc or "by_kw" in doc else "resume"
        return sign_for(self.operator_key, doc, site=self.site_id, verb=verb, issued_at=self.agent.now())

    def replies(self, verb: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.grid.payloads(f"{self.root}/reply/{verb}")]

    async def publish(self, verb: str, doc: Mapping[str, Any] | bytes, **kw: Any) -> None:
        await self.grid.publish(f"{self.root}/cmd/{verb}", doc if isinstance(doc, bytes) else dict(doc), **kw)

    async def request(
        self, verb: str, doc: Mapping[str, Any] | bytes, *, within: float = 10.0, **kw: Any
    ) -> dict[str, Any]:
        """Publish a request and return the reply to it (matched by id; an id-less one by being the next reply)."""
        seen = len(self.replies(verb))
        request_id = None if isinstance(doc, bytes) else doc.get("id")
        await self.publish(verb, doc, **kw)
        found: list[dict[str, Any]] = []

        def answered() -> bool:
            found[:] = [r for r in self.replies(verb)[seen:] if r.get("id") == request_id]
            return bool(found)

        await wait_until(answered, within, f"the reply to {verb} {request_id}")
        return found[0]

    async def ok(self, verb: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        reply = await self.request(verb, doc)
        assert reply["status"] == "ok", reply
        data: dict[str, Any] = reply["data"]
        return data

    # ---------------------------------------------------------------------------------------- what is seen
    def events(self, kind: str | None = None, request_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for e in self.grid.json(f"{self.root}/events"):
            if (kind is None or e["type"] == kind) and (request_id is None or e["data"].get("id") == request_id):
                out.append(e)
        return out

    async def event(self, kind: str, request_id: str | None = None, within: float = 30.0) -> dict[str, Any]:
        await wait_until(lambda: bool(self.events(kind, request_id)), within, f"a {kind} event for {request_id}")
        return self.events(kind, request_id)[0]

    def state(self) -> dict[str, Any]:
        """The newest …/state document seen."""
        docs = self.grid.json(f"{self.root}/state")
        assert docs, "no state published yet"
        doc: dict[str, Any] = docs[-1]
        return doc

    async def wait_state(self, predicate: Callable[[dict[str, Any]], bool], within: float = 15.0) -> dict[str, Any]:
        await wait_until(
            lambda: bool(self.grid.on(f"{self.root}/state")) and predicate(self.state()), within, "a matching state"
        )
        return self.state()

    async def retained(self, topic: str, within: float = 10.0) -> bytes:
        """What a client connecting now gets on `root/topic`: the retained message (asserted to be flagged so)."""
        async with Observer(
            self.grid.broker, f"{self.root}/{topic}", port=self.grid.port, **self.grid.client_kw
        ) as late:
            message = await late.wait(f"{self.root}/{topic}", within=within)
            assert message.retain, f"{topic} is not retained"
            return payload_bytes(message.payload)

    async def retained_state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(await self.retained("state"))
        return doc

    # ---------------------------------------------------------------------------------------- ground truth
    async def truth(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.sim.truth)

    async def kw(self) -> float:
        return float((await self.truth())["site"]["power_w"]) / 1000.0

    async def wait_kw(self, predicate: Callable[[float], bool], within: float, what: str) -> float:
        deadline = time.monotonic() + within
        kw = await self.kw()
        while not predicate(kw):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the site never got {what} within {within:g} s (now {kw:.1f} kW)\n{self.agent.tail(30)}"
                )
            if self.agent.proc.poll() is not None:
                raise AssertionError(f"the agent died:\n{self.agent.tail()}")
            await asyncio.sleep(0.25)
            kw = await self.kw()
        return kw

    async def status(self) -> dict[str, Any]:
        """The agent's status over its control socket (for the few checks MQTT cannot make while the broker is down)."""
        return await asyncio.to_thread(self.agent.status)


def mqtt_overrides(port: int) -> dict[str, Any]:
    # telemetry every 10 site seconds (one wall second)
    return {"mqtt": {"enabled": True, "host": HOST, "port": port, "telemetry_interval_s": 10.0}}


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


@contextlib.asynccontextmanager
async def running_site(
    tmp_path: Path,
    broker: Mosquitto,
    *,
    base_ip: str,
    miners: int,
    site_id: str | None = None,
    mqtt: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Callable[[float], Mapping[str, Any]] | None = None,
    grid_client: Mapping[str, Any] | None = None,
) -> AsyncIterator[Site]:
    """A simulated site with its agent connected to `broker`, and a grid-side client subscribed to its root."""
    site_id = site_id or f"e2e-{uuid.uuid4().hex[:8]}"
    root = f"hashflex/{site_id}"
    operator_key = Ed25519PrivateKey.generate()
    (tmp_path / "operator.pub").write_bytes(public_pem(operator_key))
    sim = await asyncio.to_thread(
        SimProcess(miners=miners, mix=MIX, base_ip=base_ip, seed=5, speed=K, extra_args=["--wake-s", "10"]).start
    )
    try:
        full_kw = float(sim.truth()["site"]["power_w"]) / 1000.0
        extra = overrides(full_kw) if callable(overrides) else overrides
        doc = _merge(
            {**mqtt_overrides(broker.plain_port), "grid": {"operator_public_keys": [str(tmp_path / "operator.pub")]}},
            {"mqtt": dict(mqtt or {}), **dict(extra or {})},
        )
        files = write_agent_config(
            tmp_path, sim.ips, cap_kw=round(full_kw * 1.2, 1), site_id=site_id, time_scale=K, overrides=doc
        )
        client_kw = dict(grid_client or {})
        port = client_kw.pop("port", broker.plain_port)
        async with Observer(broker, f"{root}/#", port=port, **client_kw) as grid:
            agent = await asyncio.to_thread(AgentProcess.start, files, time_scale=K)
            site = Site(sim, agent, files, grid, root, full_kw, operator_key)
            try:
                await grid.wait(f"{root}/availability", lambda m: m.payload == b"online", within=20)
                await grid.wait(f"{root}/state")  # announced right after "online"
                yield site
            finally:
                await asyncio.to_thread(site.agent.stop)  # the one running now (a test may have restarted it)
    finally:
        await asyncio.to_thread(sim.stop)
