"""Energy accounting. Pure: power samples in (with the caller's timestamps), kWh per minute and rollups out.

Power is integrated with the trapezoid rule between consecutive samples and split exactly at minute
boundaries, so the per-miner minutes of a site add up to the site minute when the site sample is the sum of
the miners' samples (the rule is linear). A gap longer than `max_gap_s` between samples (the agent was down,
the sweep hung) is not bridged: those seconds are counted as not covered rather than guessed.

Words:
- *measured*: watts the miners reported themselves (or a site meter, when there is one);
  *estimated*: the agent's figure for miners that report none (stock firmware) or whose reading is stale.
- *curtailed*: a dispatch, an operator override, a schedule window or the fail-safe holds the site below
  what it would otherwise draw. Time under curtailment is counted from the flag of the sample that opens
  each interval.
- *not drawn*: the flexibility delivered: ∫ max(0, baseline − power) over curtailed time, the baseline
  being what the site would have drawn without the dispatch (handed in by the runtime with each sample).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MINUTE_S = 60
QUARTER_S = 900
HOUR_S = 3600
DAY_S = 86400
J_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class SiteSample:
    ts: float
    measured_w: float  # sum of watts reported by the miners themselves (or a meter)
    estimated_w: float  # the agent's estimate for miners that report no power or are stale
    curtailed: bool = False
    baseline_w: float | None = None  # what the site would draw without the dispatch; used while curtailed

    @property
    def total_w(self) -> float:
        return self.measured_w + self.estimated_w


@dataclass(frozen=True, slots=True)
class EnergyMinute:
    """One minute of the site. `minute_ts` is the start of the minute (epoch seconds, a multiple of 60)."""

    minute_ts: int
    kwh: float
    measured_kwh: float
    estimated_kwh: float
    covered_s: float  # seconds of the minute with samples on both sides
    curtailed_s: float
    baseline_kwh: float  # the baseline integrated over the curtailed seconds
    not_drawn_kwh: float  # energy not drawn because of dispatch
    peak_kw: float
    samples: int


@dataclass(frozen=True, slots=True)
class MinerMinute:
    kwh: float
    measured: bool  # every sample of the minute was reported by the miner


# (power_w, measured) per miner address
MinerSamples = Mapping[str, tuple[float, bool]]


@dataclass(slots=True)
class _Acc:
    kwh: float = 0.0
    measured: float = 0.0
    estimated: float = 0.0
    covered: float = 0.0
    curtailed: float = 0.0
    baseline: float = 0.0
    not_drawn: float = 0.0
    peak_kw: float = 0.0
    samples: int = 0
    miners: dict[str, list[float]] = field(default_factory=dict)  # ip -> [kwh, measured(1.0|0.0)]


ClosedMinute = tuple[EnergyMinute, dict[str, MinerMinute]]


class EnergyIntegrator:
    """Feed samples in time order; get back each minute once a later sample has closed it."""

    def __init__(self, *, max_gap_s: float = 120.0) -> None:
        if not max_gap_s > 0:
            raise ValueError("max_gap_s must be > 0")
        self.max_gap_s = max_gap_s
        self._prev: SiteSample | None = None
        self._prev_miners: dict[str, tuple[float, bool]] = {}
        self._open: dict[int, _Acc] = {}

    def add(self, sample: SiteSample, miners: MinerSamples | None = None) -> list[ClosedMinute]:
        """Integrate up to `sample`; samples not later than the last one are ignored (a clock step back)."""
        for value in (sample.ts, sample.measured_w, sample.estimated_w):
            if not math.isfinite(value):
                raise ValueError(f"sample values must be finite: {sample!r}")
        if sample.measured_w < 0 or sample.estimated_w < 0:
            raise ValueError(f"power must not be negative: {sample!r}")
        current = dict(miners) if miners is not None else {}
        prev = self._prev
        if prev is not None and sample.ts <= prev.ts:
            return []
        closed: list[ClosedMinute] = []
        if prev is not None and sample.ts - prev.ts > self.max_gap_s:
            closed = self._close(math.inf)
        elif prev is not None:
            self._integrate(prev, self._prev_miners, sample, current)
        self._mark(sample)
        self._prev, self._prev_miners = sample, current
        return closed + self._close(sample.ts)

    def close_until(self, ts: float) -> list[ClosedMinute]:
        """Close every minute that ended by `ts` (and all, with ts=inf): on stop, flush what is known."""
        return self._close(ts)

    def _acc(self, minute: int) -> _Acc:
        acc = self._open.get(minute)
        if acc is None:
            acc = self._open[minute] = _Acc()
        return acc

    def _mark(self, sample: SiteSample) -> None:
        acc = self._acc(int(sample.ts // MINUTE_S) * MINUTE_S)
        acc.samples += 1
        acc.peak_kw = max(acc.peak_kw, sample.total_w / 1000.0)

    def _integrate(
        self, s0: SiteSample, m0: Mapping[str, tuple[float, bool]], s1: SiteSample, m1: Mapping[str, tuple[float, bool]]
    ) -> None:
        t0, t1 = s0.ts, s1.ts
        dt = t1 - t0
        a = t0
        while a < t1:
            minute = int(a // MINUTE_S) * MINUTE_S
            b = min(t1, minute + MINUTE_S)
            span = b - a
            mid = ((a - t0) + (b - t0)) / (2 * dt)  # where the segment's mean sits between the two samples
            w0, w1 = span * (1 - mid) / J_PER_KWH, span * mid / J_PER_KWH  # kWh per watt at each end
            acc = self._acc(minute)
            measured = w0 * s0.measured_w + w1 * s1.measured_w
            estimated = w0 * s0.estimated_w + w1 * s1.estimated_w
            acc.measured += measured
            acc.estimated += estimated
            acc.kwh += measured + estimated
            acc.covered += span
            if s0.curtailed:
                base0 = s0.baseline_w if s0.baseline_w is not None else s0.total_w
                base1 = s1.baseline_w if s1.baseline_w is not None else base0
                baseline = w0 * base0 + w1 * base1
                acc.curtailed += span
                acc.baseline += baseline
                acc.not_drawn += max(0.0, baseline - (measured + estimated))
            self._integrate_miners(acc, w0, w1, m0, m1)
            a = b

    @staticmethod
    def _integrate_miners(
        acc: _Acc, w0: float, w1: float, m0: Mapping[str, tuple[float, bool]], m1: Mapping[str, tuple[float, bool]]
    ) -> None:
        miners = acc.miners
        for ip, (p1, ok1) in m1.items():
            p0, ok0 = m0.get(ip, (p1, ok1))  # a miner new in this sample: hold its first value back
            cell = miners.get(ip)
            measured = 1.0 if ok0 and ok1 else 0.0
            if cell is None:
                miners[ip] = [w0 * p0 + w1 * p1, measured]
            else:
                cell[0] += w0 * p0 + w1 * p1
                if not measured:
                    cell[1] = 0.0
        for ip, (p0, ok0) in m0.items():
            if ip in m1:
                continue
            cell = miners.get(ip)  # gone from this sample: hold its last value forward
            if cell is None:
                miners[ip] = [(w0 + w1) * p0, 1.0 if ok0 else 0.0]
            else:
                cell[0] += (w0 + w1) * p0
                if not ok0:
                    cell[1] = 0.0

    def _close(self, ts: float) -> list[ClosedMinute]:
        done = sorted(m for m in self._open if m + MINUTE_S <= ts)
        out: list[ClosedMinute] = []
        for minute in done:
            acc = self._open.pop(minute)
            if acc.covered <= 0:
                continue  # only a sample on its edge: nothing integrated
            out.append(
                (
                    EnergyMinute(
                        minute_ts=minute,
                        kwh=acc.kwh,
                        measured_kwh=acc.measured,
                        estimated_kwh=acc.estimated,
                        covered_s=acc.covered,
                        curtailed_s=acc.curtailed,
                        baseline_kwh=acc.baseline,
                        not_drawn_kwh=acc.not_drawn,
                        peak_kw=acc.peak_kw,
                        samples=acc.samples,
                    ),
                    {ip: MinerMinute(cell[0], cell[1] == 1.0) for ip, cell in acc.miners.items()},
                )
            )
        return out


# ---------------------------------------------------------------------------------------------- rollups
@dataclass(frozen=True, slots=True)
class EnergyPeriod:
    start: int  # epoch seconds
    seconds: int  # length of the period
    kwh: float
    measured_kwh: float
    estimated_kwh: float
    covered_s: float
    curtailed_s: float
    baseline_kwh: float
    not_drawn_kwh: float
    peak_kw: float
    minutes: int  # minutes with data

    @property
    def end(self) -> int:
        return self.start + self.seconds

    @property
    def coverage(self) -> float:
        """Share of the period with data."""
        return self.covered_s / self.seconds if self.seconds else 0.0

    @property
    def curtailed_share(self) -> float:
        """Share of the covered time under curtailment."""
        return self.curtailed_s / self.covered_s if self.covered_s else 0.0

    @property
    def estimated_share(self) -> float:
        return self.estimated_kwh / self.kwh if self.kwh else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "start": self.start,
            "end": self.end,
            "kwh": self.kwh,
            "measured_kwh": self.measured_kwh,
            "estimated_kwh": self.estimated_kwh,
            "covered_s": self.covered_s,
            "coverage": self.coverage,
            "curtailed_s": self.curtailed_s,
            "curtailed_share": self.curtailed_share,
            "baseline_kwh": self.baseline_kwh,
            "not_drawn_kwh": self.not_drawn_kwh,
            "peak_kw": self.peak_kw,
            "minutes": self.minutes,
        }


def period_start(ts: float, period_s: int, offset_s: int = 0) -> int:
    """Start of the period holding `ts`; periods are aligned to the epoch (UTC), shifted by `offset_s`."""
    return int((ts - offset_s) // period_s) * period_s + offset_s


def rollup(minutes: Iterable[EnergyMinute], period_s: int, offset_s: int = 0) -> list[EnergyPeriod]:
    """Sum minutes into periods of `period_s` (a multiple of 60), in time order; periods with no data are left out."""
    if period_s <= 0 or period_s % MINUTE_S:
        raise ValueError(f"period must be a positive multiple of 60 s, got {period_s}")
    acc: dict[int, list[float]] = {}
    for m in minutes:
        key = period_start(m.minute_ts, period_s, offset_s)
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0.0] * 10
        row[0] += m.kwh
        row[1] += m.measured_kwh
        row[2] += m.estimated_kwh
        row[3] += m.covered_s
        row[4] += m.curtailed_s
        row[5] += m.baseline_kwh
        row[6] += m.not_drawn_kwh
        row[7] = max(row[7], m.peak_kw)
        row[8] += 1
    return [
        EnergyPeriod(start, period_s, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], int(r[8]))
        for start, r in sorted(acc.items())
    ]


def total(periods: Iterable[EnergyPeriod | EnergyMinute], start: int, seconds: int) -> EnergyPeriod:
    """One period over everything given (minutes or periods), labelled [start, start + seconds)."""
    kwh = measured = estimated = covered = curtailed = baseline = not_drawn = peak = 0.0
    count = 0
    for p in periods:
        kwh += p.kwh
        measured += p.measured_kwh
        estimated += p.estimated_kwh
        covered += p.covered_s
        curtailed += p.curtailed_s
        baseline += p.baseline_kwh
        not_drawn += p.not_drawn_kwh
        peak = max(peak, p.peak_kw)
        count += p.minutes if isinstance(p, EnergyPeriod) else 1
    return EnergyPeriod(start, seconds, kwh, measured, estimated, covered, curtailed, baseline, not_drawn, peak, count)


@dataclass(frozen=True, slots=True)
class MinerTotal:
    kwh: float
    estimated_kwh: float  # the part of kwh from minutes the agent estimated
    minutes: int
