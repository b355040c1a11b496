"""`hashflex coordinator run`: the service (`coordinator.service`) built from the program config and its three ports
(NATS lease, JetStream state, MQTT fabric) started together, until SIGINT or SIGTERM.

A clean stop gives the lease up at once (a compare-and-set delete) so a follower takes over without waiting out
the TTL; a crash (kill -9) leaves it to age out, as the lease module expects.

The stop is bounded whatever NATS and the brokers do (`stop_tasks`, `STOP_S`): on Python 3.11 `asyncio.wait_for`
can swallow a cancellation that lands as its inner call completes (fixed in 3.12). Our loops end on such a cancel
at their next round (agent/runtime/cancel.py); a task inside a library that does not is cancelled again until it
is done, and the lease release and the connection close are bounded too. A task that still will not stop is logged
and left: the process exits anyway.
"""

from __future__ import annotations

import asyncio
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

STOP_S = 5.0  # the most a task is given to end after its first cancel
RELEASE_S = 3.0  # giving the lease up (one KV request, itself bounded by the lease's op timeout)
CLOSE_S = 3.0  # closing the NATS connection (a flush to a server that may not answer)


class StartError(RuntimeError):
    """The service cannot start as configured (the message names the setting)."""


def instance_name(cfg: ProgramConfig, name: str | None = None) -> str:
    """The lease holder and the MQTT client id: stable across restarts, so the broker keeps this instance's
    persistent session (QoS 1 messages queued while it reconnects). Two instances on one host need --name."""
    return f"coordinator-{cfg.program_id}-{name or socket.gethostname()}"


async def stop_tasks(tasks: list[asyncio.Task[Any]], within_s: float = STOP_S) -> list[asyncio.Task[Any]]:
    """Cancel `tasks` until each is done, for at most `within_s` in all; returns those still running (logged).

    Why more than once: a cancel swallowed by `asyncio.wait_for` on 3.11 leaves the task running its loop, and a
    single `await task` would then wait for ever. The outcome of each task that ended is retrieved (an error it
    ended with is logged here, not by the event loop at exit)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    pending = [t for t in tasks if not t.done()]
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=min(0.2, left))
        pending = [t for t in pending if not t.done()]
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("coordinator task ended with an error", task=task.get_name(), error=repr(task.exception()))
    for task in pending:
        log.error("coordinator task did not stop", task=task.get_name(), within_s=within_s)
    return pending


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
        fabric = MqttFabric(cfg.brokers, holder)
        # leads only while it can reach the sites (Lease: an instance that cannot act does not hold the lease)
        lease = Lease(js, holder, cfg.lease.to_lease(), eligible=fabric.connected.is_set)
        store = JetStreamProgramStore(js, cfg.program_id, bucket=cfg.state.bucket, replicas=cfg.state.replicas)
        leader = lease  # bound for the closure: mypy and a reader both see it is never None there
        audit = JetStreamAuditLog(js, cfg.audit_stream, replicas=cfg.audit.replicas)
        coord = Coordinator(ccfg, fabric, store, lambda: leader.is_leader, audit=audit, holder=holder)
        if cfg.metrics.enabled:
            metrics = CoordinatorMetrics(lambda: coord.snapshot)
            try:
                metrics.start_http(cfg.metrics.host, cfg.metrics.port)
            except OSError as exc:
                metrics = None
                raise StartError(
                    f"metrics: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: {exc.strerror or exc}"
                ) from None
        tasks = [
            asyncio.create_task(lease.run(), name="lease"),
            asyncio.create_task(fabric.run(coord.subscriptions(), coord.on_message), name="fabric"),
            asyncio.create_task(coord.run(), name="coordinator"),
        ]
        log.info(
            "coordinator started",
            program=cfg.program_id,
            holder=holder,
            sites=len(ccfg.sites),
            brokers=cfg.fabric.brokers,
            nats=cfg.fabric.nats_servers,
        )
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
            await stop_tasks([task])
        if metrics is not None:
            metrics.stop_http()
        if lease is not None:
            try:
                async with asyncio.timeout(RELEASE_S):
                    await lease.release()
            except Exception as exc:  # unreachable or slow: it ages out within its TTL
                log.warning("lease not released", error=repr(exc)[:200])
        try:
            async with asyncio.timeout(CLOSE_S):
                await nc.close()
        except Exception as exc:
            log.warning("nats connection not closed cleanly", error=repr(exc)[:200])
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
