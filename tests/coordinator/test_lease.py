"""The leader lease (coordinator/lease.py) and the MQTT fabric, against a real 3-node NATS cluster.

One cluster for the module (starting one takes < 1 s, but a node kill leaves it changed): tests that kill a node
restart it before they end. Each test uses its own bucket, so they do not see each other's leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import aiomqtt
import nats
import pytest
from nats.aio.client import Client as NatsClient

from hashflex.coordinator.lease import Lease, LeaseConfig
from tests.broker import HOST, REPO
from tests.coordinator.support import TTL_S, lease_config
from tests.nats_cluster import NatsCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield nodes
    nodes.stop()


def bucket() -> str:
    return f"lease_{uuid.uuid4().hex[:10]}"


async def connect(cluster: NatsCluster, first: int) -> NatsClient:
    """A client that starts on node `first` and fails over to the others (in order, not at random)."""
    order = cluster.urls[first:] + cluster.urls[:first]
    return await nats.connect(
        servers=order, dont_randomize=True, reconnect_time_wait=0.2, max_reconnect_attempts=-1, connect_timeout=1
    )


@dataclass
class Term:
    holder: str
    start: float  # on the shared monotonic clock: the moment it became leader (its on_change callback)
    until: float = -math.inf  # the latest `valid_until` it counted on while leading
    stepped_down: float | None = None  # when it stepped down itself (on_change False), if it did

    @property
    def end(self) -> float:
        """When it stopped believing it led: its own clock ran out, or it stepped down before that."""
        return self.until if self.stepped_down is None else min(self.until, self.stepped_down)


@dataclass
class Contenders:
    """Leases running side by side, all on this process's monotonic clock. Every lease reports its changes
    (exact start of each term); a sampler every 5 ms records each term's validity and any moment two believe
    they lead."""

    leases: list[Lease] = field(default_factory=list)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    terms: list[Term] = field(default_factory=list)
    overlaps: list[tuple[float, list[str]]] = field(default_factory=list)
    _open: dict[str, Term] = field(default_factory=dict)

    def watcher(self, holder: str) -> Callable[[bool], None]:
        def changed(leading: bool) -> None:
            now = time.monotonic()
            if leading:
                self._open[holder] = term = Term(holder, now)
                self.terms.append(term)
            elif holder in self._open:
                self._open.pop(holder).stepped_down = now

        return changed

    def leaders(self) -> list[Lease]:
        return [lease for lease in self.leases if lease.is_leader]

    def _record(self) -> None:
        now = time.monotonic()
        leading = self.leaders()
        if len(leading) > 1:
            self.overlaps.append((now, [lease.holder for lease in leading]))
        for lease in leading:
            term = self._open.get(lease.holder)
            if term is not None:
                term.until = max(term.until, lease.valid_until)

    async def sample(self) -> None:
        while True:
            self._record()
            await asyncio.sleep(0.005)

    async def wait_one_leader(self, within_s: float) -> Lease:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            leading = self.leaders()
            if len(leading) == 1:
                return leading[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no single leader within {within_s} s: {[lease.holder for lease in self.leaders()]}")

    def check_no_overlap(self) -> None:
        self._record()
        assert not self.overlaps, f"two leaders at once: {self.overlaps[:5]}"
        ordered = sorted(self.terms, key=lambda term: term.start)
        for before, after in pairwise(ordered):
            assert before.end <= after.start, (before, after)


async def open_bucket(lease: Lease, within_s: float = 20.0) -> None:
    """The bucket, retried: on a cluster that has just elected its meta leader, creating an R3 stream can outlast
    one 1 s request (the server goes on creating it; the retry finds it). `Lease.step` retries the same way."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await lease.open()
            return
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def contenders(cluster: NatsCluster, n: int, name: str) -> AsyncIterator[tuple[Contenders, list[NatsClient]]]:
    clients = [await connect(cluster, i % len(cluster.nodes)) for i in range(n)]
    config = lease_config(name)
    group = Contenders()
    for i, client in enumerate(clients):
        holder = f"coordinator-{i}"
        group.leases.append(Lease(client.jetstream(timeout=1.0), holder, config, on_change=group.watcher(holder)))
    for lease in group.leases:
        await open_bucket(lease)
        group.tasks[lease.holder] = asyncio.create_task(lease.run(), name=lease.holder)
    sampler = asyncio.create_task(group.sample())
    try:
        yield group, clients
    finally:
        sampler.cancel()
        for task in group.tasks.values():
            task.cancel()
        await asyncio.gather(sampler, *group.tasks.values(), return_exceptions=True)
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()


async def test_two_contenders_exactly_one_leader(cluster: NatsCluster) -> None:
    async with contenders(cluster, 2, bucket()) as (group, _):
        leader = await group.wait_one_leader(within_s=5.0)
        first_revision = leader.revision
        await asyncio.sleep(2 * TTL_S)  # TTLs: renewals keep the same holder, the other stays out
        assert group.leaders() == [leader]
        assert (leader.revision or 0) > (first_revision or 0) > 0
        follower = next(lease for lease in group.leases if lease is not leader)
        record = await follower.current()
        assert record is not None
        assert record.holder == leader.holder
        assert follower.last_seen is not None
        assert follower.last_seen.holder == leader.holder
        group.check_no_overlap()
        assert len(group.terms) == 1


async def test_leader_that_stops_renewing_is_replaced_within_ttl(cluster: NatsCluster) -> None:
    async with contenders(cluster, 3, bucket()) as (group, _):
        leader = await group.wait_one_leader(within_s=5.0)
        await asyncio.sleep(0.5)
        # the leader's task dies without a word (as a killed process would): no release, no more renewals
        group.tasks[leader.holder].cancel()
        stopped = time.monotonic()
        while not (successors := [lease for lease in group.leaders() if lease is not leader]):
            assert time.monotonic() - stopped < TTL_S + 1.5, "no successor within TTL + 1.5 s"
            await asyncio.sleep(0.02)
        took_over = time.monotonic() - stopped
        assert len(successors) == 1
        assert not leader.is_leader  # its own clock ended it before the server could hand the lease on
        assert leader.valid_until <= time.monotonic()
        await asyncio.sleep(0.5)
        group.check_no_overlap()
        print(f"takeover after the leader stopped: {took_over:.2f} s (TTL {TTL_S} s)")


async def test_leader_process_killed_is_replaced_within_ttl(cluster: NatsCluster) -> None:
    """The leader is another process, SIGKILLed: the follower here leads within TTL + a margin, and only after
    the dead leader's own count (printed on the machine's monotonic clock) had run out."""
    name = bucket()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.coordinator.lease_proc",
        name,
        "coordinator-child",
        *cluster.urls,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    client = await connect(cluster, 1)
    try:
        assert proc.stdout is not None
        child_until = -math.inf
        async with asyncio.timeout(20):
            while not (line := (await proc.stdout.readline()).decode().strip()).startswith("leader"):
                assert line, "the lease process ended before leading"
            child_until = float(line.split()[1])
        follower = Lease(client.jetstream(timeout=1.0), "coordinator-here", lease_config(name))
        assert not await follower.step()
        proc.send_signal(signal.SIGKILL)  # no release, no goodbye
        killed = time.monotonic()
        rest = (await proc.stdout.read()).decode().split()  # whatever it printed before dying
        for word in rest:
            with contextlib.suppress(ValueError):
                child_until = max(child_until, float(word))
        while not await follower.step():
            assert time.monotonic() - killed < TTL_S + 1.5, "no takeover within TTL + 1.5 s"
            await asyncio.sleep(0.05)
        took_over = time.monotonic()
        assert took_over >= child_until  # the dead leader had stopped counting on the lease before
        print(f"leader process killed: taken over after {took_over - killed:.2f} s (TTL {TTL_S} s)")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await client.close()


async def test_clean_release_hands_over_at_once(cluster: NatsCluster) -> None:
    async with contenders(cluster, 2, bucket()) as (group, _):
        leader = await group.wait_one_leader(within_s=5.0)
        group.tasks[leader.holder].cancel()
        await leader.release()
        released = time.monotonic()
        successor = await group.wait_one_leader(within_s=TTL_S)
        assert successor is not leader
        assert time.monotonic() - released < 1.0  # one follower round, not a TTL
        group.check_no_overlap()


async def test_renewal_refused_after_someone_else_wrote_the_key(cluster: NatsCluster) -> None:
    """Compare-and-set: a holder whose revision is stale steps down on its next renewal."""
    name = bucket()
    client = await connect(cluster, 0)
    try:
        js = client.jetstream(timeout=1.0)
        lease = Lease(js, "coordinator-a", lease_config(name))
        deadline = time.monotonic() + 10.0
        while not await lease.step():  # the new bucket's stream may still be electing its first leader
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        kv = await js.key_value(name)
        await kv.put("leader", b'{"holder":"intruder"}')  # an operator's hand edit, or a split brain
        assert not await lease.step()
        assert not lease.is_leader
        # and it does not take the key back while the other entry lives
        assert not await lease.step()
    finally:
        await client.close()


async def stream_leader(cluster: NatsCluster, client: NatsClient, stream: str) -> int:
    """The index of the node leading `stream`'s replication group."""
    for _ in range(100):
        info = await client.jetstream(timeout=2.0).stream_info(stream)
        if info.cluster is not None and info.cluster.leader:
            return [node.name for node in cluster.nodes].index(info.cluster.leader)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no leader for stream {stream}")


def node_of(cluster: NatsCluster, client: NatsClient) -> int:
    url = client.connected_url
    assert url is not None
    assert url.port is not None
    return [node.ports.client for node in cluster.nodes].index(url.port)


async def test_holder_rides_through_losing_its_nats_node(cluster: NatsCluster) -> None:
    """The node the leader is connected to dies (it does not lead the lease stream): the client fails over to
    another node and the same holder keeps the lease without a gap."""
    name = bucket()
    async with contenders(cluster, 3, name) as (group, clients):
        leader = await group.wait_one_leader(within_s=5.0)
        client = clients[group.leases.index(leader)]
        victim = node_of(cluster, client)
        stream = f"KV_{name}"
        # move the stream's leadership off it, within a bound (an election that keeps choosing it, or a request
        # that hangs on a recovering cluster, once held this test until pytest's 300 s timeout)
        async with asyncio.timeout(30.0):
            while await stream_leader(cluster, client, stream) == victim:
                await client.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=2.0)
                await asyncio.sleep(0.5)
        revision = leader.revision
        cluster.kill(victim)
        try:
            await asyncio.sleep(2 * TTL_S)
            assert group.leaders() == [leader]
            assert (leader.revision or 0) > (revision or 0) > 0
            assert node_of(cluster, client) != victim
            assert len(group.terms) == 1  # one term, never interrupted
            group.check_no_overlap()
        finally:
            cluster.restart(victim)


async def test_lease_survives_its_stream_leader_node_killed(cluster: NatsCluster) -> None:
    """The worst node to lose: the one leading the lease stream. Writes stop until the two others elect a new
    stream leader (nats-server's Raft waits 4–9 s), longer than this test's TTL: the holder's own clock ends its
    term, then exactly one holder leads again and keeps renewing. Never two at once."""
    name = bucket()
    async with contenders(cluster, 2, name) as (group, clients):
        await group.wait_one_leader(within_s=5.0)
        victim = await stream_leader(cluster, clients[0], f"KV_{name}")
        revisions = [lease.revision or 0 for lease in group.leases]
        cluster.kill(victim)
        killed = time.monotonic()
        try:
            # a holder continues: a write accepted after the kill, within two election timeouts
            deadline = killed + 20.0
            while not any(lease.is_leader and (lease.revision or 0) > max(revisions) for lease in group.leases):
                assert time.monotonic() < deadline, "no lease write accepted within 20 s of the node kill"
                await asyncio.sleep(0.05)
            back = time.monotonic() - killed
            holder = await group.wait_one_leader(within_s=1.0)
            revision = holder.revision or 0
            await asyncio.sleep(TTL_S)
            assert group.leaders() == [holder]
            assert (holder.revision or 0) > revision
            group.check_no_overlap()
            print(f"lease stream leader {cluster.nodes[victim].name} killed: lease written again after {back:.2f} s")
        finally:
            cluster.restart(victim)


# -------------------------------------------------------------------------------------------------- MQTT


# non-retained copies of messages published BEFORE the subscription (see `_retained`)
STRAYS: list[tuple[int, bytes]] = []


async def _retained(port: int, topic: str, within_s: float = 5.0) -> bytes:
    """The retained message on `topic`, read by a new MQTT 3.1.1 client on `port`.

    Connecting is retried for `within_s`: nats-server 2.9 refuses MQTT clients while the JetStream streams
    behind MQTT are electing a leader (4–9 s after their leader's node died), as an agent would retry.
    While the cluster recovers, nats-server 2.9.10 sometimes also hands a brand-new QoS 1 subscription a
    message published before it subscribed, flagged as NOT retained (a live message): those are recorded in
    STRAYS and skipped, the retained copy still has to come."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            async with aiomqtt.Client(
                HOST,
                port,
                identifier=f"sub-{uuid.uuid4().hex[:8]}",
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=max(0.5, min(1.5, deadline - time.monotonic())),
            ) as client:
                await client.subscribe(topic, qos=1)
                async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        if not message.retain:
                            STRAYS.append((port, message.payload))
                            continue
                        return message.payload
        except aiomqtt.MqttError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


async def _publish_retained(port: int, topic: str, payload: bytes, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            async with aiomqtt.Client(
                HOST,
                port,
                identifier=f"pub-{uuid.uuid4().hex[:8]}",
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=max(0.5, min(1.5, deadline - time.monotonic())),
            ) as client:
                await client.publish(topic, payload, qos=1, retain=True)
                return
        except aiomqtt.MqttError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


async def test_mqtt_retained_messages_through_the_cluster_survive_a_node_killed(cluster: NatsCluster) -> None:
    topic = f"hashflex/test-{uuid.uuid4().hex[:8]}/flexibility"
    payload = b'{"present_w": 12000000}'
    # publish through one node; the MQTT streams appear with the first MQTT client (replicated on all three)
    await _publish_retained(cluster.mqtt_ports[0], topic, payload)
    # every other node serves it to a new subscriber
    assert await _retained(cluster.mqtt_ports[1], topic) == payload
    assert await _retained(cluster.mqtt_ports[2], topic) == payload
    client = await connect(cluster, 0)
    try:
        victim = await stream_leader(cluster, client, "$MQTT_rmsgs")  # the node leading the retained messages
    finally:
        await client.close()
    cluster.kill(victim)
    killed = time.monotonic()
    survivors = [port for i, port in enumerate(cluster.mqtt_ports) if i != victim]
    try:
        for port in survivors:
            assert await _retained(port, topic, within_s=20.0) == payload
        served = time.monotonic() - killed
        # and a retained update published now, with a node down, reaches the survivors
        await _publish_retained(survivors[0], topic, b"v2", within_s=20.0)
        for port in survivors:
            assert await _retained(port, topic, within_s=20.0) == b"v2"
        updated = time.monotonic() - killed
    finally:
        cluster.restart(victim)
    restarted = time.monotonic()
    # the restarted node catches up
    assert await _retained(cluster.mqtt_ports[victim], topic, within_s=20.0) == b"v2"
    print(
        f"$MQTT_rmsgs leader {cluster.nodes[victim].name} killed: retained message served by both others after "
        f"{served:.2f} s, updated and served after {updated:.2f} s; restarted node served it after "
        f"{time.monotonic() - restarted:.2f} s; stale non-retained copies delivered: {STRAYS}"
    )


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("field_name", ["ttl_s", "renew_every_s", "op_timeout_s", "safety_s"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "2", True])
def test_lease_config_refuses_non_finite_or_negative_numbers(field_name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"lease.{field_name}"):
        LeaseConfig(**{field_name: bad})  # type: ignore[arg-type]


def test_lease_config_refuses_renewals_that_cannot_finish_within_the_ttl() -> None:
    with pytest.raises(ValueError, match="renew_every_s"):
        LeaseConfig(ttl_s=2.0, renew_every_s=1.0, op_timeout_s=1.0)
    assert LeaseConfig(ttl_s=6.0).renew == 1.5


async def test_an_instance_that_cannot_act_neither_takes_nor_keeps_the_lease(cluster: NatsCluster) -> None:
    """A coordinator cut off from the site fabric must not lead: bench_program saw one take the lease after a NATS
    node loss before its fabric was back, and lead for 7 s counting every site at its cap while a connected
    follower waited. `eligible` False: it never acquires; a leader that turns ineligible gives the lease up."""
    name = bucket()
    can_act = {"a": False, "b": True}
    clients = [await connect(cluster, 0), await connect(cluster, 1)]
    leases = {
        h: Lease(c.jetstream(timeout=1.0), h, lease_config(name), eligible=lambda h=h: can_act[h])
        for h, c in zip(("a", "b"), clients, strict=True)
    }
    try:
        for lease in leases.values():
            await open_bucket(lease)
        deadline = time.monotonic() + 10
        while not leases["b"].is_leader:  # b can act: it takes the lease; a, cut off, never tries
            assert time.monotonic() < deadline, "the instance that can act never led"
            for lease in leases.values():
                await lease.step()
            await asyncio.sleep(0.1)
        can_act["a"], can_act["b"] = True, False  # b loses its link: it gives the lease up, a takes it
        while not leases["a"].is_leader:
            assert not leases["a"].is_leader or not leases["b"].is_leader
            assert time.monotonic() < deadline + 10, "the lease was not handed to the instance that can act"
            for lease in leases.values():
                await lease.step()
            await asyncio.sleep(0.1)
        assert not leases["b"].is_leader
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
