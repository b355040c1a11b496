"""A lease loop cancelled while a KV request is answered ends (no cluster: the KV is a stand-in whose answers the
test releases by hand, so the cancel and the answer land in the same turn of the event loop).

Python 3.11's `asyncio.wait_for` then returns the answer and drops the cancellation; nats-py uses `wait_for` in
every request. Before agent/runtime/cancel.py the renewal loop went on for ever and the clean-up that awaited it
hung: CI's `test_two_contenders_exactly_one_leader` ran into the 300 s timeout that way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import pytest
from nats.js import JetStreamContext

from hashflex.agent.runtime.cancel import raise_if_cancelled
from hashflex.coordinator.lease import Lease, LeaseConfig


class HeldKV:
    """Every write waits for the test to answer it, through `wait_for` as nats-py's requests do."""

    def __init__(self) -> None:
        self.pending: asyncio.Future[int] | None = None
        self.writes = 0
        self.asked = asyncio.Event()

    async def _write(self) -> int:
        self.writes += 1
        self.pending = asyncio.get_running_loop().create_future()
        self.asked.set()
        return await asyncio.wait_for(self.pending, 10.0)

    async def create(self, key: str, value: bytes) -> int:
        return await self._write()

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return await self._write()


class HeldJS:
    def __init__(self, kv: HeldKV) -> None:
        self.kv = kv

    async def create_key_value(self, config: Any) -> HeldKV:
        return self.kv


async def _answered_as_cancelled(kv: HeldKV, task: asyncio.Task[None], revision: int) -> None:
    await kv.asked.wait()
    kv.asked.clear()
    assert kv.pending is not None
    kv.pending.set_result(revision)  # the answer and the cancel in the same turn
    task.cancel()


@pytest.mark.parametrize("round_", ["acquire", "renew"])
async def test_a_lease_loop_cancelled_while_its_request_is_answered_ends(round_: str) -> None:
    kv = HeldKV()
    config = LeaseConfig(bucket="b", ttl_s=2.0, renew_every_s=0.05, op_timeout_s=0.5, safety_s=0.2)
    lease = Lease(cast(JetStreamContext, HeldJS(kv)), "coordinator-1", config)
    task = asyncio.create_task(lease.run())
    if round_ == "renew":  # first acquire, answered normally; the renewal is the one cancelled
        await kv.asked.wait()
        kv.asked.clear()
        assert kv.pending is not None
        kv.pending.set_result(1)
    await _answered_as_cancelled(kv, task, 2)
    done, _ = await asyncio.wait({task}, timeout=2.0)
    writes_after = kv.writes
    if not done:
        task.cancel()  # the loop ran on: stop it by a cancel that lands while it sleeps
    assert done, f"the lease loop went on after its cancel ({writes_after} writes)"
    assert task.cancelled()


async def test_raise_if_cancelled_only_after_a_cancel() -> None:
    raise_if_cancelled()  # nothing asked: nothing raised

    async def swallowing() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # as a library's wait_for does, the answer in the same turn
            await asyncio.sleep(10)
        raise_if_cancelled()
        return "went on"

    task = asyncio.create_task(swallowing())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
