"""The site's clock: wall time scaled by --speed, so ramps that take minutes on hardware take seconds in tests."""

from __future__ import annotations

import time


class SimClock:
    """Sim time in seconds since start; `speed` sim seconds pass per wall second."""

    def __init__(self, speed: float = 1.0, *, epoch: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self._t0 = time.monotonic()
        # wall-clock epoch the firmware reports in "When" fields; advances at sim speed too
        self.epoch = time.time() if epoch is None else epoch

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    def unix(self) -> int:
        return int(self.epoch + self.now())

    def wall_delay(self, sim_seconds: float) -> float:
        """Wall seconds until `sim_seconds` of sim time have passed."""
        return max(0.0, sim_seconds / self.speed)
