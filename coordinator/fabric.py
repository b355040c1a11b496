"""The coordinator's MQTT link to the site fabric (the only coordinator module that imports aiomqtt).

MQTT 3.1.1 (what the NATS server's MQTT listener speaks; Mosquitto too), a persistent session (clean_session False,
a stable client id: QoS 1 messages for the coordinator are kept while it reconnects), and a list of brokers tried
in turn by the agent's rule (agent.core.brokers): a failure moves on to the next broker at once while the round has
brokers not yet tried, and backs off once all have failed; losing one node of the cluster costs a reconnect, not
the link. `broker` names the one connected to (None while not connected).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiomqtt

from hashflex.agent.core.brokers import Broker, Rotation, retry_delay_s
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.cancel import raise_if_cancelled

log = get_logger("coordinator.fabric")

Handler = Callable[[str, bytes, bool], Awaitable[None]]
STABLE_AFTER_S = 10.0  # a connection that lasted this long starts a new round of the broker list
HANDLER_GRACE_S = 15.0  # a link found broken lets the message in hand finish this long before it is cut


class NotConnected(ConnectionError):
    """Nothing was sent: the fabric is not connected just now (the caller retries on its next step)."""


class MqttFabric:
    def __init__(self, brokers: Sequence[tuple[str, int]], client_id: str, *, keepalive_s: int = 10) -> None:
        self.rotation = Rotation([Broker(host, port) for host, port in brokers])
        self.brokers = list(brokers)
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.broker: Broker | None = None  # the one connected to
        self.failures = 0  # failed attempts (refused, or lost) since the last connection that stood
        self._broken = asyncio.Event()  # a publish on the current connection was not acknowledged
        self._broken_why = ""

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            raise NotConnected(f"not connected to the fabric; {topic} not sent")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            # not acknowledged within the client's timeout: the connection may look alive (messages still come
            # in) while nothing we send completes: a NATS node whose MQTT streams lost their leader. Counted as a
            # lost connection, so the link moves on to the next broker instead of staying on this one for ever
            if client is self._client:
                self._broken.set()
                self._broken_why = f"{topic}: {exc}"
            raise

    async def run(self, subscriptions: Sequence[str], handler: Handler) -> None:
        """Connect (each broker in turn), subscribe, hand every message to `handler`, for ever."""
        connected_at = 0.0
        while True:
            broker = self.rotation.current
            try:
                client = aiomqtt.Client(
                    broker.host,
                    broker.port,
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False,
                    keepalive=self.keepalive_s,
                    timeout=5.0,
                )
                async with client:
                    await client.subscribe([(topic, 1) for topic in subscriptions])
                    self._broken.clear()
                    self._client, self.broker, connected_at = client, broker, time.monotonic()
                    self.connected.set()
                    log.info("fabric connected", broker=str(broker), broker_index=self.rotation.index)
                    await self._serve(client, handler)
            except aiomqtt.MqttError as exc:
                lost = self.broker is not None
                if lost and time.monotonic() - connected_at >= STABLE_AFTER_S:
                    self.failures = 0  # a connection that stood: a new round (a flapping one keeps counting)
                self.failures += 1
                delay = retry_delay_s(self.failures, len(self.rotation), random.random())  # not cryptographic
                nxt = self.rotation.advance()
                log.warning(
                    "fabric connection lost" if lost else "fabric connect failed",
                    broker=str(broker),
                    error=str(exc)[:200],
                    next_broker=str(nxt),
                    retry_s=round(delay, 2),
                )
            else:  # the message stream ended without an error: reconnect to the same broker
                delay = 0.5
            finally:
                self._client, self.broker = None, None
                self.connected.clear()
            raise_if_cancelled()  # one that aiomqtt's wait_for swallowed as it connected or subscribed (3.11)
            await asyncio.sleep(delay)

    async def _serve(self, client: aiomqtt.Client, handler: Handler) -> None:
        """Hand every message to `handler` until the stream ends, or raise MqttError when it breaks or a publish
        on it went unacknowledged. A message being handled is let finish first (up to HANDLER_GRACE_S): a command
        cut off between its durable save and its reply would come back as a conflict with our own write."""
        idle = asyncio.Event()
        idle.set()
        reader = asyncio.ensure_future(self._read(client, handler, idle))
        broken = asyncio.ensure_future(self._broken.wait())
        try:
            await asyncio.wait({reader, broken}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HANDLER_GRACE_S):
                        while not idle.is_set():  # checked and cancelled below with no await between
                            await idle.wait()
        finally:
            for task in (reader, broken):
                task.cancel()
            await asyncio.gather(reader, broken, return_exceptions=True)
        if not reader.cancelled():
            reader.result()  # the stream's own end or error
            return
        raise aiomqtt.MqttError(f"a publish was not acknowledged ({self._broken_why})")

    @staticmethod
    async def _read(client: aiomqtt.Client, handler: Handler, idle: asyncio.Event) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            idle.clear()
            try:
                await handler(message.topic.value, bytes(payload), bool(message.retain))
            except Exception:  # one bad message must not take the link down
                log.exception("fabric message handling failed", topic=message.topic.value)
            finally:
                idle.set()


async def read_retained(brokers: list[tuple[str, int]], topic: str, wait_s: float) -> dict[str, Any]:
    """The retained document on `topic` from the first broker that answers (each tried in turn)."""
    problems = []
    for host, port in brokers:
        try:
            async with aiomqtt.Client(
                host,
                port,
                identifier=f"hashflex-status-{uuid.uuid4().hex[:8]}",
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=wait_s,
            ) as client:
                # QoS 0: a one-off read needs no persistent delivery, and a fresh session's QoS 1 subscription waits
                # for a JetStream consumer that nats-server 2.9 may create late while the cluster re-elects
                await client.subscribe(topic, qos=0)
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
