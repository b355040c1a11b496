"""Replays, redirected replies, anonymous heartbeats and floods over a real Mosquitto (issue 12, findings 5, 8, 10):
the in-process command path on a real SQLite store behind the real MqttLink, the grid side played by an MQTT 5
client that captures what one site is sent and replays it at another."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hashflex.agent.config import AgentConfig
from hashflex.agent.io.mqtt import MqttLink
from hashflex.contract import signing
from tests.agent_harness import iso, sign_for
from tests.broker import HOST, Mosquitto
from tests.mqtt_support import Observer, RecordingHandler, running, unique_site, wait_until
from tests.runtime_support import GRID, T0, ManualClock, Runtime, start_runtime, stop_runtime

pytestmark = pytest.mark.timeout(90)


def config(tmp_path: Path, broker: Mosquitto, site_id: str) -> AgentConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pub = tmp_path / "grid.pub"
    pub.write_bytes(
        GRID.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return AgentConfig.model_validate(
        {
            "site": {"id": site_id, "cap_kw": 1000},
            "mqtt": {"host": HOST, "port": broker.plain_port},
            "grid": {"public_keys": [str(pub)]},
            "state_dir": str(tmp_path / "state"),
            "failsafe": {"enabled": False},
            "dispatch": {"debounce_s": 0},
        }
    )


@contextlib.asynccontextmanager
async def site(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[tuple[Runtime, MqttLink]]:
    """A site's command path on its own store, linked to the broker the way app.py wires it."""
    cfg = config(tmp_path, broker, unique_site())
    rt = await start_runtime(cfg, ManualClock(T0))
    link = MqttLink(
        cfg,
        rt.service,
        rt.service,
        lambda: {"site_id": cfg.site.id},
        clock=rt.clock.time,
        authentic=rt.service.authentic,
    )
    try:
        async with running(link):
            yield rt, link
    finally:
        await stop_runtime(rt)


def response_to(topic: str, correlation: bytes = b"c-1") -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = topic
    props.CorrelationData = correlation
    return props


async def reply(grid: Observer, root: str, verb: str, request_id: str) -> dict[str, Any]:
    return await grid.wait_reply(root, verb, request_id, within=15)


async def test_a_cancel_captured_at_one_site_is_refused_at_another(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with site(tmp_path / "a", mosquitto) as (a, link_a), site(tmp_path / "b", mosquitto) as (b, link_b):
        ra, rb = link_a.topics.root, link_b.topics.root
        async with Observer(mosquitto, f"{ra}/#", f"{rb}/#") as grid:
            for rt, root in ((a, ra), (b, rb)):
                doc = sign_for(
                    GRID, {"id": "d-1", "target_kw": 300}, site=rt.controller.cfg.site.id, verb="dispatch", issued_at=T0
                )
                await grid.publish(f"{root}/cmd/dispatch", doc)
                assert (await reply(grid, root, "dispatch", "d-1"))["status"] == "ok"
            cancel_a = sign_for(
                GRID, {"id": "c-1", "dispatch_id": "d-1"}, site=a.controller.cfg.site.id, verb="cancel", issued_at=T0
            )
            await grid.publish(f"{rb}/cmd/cancel", cancel_a)  # the byte-for-byte replay at site B
            refused = await reply(grid, rb, "cancel", "c-1")
            assert refused["error"]["code"] == "wrong_scope"
            assert b.controller.book.records["d-1"].open
            await grid.publish(f"{ra}/cmd/cancel", cancel_a)  # where it belongs, it works
            assert (await reply(grid, ra, "cancel", "c-1"))["status"] == "ok"
            assert not a.controller.book.records["d-1"].open


async def test_response_topics_stay_in_the_sites_reply_subtree(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with site(tmp_path, mosquitto) as (rt, link):
        root = link.topics.root
        async with Observer(mosquitto, f"{root}/#", "elsewhere/#") as grid:
            targets = [
                f"{root}/heartbeat",
                f"{root}/cmd/dispatch",
                f"{root}/state",
                "elsewhere/reply/ping",
                f"{root}/reply/../heartbeat",
                f"{root}/reply/",
            ]
            for n, target in enumerate(targets):
                await grid.publish(f"{root}/cmd/ping", {"id": f"p-{n}"}, properties=response_to(target))
                await reply(grid, root, "ping", f"p-{n}")
            await grid.publish(f"{root}/cmd/ping", {"id": "ok"}, properties=response_to(f"{root}/reply/mine/1"))
            own = await grid.wait(f"{root}/reply/mine/1")
            assert json.loads(bytes(own.payload))["id"] == "ok"  # type: ignore[arg-type]
            await asyncio.sleep(0.3)
            assert grid.on(f"{root}/heartbeat") == []
            assert grid.on(f"{root}/cmd/dispatch") == []
            assert [m for m in grid.messages if m.topic.value.startswith("elsewhere/")] == []
            assert rt.controller.failsafe is not None
            assert rt.controller.failsafe.last_heartbeat is None


async def test_only_signed_heartbeats_reach_the_failsafe(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with site(tmp_path, mosquitto) as (rt, link):
        root, site_id = link.topics.root, rt.controller.cfg.site.id
        fs = rt.controller
        async with Observer(mosquitto) as grid:
            await grid.publish(f"{root}/heartbeat", {"ts": iso(T0), "seq": 1})  # anonymous, as before
            signed_elsewhere = signing.sign_command(
                {"site": "another-site", "verb": "heartbeat", "issued_at": iso(T0), "seq": 1}, GRID
            )
            await grid.publish(f"{root}/heartbeat", signed_elsewhere)
            await asyncio.sleep(0.5)
            assert fs.failsafe is not None
            assert fs.failsafe.last_heartbeat is None
            beat = signing.sign_command({"site": site_id, "verb": "heartbeat", "issued_at": iso(T0), "seq": 2}, GRID)
            await grid.publish(f"{root}/heartbeat", beat)
            await wait_until(lambda: fs.failsafe is not None and fs.failsafe.last_heartbeat == T0, 10, "a heartbeat")


async def test_the_inbox_is_bounded_for_unauthenticated_traffic(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = config(tmp_path, mosquitto, unique_site())
    handler = RecordingHandler(delay_s=0.02)  # a slow consumer, so the inbox fills
    keys = [GRID.public_key()]

    def authentic(payload: bytes) -> bool:
        try:
            doc = json.loads(payload)
        except ValueError:
            return False
        return isinstance(doc, dict) and signing.verify_command(doc, keys)

    link = MqttLink(cfg, handler, handler_heartbeat(), dict, authentic=authentic, inbox_soft_limit=20)
    seen_max = 0
    async with running(link), Observer(mosquitto) as grid:
        root = link.topics.root
        for i in range(300):
            await grid.publish(f"{root}/cmd/ping", {"id": f"junk-{i}"})
            seen_max = max(seen_max, link.status()["queued"]["commands"])
        signed = sign_for(GRID, {"id": "real", "cap_kw": 5}, site=cfg.site.id, verb="cap", issued_at=T0)
        await grid.publish(f"{root}/cmd/cap", signed)
        await wait_until(lambda: "real" in handler.ids("cap"), 30, "the signed command to be handled")
    assert link.dropped_unauthenticated > 0
    assert link.status()["dropped_unauthenticated"] == link.dropped_unauthenticated
    assert seen_max <= 21 + 5  # the soft limit, plus what is in flight between the check and the put


def handler_heartbeat() -> Any:
    class Sink:
        def heartbeat(self, payload: bytes) -> None:
            return None

    return Sink()
