"""The coordinator's MQTT link to the site fabric (the only coordinator module that imports aiomqtt).

MQTT 3.1.1 (what the NATS server's MQTT listener speaks; Mosquitto too), a persistent session (clean_session False,
a stable client id: QoS 1 messages for the coordinator are kept while it reconnects), and a list of brokers tried
in turn: losing one node of the cluster costs a reconnect, not the link.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiomqtt

from hashflex.agent.logging import get_logger

log = get_logger("coordinator.fabric")

Handler = Callable[[str, bytes, bool], Awaitable[None]]


class NotConnected(ConnectionError):
    """Nothing was sent: the fabric is not connected just now (the caller retries on its next step)."""


class MqttFabric:
    def __init__(self, brokers: Sequence[tuple[str, int]], client_id: str, *, keepalive_s: int = 10) -> None:
        if not brokers:
            raise ValueError("at least one broker (host, port) is needed")
        self.brokers = list(brokers)
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            raise NotConnected(f"not connected to the fabric; {topic} not sent")
        await client.publish(topic, payload, qos=qos, retain=retain)

    async def run(self, subscriptions: Sequence[str], handler: Handler) -> None:
        """Connect (each broker in turn), subscribe, hand every message to `handler`, for ever."""
        attempt = 0
        while True:
            host, port = self.brokers[attempt % len(self.brokers)]
            attempt += 1
            try:
                client = aiomqtt.Client(
                    host, port, identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False, keepalive=self.keepalive_s, timeout=5.0,
                )  # fmt: skip
                async with client:
                    await client.subscribe([(topic, 1) for topic in subscriptions])
                    self._client = client
                    self.connected.set()
                    log.info("fabric connected", host=host, port=port)
                    attempt = 0 if len(self.brokers) == 1 else attempt
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                        try:
                            await handler(message.topic.value, bytes(payload), bool(message.retain))
                        except Exception:  # one bad message must not take the link down
                            log.exception("fabric message handling failed", topic=message.topic.value)
            except aiomqtt.MqttError as exc:
                log.warning("fabric connection lost", host=host, port=port, error=str(exc)[:200])
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(0.5)


async def read_retained(brokers: list[tuple[str, int]], topic: str, wait_s: float) -> dict[str, Any]:
    """The retained document on `topic` from the first broker that answers (each tried in turn)."""
    problems = []
    for host, port in brokers:
        try:
            async with aiomqtt.Client(host, port, identifier=f"hashflex-status-{uuid.uuid4().hex[:8]}",
                                      protocol=aiomqtt.ProtocolVersion.V311, timeout=wait_s) as client:  # fmt: skip
                await client.subscribe(topic, qos=1)
                try:
                    async with asyncio.timeout(wait_s):
                        async for message in client.messages:
                            payload = message.payload
                            if isinstance(payload, bytes | bytearray) and payload:
                                doc = json.loads(bytes(payload))
                                if isinstance(doc, dict):
                                    return doc
                                raise ValueError(f"{topic}: not a program state document")
                except TimeoutError:
                    raise TimeoutError(
                        f"no program state on {topic} at {host}:{port} within {wait_s:g} s: is a coordinator "
                        "leading this program (`hashflex coordinator run`)?"
                    ) from None
        except aiomqtt.MqttError as exc:
            problems.append(f"{host}:{port}: {exc}")
    raise OSError(f"no broker answered ({'; '.join(problems)})")
