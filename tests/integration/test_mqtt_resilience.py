"""MqttLink when things break: the agent process dies (last will), the broker dies and comes back (reconnect,
republish, queued command delivered once), credentials are wrong (straight to the longest backoff)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import yaml

from hashflex.agent.io.mqtt import BACKOFF_MAX_S, FailureKind, LinkState, backoff_s, classify_failure
from hashflex.contract import signing
from tests.broker import HOST, REPO, Mosquitto
from tests.mqtt_support import (
    Observer,
    RecordingHandler,
    make_link,
    running,
    site_config,
    unique_site,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


async def test_last_will_shows_offline_when_the_agent_process_is_killed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    site = unique_site()
    root = f"hashflex/{site}"
    (tmp_path / "grid.pub").write_bytes(signing.generate_keypair()[1])
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site": {"id": site, "cap_kw": 100},
                "mqtt": {"host": HOST, "port": mosquitto.plain_port},
                "grid": {"public_keys": ["grid.pub"]},
                "state_dir": "state",
            }
        )
    )
    async with Observer(mosquitto, f"{root}/availability", f"{root}/info") as grid:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.mqtt_agent_proc",
            str(config),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                while (line := (await proc.stdout.readline()).decode().strip()) != "state connected":
                    assert line, "the agent process ended before connecting"
            await grid.wait(f"{root}/availability", lambda m: m.payload == b"online")
            assert grid.json(f"{root}/info")[-1]["pid"] == "child"
            proc.send_signal(signal.SIGKILL)  # no chance to say goodbye
            await proc.wait()
            await grid.wait(f"{root}/availability", lambda m: m.payload == b"offline")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert grid.payloads(f"{root}/availability") == [b"online", b"offline"]
        # the will is retained: whoever looks later sees the site offline
        async with Observer(mosquitto, f"{root}/availability") as late:
            message = await late.wait(f"{root}/availability")
            assert (message.payload, message.retain) == (b"offline", True)
        for topic in ("availability", "info"):
            await grid.client.publish(f"{root}/{topic}", b"", qos=1, retain=True)


async def test_broker_killed_and_restarted_reconnects_republishes_and_delivers_queued_command_once(
    mosquitto_factory: Callable[[], Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    cfg = site_config(tmp_path, broker.plain_port)
    root = cfg.mqtt_root
    link, handler, _ = make_link(cfg)
    link.publish_state({"v": 1})
    async with running(link):
        # a crashed broker keeps what its last autosave wrote: wait until that includes the agent's session
        await asyncio.to_thread(broker.wait_saved, time.time() + 0.1)
        broker.kill()
        await wait_until(lambda: link.state is not LinkState.CONNECTED, 10, "the link to notice")
        link.publish_event({"type": "alarm", "data": {"n": 1}})
        # after two failed attempts the next one is at least 1.8 s away: room to publish before it returns
        await wait_until(lambda: link.failures >= 2, 15, "two failed reconnects")
        broker.start()
        async with Observer(
            broker, f"{root}/reply/#", f"{root}/availability", f"{root}/state", f"{root}/events"
        ) as grid:
            await grid.publish(f"{root}/cmd/ping", {"id": "while-down"})
            assert link.state is not LinkState.CONNECTED, "precondition: published while the agent was away"
            reply = await grid.wait_reply(root, "ping", "while-down", within=20)
            assert reply["status"] == "ok"
            assert link.connects == 2
            # republished live after the reconnect (retain=False on a live delivery to an existing subscriber)
            await grid.wait(f"{root}/availability", lambda m: m.payload == b"online" and not m.retain)
            await grid.wait(f"{root}/state", lambda m: json.loads(m.payload) == {"v": 1} and not m.retain)  # type: ignore[arg-type]
            # the event queued during the outage arrives once (under load it may trail the state publish)
            await grid.wait(f"{root}/events")
            assert [e["type"] for e in grid.json(f"{root}/events")] == ["alarm"]
            await grid.publish(f"{root}/cmd/ping", {"id": "after"})
            await grid.wait_reply(root, "ping", "after")
            assert handler.ids() == ["while-down", "after"]
            assert [r["id"] for r in grid.json(f"{root}/reply/ping")] == ["while-down", "after"]


async def test_commands_received_just_before_the_connection_drops_are_still_handled_and_answered(
    mosquitto_factory: Callable[[], Mosquitto], tmp_path: Path
) -> None:
    """aiomqtt acknowledged them to the broker already: losing them with the dropped client would lose them."""
    broker = mosquitto_factory()
    cfg = site_config(tmp_path, broker.plain_port)
    root = cfg.mqtt_root
    link, handler, _ = make_link(cfg, RecordingHandler(delay_s=0.5))
    ids = [f"c{i}" for i in range(5)]
    async with running(link):
        async with Observer(broker) as grid:
            for request in ids:
                await grid.publish(f"{root}/cmd/ping", {"id": request})
        await asyncio.sleep(1.5)  # acknowledged, and the broker's autosave no longer holds them in flight
        assert len(handler.calls) < len(ids), "precondition: some are still waiting in the agent"
        broker.kill()
        await wait_until(lambda: link.state is not LinkState.CONNECTED, 10, "the link to notice")
        broker.start()
        async with Observer(broker, f"{root}/reply/#") as grid:  # subscribed before the agent's first retry
            await wait_until(lambda: link.connects == 2, 20, "the reconnect")
            await grid.publish(f"{root}/cmd/ping", {"id": "marker"})
            await grid.wait_reply(root, "ping", "marker", within=20)
            replied = [r["id"] for r in grid.json(f"{root}/reply/ping")]
    assert handler.ids() == [*ids, "marker"]
    assert replied[-1] == "marker"
    assert len(replied) == len(set(replied))
    # c3 and c4 were handled after the kill (0.5 s each, one at a time): their replies waited for the reconnect;
    # earlier ones may have gone out before the kill, when nobody was subscribed to replies
    assert {"c3", "c4"} <= set(replied)
    assert set(ids) - set(replied) <= {"c0", "c1", "c2"}


async def test_bad_credentials_go_straight_to_the_longest_backoff(mosquitto: Mosquitto, tmp_path: Path) -> None:
    pw = tmp_path / "mqtt-password"
    pw.write_text("not-the-password\n")
    cfg = site_config(tmp_path, mosquitto.password_port, site_id="site-a", username="site-a", password_file=str(pw))
    link, handler, _ = make_link(cfg)
    async with running(link, connected=False):
        await wait_until(lambda: link.failures == 1, 10, "the first refusal")
        assert link.state in (LinkState.DISCONNECTED, LinkState.CONNECTING)
        assert link.last_error is not None
        assert "authori" in link.last_error.lower() or "password" in link.last_error.lower()
        await asyncio.sleep(3)  # a transient failure would have retried by now (about 1 s, then 1.8 s)
        assert link.failures == 1
        assert link.state is LinkState.DISCONNECTED
    assert handler.calls == []
    assert BACKOFF_MAX_S == 60


async def test_unreachable_broker_is_transient_and_retried_with_growing_backoff(tmp_path: Path) -> None:
    from tests.broker import free_port

    cfg = site_config(tmp_path, free_port())  # nothing listens there
    link, _, _ = make_link(cfg)
    with structlog.testing.capture_logs() as logs:
        async with running(link, connected=False):
            await wait_until(lambda: link.failures >= 3, 15, "three attempts")
            assert link.state in (LinkState.DISCONNECTED, LinkState.CONNECTING)
            assert link.last_error is not None
            assert "refused" in link.last_error.lower()
    # a warning for the first failure of the outage, nothing louder than debug after it
    failures = [e for e in logs if e["event"] == "mqtt connect failed"]
    assert failures[0]["log_level"] == "warning"
    assert all(e["log_level"] == "debug" for e in failures[1:])
    assert [e["attempt"] for e in failures] == list(range(1, len(failures) + 1))
    # and the outbound calls kept working without a broker
    link.publish_event({"type": "alarm"})
    assert link.status()["queued"]["events"] == 1


def test_failures_are_classified_for_backoff() -> None:
    import ssl

    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    def refused(name: str) -> aiomqtt.MqttError:
        return aiomqtt.MqttCodeError(ReasonCode(PacketTypes.CONNACK, name), "refused")

    assert classify_failure(refused("Not authorized")) is FailureKind.AUTH
    assert classify_failure(refused("Bad user name or password")) is FailureKind.AUTH
    assert classify_failure(refused("Unsupported protocol version")) is FailureKind.PROTOCOL
    assert classify_failure(refused("Server unavailable")) is FailureKind.TRANSIENT
    assert classify_failure(aiomqtt.MqttError("[Errno 111] Connection refused")) is FailureKind.TRANSIENT
    assert classify_failure(ssl.SSLCertVerificationError("CERTIFICATE_VERIFY_FAILED")) is FailureKind.AUTH


def test_backoff_grows_by_1_8_to_a_60_s_ceiling_plus_jitter() -> None:
    for failures, base in ((1, 1.0), (2, 1.8), (3, 1.8**2), (7, 1.8**6), (8, 60.0), (50, 60.0)):
        delays = [backoff_s(failures) for _ in range(200)]
        assert all(base <= d <= base + 1.0 + 0.1 * base for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > 0.1  # jittered, so many sites do not retry in step
    assert all(60.0 <= backoff_s(1, FailureKind.AUTH) <= 67.0 for _ in range(50))


async def test_a_state_doc_larger_than_the_broker_takes_does_not_cut_the_link(
    mosquitto_factory: Callable[[], Mosquitto], tmp_path: Path
) -> None:
    """Chaos finding A: the status doc grew past the broker's message_size_limit (256 KiB in the example config).
    Mosquitto dropped the retained state publish and the connection with it; every reconnect announced the same
    doc first, so the link never came up again and no request was answered any more."""
    broker = mosquitto_factory()
    cfg = site_config(tmp_path, broker.plain_port)
    root = cfg.mqtt_root
    link, handler, _ = make_link(cfg)
    async with running(link), Observer(broker, f"{root}/reply/#", f"{root}/state") as grid:
        link.publish_state({"v": 2, "dispatches": ["x" * 1000] * 300})  # ~300 kB
        await grid.wait(f"{root}/state", lambda m: json.loads(m.payload).get("v") == 2, within=10)  # type: ignore[arg-type]
        await grid.publish(f"{root}/cmd/ping", {"id": "after-big-state"})
        await grid.wait_reply(root, "ping", "after-big-state", within=20)
        assert link.connects == 1, link.status()
        assert link.state is LinkState.CONNECTED
        assert all(len(m.payload) <= cfg.mqtt.max_payload_bytes for m in grid.on(f"{root}/state"))  # type: ignore[arg-type]
    assert handler.ids() == ["after-big-state"]
