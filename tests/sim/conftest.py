"""Helpers for the simulator's own tests. Each test module starts its own site in its own slice of the sim
helper's loopback range (127.10.0.0 – 127.19.255.255)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from hashflex.sim.testing import SimProcess

T = TypeVar("T")


def truth_of(sim: SimProcess, ip: str) -> dict[str, Any]:
    return next(m for m in sim.truth()["miners"] if m["ip"] == ip)


def ips_of(sim: SimProcess, family: str) -> list[str]:
    return [m["ip"] for m in sim.truth()["miners"] if m["family"] == family]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
