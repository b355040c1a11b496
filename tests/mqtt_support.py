"""What the MQTT tests share: a site config pointing at the test broker, a small real CommandHandler, a test-side
client that records what the agent publishes, and a way to run an MqttLink for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from hashflex.agent.config import AgentConfig
from hashflex.agent.io.mqtt import LinkState, MqttLink
from hashflex.agent.protocol import Channel
from hashflex.contract import signing
from hashflex.contract.reply import Reply
from tests.broker import HOST, Mosquitto


def unique_site() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def site_config(tmp_path: Path, port: int, *, site_id: str | None = None, **mqtt: Any) -> AgentConfig:
    """A minimal valid site config whose MQTT section points at `port` on the test broker."""
    pub = tmp_path / "grid.pub"
    if not pub.exists():
        pub.write_bytes(signing.generate_keypair()[1])
    return AgentConfig.model_validate(
        {
            "site": {"id": site_id or unique_site(), "cap_kw": 1000},
            "mqtt": {"host": HOST, "port": port, **mqtt},
            "grid": {"public_keys": [str(pub)]},
            "state_dir": str(tmp_path / "state"),
        }
    )


@dataclass(frozen=True)
class Call:
    verb: str
    payload: bytes
    channel: Channel
    retained: bool


@dataclass
class RecordingHandler:
    """A real (tiny) CommandHandler: records every call and answers by verb.

    ping -> ok {pong, n}; echo -> ok {request}; a retained request -> error "retained"; anything else -> error
    "unknown_verb". `delay_s` makes each call take that long (for ordering and backlog tests).
    """

    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)

    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        self.calls.append(Call(verb, payload, channel, retained))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        try:
            doc = json.loads(payload)
        except ValueError:
            return Reply.error(None, "bad_json", "not JSON")
        request_id = doc.get("id") if isinstance(doc, dict) else None
        if retained:
            return Reply.error(request_id, "retained", "retained messages on command topics are refused")
        if verb == "ping":
            return Reply.ok(request_id, {"pong": True, "n": len(self.calls)})
        if verb == "echo":
            return Reply.ok(request_id, {"request": doc})
        return Reply.error(request_id, "unknown_verb", f"unknown verb {verb!r}")

    def ids(self, verb: str | None = None) -> list[str | None]:
        out: list[str | None] = []
        for call in self.calls:
            if verb is None or call.verb == verb:
                doc = json.loads(call.payload)
                out.append(doc.get("id") if isinstance(doc, dict) else None)
        return out


@dataclass
class RecordingHeartbeat:
    beats: list[bytes] = field(default_factory=list)

    def heartbeat(self, payload: bytes) -> None:
        self.beats.append(payload)


def make_link(
    cfg: AgentConfig,
    handler: RecordingHandler | None = None,
    heartbeat: RecordingHeartbeat | None = None,
    info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[MqttLink, RecordingHandler, RecordingHeartbeat]:
    handler = handler or RecordingHandler()
    heartbeat = heartbeat or RecordingHeartbeat()
    info_doc = info if info is not None else {"site_id": cfg.site.id, "version": "test"}
    return MqttLink(cfg, handler, heartbeat, lambda: info_doc, **kwargs), handler, heartbeat


async def wait_until(predicate: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(link: MqttLink, *, connected: bool = True, within: float = 10.0) -> AsyncIterator[MqttLink]:
    """Run the link in a task for the block; cancel it (a clean stop) afterwards."""
    task = asyncio.create_task(link.run())
    try:
        if connected:
            await wait_until(lambda: link.state is LinkState.CONNECTED or task.done(), within, "the link to connect")
            if task.done():
                task.result()
            assert link.state is LinkState.CONNECTED, link.status()
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Observer:
    """A test-side MQTT 5 client (anonymous, plain listener unless told otherwise) that records what it sees."""

    def __init__(self, broker: Mosquitto, *topics: str, port: int | None = None, **client_kw: Any) -> None:
        self.broker = broker
        self.topics = topics
        self.port = port or broker.plain_port
        self.client_kw = client_kw
        self.messages: list[aiomqtt.Message] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def client(self) -> aiomqtt.Client:
        assert self._client is not None
        return self._client

    async def __aenter__(self) -> Observer:
        self._client = aiomqtt.Client(
            HOST,
            self.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"obs-{uuid.uuid4().hex[:8]}",
            **self.client_kw,
        )
        await self._client.__aenter__()
        for topic in self.topics:
            await self._client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self.client.messages:
                self.messages.append(message)

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    def payloads(self, topic: str) -> list[bytes]:
        return [payload_bytes(m.payload) for m in self.on(topic)]

    def json(self, topic: str) -> list[Any]:
        return [json.loads(p) for p in self.payloads(topic)]

    async def wait(
        self, topic: str, predicate: Callable[[aiomqtt.Message], bool] = lambda _m: True, within: float = 10.0
    ) -> aiomqtt.Message:
        found: list[aiomqtt.Message] = []

        def seen() -> bool:
            found[:] = [m for m in self.on(topic) if predicate(m)]
            return bool(found)

        await wait_until(seen, within, f"a message on {topic}")
        return found[0]

    async def wait_reply(self, root: str, verb: str, request_id: str, within: float = 10.0) -> dict[str, Any]:
        message = await self.wait(
            f"{root}/reply/{verb}", lambda m: json.loads(payload_bytes(m.payload)).get("id") == request_id, within
        )
        reply: dict[str, Any] = json.loads(payload_bytes(message.payload))
        return reply

    async def publish(self, topic: str, doc: Any, *, retain: bool = False, **kw: Any) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        await self.client.publish(topic, payload, qos=1, retain=retain, **kw)


def payload_bytes(payload: object) -> bytes:
    """A message payload as bytes (aiomqtt types it as bytes, str, a number or None)."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()
