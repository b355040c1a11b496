"""The coordinator's fabric link (coordinator/fabric.py) on a half-broken connection, against real Mosquittos.

A broker that takes PUBLISHes but never acknowledges them (a NATS node whose MQTT streams lost their leader; seen in
CI after a node kill: the new leader's replies and site commands pending, "There are 11 pending publish calls", the
grid's repeated cancel unanswered for 60 s) must cost the link, not the program: the publish that timed out moves
the fabric on to the next broker, like a connection lost, where the agent's link already did (agent/io/mqtt.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiomqtt
import pytest

from hashflex.coordinator.fabric import MqttFabric
from tests.broker import HOST, Mosquitto, PubackDroppingProxy


async def _until(check: Callable[[], bool], within_s: float, what: str) -> float:
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < within_s, f"{what}: not within {within_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_a_publish_never_acknowledged_moves_the_link_to_the_next_broker(
    mosquitto_factory: Callable[[], Mosquitto],
) -> None:
    first, second = mosquitto_factory(), mosquitto_factory()
    heard: list[tuple[str, bytes]] = []

    async def handler(topic: str, payload: bytes, retained: bool) -> None:
        heard.append((topic, payload))

    async with PubackDroppingProxy(first.plain_port) as proxy:
        fabric = MqttFabric([(HOST, proxy.port), (HOST, second.plain_port)], "coordinator-halfbroken", keepalive_s=5)
        runner = asyncio.create_task(fabric.run(["hf/test/#"], handler))
        try:
            await _until(lambda: fabric.broker is not None, 10, "connected")
            assert fabric.broker is not None
            assert fabric.broker.port == proxy.port
            await fabric.publish("hf/test/a", b"1")  # acknowledged: the link is sound
            proxy.drop_pubacks = True
            began = time.monotonic()
            with pytest.raises(aiomqtt.MqttError):
                await fabric.publish("hf/test/b", b"2")
            assert proxy.dropped >= 1
            took = await _until(
                lambda: fabric.broker is not None and fabric.broker.port == second.plain_port,
                10,
                "the link on the next broker",
            )
            print(f"unacknowledged publish to the next broker: {time.monotonic() - began:.2f} s ({took:.2f} s after)")
            await fabric.publish("hf/test/c", b"3")  # acknowledged there
            await _until(lambda: ("hf/test/c", b"3") in heard, 5, "the message through the next broker")
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_a_publish_refused_for_want_of_a_link_does_not_move_it(
    mosquitto_factory: Callable[[], Mosquitto],
) -> None:
    """Not connected (yet): NotConnected, nothing counted against a broker (the rotation stays where it is)."""
    broker = mosquitto_factory()
    fabric = MqttFabric([(HOST, broker.plain_port)], "coordinator-idle")
    with pytest.raises(ConnectionError):
        await fabric.publish("hf/test/x", b"1")
    assert fabric.failures == 0
