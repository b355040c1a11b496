"""MqttLink against a real Mosquitto: requests in, replies out, retained/oversized refusals, the retained
availability/info/state, heartbeats, outbound queues. Each test has its own site id (topic root, client id)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hashflex.agent.io.mqtt import LinkState
from hashflex.agent.protocol import Channel
from tests.broker import Mosquitto, Mqtt311OnlyProxy
from tests.mqtt_support import Observer, RecordingHandler, make_link, running, site_config, wait_until

pytestmark = pytest.mark.timeout(60)


def rid() -> str:
    return uuid.uuid4().hex


async def test_command_is_handled_and_replied_on_reply_topic_with_same_id(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, handler, _ = make_link(cfg)
    root = cfg.mqtt_root
    async with running(link), Observer(mosquitto, f"{root}/reply/#") as grid:
        request = rid()
        await grid.publish(f"{root}/cmd/ping", {"id": request})
        reply = await grid.wait_reply(root, "ping", request)
        assert reply["status"] == "ok"
        assert reply["data"]["pong"] is True
        assert len(handler.calls) == 1
        call = handler.calls[0]
        assert (call.verb, call.channel, call.retained) == ("ping", Channel.MQTT, False)
        assert json.loads(call.payload) == {"id": request}

        # an error reply carries the id and an actionable error
        other = rid()
        await grid.publish(f"{root}/cmd/frobnicate", {"id": other})
        refused = await grid.wait_reply(root, "frobnicate", other)
        assert refused["status"] == "error"
        assert refused["error"]["code"] == "unknown_verb"


async def test_mqtt5_response_topic_and_correlation_data_are_honoured(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, _, _ = make_link(cfg)
    root = cfg.mqtt_root
    response_topic = f"{root}/reply/rt-{rid()}"
    async with running(link), Observer(mosquitto, f"{root}/reply/#") as grid:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = b"corr-42"
        request = rid()
        await grid.publish(f"{root}/cmd/ping", {"id": request}, properties=props)
        message = await grid.wait(response_topic)
        assert json.loads(message.payload)["id"] == request  # type: ignore[arg-type]
        assert message.properties is not None
        assert message.properties.CorrelationData == b"corr-42"
        # ... and the ordinary reply topic still gets its copy
        assert (await grid.wait_reply(root, "ping", request))["status"] == "ok"


async def test_retained_command_published_live_is_flagged_and_refused(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, handler, _ = make_link(cfg)
    root = cfg.mqtt_root
    async with running(link), Observer(mosquitto, f"{root}/reply/#") as grid:
        request = rid()
        await grid.publish(f"{root}/cmd/ping", {"id": request}, retain=True)
        reply = await grid.wait_reply(root, "ping", request)
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "retained"
        assert [c.retained for c in handler.calls] == [True]
        await grid.client.publish(f"{root}/cmd/ping", b"", qos=1, retain=True)  # clear it


async def test_stale_retained_command_is_not_replayed_on_connect(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    root = cfg.mqtt_root
    async with Observer(mosquitto, f"{root}/reply/#") as grid:
        await grid.publish(f"{root}/cmd/ping", {"id": "stale"}, retain=True)
        link, handler, _ = make_link(cfg)
        async with running(link):
            live = rid()  # a live request after it, to know the link has processed everything before
            await grid.publish(f"{root}/cmd/ping", {"id": live})
            await grid.wait_reply(root, "ping", live)
            assert handler.ids() == [live]
            assert [r["id"] for r in grid.json(f"{root}/reply/ping")] == [live]
        await grid.client.publish(f"{root}/cmd/ping", b"", qos=1, retain=True)


async def test_oversized_request_is_refused_without_reaching_the_handler(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port, max_payload_bytes=1024)
    link, handler, _ = make_link(cfg)
    root = cfg.mqtt_root
    async with running(link), Observer(mosquitto, f"{root}/reply/#", f"{root}/events") as grid:
        big = {"id": "big", "pad": "x" * 2000}
        await grid.publish(f"{root}/cmd/dispatch", big)
        message = await grid.wait(f"{root}/reply/dispatch")
        reply = json.loads(message.payload)  # type: ignore[arg-type]
        assert reply["status"] == "error"
        assert reply["error"]["code"] == "too_large"
        assert "1024" in reply["error"]["message"]
        assert reply["id"] is None  # not parsed, so not known
        event = json.loads((await grid.wait(f"{root}/events")).payload)  # type: ignore[arg-type]
        assert event["type"] == "rejected"
        assert event["data"]["code"] == "too_large"
        # exactly at the limit is still handed on
        fits = {"id": "fits", "pad": ""}
        fits["pad"] = "x" * (1024 - len(json.dumps(fits)))
        await grid.publish(f"{root}/cmd/echo", fits)
        assert (await grid.wait_reply(root, "echo", "fits"))["status"] == "ok"
        assert handler.ids() == ["fits"]


async def test_commands_are_handled_one_at_a_time_in_arrival_order(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, handler, _ = make_link(cfg, RecordingHandler(delay_s=0.01))
    root = cfg.mqtt_root
    ids = [f"c{i:03d}" for i in range(60)]
    async with running(link), Observer(mosquitto, f"{root}/reply/#") as grid:
        for i, request in enumerate(ids):
            await grid.publish(f"{root}/cmd/{'ping' if i % 2 else 'echo'}", {"id": request})
        await wait_until(lambda: len(grid.on(f"{root}/reply/ping")) + len(grid.on(f"{root}/reply/echo")) == 60)
    assert handler.ids() == ids


async def test_heartbeat_reaches_the_sink_and_a_retained_one_is_ignored(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, handler, beats = make_link(cfg)
    root = cfg.mqtt_root
    async with running(link), Observer(mosquitto, f"{root}/reply/#") as grid:
        await grid.publish(f"{root}/heartbeat", {"ts": "2025-01-01T00:00:00Z", "seq": 1})
        await grid.publish(f"{root}/heartbeat", {"ts": "2025-01-01T00:00:10Z", "seq": 2}, retain=True)
        await grid.publish(f"{root}/heartbeat", {"ts": "2025-01-01T00:00:20Z", "seq": 3})
        await wait_until(lambda: len(beats.beats) >= 2)
        await grid.publish(f"{root}/cmd/ping", {"id": "after"})  # everything before it has been routed
        await grid.wait_reply(root, "ping", "after")
        assert [json.loads(b)["seq"] for b in beats.beats] == [1, 3]
        assert handler.ids() == ["after"]
        await grid.client.publish(f"{root}/heartbeat", b"", qos=1, retain=True)


async def test_online_info_and_state_are_retained_and_offline_on_clean_stop(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, _, _ = make_link(cfg, info={"site_id": cfg.site.id, "version": "9.9"})
    root = cfg.mqtt_root
    link.publish_state({"ts": 1, "target_kw": 10})
    link.publish_state({"ts": 2, "target_kw": 20})  # latest wins
    async with running(link):
        await wait_until(lambda: not link.status()["queued"]["replies"])
        # a late subscriber sees the retained documents
        async with Observer(mosquitto, f"{root}/availability", f"{root}/info", f"{root}/state") as late:
            await late.wait(f"{root}/state")
            await late.wait(f"{root}/info")
            await late.wait(f"{root}/availability")
            assert late.payloads(f"{root}/availability") == [b"online"]
            assert late.json(f"{root}/info") == [{"site_id": cfg.site.id, "version": "9.9"}]
            assert late.json(f"{root}/state") == [{"ts": 2, "target_kw": 20}]
            assert all(m.retain for m in late.messages)
            link.publish_state({"ts": 3, "target_kw": 30})
            await late.wait(f"{root}/state", lambda m: json.loads(m.payload)["ts"] == 3)  # type: ignore[arg-type]
            assert link.status()["state"] == "connected"
    assert link.state is LinkState.DISCONNECTED
    async with Observer(mosquitto, f"{root}/availability") as after:
        await after.wait(f"{root}/availability")
        assert after.payloads(f"{root}/availability") == [b"offline"]
    async with Observer(mosquitto) as cleaner:  # leave no retained messages behind
        for topic in ("availability", "info", "state"):
            await cleaner.client.publish(f"{root}/{topic}", b"", qos=1, retain=True)


async def test_events_queued_while_the_broker_is_unreachable_are_all_sent_in_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, _, _ = make_link(cfg, telemetry_queue=8)
    root = cfg.mqtt_root
    # before the link runs (as when the broker is down) the outbound calls only queue
    for i in range(500):
        link.publish_event({"type": "received", "ts": i, "data": {"n": i}})
    for i in range(100):
        link.publish_telemetry({"n": i})
    for i in range(300):
        link.publish_miner(f"10.0.{i // 100}.{i % 100}", {"power_w": i})
    link.publish_miner("10.0.0.5", {"power_w": 9999})  # latest per miner wins
    assert link.telemetry_dropped == 92
    assert link.status()["queued"] == {"commands": 0, "replies": 0, "events": 500, "telemetry": 8, "miners": 300}
    async with Observer(mosquitto, f"{root}/events", f"{root}/telemetry", f"{root}/miners/#") as grid:
        async with running(link):
            await wait_until(lambda: len(grid.on(f"{root}/events")) == 500 and len(grid.on(f"{root}/telemetry")) == 8)
            await wait_until(lambda: sum(1 for m in grid.messages if "/miners/" in m.topic.value) == 300)
        assert [e["ts"] for e in grid.json(f"{root}/events")] == list(range(500))
        assert [t["n"] for t in grid.json(f"{root}/telemetry")] == list(range(92, 100))  # the oldest were dropped
        assert grid.json(f"{root}/miners/10.0.0.5") == [{"power_w": 9999}]
    async with Observer(mosquitto) as cleaner:
        for i in range(300):
            await cleaner.client.publish(f"{root}/miners/10.0.{i // 100}.{i % 100}", b"", qos=0, retain=True)


async def test_telemetry_and_miner_floods_never_hold_up_a_reply(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    link, _, _ = make_link(cfg)
    root = cfg.mqtt_root
    async with running(link), Observer(mosquitto, f"{root}/reply/#", f"{root}/miners/#", f"{root}/telemetry") as grid:
        stop = asyncio.Event()

        async def flood() -> None:
            n = 0
            while not stop.is_set():
                link.publish_telemetry({"n": n})
                n += 1
                await asyncio.sleep(0)

        flooder = asyncio.create_task(flood())
        for i in range(5000):
            link.publish_miner(f"m{i}", {"i": i})
        await grid.publish(f"{root}/cmd/ping", {"id": "urgent"})
        await grid.wait_reply(root, "ping", "urgent")
        miners_before_reply = sum(1 for m in grid.messages if "/miners/" in m.topic.value)
        stop.set()
        await flooder
        # the reply went out ahead of the miner backlog, which was still being drained
        assert miners_before_reply < 5000
        await wait_until(lambda: sum(1 for m in grid.messages if "/miners/" in m.topic.value) == 5000, 30)
        assert grid.on(f"{root}/telemetry")
    async with Observer(mosquitto) as cleaner:
        for i in range(5000):
            await cleaner.client.publish(f"{root}/miners/m{i}", b"", qos=0, retain=True)


async def test_command_sent_while_the_agent_is_away_is_delivered_once_when_it_returns(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg = site_config(tmp_path, mosquitto.plain_port)
    root = cfg.mqtt_root
    first, first_handler, _ = make_link(cfg)
    async with running(first):  # creates the persistent session and its subscriptions
        pass
    async with Observer(mosquitto, f"{root}/reply/#") as grid:
        await grid.publish(f"{root}/cmd/ping", {"id": "while-away"})
        second, handler, _ = make_link(cfg)
        async with running(second):
            reply = await grid.wait_reply(root, "ping", "while-away")
            assert reply["status"] == "ok"
            await grid.publish(f"{root}/cmd/ping", {"id": "marker"})
            await grid.wait_reply(root, "ping", "marker")
        assert handler.ids() == ["while-away", "marker"]
        assert first_handler.calls == []
        assert len([r for r in grid.json(f"{root}/reply/ping") if r["id"] == "while-away"]) == 1


async def test_falls_back_to_mqtt_311_when_the_broker_refuses_mqtt_5(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with Mqtt311OnlyProxy(mosquitto.plain_port) as proxy:
        cfg = site_config(tmp_path, proxy.port)
        root = cfg.mqtt_root
        async with Observer(mosquitto, f"{root}/reply/#") as grid:
            # MQTT 3.1.1 has no "do not send retained": a stale retained command is replayed at subscribe time,
            # flagged retained, and handed on as such (the handler refuses it)
            await grid.publish(f"{root}/cmd/ping", {"id": "stale"}, retain=True)
            link, handler, _ = make_link(cfg)
            async with running(link):
                assert link.status()["protocol"] == "3.1.1"
                assert proxy.levels[:2] == [5, 4]
                refused = await grid.wait_reply(root, "ping", "stale")
                assert refused["error"]["code"] == "retained"
                await grid.publish(f"{root}/cmd/ping", {"id": "live"})
                assert (await grid.wait_reply(root, "ping", "live"))["status"] == "ok"
            assert [(c.retained, json.loads(c.payload)["id"]) for c in handler.calls] == [
                (True, "stale"),
                (False, "live"),
            ]
            await grid.client.publish(f"{root}/cmd/ping", b"", qos=1, retain=True)


async def test_disabled_link_does_nothing_and_queues_nothing(tmp_path: Path) -> None:
    cfg = site_config(tmp_path, 1, enabled=False)
    link, handler, _ = make_link(cfg)
    await asyncio.wait_for(link.run(), 5)  # returns at once
    link.publish_state({"a": 1})
    link.publish_event({"type": "alarm"})
    link.publish_telemetry({"n": 1})
    link.publish_miner("m", {"n": 1})
    assert link.state is LinkState.DISABLED
    assert link.status()["state"] == "disabled"
    assert set(link.status()["queued"].values()) == {0}
    assert handler.calls == []
