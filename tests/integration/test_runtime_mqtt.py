"""The agent over MQTT, wired as in production: `hashflex run` with its MQTT link to a real Mosquitto, the grid side
an aiomqtt client. Signed dispatches get a reply and change the target; the heartbeat drives the fail-safe.

No miners here (the runtime against the simulated site is in test_runtime.py): this is about the wiring
between the link, the command service, the controller and the fail-safe.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.agent_harness import AgentProcess, sign_for, write_agent_config
from tests.broker import HOST, Mosquitto, free_port

pytestmark = pytest.mark.timeout(120)


async def next_json(client: aiomqtt.Client, topic: str, wait_s: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(wait_s):
        async for message in client.messages:
            if message.topic.matches(topic):
                doc = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                assert isinstance(doc, dict)
                return doc
    raise AssertionError("no message")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


async def test_grid_dispatch_and_heartbeat_over_mqtt(mosquitto: Mosquitto, tmp_path: Path) -> None:
    site = f"rt-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    files = write_agent_config(
        tmp_path,
        [],
        cap_kw=1000,
        site_id=site,
        overrides={
            "mqtt": {"enabled": True, "host": HOST, "port": mosquitto.plain_port, "telemetry_interval_s": 1},
            "failsafe": {
                "enabled": True,
                "level": 50,
                "hold_at_start": True,
                "heartbeat_timeout_s": 4,
                "release_after_s": 60,
            },
            "metrics": {"enabled": True, "host": HOST, "port": metrics_port},
        },
    )
    root = f"hashflex/{site}"
    agent = await asyncio.to_thread(AgentProcess.start, files)
    try:
        status = await asyncio.to_thread(agent.status)
        assert status["failsafe"]["active"] is True  # held at start until the grid is heard
        assert status["target_source"] == "failsafe"
        assert status["target_kw"] == 50
        # the agent subscribes on its first connect: a command published before that has no session to wait in
        await asyncio.to_thread(agent.wait_for, lambda: agent.status()["broker"]["state"] == "connected", 20)
        async with aiomqtt.Client(HOST, mosquitto.plain_port, identifier=f"grid-{site}") as grid:
            await grid.subscribe(f"{root}/reply/#", qos=1)
            await grid.subscribe(f"{root}/events", qos=1)
            # signed for this site (hashflex-sig-v2, verb heartbeat): an anonymous heartbeat is ignored
            beat = sign_for(
                files.grid_key, {"seq": 1}, site=str(files.doc["site"]["id"]), verb="heartbeat", issued_at=agent.now()
            )
            await grid.publish(f"{root}/heartbeat", json.dumps(beat), qos=1)
            doc = agent.signed({"id": "mq-1", "target_kw": 400})
            await grid.publish(f"{root}/cmd/dispatch", json.dumps(doc), qos=1)
            reply = await next_json(grid, f"{root}/reply/dispatch")
            assert reply["id"] == "mq-1"
            assert reply["status"] == "ok", reply
            # heartbeat back + a fresh command: the fail-safe is left, the dispatch binds
            status = await asyncio.to_thread(
                agent.wait_for, lambda: (s := agent.status())["target_source"] == "grid" and s, 10
            )
            assert status["failsafe"]["active"] is False
            assert status["target_kw"] == 400
            # a bad signature: an error reply, and nothing changes
            bad = {**agent.signed({"id": "mq-2", "target_kw": 10}), "target_kw": 11}
            await grid.publish(f"{root}/cmd/dispatch", json.dumps(bad), qos=1)
            reply = await next_json(grid, f"{root}/reply/dispatch")
            assert reply["id"] == "mq-2"
            assert reply["error"]["code"] == "bad_signature"
            assert (await asyncio.to_thread(agent.status))["target_kw"] == 400
            # the heartbeat stops: after the timeout the fail-safe holds the last target
            status = await asyncio.to_thread(
                agent.wait_for, lambda: (s := agent.status())["failsafe"]["active"] and s, 15
            )
            assert status["target_source"] == "failsafe"
            assert status["target_kw"] == 50  # the configured level: the lowest input wins
        # every message the broker delivered is counted: the heartbeat and the two dispatches at least
        body = await asyncio.to_thread(scrape, metrics_port)
        received = [
            float(line.split()[-1])
            for line in body.splitlines()
            if line.startswith("hashflex_mqtt_messages_received_total ")
        ]
        assert received
        assert received[0] >= 3
    finally:
        await asyncio.to_thread(agent.stop)
    assert list(agent.log_events("failsafe_entered"))
