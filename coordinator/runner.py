"""`hashflex coordinator run`: the service (`coordinator.service`) built from the program config and its three ports
(NATS lease, JetStream state, MQTT fabric) started together, until SIGINT or SIGTERM.

A clean stop gives the lease up at once (a compare-and-set delete) so a follower takes over without waiting out
the TTL; a crash (kill -9) leaves it to age out, as the lease module expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Any

from hashflex.agent.logging import get_logger
from hashflex.coordinator.config import ProgramConfig
from hashflex.coordinator.fabric import MqttFabric
from hashflex.coordinator.lease import Lease
from hashflex.coordinator.metrics import CoordinatorMetrics
from hashflex.coordinator.service import Coordinator, CoordinatorConfig
from hashflex.coordinator.store import JetStreamAuditLog, JetStreamProgramStore, connect_nats

log = get_logger("coordinator.runner")


class StartError(RuntimeError):
    """The service cannot start as configured (the message names the setting)."""


def instance_name(cfg: ProgramConfig, name: str | None = None) -> str:
    """The lease holder and the MQTT client id: stable across restarts, so the broker keeps this instance's
    persistent session (QoS 1 messages queued while it reconnects). Two instances on one host need --name."""
    return f"coordinator-{cfg.program_id}-{name or socket.gethostname()}"


async def serve(cfg: ProgramConfig, ccfg: CoordinatorConfig, stop: asyncio.Event, *, name: str | None = None) -> None:
    """Run until `stop` is set; then stop acting, release the lease, close the connections."""
    holder = instance_name(cfg, name)

    nc = await connect_nats(list(cfg.fabric.nats_servers), holder, stop)
    if nc is None:  # stopped before the cluster answered
        return
    tasks: list[asyncio.Task[Any]] = []
    lease: Lease | None = None
    metrics: CoordinatorMetrics | None = None
    try:
        js = nc.jetstream()
        lease = Lease(js, holder, cfg.lease.to_lease())
        store = JetStreamProgramStore(js, cfg.program_id, bucket=cfg.state.bucket, replicas=cfg.state.replicas)
        fabric = MqttFabric(cfg.brokers, holder)
        leader = lease  # bound for the closure: mypy and a reader both see it is never None there
        audit = JetStreamAuditLog(js, cfg.audit_stream, replicas=cfg.audit.replicas)
        coord = Coordinator(ccfg, fabric, store, lambda: leader.is_leader, audit=audit, holder=holder)
        if cfg.metrics.enabled:
            metrics = CoordinatorMetrics(lambda: coord.snapshot)
            try:
                metrics.start_http(cfg.metrics.host, cfg.metrics.port)
            except OSError as exc:
                metrics = None
                raise StartError(f"metrics: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: "
                                 f"{exc.strerror or exc}") from None  # fmt: skip
        tasks = [
            asyncio.create_task(lease.run(), name="lease"),
            asyncio.create_task(fabric.run(coord.subscriptions(), coord.on_message), name="fabric"),
            asyncio.create_task(coord.run(), name="coordinator"),
        ]
        log.info("coordinator started", program=cfg.program_id, holder=holder, sites=len(ccfg.sites),
                 brokers=cfg.fabric.brokers, nats=cfg.fabric.nats_servers)  # fmt: skip
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in done:
            if task is not stopping:  # these loops run for ever: one that ended failed
                failure = None if task.cancelled() else task.exception()
                raise failure or RuntimeError(f"coordinator task {task.get_name()!r} ended")
    finally:
        # the acting loop first (nothing is decided after this point), then the lease, then the links
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if metrics is not None:
            metrics.stop_http()
        if lease is not None:
            await lease.release()
        await nc.close()
        log.info("coordinator stopped", program=cfg.program_id, holder=holder)


def run(cfg: ProgramConfig, ccfg: CoordinatorConfig, *, name: str | None = None) -> int:
    """The foreground service: 0 after SIGINT or SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, ccfg, stop, name=name)

    asyncio.run(main())
    return 0
