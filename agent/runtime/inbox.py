"""The controller's inbox: validated commands (each with the future its reply goes to) and the miners' answers to
commands sent (agent.runtime.commanding), taken in by the controller's task in the order they came. Never capped: a
reply is the real acknowledgement of a command, and an answer lost would leave a miner counted as told nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from hashflex.agent.commands import Command
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.actuator import OpResult
from hashflex.contract.reply import Reply

log = get_logger("controller")


@dataclass(frozen=True, slots=True)
class Landed:
    """A miner's answer to a command, on its way to the loop."""

    result: OpResult
    sent_at: float | None


class Wake:
    """What wakes the loop: anything put in its inbox, and an early tick asked for (`trigger`) by whatever sees a
    reason (a batch answered, an under-frequency stage, a heartbeat, a refused meter reading). Made before the loop
    and its parts, so each part is handed this instead of the controller."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.early = False  # an early tick was asked for (the loop clears it when it ticks)

    def trigger(self) -> None:
        self.early = True
        self.event.set()


class Inbox:
    def __init__(self, wake: asyncio.Event) -> None:
        self._queue: asyncio.Queue[tuple[Command, asyncio.Future[Reply]] | Landed] = asyncio.Queue()
        self._wake = wake  # the loop's: anything put here wakes it

    def empty(self) -> bool:
        return self._queue.empty()

    async def submit(self, command: Command, timeout_s: float) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        await self._queue.put((command, future))
        self._wake.set()
        async with asyncio.timeout(timeout_s):
            return await future

    def deliver(self, result: OpResult, sent_at: float | None) -> None:
        self._queue.put_nowait(Landed(result, sent_at))
        self._wake.set()

    def drain(
        self, apply: Callable[[Command], Reply], take: Callable[[OpResult, float | None], None], *, stopping: bool
    ) -> bool:
        """Take in every answer (`take`) and apply every command (`apply`; `stopping`: fail it instead), in order.
        True when a command was applied."""
        applied = False
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return applied
            if isinstance(item, Landed):
                take(item.result, item.sent_at)
                continue
            command, future = item
            if future.done():
                continue
            if stopping:
                future.set_exception(TimeoutError("the agent is stopping"))
                continue
            try:
                reply = apply(command)
            except Exception as exc:
                log.exception("command failed", verb=command.verb, id=command.id)
                future.set_exception(exc)
                continue
            applied = applied or reply.is_ok
            future.set_result(reply)
