"""An in-memory MinerHandle (the driver contract) for the actuator tests (test_actuator.py, test_wake_at_limit.py):
it records every call and answers as told (fails the first calls, one fixed result, slow, or raising)."""

from __future__ import annotations

import asyncio
import time

from hashflex.drivers.base import Failed, Family, Identity, Ok, PowerRange, Reading, Result, Unreachable

RANGE = PowerRange(1000, 3500, 50)
OK = Ok()


class RecordingHandle:
    """Records every call (with the time it started and ended) and fails the first `fail_first` calls."""

    family = Family.LUXOS

    def __init__(
        self,
        ip: str,
        log: list[tuple[str, str, float]],
        *,
        fail_first: int = 0,
        result: Result = OK,
        delay_s: float = 0.0,
        raises: Exception | None = None,
    ) -> None:
        self.ip, self.log, self.fail_first, self.result = ip, log, fail_first, result
        self.delay_s, self.raises = delay_s, raises
        self.calls = 0
        self.active = 0
        self.max_active = 0

    @property
    def identity(self) -> Identity:
        return Identity(self.ip, self.family, "x", "S19", "1", "C", RANGE, 3250.0, 100.0)

    async def read(self) -> Reading:
        raise Unreachable("not used")

    async def _call(self, op: str) -> Result:
        self.calls += 1
        self.log.append((self.ip, op, time.monotonic()))
        await asyncio.sleep(self.delay_s)
        if self.raises is not None:
            raise self.raises
        if self.calls <= self.fail_first:
            return Failed("busy", retryable=True)
        return self.result

    async def set_power(self, watts: int) -> Result:
        return await self._call(f"set_power:{watts}")

    async def sleep(self) -> Result:
        return await self._call("sleep")

    async def wake(self) -> Result:
        return await self._call("wake")
