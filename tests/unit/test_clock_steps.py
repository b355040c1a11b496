"""The agent's time never steps with the wall clock (issue 11, finding 4): SteadyClock, on a clock whose wall reading
the test steps while its monotonic reading runs on."""

from __future__ import annotations

import time

import pytest

from hashflex.agent.core.timeline import STEP_THRESHOLD_S
from hashflex.agent.runtime.clock import MAX_SLEW, ScaledClock, SteadyClock, make_clock, steady

T0 = 1_760_000_000.0


class SteppingClock:
    """A wall reading the test can step, and a monotonic reading that only runs forward with `advance`."""

    scale = 1.0

    def __init__(self, wall: float = T0) -> None:
        self.wall, self.mono = wall, 100.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        return None

    def to_wall(self, seconds: float) -> float:
        return seconds

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.wall += seconds


@pytest.mark.parametrize("step_s", [-30.0, 3600.0, -3600.0])
def test_a_wall_step_moves_the_agents_time_by_the_elapsed_time_only(step_s: float) -> None:
    inner = SteppingClock()
    clock = SteadyClock(inner)
    before = clock.time()
    inner.advance(10.0)
    inner.step(step_s)
    inner.advance(5.0)
    after = clock.time()
    assert after - before == pytest.approx(15.0, abs=15.0 * MAX_SLEW + 1e-9)
    assert clock.wall_offset_s() == pytest.approx(step_s, abs=1.0)
    assert abs(clock.wall_offset_s()) > STEP_THRESHOLD_S


def test_the_agents_time_never_runs_backwards_and_slews_toward_the_wall() -> None:
    inner = SteppingClock()
    clock = SteadyClock(inner)
    inner.step(-30.0)
    last = clock.time()
    for _ in range(1000):
        inner.advance(1.0)
        now = clock.time()
        assert now - last >= 1.0 - MAX_SLEW - 1e-9  # every second counts at least (1 − slew) s
        last = now
    # 1,000 s at the slew limit took back 0.5 s of the 30 s step: a timer is off by at most 0.05 %
    assert clock.wall_offset_s() == pytest.approx(-30.0 + 1000 * MAX_SLEW, abs=1e-3)


def test_a_small_drift_is_absorbed() -> None:
    inner = SteppingClock()
    clock = SteadyClock(inner)
    inner.step(0.2)  # below the step threshold: e.g. NTP corrects a drift
    for _ in range(500):
        inner.advance(1.0)
        clock.time()
    assert clock.wall_offset_s() == pytest.approx(0.0, abs=1e-3)


def test_the_scaled_simulation_clock_keeps_working() -> None:
    clock = make_clock(20.0)
    assert isinstance(clock, SteadyClock)
    assert clock.scale == 20.0
    t0 = clock.time()
    time.sleep(0.05)
    elapsed = clock.time() - t0
    assert 0.9 < elapsed < 5.0  # ~1 site second in 0.05 wall seconds
    assert abs(clock.wall_offset_s()) < 0.01  # a scaled clock has no steps of its own
    assert clock.to_wall(20.0) == 1.0
    inner = ScaledClock(20.0, origin=T0)
    assert abs(SteadyClock(inner).time() - inner.time()) < 0.01
    assert steady(clock) is clock
