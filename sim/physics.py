"""A physical model of one miner: power follows the setting through piecewise-linear ramps, hashrate follows power
along an efficiency curve (J/TH improves when under-clocked), temperatures and fans follow power.

Everything here is a pure function of the sim time passed in, so a run is deterministic for a given seed and
the energy integral is exact (trapezoids over the ramp breakpoints)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from hashflex.sim.catalogue import ModelSpec

# hashrate ∝ power^EXPONENT: with 0.75, J/TH ∝ P^0.25, so a unit at 70 % power is ~9 % more efficient per TH
EXPONENT = 0.75
AMBIENT_C = 25.0
DOWN_RAMP_S = 5.0  # a lower setting takes effect within seconds
UP_RAMP_S = 20.0  # retuning upwards is slower
SLEEP_RAMP_S = 4.0
BOOT_SHARE = 0.3  # first 30 % of a wake-up is booting the control board and boards at a few % power
BOOT_POWER_SHARE = 0.05


@dataclass(frozen=True)
class PhysicsParams:
    wake_s: float = 180.0  # sim seconds from wake command to full power
    reboot_s: float = 90.0  # sim seconds offline during a reboot


def hashrate_at(spec: ModelSpec, watts: float, ths_factor: float = 1.0) -> float:
    """TH/s a healthy unit makes at `watts` (its setting, not its wall draw)."""
    if watts <= 0:
        return 0.0
    return float(spec.nominal_ths * ths_factor * (watts / spec.nominal_w) ** EXPONENT)


@dataclass
class MinerPhysics:
    spec: ModelSpec
    params: PhysicsParams
    rng_seed: str
    setpoint_w: float = 0.0  # the power the current setting asks for while hashing
    state: str = "hashing"  # hashing | sleeping | waking | offline
    state_until: float = 0.0  # waking → hashing / offline → waking at this sim time
    wake_began: float | None = None  # the sim time of the last wake from sleep (or cold boot): what a watcher records
    drift: float = 0.0  # fault: fraction drawn above the setting
    energy_j: float = 0.0
    _points: list[tuple[float, float]] = field(default_factory=list)  # power breakpoints (t, W)
    _t_acc: float = 0.0  # energy integrated up to here

    def __post_init__(self) -> None:
        rng = random.Random(self.rng_seed)
        # unit-to-unit spread: PSU efficiency and chip bin
        self.power_factor = 1.0 + rng.uniform(-0.02, 0.02)
        self.ths_factor = 1.0 + rng.uniform(-0.025, 0.025)
        self.temp_offset = rng.uniform(-2.5, 2.5)
        self.fan_offset = rng.randint(-120, 120)
        if self.setpoint_w <= 0:
            self.setpoint_w = self.spec.nominal_w
        self._points = [(0.0, self._draw(self.setpoint_w))]

    # -- evaluation ---------------------------------------------------------------------------------------
    def _draw(self, setting_w: float) -> float:
        return setting_w * self.power_factor * (1.0 + self.drift)

    def power_w(self, t: float) -> float:
        pts = self._points
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, p0), (t1, p1) in itertools.pairwise(pts):
            if t < t1:
                return p0 + (p1 - p0) * (t - t0) / (t1 - t0)
        return pts[-1][1]

    def current_state(self, t: float) -> str:
        if self.state == "waking" and t >= self.state_until:
            return "hashing"
        if self.state == "offline" and t >= self.state_until:
            return "waking"  # the site reboots it; until then it is just booting
        return self.state

    def hashrate_ths(self, t: float) -> float:
        state = self.current_state(t)
        if state in ("sleeping", "offline"):
            return 0.0
        full = hashrate_at(self.spec, self.setpoint_w, self.ths_factor)
        if state == "hashing":
            # a limit change ramps: hashrate tracks the draw
            target = self._draw(self.setpoint_w)
            p = self.power_w(t)
            if target > 0 and abs(p - target) > 1.0:
                return hashrate_at(self.spec, p / self.power_factor / (1.0 + self.drift), self.ths_factor)
            return full
        boot = self._draw(self.setpoint_w) * BOOT_POWER_SHARE
        p = self.power_w(t)
        span = self._draw(self.setpoint_w) - boot
        share = 0.0 if span <= 0 else max(0.0, min(1.0, (p - boot) / span))
        return full * share

    def energy_at(self, t: float) -> float:
        """Joules consumed since the start, up to sim time t."""
        return self.energy_j + self._integrate(self._t_acc, t)

    def _integrate(self, ta: float, tb: float) -> float:
        if tb <= ta:
            return 0.0
        # breakpoints inside (ta, tb) plus the ends; power is linear between them
        ts = [ta] + [bt for bt, _ in self._points if ta < bt < tb] + [tb]
        total = 0.0
        for a, b in itertools.pairwise(ts):
            total += (self.power_w(a) + self.power_w(b)) * 0.5 * (b - a)
        return total

    def temps(self, t: float) -> tuple[float, float]:
        """(board °C, chip °C); they follow the draw."""
        share = self.power_w(t) / self.spec.nominal_w
        board = AMBIENT_C + 33.0 * share + self.temp_offset
        return board, board + 16.0 * share

    def fan_rpm(self, t: float) -> int:
        state = self.current_state(t)
        if state == "offline":
            return 0
        share = self.power_w(t) / self.spec.nominal_w
        return max(0, int(1500 + 4300 * min(share, 1.2)) + self.fan_offset)

    # -- changes ------------------------------------------------------------------------------------------
    def _rebase(self, t: float, path: list[tuple[float, float]]) -> None:
        """Replace the power path from t on with `path` (starting from the present draw)."""
        self.energy_j = self.energy_at(t)
        self._t_acc = t
        self._points = [(t, self.power_w(t)), *path]

    def set_setpoint(self, t: float, watts: float) -> None:
        state = self.current_state(t)
        old = self.setpoint_w
        self.setpoint_w = watts
        if state == "hashing":
            ramp = DOWN_RAMP_S if watts < old else UP_RAMP_S
            self._rebase(t, [(t + ramp, self._draw(watts))])
        elif state == "waking":
            self._start_wake(t, self.state_until - t)

    def sleep(self, t: float) -> None:
        if self.current_state(t) == "offline":
            return
        self.state = "sleeping"
        self._rebase(t, [(t + SLEEP_RAMP_S, self.spec.sleep_w)])

    def wake(self, t: float) -> None:
        state = self.current_state(t)
        if state in ("hashing", "waking", "offline"):
            return
        self.wake_began = t
        self._start_wake(t, self.params.wake_s)

    def _start_wake(self, t: float, duration: float) -> None:
        duration = max(duration, 1.0)
        self.state = "waking"
        self.state_until = t + duration
        settle = min(1.0, duration * 0.1)
        boot_end = t + max(duration * BOOT_SHARE, settle * 2)
        full = self._draw(self.setpoint_w)
        boot = full * BOOT_POWER_SHARE
        self._rebase(t, [(t + settle, boot), (boot_end, boot), (t + duration, full)])

    def go_offline(self, t: float, duration: float) -> None:
        self.state = "offline"
        self.state_until = t + duration
        self._rebase(t, [(t + 0.5, 0.0)])

    def boot(self, t: float, setpoint_w: float) -> None:
        """Back from a reboot at the firmware defaults: hashing again after a full wake-up."""
        self.setpoint_w = setpoint_w
        self.state = "sleeping"  # so _start_wake runs from a cold start
        self.wake_began = t
        self._start_wake(t, self.params.wake_s)

    def set_drift(self, t: float, drift: float) -> None:
        self.drift = drift
        state = self.current_state(t)
        if state == "hashing":
            self._rebase(t, [(t + DOWN_RAMP_S, self._draw(self.setpoint_w))])
        elif state == "waking":
            self._start_wake(t, self.state_until - t)

    def settle(self, t: float) -> None:
        """Fold lazily-due state changes (waking → hashing) into the stored state."""
        self.state = self.current_state(t) if self.state != "offline" else self.state
