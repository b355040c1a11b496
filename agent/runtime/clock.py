"""The agent's sense of time: wall time for a real site, and a scaled clock for simulation runs only.

Everything in the runtime that counts time against the site (tick period, heartbeat timeout, min on/off times,
wake stagger, dispatch windows, energy integration) reads it from one `Clock`. A `ScaledClock(k)` runs k times
faster than the wall, so a run against the simulator started with `--speed k` agrees with the simulator's clock
about energy and timers, and a 24-hour scenario runs in minutes.

SIMULATION ONLY: a scaled clock on a real site would shorten every safety timer by k. `hashflex run
--time-scale` refuses to start unless every miner address is a loopback address.

Network deadlines (read and command timeouts) are not site time: they stay in wall seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    scale: float

    def time(self) -> float:
        """Epoch seconds on this clock."""
        ...

    def monotonic(self) -> float:
        """Seconds on this clock that never jump back; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds` of this clock's time."""
        ...

    def to_wall(self, seconds: float) -> float:
        """Wall seconds that `seconds` of this clock's time take."""
        ...


class WallClock:
    scale = 1.0

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def to_wall(self, seconds: float) -> float:
        return seconds


class ScaledClock:
    """Time that runs `scale` times faster than the wall since `origin` (epoch seconds; default: now).

    Matches the simulator's `--speed scale`: its `sim_time_s` is wall time elapsed × speed, so after both have
    run for the same wall interval they have counted the same site seconds. Processes given the same origin
    share one timeline, so an agent restarted during a scaled run finds its stored dispatch windows where it left
    them (and a window that ended while it was down has ended).
    """

    def __init__(self, scale: float, *, origin: float | None = None) -> None:
        if not scale > 0:
            raise ValueError(f"time scale must be > 0, got {scale!r}")
        self.scale = float(scale)
        wall = time.time()
        self.origin = wall if origin is None else float(origin)
        self._offset = (wall - self.origin) * self.scale  # site seconds already run since the origin
        self._mono0 = time.monotonic()

    def time(self) -> float:
        return self.origin + self._offset + (time.monotonic() - self._mono0) * self.scale

    def monotonic(self) -> float:
        return (time.monotonic() - self._mono0) * self.scale

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.scale)

    def to_wall(self, seconds: float) -> float:
        return seconds / self.scale


def make_clock(scale: float | None, origin: float | None = None) -> Clock:
    return WallClock() if scale is None or scale == 1.0 else ScaledClock(scale, origin=origin)
