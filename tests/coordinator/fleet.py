"""Helpers for the coordinator's end-to-end tests (test_service.py, test_program_cluster.py): one coordinator
instance as the service runs it (its own NATS connection, lease, JetStream store and fabric client), the grid side
sending signed program commands, and waiting.

    program = Program("prog-ab12", ("east", "west"), cap_w=15_000.0)   # site ids are f"{program.id}-{name}"
    first = await start_instance("coordinator-1", program, brokers, cluster)
    grid = Grid(program, brokers)
    reply = await grid.command("hold", {"id": "evening", "target_kw": 20, "end": ...})   # signed, answered
    process = CoordinatorProcess("coordinator-p", program, brokers, cluster, tmp_path)  # `hashflex coordinator run`
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import nats
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NatsClient

from hashflex.contract.signing import sign_command
from hashflex.coordinator.allocation import SiteLimits
from hashflex.coordinator.fabric import MqttFabric
from hashflex.coordinator.lease import Lease, LeaseConfig
from hashflex.coordinator.program import ProgramRules, SiteConfig
from hashflex.coordinator.service import Coordinator, CoordinatorConfig
from hashflex.coordinator.store import JetStreamProgramStore
from tests.broker import HOST, free_port
from tests.nats_cluster import NatsCluster

Broker = tuple[str, int]


@dataclass(frozen=True)
class Program:
    """A program under test: its id (its lease, state bucket and site ids are its own), its sites, the keys."""

    id: str
    names: tuple[str, ...]
    cap_w: float
    grid: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    coordinator: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @staticmethod
    def new(names: Sequence[str], cap_w: float) -> Program:
        return Program(f"prog-{uuid.uuid4().hex[:6]}", tuple(names), cap_w)

    def site(self, name: str) -> str:
        return f"{self.id}-{name}"

    @property
    def site_ids(self) -> list[str]:
        return [self.site(n) for n in self.names]

    @property
    def bucket(self) -> str:
        return f"state_{self.id}".replace("-", "_")

    def topic(self, tail: str) -> str:
        return f"hashflex/program/{self.id}/{tail}"


async def until(
    predicate: Callable[[], Any], within_s: float, what: str, every_s: float = 0.2, *, blocking: bool = False
) -> None:
    """Until `predicate()` is true. `blocking`: it does blocking I/O (an agent's control socket, the simulator's
    truth), so it runs in a thread and the coordinators on this event loop keep running meanwhile."""
    deadline = time.monotonic() + within_s
    while not (await asyncio.to_thread(predicate) if blocking else predicate()):
        assert time.monotonic() < deadline, f"timed out after {within_s:g} s waiting for {what}"
        await asyncio.sleep(every_s)


@dataclass
class Instance:
    """One coordinator instance: its own NATS connection, lease, store, fabric client and tasks."""

    name: str
    nc: NatsClient
    lease: Lease
    coord: Coordinator
    fabric: MqttFabric
    tasks: list[asyncio.Task[Any]]

    async def stand_aside(self) -> None:
        """A follower stops contending for the lease (its lease loop cancelled) and keeps following: connected,
        reading the fabric. So that another instance, alone in the race, takes the lease when its holder lets go."""
        assert not self.lease.is_leader, f"{self.name} leads: it cannot stand aside"
        await _cancel_all([self.tasks[0]], self.name)

    def stand_by(self) -> None:
        """After `stand_aside`: contending again (it takes the lease when the holder's ages out)."""
        assert self.tasks[0].done(), f"{self.name}: its lease loop still runs"
        self.tasks[0] = asyncio.create_task(self.lease.run())

    async def kill(self) -> None:
        """As a crash: its tasks stop, its connections drop, the lease is NOT released (it ages out)."""
        await _cancel_all(self.tasks, self.name)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.nc.close()

    async def stop(self) -> None:
        """The end of a test: the lease handed back if it still can be (bounded: the cluster may be short of a
        node), then as `kill`."""
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.lease.release()
        await self.kill()


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]], name: str) -> None:
    """Cancelled once, and done soon after: a loop that swallowed its cancel (Python 3.11's `wait_for`, see
    agent/runtime/cancel.py) and ran on would keep renewing a lease whose holder the test thinks dead."""
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=10.0)
    assert not pending, f"{name}: tasks still running 10 s after their cancel: {pending}"


async def start_instance(
    name: str,
    program: Program,
    brokers: Sequence[Broker],
    cluster: NatsCluster,
    *,
    step_s: float = 0.5,
    settle_s: float = 1.0,
    resend_s: float = 5.0,
    rules: ProgramRules | None = None,
) -> Instance:
    nc = await nats.connect(servers=cluster.urls, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    js = nc.jetstream()
    lease = Lease(
        js,
        name,
        LeaseConfig(
            bucket=f"lease_{program.id}".replace("-", "_"), ttl_s=2.0, renew_every_s=0.4, op_timeout_s=0.5, safety_s=0.2
        ),
    )
    store = JetStreamProgramStore(js, program.id, bucket=program.bucket)
    fabric = MqttFabric(list(brokers), f"{name}-{program.id}")
    sites = tuple(SiteConfig(sid, program.cap_w, SiteLimits()) for sid in program.site_ids)
    cfg = CoordinatorConfig(
        program_id=program.id,
        sites=sites,
        grid_keys=(program.grid.public_key(),),
        signing_key=program.coordinator,
        step_s=step_s,
        settle_s=settle_s,
        resend_s=resend_s,
        rules=rules or ProgramRules(min_horizon_s=30.0, retarget_w=500.0, min_tolerance_w=500.0),
    )
    coord = Coordinator(cfg, fabric, store, lambda: lease.is_leader)
    tasks = [
        asyncio.create_task(lease.run()),
        asyncio.create_task(fabric.run(coord.subscriptions(), coord.on_message)),
        asyncio.create_task(coord.run()),
    ]
    return Instance(name, nc, lease, coord, fabric, tasks)


class Grid:
    """The grid side: signs a program command, publishes it and waits for the coordinator's reply (by id).

    Each command is its own short MQTT session, tried on each broker in turn until the deadline: a node of the
    cluster may be down, or its JetStream assets between leaders, while the grid keeps sending (a publish sent twice
    is a repeat the coordinator answers the same way). After a node loss, nats-server 2.9 may hold QoS 1 deliveries
    until the consumers led from the lost node have new leaders: tens of seconds on a busy machine, hence the
    default deadline."""

    def __init__(self, program: Program, brokers: Sequence[Broker]) -> None:
        self.program = program
        self.brokers = list(brokers)

    def sign(self, verb: str, doc: Mapping[str, Any], *, key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
        body = {"program": self.program.id, "verb": verb, "issued_at": int(time.time()), **doc}
        return sign_command(body, key or self.program.grid)

    async def command(
        self, verb: str, doc: Mapping[str, Any], *, signed: bool = True, within_s: float = 60.0
    ) -> dict[str, Any]:
        """The reply to `doc` (signed with the grid key unless `signed` is False, or already signed)."""
        payload = dict(doc) if not signed or "signature" in doc else self.sign(verb, doc)
        return await self.send(verb, json.dumps(payload).encode(), str(payload.get("id")), within_s=within_s)

    async def send(self, verb: str, payload: bytes, request_id: str, *, within_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        problems: list[str] = []
        attempt = 0
        while time.monotonic() < deadline:
            host, port = self.brokers[attempt % len(self.brokers)]
            attempt += 1
            try:
                async with aiomqtt.Client(host, port, identifier=f"grid-{uuid.uuid4().hex[:8]}", timeout=5.0) as client:
                    # the answer at QoS 0: a fresh session's QoS 1 subscription needs a JetStream consumer, which
                    # nats-server 2.9 may create late, or deliver to late, while the cluster re-elects after a node
                    # loss (twice in CI under load: no reply within 60 s); a lost answer costs a repeat, answered alike
                    granted = await client.subscribe(self.program.topic(f"reply/{verb}"), qos=0)
                    if any((g if isinstance(g, int) else g.value) >= 0x80 for g in granted):
                        raise aiomqtt.MqttError(f"reply subscription refused ({list(granted)})")
                    await client.publish(self.program.topic(f"cmd/{verb}"), payload, qos=1)
                    async with asyncio.timeout(max(1.0, min(15.0, deadline - time.monotonic()))):
                        async for message in client.messages:
                            reply: dict[str, Any] = json.loads(bytes(message.payload))
                            if str(reply.get("id")) == request_id:
                                return reply
            except (aiomqtt.MqttError, TimeoutError) as exc:
                problems.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.3)
        raise AssertionError(f"no reply to {verb} {request_id!r} within {within_s:g} s: {problems[-5:]}")


class CoordinatorProcess:
    """One coordinator instance as a real `hashflex coordinator run` process, on the same lease, state bucket and
    rules as `start_instance`'s (so it can lead or follow beside in-process instances); killed with SIGKILL as a
    crash. Whether it leads: its Prometheus endpoint's `hashflex_coordinator_leader`."""

    def __init__(
        self, name: str, program: Program, brokers: Sequence[Broker], cluster: NatsCluster, folder: Path
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "coordinator.key").write_bytes(
            program.coordinator.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (folder / "grid.pub").write_bytes(
            program.grid.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.name = name
        self.metrics_port = free_port()
        config = folder / "program.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "program_id": program.id,
                    "signing_key": "coordinator.key",
                    "grid_public_keys": ["grid.pub"],
                    "fabric": {"brokers": [f"{h}:{p}" for h, p in brokers], "nats_servers": cluster.urls},
                    "sites": [{"id": sid, "cap_kw": program.cap_w / 1000.0} for sid in program.site_ids],
                    # as start_instance: the same lease bucket and TTL (the bucket's max age), state bucket and rules
                    "lease": {"bucket": f"lease_{program.id}".replace("-", "_"), "ttl_s": 2.0, "renew_every_s": 0.4},
                    "state": {"bucket": program.bucket},
                    "rules": {"min_horizon_s": 30.0, "retarget_w": 500.0, "min_tolerance_w": 500.0},
                    "step_s": 0.5,
                    "settle_s": 1.0,
                    "resend_s": 5.0,
                    "metrics": {"enabled": True, "host": HOST, "port": self.metrics_port},
                }
            )
        )
        self.log_path = folder / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hashflex", "coordinator", "run", "-c", str(config), "--name", name],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def leading(self) -> bool | None:
        """Whether it leads (None: not serving its metrics yet). Blocking I/O: call it from a thread."""
        assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=1.0) as resp:
                return "hashflex_coordinator_leader 1.0" in resp.read().decode().splitlines()
        except OSError:
            return None

    def on_fabric(self) -> bool:
        """Its log says it has connected to the fabric (it does not wait for that before it takes the lease)."""
        assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
        return '"event":"fabric connected"' in self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash (the lease is not released; it ages out)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
