"""MQTT link figures against a real Mosquitto, each next to a baseline measured in the same run.

    python -m tests.bench.bench_mqtt [--n 300] [--miners 10000]

1. Command round trip (publish request -> reply seen by the requester), idle link, p50/p99/max.
   Baseline: a bare aiomqtt echo client (no handler, no link) on the same broker.
2. The same round trip while the link drains a backlog of per-miner docs and a telemetry flood
   (the issue's target: a reply within a second under normal load; telemetry never blocks commands).
3. Draining N per-miner docs (publish_miner x N, until the last is seen by a subscriber).
   Baseline: the same N QoS 0 publishes from a bare aiomqtt client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt
import structlog

from tests.broker import HOST, Mosquitto
from tests.mqtt_support import Observer, make_link, running, site_config, wait_until

# every client here sets TCP_NODELAY, as MqttLink does, so the figures are not Nagle/delayed-ACK waits (~40 ms)
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"p50 {statistics.median(values) * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  max {values[-1] * 1000:7.2f} ms"


async def _round_trips(grid: Observer, root: str, n: int) -> list[float]:
    out: list[float] = []
    for i in range(n):
        request = f"b{i}-{time.monotonic_ns()}"
        start = time.perf_counter()
        await grid.publish(f"{root}/cmd/ping", {"id": request})
        await grid.wait_reply(root, "ping", request)
        out.append(time.perf_counter() - start)
        grid.messages.clear()
    return out


async def _baseline_echo(broker: Mosquitto, n: int) -> list[float]:
    async def echo(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            await client.publish("bench/echo/out", message.payload, qos=1)

    async with aiomqtt.Client(
        HOST, broker.plain_port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY
    ) as echoer:
        await echoer.subscribe("bench/echo/in", qos=1)
        task = asyncio.create_task(echo(echoer))
        async with Observer(broker, "bench/echo/out", socket_options=NODELAY) as grid:
            out: list[float] = []
            for i in range(n):
                start = time.perf_counter()
                await grid.client.publish("bench/echo/in", f"{i}".encode(), qos=1)
                await grid.wait("bench/echo/out", lambda m, i=i: m.payload == f"{i}".encode())  # type: ignore[misc]
                out.append(time.perf_counter() - start)
                grid.messages.clear()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return out


async def main(n: int, miners: int) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        cfg = site_config(Path(tmp), broker.plain_port)
        root = cfg.mqtt_root
        baseline = await _baseline_echo(broker, n)
        print(f"round trip, bare aiomqtt echo (baseline) : {_ms(baseline)}")
        link, _, _ = make_link(cfg)
        async with running(link), Observer(broker, f"{root}/reply/#", socket_options=NODELAY) as grid:
            idle = await _round_trips(grid, root, n)
            print(f"round trip, MqttLink idle                : {_ms(idle)}")

            stop = asyncio.Event()

            async def flood() -> None:
                k = 0
                while not stop.is_set():
                    link.publish_telemetry({"n": k})
                    k += 1
                    if k % 100 == 0:
                        for m in range(miners // 10):
                            link.publish_miner(f"m{m}", {"k": k})
                    await asyncio.sleep(0)

            for m in range(miners):
                link.publish_miner(f"m{m}", {"k": 0})
            flooder = asyncio.create_task(flood())
            loaded = await _round_trips(grid, root, n)
            stop.set()
            await flooder
            print(f"round trip, MqttLink + {miners} miner docs + telemetry flood: {_ms(loaded)}")
            print(f"  telemetry dropped by the bounded queue during the flood: {link.telemetry_dropped}")

        # outbound drain
        async with (
            Observer(broker, "bench/raw/#", socket_options=NODELAY) as sub,
            aiomqtt.Client(HOST, broker.plain_port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NODELAY) as raw,
        ):
            start = time.perf_counter()
            for m in range(miners):
                await raw.publish(f"bench/raw/{m}", json.dumps({"power_w": m}).encode(), qos=0)
            await wait_until(lambda: len(sub.messages) >= miners, 120)
            raw_s = time.perf_counter() - start
        site2 = site_config(Path(tmp), broker.plain_port)
        link2, _, _ = make_link(site2)
        async with Observer(broker, f"{site2.mqtt_root}/miners/#", socket_options=NODELAY) as sub, running(link2):
            start = time.perf_counter()
            for m in range(miners):
                link2.publish_miner(f"m{m}", {"power_w": m})
            call_s = time.perf_counter() - start
            await wait_until(lambda: len(sub.messages) >= miners, 120)
            link_s = time.perf_counter() - start
        print(f"{miners} per-miner docs, bare aiomqtt QoS0 publishes (baseline): {raw_s:6.2f} s")
        print(f"{miners} per-miner docs via MqttLink, until all seen             : {link_s:6.2f} s")
        print(f"  time spent in the {miners} publish_miner() calls (the control loop's cost): {call_s * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--miners", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.miners))
