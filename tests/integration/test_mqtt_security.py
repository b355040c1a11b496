"""TLS with client certificates, passwords, and the example ACL (configs/mosquitto/acl), on a broker built from
the example config. Uses the mosquitto_pub / mosquitto_sub tools the way an operator would."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hashflex.agent.io.mqtt import FailureKind, LinkState, classify_failure
from tests.broker import DEFAULT_USERS, HOST, Mosquitto
from tests.mqtt_support import Observer, make_link, running, site_config, wait_until

pytestmark = pytest.mark.timeout(60)

Factory = Callable[[], Mosquitto]


def auth(user: str) -> list[str]:
    return ["-u", user, "-P", DEFAULT_USERS[user]]


def pub(broker: Mosquitto, user: str, topic: str, message: str) -> subprocess.CompletedProcess[str]:
    """mosquitto_pub at QoS 1 over MQTT 5, so a refusal by the ACL comes back in the PUBACK."""
    return subprocess.run(
        [
            "mosquitto_pub",
            "-V",
            "5",
            "-h",
            HOST,
            "-p",
            str(broker.password_port),
            *auth(user),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            message,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


async def apub(broker: Mosquitto, user: str, topic: str, message: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(pub, broker, user, topic, message)


async def subscribe(broker: Mosquitto, user: str, *topics: str, count: int) -> asyncio.subprocess.Process:
    """mosquitto_sub printing `topic payload` lines, exiting after `count` messages; returns once subscribed."""
    # stdbuf: mosquitto_sub's stdout is block-buffered in a pipe, and the SUBACK line is our "subscribed" signal
    args = [
        "stdbuf",
        "-oL",
        "mosquitto_sub",
        "-V",
        "5",
        "-h",
        HOST,
        "-p",
        str(broker.password_port),
        *auth(user),
        "-q",
        "1",
        "-v",
        "-d",
        "-C",
        str(count),
        "-W",
        "20",
    ]
    for topic in topics:
        args += ["-t", topic]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    async with asyncio.timeout(10):
        while b"received SUBACK" not in await proc.stdout.readline():
            pass
    return proc


async def received(proc: asyncio.subprocess.Process) -> list[str]:
    """The `topic payload` lines mosquitto_sub printed (its -d debug lines left out)."""
    out, _ = await asyncio.wait_for(proc.communicate(), 25)
    return [line for line in out.decode().splitlines() if line.startswith("hashflex/")]


async def test_acl_lets_a_site_read_only_its_own_commands(mosquitto_factory: Factory) -> None:
    broker = mosquitto_factory()
    # site-a asks for its own AND site-b's commands; the broker grants the subscription but filters delivery
    sub = await subscribe(broker, "site-a", "hashflex/site-b/cmd/#", "hashflex/site-a/cmd/#", count=1)
    assert (await apub(broker, "grid-operator", "hashflex/site-b/cmd/ping", "for-b")).returncode == 0
    assert (await apub(broker, "grid-operator", "hashflex/site-a/cmd/ping", "for-a")).returncode == 0
    assert await received(sub) == ["hashflex/site-a/cmd/ping for-a"]  # site-b's, sent first, never arrived


async def test_acl_lets_a_site_write_only_its_own_outputs(mosquitto_factory: Factory) -> None:
    broker = mosquitto_factory()
    sub = await subscribe(broker, "grid-operator", "hashflex/#", count=1)
    denied = await apub(broker, "site-a", "hashflex/site-b/state", "forged")
    assert "Not authorized" in denied.stderr
    forged_cmd = await apub(broker, "site-a", "hashflex/site-a/cmd/dispatch", "self-command")
    assert "Not authorized" in forged_cmd.stderr
    ok = await apub(broker, "site-a", "hashflex/site-a/state", "mine")
    assert ok.returncode == 0
    assert "Not authorized" not in ok.stderr
    assert await received(sub) == ["hashflex/site-a/state mine"]


async def test_site_agent_works_through_the_acl_with_its_password(mosquitto_factory: Factory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    password = tmp_path / "mqtt-password"
    password.write_text(DEFAULT_USERS["site-a"] + "\n")
    cfg = site_config(tmp_path, broker.password_port, site_id="site-a", username="site-a", password_file=str(password))
    link, handler, _ = make_link(cfg)
    async with running(link):
        sub = await subscribe(broker, "grid-operator", "hashflex/site-a/reply/ping", count=1)
        assert (
            await apub(broker, "grid-operator", "hashflex/site-a/cmd/ping", json.dumps({"id": "acl-1"}))
        ).returncode == 0
        [line] = await received(sub)
        topic, body = line.split(" ", 1)
        assert topic == "hashflex/site-a/reply/ping"
        assert json.loads(body)["id"] == "acl-1"
        assert json.loads(body)["status"] == "ok"
        # a command for another site never reaches this agent
        assert (
            await apub(broker, "grid-operator", "hashflex/site-b/cmd/ping", json.dumps({"id": "b-1"}))
        ).returncode == 0
        sub = await subscribe(broker, "grid-operator", "hashflex/site-a/reply/ping", count=1)
        assert (
            await apub(broker, "grid-operator", "hashflex/site-a/cmd/ping", json.dumps({"id": "acl-2"}))
        ).returncode == 0
        await received(sub)
        assert handler.ids() == ["acl-1", "acl-2"]


async def test_tls_with_client_certificate_connects(mosquitto_factory: Factory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    password = tmp_path / "mqtt-password"
    password.write_text(DEFAULT_USERS["site-a"])
    tls = {
        "ca_file": str(broker.pki.ca_cert),
        "cert_file": str(broker.pki.client_cert),
        "key_file": str(broker.pki.client_key),
    }
    cfg = site_config(
        tmp_path, broker.tls_port, site_id="site-a", username="site-a", password_file=str(password), tls=tls
    )
    link, handler, _ = make_link(cfg)
    async with running(link), Observer(broker, "hashflex/site-a/reply/#") as grid:
        await grid.publish("hashflex/site-a/cmd/ping", {"id": "tls-1"})
        assert (await grid.wait_reply("hashflex/site-a", "ping", "tls-1"))["status"] == "ok"
    assert handler.ids() == ["tls-1"]
    assert "as hashflex-site-a (p5, c0" in broker.log()  # MQTT 5, clean start off (a persistent session)


async def test_tls_with_an_untrusted_ca_does_not_connect(mosquitto_factory: Factory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    password = tmp_path / "mqtt-password"
    password.write_text(DEFAULT_USERS["site-a"])
    tls = {
        "ca_file": str(broker.pki.wrong_ca_cert),
        "cert_file": str(broker.pki.client_cert),
        "key_file": str(broker.pki.client_key),
    }
    cfg = site_config(
        tmp_path, broker.tls_port, site_id="site-a", username="site-a", password_file=str(password), tls=tls
    )
    link, handler, _ = make_link(cfg)
    async with running(link, connected=False):
        await wait_until(lambda: link.failures >= 1, 15, "the TLS failure")
        assert link.connects == 0
        assert link.state is not LinkState.CONNECTED
        assert link.last_error is not None
        assert "CERTIFICATE_VERIFY_FAILED" in link.last_error
        assert classify_failure(Exception(link.last_error)) is FailureKind.AUTH
    assert handler.calls == []


async def test_tls_without_a_client_certificate_is_refused(mosquitto_factory: Factory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    password = tmp_path / "mqtt-password"
    password.write_text(DEFAULT_USERS["site-a"])
    cfg = site_config(
        tmp_path,
        broker.tls_port,
        site_id="site-a",
        username="site-a",
        password_file=str(password),
        tls={"ca_file": str(broker.pki.ca_cert)},
    )
    # the server's refusal ends the TLS session after the client's handshake finished: the client only notices
    # by the missing CONNACK, so a short operation timeout keeps this test quick
    link, _, _ = make_link(cfg, op_timeout_s=1.0)
    async with running(link, connected=False):
        await wait_until(lambda: link.failures >= 1, 15, "the refusal")
        assert link.connects == 0
        assert link.state is not LinkState.CONNECTED
