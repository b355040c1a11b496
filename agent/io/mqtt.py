"""The agent's link to the grid broker: the ONLY module that imports aiomqtt (and its paho types).

Topic tree (root `cfg.mqtt_root`, default `hashflex/<site id>`; the names are hashflex.contract.topics), see STYLE.md:

    availability  out  retained QoS1  "online" / "offline"; "offline" is also the last will
    info          out  retained QoS1  info() as JSON, republished after every (re)connect
    state         out  retained QoS1  latest status doc (latest wins), republished after every (re)connect; at
                                      most mqtt.max_payload_bytes (largest fields left out, see _fit)
    flex          out  retained QoS1  the site's flexibility (hashflex.contract.flex, schema hashflex.flex/1) for the
                                      program coordinator; latest wins, republished after every (re)connect
    telemetry     out  QoS0           periodic site figures; lossy (a bounded queue drops the oldest)
    miners/<id>   out  retained QoS0  per-miner detail (latest per miner wins)
    events        out  QoS1           dispatch lifecycle; never dropped, in order
    cmd/<verb>    in   QoS1           requests, handed to the CommandHandler in arrival order
    reply/<verb>  out  QoS1           one Reply per request (also to the MQTT 5 response topic, if it is under
                                      this site's own reply/ subtree: never …/heartbeat, …/cmd/ or another site)
    heartbeat     in   QoS1           grid heartbeat (signed, see contract.signing), handed to the HeartbeatSink

Why it is built the way it is:
- aiomqtt 2.x PUBACKs a QoS 1 message before our code sees it, so a message it has queued must never be lost
  with a dropped connection. aiomqtt's queue is therefore replaced by a forwarder into the link's own inbox,
  which outlives connections; one consumer task drains it in arrival order. The reply is the real
  acknowledgement (the runtime persists before replying ok). The inbox is bounded for unauthenticated traffic
  only: past INBOX_SOFT_LIMIT messages, a message is queued only if it carries a valid signature (the `authentic`
  check); anything else is dropped and counted (`dropped_unauthenticated` in the status). A signed command is
  never dropped, and a flood of junk cannot grow the inbox without bound.
- Retained commands: the link subscribes with MQTT 5 "retain as published" (so a live retained publish is
  still flagged) and "do not send retained" (so a stale retained command is never replayed on subscribe),
  and hands `retained=message.retain` to the handler. THE HANDLER refuses retained commands (it owns the
  error reply, the event and the metrics for every refusal). On MQTT 3.1.1 a retained command is replayed
  at subscribe time, flagged retained, and refused the same way.
- Oversized payloads are the one refusal made here: they are answered with an error (code "too_large")
  without being parsed or handed on, and reported on …/events.
- Outbound calls (publish_state/telemetry/event/miner) are synchronous and only touch in-memory queues, so
  the control loop never waits on the broker. One sender task per connection drains them: replies first,
  then events, state, telemetry, miners. Items leave their queue only once the broker has them (PUBACK for
  QoS 1), so replies and events survive a reconnect (at least once).
- Reconnect forever: backoff min(1.8**n, 60) s + jitter; errors that retrying soon cannot fix (bad
  credentials, not authorised, refused subscription, untrusted certificate) wait the maximum at once. A
  warning on the first failure of a cycle, debug afterwards (aioesphomeapi).
- A list of brokers (`mqtt.brokers`: the nodes of a NATS cluster's MQTT listener): every failure moves on to the
  next one, at once while the round has brokers not yet tried, with the backoff above once all have failed
  (agent.core.brokers). Availability, info, state and flex are republished on whichever broker the link lands on;
  the status names it (`broker.address`). NATS speaks MQTT 3.1.1 only, with QoS 0/1, retained messages, wills and
  persistent sessions kept in JetStream (replicated): `mqtt.protocol: "3.1.1"` skips the refused MQTT 5 connect.
- Persistent session: a stable client id, clean_start=False and a session expiry, so QoS 1 commands sent
  while the agent is away are queued by the broker and delivered when it reconnects.

Call every public method from the event loop thread that runs `run()`; they are not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from hashflex.agent.config import AgentConfig
from hashflex.agent.core import brokers as broker_rules
from hashflex.agent.core.brokers import Broker, Rotation, retry_delay_s
from hashflex.agent.core.timefmt import iso
from hashflex.agent.logging import get_logger
from hashflex.agent.protocol import Channel, CommandHandler, HeartbeatSink
from hashflex.agent.runtime.cancel import raise_if_cancelled
from hashflex.contract.flex import FlexDoc
from hashflex.contract.reply import Reply
from hashflex.contract.status import BrokerDoc, StatusDoc
from hashflex.contract.topics import Topics

log = get_logger("mqtt")

BACKOFF_BASE = broker_rules.BACKOFF_BASE  # the rule lives in agent.core.brokers (shared with the coordinator)
BACKOFF_MAX_S = broker_rules.BACKOFF_MAX_S
STABLE_AFTER_S = 10.0  # a connection that lasted this long resets the backoff; shorter ones count as flapping
STOP_GRACE_S = 3.0  # on a clean stop: time to answer commands already received and flush replies and events
OFFLINE_TIMEOUT_S = 2.0
EVENT_BACKLOG_WARNING = 10_000
INBOX_SOFT_LIMIT = 1_000  # queued messages past which only authenticated ones are queued

# MQTT 5 reason codes (paho maps MQTT 3.1.1 CONNACK codes onto them)
_UNSUPPORTED_PROTOCOL = 132
_AUTH_REASONS = frozenset({134, 135, 138, 140})  # bad user name or password, not authorized, banned, bad method


class LinkState(enum.StrEnum):
    DISABLED = "disabled"  # mqtt.enabled is false
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # waiting to retry, or stopped


class FailureKind(enum.Enum):
    TRANSIENT = "transient"  # network, broker down: retry with growing backoff
    AUTH = "auth"  # will not fix itself soon: straight to the maximum backoff
    PROTOCOL = "protocol"  # the broker does not speak MQTT 5: retry at once with 3.1.1


class SubscriptionRefused(Exception):
    """The broker accepted the connection but refused a subscription (its ACL): commands cannot arrive."""


def backoff_s(failures: int, kind: FailureKind = FailureKind.TRANSIENT, brokers: int = 1) -> float:
    """Delay before the next attempt after `failures` failed ones in a row (1 → about 1 s, growing to 60 s), with
    `brokers` to rotate through (a hop to an untried one is almost at once; see agent.core.brokers)."""
    # jitter spreads many sites reconnecting to one broker after it restarts
    unit = random.random()  # not cryptographic
    return retry_delay_s(failures, brokers, unit, hard=kind is not FailureKind.TRANSIENT)


def classify_failure(exc: BaseException) -> FailureKind:
    if isinstance(exc, SubscriptionRefused):
        return FailureKind.AUTH
    if isinstance(exc, aiomqtt.MqttCodeError) and isinstance(exc.rc, ReasonCode):
        if exc.rc.value == _UNSUPPORTED_PROTOCOL:
            return FailureKind.PROTOCOL
        if exc.rc.value in _AUTH_REASONS:
            return FailureKind.AUTH
    if isinstance(exc, ssl.SSLCertVerificationError | FileNotFoundError | PermissionError):
        return FailureKind.AUTH
    # aiomqtt turns the OSError of a failed TLS handshake into MqttError(str(exc))
    if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate" in str(exc).lower():
        return FailureKind.AUTH
    return FailureKind.TRANSIENT


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: Properties | None = None


def _encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), default=str).encode()


def _fit(document: Mapping[str, Any], limit: int) -> tuple[bytes, list[str]]:
    """`document` encoded, at most `limit` bytes: the largest top-level fields are left out (and named under
    "truncated") until it fits. Brokers refuse big payloads (the example config: 256 KiB) by dropping the
    connection, and the state is announced first after every reconnect: an oversized one kept the link down for
    good (chaos finding A: the status doc grew with the dispatches it lists)."""
    body = _encode(document)
    if len(body) <= limit:
        return body, []
    doc = dict(document)
    dropped: list[str] = []
    for key in sorted(doc, key=lambda k: len(_encode({k: doc[k]})), reverse=True):
        del doc[key]
        dropped.append(str(key))
        body = _encode({**doc, "truncated": dropped})
        if len(body) <= limit:
            break
    return (body if len(body) <= limit else _encode({"truncated": True})), dropped


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


def _request_id(payload: bytes) -> str | None:
    """The `id` of a request, if it has a readable one (only used for an internal-error reply)."""
    try:
        raw = json.loads(payload)
    except Exception:  # ValueError, RecursionError (deep nesting): no id, then
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def _response_target(properties: Properties | None, reply_root: str) -> tuple[str, bytes | None] | None:
    """MQTT 5 response topic and correlation data of a request, if it names a topic under `reply_root` (the site's
    own `…/reply/` subtree). Anything else is ignored: a requester must not make the agent publish, as itself, on
    its heartbeat, its command topics or another site's tree."""
    topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return None
    if not topic.startswith(reply_root) or len(topic) == len(reply_root) or len(topic) > 512:
        return None
    if any(level in ("", ".", "..") for level in topic[len(reply_root) :].split("/")):
        return None
    correlation = getattr(properties, "CorrelationData", None)
    return topic, bytes(correlation) if correlation is not None else None


def _forwarding_queue(
    inbox: asyncio.Queue[aiomqtt.Message], admit: Callable[[aiomqtt.Message], bool]
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue class for aiomqtt that hands every incoming message `admit` lets through straight to `inbox`.

    aiomqtt puts what it receives into its own queue, which dies with the client object; the link's inbox
    lives as long as the link, so a message already acknowledged to the broker is handled even if the
    connection drops right after. aiomqtt's own queue stays empty, so iterating `client.messages` only
    waits for a disconnection.
    """

    class ForwardingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            if admit(item):
                inbox.put_nowait(item)

    return ForwardingQueue


class MqttLink:
    """One site's MQTT client: commands in, replies/state/telemetry/events out, reconnecting forever."""

    def __init__(
        self,
        cfg: AgentConfig,
        handler: CommandHandler,
        heartbeat: HeartbeatSink,
        info: Callable[[], Mapping[str, Any]],
        *,
        telemetry_queue: int = 64,
        op_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        authentic: Callable[[bytes], bool] | None = None,
        inbox_soft_limit: int = INBOX_SOFT_LIMIT,
        on_message: Callable[[], None] | None = None,
    ) -> None:
        self._cfg = cfg
        # told of every message the broker delivers, before any filtering (the hashflex_mqtt_messages_received
        # counter); called from aiomqtt's network callback, so it must not raise or block
        self.on_message = on_message
        # is a payload validly signed? (asked only while the inbox is over its soft limit; None: nothing is)
        self._authentic = authentic
        self._inbox_soft_limit = inbox_soft_limit
        self.dropped_unauthenticated = 0
        self._handler = handler
        self._heartbeat = heartbeat
        self._info = info
        self._clock = clock
        # how long to wait for a CONNACK, SUBACK or PUBACK before the connection counts as broken
        self._op_timeout_s = op_timeout_s
        self.topics = Topics(cfg.mqtt_root)
        self.client_id = cfg.mqtt.client_id or f"hashflex-{cfg.site.id}"
        self._max_payload = cfg.mqtt.max_payload_bytes
        self._protocol = aiomqtt.ProtocolVersion.V311 if cfg.mqtt.protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self.rotation = Rotation([Broker(host, port) for host, port in cfg.mqtt.endpoints()])

        self.state = LinkState.DISABLED if not cfg.mqtt.enabled else LinkState.DISCONNECTED
        self.since = clock()
        self.last_error: str | None = None
        self.connects = 0  # successful connections since start
        self.failures = 0  # failed attempts in the current cycle (resets after a stable connection)
        self.telemetry_dropped = 0

        # bounded for unauthenticated traffic only (see the module doc and _admit)
        self._inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._handling = False
        self._replies: deque[_Outgoing] = deque()
        self._events: deque[_Outgoing] = deque()
        self._state_doc: bytes | None = None
        self._state_dirty = False
        self._state_dropped: list[str] = []  # top-level fields left out of the state doc to fit (see _fit)
        self._flex_doc: bytes | None = None
        self._flex_dirty = False
        self._telemetry: deque[bytes] = deque(maxlen=telemetry_queue)
        self._miners: dict[str, bytes] = {}
        self._wake = asyncio.Event()
        self._connected_at: float | None = None

    # ------------------------------------------------------------------------------------ outbound (sync)
    def publish_state(self, document: StatusDoc) -> None:
        """The latest status doc, retained on …/state. Only the newest unsent one is kept (latest wins)."""
        if self.state is LinkState.DISABLED:
            return
        self._state_doc, dropped = _fit(document, self._max_payload)
        if dropped != self._state_dropped:  # logged when it changes, not on every tick
            self._state_dropped = dropped
            if dropped:
                log.warning(
                    "mqtt state doc over mqtt.max_payload_bytes; fields left out",
                    fields=dropped,
                    limit=self._max_payload,
                )
        self._state_dirty = True
        self._wake.set()

    def publish_flex(self, document: FlexDoc) -> None:
        """The site's flexibility, retained on …/flex. Only the newest unsent one is kept (latest wins)."""
        if self.state is LinkState.DISABLED:
            return
        self._flex_doc, _ = _fit(document, self._max_payload)
        self._flex_dirty = True
        self._wake.set()

    def publish_telemetry(self, document: Mapping[str, Any]) -> None:
        """Site figures on …/telemetry. Lossy: when the queue is full the oldest entry is dropped."""
        if self.state is LinkState.DISABLED:
            return
        if len(self._telemetry) == self._telemetry.maxlen:
            self.telemetry_dropped += 1
        self._telemetry.append(_encode(document))
        self._wake.set()

    def publish_event(self, document: Mapping[str, Any]) -> None:
        """A lifecycle event on …/events. Never dropped; sent in order once the broker is reachable."""
        if self.state is LinkState.DISABLED:
            return
        self._events.append(_Outgoing(self.topics.events, _encode(document), qos=1))
        if len(self._events) == EVENT_BACKLOG_WARNING:
            log.warning("mqtt event backlog is large; the broker has been unreachable", queued=len(self._events))
        self._wake.set()

    def publish_miner(self, miner_id: str, document: Mapping[str, Any]) -> None:
        """Per-miner detail, retained on …/miners/<id>. Latest per miner wins."""
        if self.state is LinkState.DISABLED:
            return
        self._miners.pop(miner_id, None)  # re-insert at the end: miners are sent oldest update first
        self._miners[miner_id] = _encode(document)
        self._wake.set()

    def status(self) -> BrokerDoc:
        """The `broker` part of the status doc."""
        return {
            "state": self.state.value,
            "since": iso(self.since),
            # the broker connected to (or being tried), and the list the link rotates through
            "address": str(self.rotation.current),
            "brokers": [str(b) for b in self.rotation.brokers],
            "last_error": self.last_error,
            "protocol": "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1",
            "queued": {
                "commands": self._inbox.qsize(),
                "replies": len(self._replies),
                "events": len(self._events),
                "telemetry": len(self._telemetry),
                "miners": len(self._miners),
            },
            "telemetry_dropped": self.telemetry_dropped,
            "dropped_unauthenticated": self.dropped_unauthenticated,
        }

    def _admit(self, message: aiomqtt.Message) -> bool:
        """Queue `message`? Always below the soft limit; above it, only a validly signed one. Never raises: aiomqtt
        calls this from its network callback."""
        if self.on_message is not None:
            with contextlib.suppress(Exception):
                self.on_message()
        if self._inbox.qsize() < self._inbox_soft_limit:
            return True
        try:
            payload = _as_bytes(message.payload)
            ok = self._authentic is not None and len(payload) <= self._max_payload and self._authentic(payload)
        except Exception:
            ok = False
        if not ok:
            self.dropped_unauthenticated += 1
            if self.dropped_unauthenticated == 1 or self.dropped_unauthenticated % 10_000 == 0:
                log.warning(
                    "mqtt inbox over its bound: unauthenticated messages dropped",
                    queued=self._inbox.qsize(),
                    dropped=self.dropped_unauthenticated,
                )
        return ok

    # ---------------------------------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        """Connect and serve until cancelled; cancelling is a clean stop ("offline" published first)."""
        if not self._cfg.mqtt.enabled:
            self._set_state(LinkState.DISABLED)
            log.info("mqtt disabled by config")
            return
        consumer = asyncio.create_task(self._consume(), name="mqtt-commands")
        try:
            await self._reconnect_forever()
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            self._set_state(LinkState.DISCONNECTED)

    async def _reconnect_forever(self) -> None:
        while True:
            self._connected_at = None
            try:
                await self._session()
                raise_if_cancelled()  # one that aiomqtt's wait_for swallowed as its request completed (3.11)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever happened, the link retries; logged below
                delay = self._after_failure(exc)
                if delay is None:
                    continue
                self._set_state(LinkState.DISCONNECTED)
                await asyncio.sleep(delay)

    def _after_failure(self, exc: Exception) -> float | None:
        """Log one failure and return how long to wait (None: retry at once)."""
        kind = classify_failure(exc)
        self.last_error = f"{type(exc).__name__}: {exc}"
        expected = isinstance(exc, aiomqtt.MqttError | OSError | SubscriptionRefused | ssl.SSLError)
        failed = self.rotation.current
        auto = self._cfg.mqtt.protocol == "auto"
        if kind is FailureKind.PROTOCOL and self._protocol is aiomqtt.ProtocolVersion.V5 and auto:
            # the same broker again, at once, in 3.1.1 (NATS's MQTT listener, older brokers)
            self._protocol = aiomqtt.ProtocolVersion.V311
            log.warning("mqtt broker refused MQTT 5; using MQTT 3.1.1", broker=str(failed))
            return None
        now = self._clock()
        if self._connected_at is not None:
            lasted = now - self._connected_at
            if lasted >= STABLE_AFTER_S:
                self.failures = 0
            self.failures += 1
            delay = backoff_s(self.failures, kind, len(self.rotation))
            nxt = self.rotation.advance()
            log.warning(
                "mqtt connection lost",
                broker=str(failed),
                error=self.last_error,
                connected_s=round(lasted, 1),
                retry_s=round(delay, 1),
                next_broker=str(nxt),
            )
            return delay
        self.failures += 1
        delay = backoff_s(self.failures, kind, len(self.rotation))
        nxt = self.rotation.advance()
        fields: dict[str, Any] = {
            "host": failed.host,
            "port": failed.port,
            "error": self.last_error,
            "attempt": self.failures,
            "retry_s": round(delay, 1),
        }
        if len(self.rotation) > 1:
            fields["next_broker"] = str(nxt)
        if kind is FailureKind.AUTH:
            fields["hint"] = "check mqtt.username, the password file, the TLS files and the broker ACL"
        elif kind is FailureKind.PROTOCOL:
            spoken = "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"
            fields["hint"] = f"the broker refused MQTT {spoken}: check mqtt.protocol"
        if not expected:
            log.error("mqtt link failed unexpectedly", exc_info=exc, **fields)
        elif self.failures == 1:
            log.warning("mqtt connect failed", **fields)
        else:
            log.debug("mqtt connect failed", **fields)
        return delay

    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            self.state = state
            self.since = self._clock()

    # ------------------------------------------------------------------------------------------ session
    async def _client(self) -> aiomqtt.Client:
        password, tls = await asyncio.to_thread(self._secrets)
        mqtt = self._cfg.mqtt
        will = aiomqtt.Will(self.topics.availability, b"offline", qos=1, retain=True)
        broker = self.rotation.current
        common: dict[str, Any] = {
            "hostname": broker.host,
            "port": broker.port,
            "username": mqtt.username,
            "password": password,
            "identifier": self.client_id,
            "will": will,
            "keepalive": max(int(mqtt.keepalive_s), 1),
            "tls_context": tls,
            "tls_insecure": True if (mqtt.tls is not None and mqtt.tls.insecure) else None,
            "timeout": self._op_timeout_s,
            # small packets (a reply, a PUBACK) must not wait for Nagle's algorithm and the peer's delayed ACK
            "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            "queue_type": _forwarding_queue(self._inbox, self._admit),
            # max_queued_incoming_messages stays unset: a capped queue silently drops commands
        }
        if self._protocol is aiomqtt.ProtocolVersion.V5:
            connect = _properties(PacketTypes.CONNECT)
            connect.SessionExpiryInterval = int(mqtt.session_expiry_s)
            return aiomqtt.Client(protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=connect, **common)
        return aiomqtt.Client(protocol=aiomqtt.ProtocolVersion.V311, clean_session=False, **common)

    def _secrets(self) -> tuple[str | None, ssl.SSLContext | None]:
        """Password and TLS context, read at every connect so rotated files are picked up (blocking I/O)."""
        password = self._cfg.mqtt_password()
        tls = self._cfg.mqtt.tls
        if tls is None:
            return password, None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self._cfg.resolve(tls.ca_file)))
        if tls.cert_file is not None:
            key = self._cfg.resolve(tls.key_file) if tls.key_file is not None else None
            context.load_cert_chain(self._cfg.resolve(tls.cert_file), key)
        if tls.insecure:
            context.check_hostname = False
        return password, context

    async def _session(self) -> None:
        self._set_state(LinkState.CONNECTING)
        client = await self._client()
        async with client:
            await self._subscribe(client)
            await self._announce(client)
            self._connected_at = self._clock()
            self.connects += 1
            self._set_state(LinkState.CONNECTED)
            log.info(
                "mqtt connected",
                host=self.rotation.current.host,
                port=self.rotation.current.port,
                broker_index=self.rotation.index,
                client_id=self.client_id,
                root=self.topics.root,
                after_failures=self.failures,
            )
            self.last_error = None
            sender = asyncio.create_task(self._send_loop(client), name="mqtt-send")
            watcher = asyncio.create_task(self._watch(client), name="mqtt-watch")
            try:
                done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # both only end by raising
                raise aiomqtt.MqttError("connection ended")
            except asyncio.CancelledError:
                await self._goodbye(client, sender)
                raise
            finally:
                for task in (sender, watcher):
                    task.cancel()
                await asyncio.gather(sender, watcher, return_exceptions=True)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        topics = [self.topics.commands, self.topics.heartbeat]
        if self._protocol is aiomqtt.ProtocolVersion.V5:
            options = SubscribeOptions(
                qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
            )
            granted = await client.subscribe([(t, options) for t in topics])
        else:
            granted = await client.subscribe([(t, 1) for t in topics])
        for topic, code in zip(topics, granted, strict=False):
            failed = code.is_failure if isinstance(code, ReasonCode) else (isinstance(code, int) and code >= 0x80)
            if failed:
                raise SubscriptionRefused(f"the broker refused the subscription to {topic}: {code}")

    async def _announce(self, client: aiomqtt.Client) -> None:
        """After every (re)connect: online, info and the latest state (all retained)."""
        await client.publish(self.topics.availability, b"online", qos=1, retain=True)
        try:
            info = _encode(self._info())
        except Exception:  # a broken info() must not keep the site off the grid link
            log.exception("mqtt info() failed; info not published")
        else:
            await client.publish(self.topics.info, info, qos=1, retain=True)
        doc = self._state_doc
        if doc is not None:
            await client.publish(self.topics.state, doc, qos=1, retain=True)
            if self._state_doc is doc:
                self._state_dirty = False
        flex = self._flex_doc
        if flex is not None:
            await client.publish(self.topics.flex, flex, qos=1, retain=True)
            if self._flex_doc is flex:
                self._flex_dirty = False

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Returns only by raising MqttError when the connection drops (messages go to the inbox)."""
        async for _ in client.messages:
            pass

    async def _goodbye(self, client: aiomqtt.Client, sender: asyncio.Task[None]) -> None:
        """Clean stop: answer what was already received, flush replies and events, then say offline."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_GRACE_S):
                await self._settled(sender)
        sender.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(OFFLINE_TIMEOUT_S):
                await client.publish(self.topics.availability, b"offline", qos=1, retain=True)
        log.info("mqtt disconnecting", unsent_replies=len(self._replies), unsent_events=len(self._events))

    async def _settled(self, sender: asyncio.Task[None]) -> None:
        """Until every received command is answered and every reply and event is sent (or the sender died)."""
        while True:
            idle = self._inbox.empty() and not self._handling and not self._replies and not self._events
            if idle or sender.done():
                return
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------------------------------- sender
    def _next_outgoing(self) -> tuple[_Outgoing, Callable[[], None]] | None:
        """The next message to send and what to do once the broker has it; None when nothing is waiting."""
        if self._replies:
            return self._replies[0], self._reply_sent
        if self._events:
            return self._events[0], self._event_sent
        if self._state_dirty and self._state_doc is not None:
            doc = self._state_doc

            def state_sent() -> None:
                if self._state_doc is doc:
                    self._state_dirty = False

            return _Outgoing(self.topics.state, doc, qos=1, retain=True), state_sent
        if self._flex_dirty and self._flex_doc is not None:
            flex = self._flex_doc

            def flex_sent() -> None:
                if self._flex_doc is flex:
                    self._flex_dirty = False

            return _Outgoing(self.topics.flex, flex, qos=1, retain=True), flex_sent
        if self._telemetry:
            return _Outgoing(self.topics.telemetry, self._telemetry.popleft(), qos=0), _nothing
        if self._miners:
            miner_id, doc = next(iter(self._miners.items()))

            def miner_sent() -> None:
                if self._miners.get(miner_id) is doc:
                    del self._miners[miner_id]

            return _Outgoing(self.topics.miner(miner_id), doc, qos=0, retain=True), miner_sent
        return None

    def _reply_sent(self) -> None:
        self._replies.popleft()

    def _event_sent(self) -> None:
        self._events.popleft()

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            nxt = self._next_outgoing()
            if nxt is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            out, sent = nxt
            try:
                await client.publish(out.topic, out.payload, qos=out.qos, retain=out.retain, properties=out.properties)
                raise_if_cancelled()  # one that aiomqtt's wait_for swallowed (see agent/runtime/cancel.py)
            except ValueError as exc:  # paho refuses the topic itself: no retry can help
                log.error("mqtt publish refused locally; message dropped", topic=out.topic, error=str(exc))
            sent()

    # ------------------------------------------------------------------------------------------ inbound
    async def _consume(self) -> None:
        while True:
            message = await self._inbox.get()
            self._handling = True
            try:
                await self._route(message)
            except Exception:  # one bad message must not stop the command stream
                log.exception("mqtt message handling failed", topic=message.topic.value)
            finally:
                self._handling = False

    async def _route(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = _as_bytes(message.payload)
        if topic == self.topics.heartbeat:
            self._on_heartbeat(payload, retained=message.retain)
            return
        verb = self.topics.verb_of(topic)
        if verb is None:  # e.g. left over from an old subscription in the persistent session
            log.debug("mqtt message on an unexpected topic ignored", topic=topic)
            return
        if len(payload) > self._max_payload:
            reply = Reply.error(
                None,
                "too_large",
                f"the request is {len(payload)} bytes; the limit is {self._max_payload} (mqtt.max_payload_bytes)",
            )
            log.warning("mqtt oversized request refused", verb=verb, size=len(payload), limit=self._max_payload)
            self.publish_event(
                {
                    "type": "rejected",
                    "ts": iso(self._clock()),
                    "data": {"verb": verb, "channel": Channel.MQTT.value, "code": "too_large", "size": len(payload)},
                }
            )
        else:
            try:
                reply = await self._handler.handle(verb, payload, Channel.MQTT, retained=message.retain)
            except Exception:  # the handler must answer; if it raises, the sender still gets one
                log.exception("command handler raised", verb=verb)
                reply = Reply.error(_request_id(payload), "internal", "the agent failed to handle this request")
        self._queue_reply(verb, reply, _response_target(message.properties, f"{self.topics.root}/reply/"))

    def _on_heartbeat(self, payload: bytes, *, retained: bool) -> None:
        if retained:  # a retained heartbeat is an old proof of life: it must not hold off the fail-safe
            log.warning(
                "mqtt retained heartbeat ignored; publish heartbeats without retain", topic=self.topics.heartbeat
            )
            return
        if len(payload) > self._max_payload:
            log.warning("mqtt oversized heartbeat ignored", size=len(payload), limit=self._max_payload)
            return
        try:
            self._heartbeat.heartbeat(payload)
        except Exception:
            log.exception("heartbeat sink raised")

    def _queue_reply(self, verb: str, reply: Reply, response: tuple[str, bytes | None] | None) -> None:
        body = reply.to_json()
        self._replies.append(_Outgoing(self.topics.reply(verb), body, qos=1))
        if response is not None:
            topic, correlation = response
            properties: Properties | None = None
            if correlation is not None:
                properties = _properties(PacketTypes.PUBLISH)
                properties.CorrelationData = correlation
            self._replies.append(_Outgoing(topic, body, qos=1, properties=properties))
        self._wake.set()


def _nothing() -> None:
    return None


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho's constructor is unannotated
