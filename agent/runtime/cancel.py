"""Loops that run for ever must end when they are cancelled, even when a library swallowed the cancellation.

On Python 3.11, `asyncio.wait_for` returns the awaited result instead of raising `CancelledError` when the
cancellation and the result arrive in the same turn of the event loop (fixed in 3.12, where `wait_for` is built on
`asyncio.timeout`). nats-py, pyasic and pymodbus use `wait_for` inside every request, so a task cancelled while a
request completes goes on as if nothing happened: its `while True` loop runs on, and whoever awaits it after the
cancel (a shutdown, a test's clean-up) waits for ever. Seen in CI: the coordinator lease's renewal loop, cancelled
as its KV update was answered, kept renewing until the 300 s test timeout.

The request to cancel is not lost, only its exception: `Task.cancelling()` still counts it (nobody called
`uncancel()`), so a loop that checks it once per round ends at the next round. Our own code waits with
`within` below, which keeps the cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for` that keeps a cancellation: built on `asyncio.timeout`, as Python 3.12's is.
    TimeoutError when `seconds` pass first."""
    async with asyncio.timeout(seconds):
        return await awaitable


def raise_if_cancelled() -> None:
    """Raise `CancelledError` if this task was asked to stop and the request was swallowed on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
