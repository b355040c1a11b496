"""The grid as the simulated meter sees it: frequency (and the voltage level) along a path tests script.

The frequency path is a list of (sim time, Hz) breakpoints joined by straight lines (a step is two points at the
same time). A scripted event replaces the path from its start time on, like a miner's power path: `step`, `ramp`,
`dip` (fall, hold, recover) and `trace` (recorded (t, Hz) points, t relative to the start). Measurement noise is
added on top, seeded and a pure function of sim time, so a run is repeatable."""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

HZ_MIN, HZ_MAX = 40.0, 70.0  # what the model accepts: beyond it no grid is running
MAX_SPAN_S = 7 * 86400.0
MAX_TRACE_POINTS = 100_000


class GridSpecError(ValueError):
    pass


def _number(doc: dict[str, Any], key: str, default: float | None = None) -> float:
    value = doc.get(key, default)
    if value is None:
        raise GridSpecError(f"{key} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GridSpecError(f"{key} must be a finite number")
    return float(value)


def _hz(value: float, what: str) -> float:
    if not HZ_MIN <= value <= HZ_MAX:
        raise GridSpecError(f"{what} must be in [{HZ_MIN}, {HZ_MAX}] Hz")
    return value


def _duration(value: float, what: str) -> float:
    if not 0.0 <= value <= MAX_SPAN_S:
        raise GridSpecError(f"{what} must be in [0, {MAX_SPAN_S:g}] s")
    return value


@dataclass
class GridModel:
    nominal_hz: float = 50.0
    noise_hz: float = 0.002  # standard deviation of the measured frequency
    seed: int = 7
    _points: list[tuple[float, float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _hz(self.nominal_hz, "nominal frequency")
        if not 0.0 <= self.noise_hz <= 1.0:
            raise GridSpecError("frequency noise must be in [0, 1] Hz")
        self._points = [(0.0, self.nominal_hz)]

    def base_hz(self, t: float) -> float:
        """The frequency path without noise."""
        pts = self._points
        # the first breakpoint after t (at equal times the later one wins: a step is two points at one time)
        i = bisect.bisect_right(pts, t, key=lambda p: p[0])
        if i == 0:
            return pts[0][1]
        if i == len(pts):
            return pts[-1][1]
        (t0, h0), (t1, h1) = pts[i - 1], pts[i]
        return h0 + (h1 - h0) * (t - t0) / (t1 - t0)

    def hz(self, t: float) -> float:
        if self.noise_hz <= 0:
            return self.base_hz(t)
        # one noise value per 10 ms of sim time, the same whoever asks
        bucket = math.floor(t * 100.0)
        digest = hashlib.blake2b(f"{self.seed}:grid:{bucket}".encode(), digest_size=8).digest()
        return self.base_hz(t) + random.Random(digest).gauss(0.0, self.noise_hz)

    def _rebase(self, t0: float, path: list[tuple[float, float]]) -> None:
        start = self.base_hz(t0)
        kept = [p for p in self._points if p[0] < t0][-1000:]  # the past only matters back to the last reading
        self._points = [*kept, (t0, start), *path]

    def apply(self, doc: Any, now: float) -> dict[str, Any]:
        """Validate one event completely, then apply it. Raises GridSpecError (nothing changes)."""
        if not isinstance(doc, dict):
            raise GridSpecError("a grid event is an object")
        event = doc.get("event")
        allowed = {"event", "at_s"} | {
            "step": {"hz"},
            "ramp": {"hz", "duration_s"},
            "dip": {"depth_hz", "duration_s", "fall_s", "recover_s"},
            "trace": {"points"},
            "nominal": set(),
        }.get(str(event), set())
        if event not in ("step", "ramp", "dip", "trace", "nominal"):
            raise GridSpecError("event is one of step, ramp, dip, trace, nominal")
        unknown = set(doc) - allowed
        if unknown:
            raise GridSpecError(f"{event}: unknown keys {sorted(unknown)}")
        t0 = _number(doc, "at_s", now)
        if not now - 1e-9 <= t0 <= now + MAX_SPAN_S:
            raise GridSpecError("at_s must be now or later (sim time, s)")
        path: list[tuple[float, float]]
        if event == "nominal":
            path = [(t0, self.nominal_hz)]
        elif event == "step":
            path = [(t0, _hz(_number(doc, "hz"), "hz"))]
        elif event == "ramp":
            target = _hz(_number(doc, "hz"), "hz")
            path = [(t0 + _duration(_number(doc, "duration_s"), "duration_s"), target)]
        elif event == "dip":
            depth = _number(doc, "depth_hz")
            if not 0.0 < depth <= 10.0:
                raise GridSpecError("depth_hz must be in (0, 10]")
            hold = _duration(_number(doc, "duration_s"), "duration_s")
            fall = _duration(_number(doc, "fall_s", 0.0), "fall_s")
            recover = _duration(_number(doc, "recover_s", 0.0), "recover_s")
            before = self.base_hz(t0)
            low = _hz(before - depth, "the dip's bottom")
            path = [(t0 + fall, low), (t0 + fall + hold, low), (t0 + fall + hold + recover, before)]
        else:
            path = self._trace(doc.get("points"), t0)
        self._rebase(t0, path)
        record = {**doc, "at_s": round(t0, 6)}
        self.events.append(record)
        del self.events[:-50]
        return record

    @staticmethod
    def _trace(points: Any, t0: float) -> list[tuple[float, float]]:
        if not isinstance(points, list) or not 1 <= len(points) <= MAX_TRACE_POINTS:
            raise GridSpecError(f"points must be a list of 1 to {MAX_TRACE_POINTS} [t_s, hz] pairs")
        out: list[tuple[float, float]] = []
        last = 0.0
        for i, p in enumerate(points):
            if not isinstance(p, list | tuple) or len(p) != 2:
                raise GridSpecError(f"points[{i}] must be [t_s, hz]")
            t = _duration(_number({"t": p[0]}, "t"), f"points[{i}] time")
            if t < last:
                raise GridSpecError("trace times must not decrease")
            last = t
            out.append((t0 + t, _hz(_number({"hz": p[1]}, "hz"), f"points[{i}] frequency")))
        return out

    def describe(self, t: float) -> dict[str, Any]:
        ahead = [[round(pt, 6), round(h, 6)] for pt, h in self._points if pt >= t][:20]
        return {
            "hz": round(self.hz(t), 6),
            "base_hz": round(self.base_hz(t), 6),
            "nominal_hz": self.nominal_hz,
            "noise_hz": self.noise_hz,
            "path_ahead": ahead,
            "events": self.events[-10:],
        }
