"""What a miner hashes at a given power, and which power levels its capability allows.

The curve (generic and deliberately plausible; the simulator keeps its own truth):

    f = P / P_nominal
    hashrate(P) = H_nominal * f ** alpha                 for f >= floor        (alpha ≈ 0.75)
    hashrate(P) = H_nominal * floor ** alpha * f / floor for f <  floor        (floor ≈ 0.55)

Above the floor, lowering the power lowers the chip voltage with the clock, so J/TH improves as the miner is
under-clocked (at f = 0.55 the J/TH is 0.55 ** 0.25 ≈ 86 % of nominal). Below the floor the fixed overheads
(fans, control board, PSU losses at light load) eat the gain, so we assume efficiency stops improving and hashrate
is proportional to power. The curve is concave with hashrate(0) = 0, which the planner relies on: each watt added
to a miner buys no more hashrate than the watt before it, so "marginal TH per W" orders the choices consistently.
Above nominal (over-clocking) the same power law makes J/TH worse, which is also what the field sees.

Power levels: the planner never commands above a miner's stock (nominal) power — over-clocking is the operator's
choice, not the grid controller's — and its run levels start at the curve's floor (below it there is no gain over
fewer miners at the floor, only more machines cycling). A level under the floor is only the last resort for room
that no run level fits (`below_floor_w`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hashflex.drivers.base import Capability, OnOff, PowerRange, Presets


@dataclass(frozen=True, slots=True)
class EfficiencyCurve:
    alpha: float = 0.75  # hashrate ∝ power ** alpha above the floor
    floor_fraction: float = 0.55  # below this share of nominal power, efficiency stops improving

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 < self.floor_fraction <= 1.0:
            raise ValueError(f"floor_fraction must be in (0, 1], got {self.floor_fraction}")

    def ths_at(self, watts: float, nominal_w: float, nominal_ths: float) -> float:
        """Expected hashrate (TH/s) at `watts` for a miner rated (nominal_w, nominal_ths)."""
        if watts <= 0.0 or nominal_w <= 0.0 or nominal_ths <= 0.0:
            return 0.0
        f = watts / nominal_w
        if f >= self.floor_fraction:
            return float(nominal_ths * f**self.alpha)
        return float(nominal_ths * self.floor_fraction ** (self.alpha - 1.0) * f)

    def j_per_th(self, watts: float, nominal_w: float, nominal_ths: float) -> float:
        """Energy per terahash at `watts` (J/TH); infinite for a miner that hashes nothing."""
        ths = self.ths_at(watts, nominal_w, nominal_ths)
        return watts / ths if ths > 0.0 else math.inf


DEFAULT_CURVE = EfficiencyCurve()


def expected_ths(watts: float, nominal_w: float, nominal_ths: float, curve: EfficiencyCurve = DEFAULT_CURVE) -> float:
    return curve.ths_at(watts, nominal_w, nominal_ths)


# ---------------------------------------------------------------------------------------------- capability levels
def stock_w(capability: Capability, nominal_w: float) -> int:
    """The level a running miner that we never limited is taken to be at, and the highest level we command.

    PowerRange: nominal clamped into [min_w, max_w] and snapped down to the step; Presets: the highest preset not
    above nominal (the lowest preset if all are above); OnOff: nominal.
    """
    if isinstance(capability, PowerRange):
        return _snap_range(capability, nominal_w)
    if isinstance(capability, Presets):
        below = [w for w in capability.watts if w <= nominal_w]
        return max(below) if below else min(capability.watts)
    return round(nominal_w)


def self_step_ceiling_w(capability: Capability, nominal_w: float) -> int:
    """The most a miner's own firmware may move it to without a command from us, at or above stock_w().

    Presets: the highest preset. LuxOS ships with ATM (automatic tuning) enabled, and ATM steps the profile by
    itself, up to the highest profile (the simulator: +3 steps, ~+19 % of stock); a miner we cannot read may be
    there without anyone seeing it. PowerRange and OnOff: stock_w() (their firmware holds the limit it was given).
    """
    stock = stock_w(capability, nominal_w)
    if isinstance(capability, Presets):
        return max(stock, *capability.watts)
    return stock


def _snap_range(cap: PowerRange, watts: float) -> int:
    step = max(1, cap.step_w)
    clamped = min(max(watts, cap.min_w), cap.max_w)
    return cap.min_w + int((clamped - cap.min_w) // step) * step


def run_levels(capability: Capability, nominal_w: float, curve: EfficiencyCurve, points: int = 8) -> tuple[int, ...]:
    """Ascending run levels the planner chooses among (watts), lowest first; the last is stock_w().

    PowerRange: `points` evenly spaced levels from max(min_w, floor) to the stock level, snapped to the step (the
    planner may top one miner up to any step in between); Presets: the presets from the floor to stock (at least
    the lowest); OnOff: nominal only.
    """
    top = stock_w(capability, nominal_w)
    if isinstance(capability, OnOff):
        return (top,)
    floor_w = curve.floor_fraction * nominal_w
    if isinstance(capability, Presets):
        levels = sorted({w for w in capability.watts if floor_w <= w <= top})
        if not levels:
            levels = [min(capability.watts)]
        return tuple(levels)
    step = max(1, capability.step_w)
    low = capability.min_w if capability.min_w >= floor_w else _snap_up(capability, floor_w)
    low = min(low, top)
    if points <= 1 or top <= low:
        return (top,) if top <= low else (low, top)
    raw = {low + (top - low) * k / (points - 1) for k in range(points)}
    snapped = {min(top, low + int((w - low) // step) * step) for w in raw}
    return tuple(sorted(snapped | {top}))


def _snap_up(cap: PowerRange, watts: float) -> int:
    step = max(1, cap.step_w)
    k = math.ceil((watts - cap.min_w) / step)
    return min(cap.max_w, cap.min_w + max(0, k) * step)


def snap_down(capability: Capability, nominal_w: float, watts: float) -> int | None:
    """The highest level the capability allows at or below `watts` (None when even the lowest is above)."""
    if isinstance(capability, PowerRange):
        if watts < capability.min_w:
            return None
        return _snap_range(capability, watts)
    if isinstance(capability, Presets):
        below = [w for w in capability.watts if w <= watts]
        return max(below) if below else None
    return round(nominal_w) if watts >= nominal_w else None


def lowest_w(capability: Capability, nominal_w: float) -> int:
    """The least a running miner can be set to: a range's minimum, the lowest preset; an on/off miner's nominal."""
    if isinstance(capability, PowerRange):
        return capability.min_w
    if isinstance(capability, Presets):
        return min(capability.watts)
    return round(nominal_w)


def below_floor_w(capability: Capability, nominal_w: float, lowest_run_w: int, watts: float) -> int | None:
    """The highest level the firmware takes under `lowest_run_w` (the planner's lowest run level, at the curve's
    floor) and at most `watts`; None when there is none (on/off, or a range or presets that start at the floor).

    Below the floor the curve is linear: a miner there hashes at the floor's TH per W, no better, so the planner
    does not choose such a level over fewer miners at or above the floor. It is still far better than asleep: the
    last resort for room that no run level fits (planning.optimal._below_floor)."""
    level = snap_down(capability, nominal_w, min(watts, lowest_run_w - 1))
    return level if level is not None and 0 < level < lowest_run_w else None


def range_step(capability: Capability) -> int | None:
    """The fine step of a continuous range (None for presets and on/off)."""
    return max(1, capability.step_w) if isinstance(capability, PowerRange) else None
