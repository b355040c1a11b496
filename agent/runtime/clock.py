"""The agent's sense of time: wall time for a real site, and a scaled clock for simulation runs only.

Everything in the runtime that counts time against the site (tick period, heartbeat timeout, min on/off times,
wake stagger, dispatch windows, energy integration) reads it from one `Clock`: a `SteadyClock` (what `make_clock`
returns), whose time never steps with the wall clock (see there). A `ScaledClock(k)` runs k times
faster than the wall, so a run against the simulator started with `--speed k` agrees with the simulator's clock
about energy and timers, and a 24-hour scenario runs in minutes.

SIMULATION ONLY: a scaled clock on a real site would shorten every safety timer by k. `hashflex run
--time-scale` refuses to start unless every miner address is a loopback address.

Network deadlines (read and command timeouts) are not site time: they stay in wall seconds.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Protocol

from hashflex.agent.core.timeline import STEP_THRESHOLD_S  # beyond it the wall and the agent's time disagree: alarmed


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


MAX_SLEW = 0.0005  # the agent's time follows the wall at most this fast (500 ppm, ntpd's limit): 0.05 % of any timer


class SteadyClock:
    """The agent's time: epoch seconds that never step, for every rule that counts elapsed time.

    It starts at the wall clock and then advances with the inner clock's monotonic reading (scaled for a simulation
    run), so a wall-clock step (an NTP step, an operator's `date -s`, a VM resumed) moves nothing: an accepted
    dispatch stays bound, the heartbeat timeout, min on/off times, the wake stagger and confirmations measure real
    elapsed time. It follows the wall only by slewing, at most MAX_SLEW seconds per second (a drift or a small step
    is absorbed, a timer is off by at most 0.05 %); a difference beyond `step_threshold_s` is a step, reported by
    `wall_offset_s` for the controller to alarm on. Dispatch windows from the grid are epoch times read on this
    clock: after a step they keep the timeline the agent had (a restart adopts the wall clock again).
    """

    def __init__(self, inner: Clock, *, step_threshold_s: float = STEP_THRESHOLD_S, max_slew: float = MAX_SLEW) -> None:
        if not 0.0 <= max_slew < 1.0:
            raise ValueError("max_slew must be in [0, 1): the agent's time never runs backwards")
        self.inner = inner
        self.scale = inner.scale
        self.step_threshold_s = step_threshold_s
        self.max_slew = max_slew
        self._mono = inner.monotonic()
        self._t = inner.time()

    def time(self) -> float:
        mono = self.inner.monotonic()
        elapsed = max(0.0, mono - self._mono)
        self._mono = max(self._mono, mono)
        t = self._t + elapsed
        slew = self.max_slew * elapsed
        self._t = t + min(slew, max(-slew, self.inner.time() - t))  # toward the wall, never faster than the slew
        return self._t

    def monotonic(self) -> float:
        return self.inner.monotonic()

    def wall(self) -> float:
        """The inner clock's wall reading (it may step)."""
        return self.inner.time()

    def wall_offset_s(self) -> float:
        """How far the wall clock is from the agent's time now (positive: the wall is ahead)."""
        return self.wall() - self.time()

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)

    def to_wall(self, seconds: float) -> float:
        return self.inner.to_wall(seconds)


def steady(clock: Clock) -> SteadyClock:
    """`clock` as a SteadyClock (itself if it is one already)."""
    return clock if isinstance(clock, SteadyClock) else SteadyClock(clock)


def make_clock(scale: float | None, origin: float | None = None) -> SteadyClock:
    inner: Clock = WallClock() if scale is None or scale == 1.0 else ScaledClock(scale, origin=origin)
    return SteadyClock(inner)


def boot_clock(clock: Clock) -> tuple[str, float] | None:
    """The host's boot id and the seconds since that boot on `clock`'s scale, or None where there is no such clock.

    CLOCK_BOOTTIME never steps and runs on across process restarts (and a suspend), so two readings on one boot
    measure how long the agent was down whatever the wall clock did meanwhile (failsafe.resume checks the wall
    clock against it). Linux only; elsewhere the wall clock alone is checked.
    """
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    boot_id = _boot_id()
    if boottime is None or boot_id is None:
        return None
    return boot_id, time.clock_gettime(boottime) * clock.scale


@functools.cache
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None
