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
- *source* of a minute's kWh: `metered` (the site meter's import counter), `miners` (no meter: the miners' sum),
  `fallback` (a meter, but no counter for that minute: the miners' sum). See `MeteredEnergy` below.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

MINUTE_S = 60
QUARTER_S = 900
HOUR_S = 3600
DAY_S = 86400
J_PER_KWH = 3.6e6
METERED, MINERS, FALLBACK = "metered", "miners", "fallback"
SOURCES = (METERED, MINERS, FALLBACK)  # from the most direct to the least: a merged minute takes the least direct


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
    # with a site meter (MeteredEnergy): `kwh` is metered_kwh + carried_kwh on a metered minute, the miners' sum
    # (measured + estimated, always kept beside it) on a fallback one
    source: str = MINERS
    metered_kwh: float = 0.0  # the counter's delta over the minute's own time (metered minutes only)
    carried_kwh: float = 0.0  # counter energy of earlier time no metered minute holds, booked here (see below)

    @property
    def miners_kwh(self) -> float:
        return self.measured_kwh + self.estimated_kwh


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
    metered_kwh: float = 0.0
    carried_kwh: float = 0.0
    # over the metered minutes: what the meter counted beyond the miners' sum (cooling, losses, base load, and
    # whatever the miners' own reports miss); negative if the miners report more than the meter counts
    gap_kwh: float = 0.0
    metered_minutes: int = 0
    fallback_minutes: int = 0

    @property
    def end(self) -> int:
        return self.start + self.seconds

    @property
    def miners_kwh(self) -> float:
        """The miners' sum over the whole period, whatever the source of `kwh`."""
        return self.measured_kwh + self.estimated_kwh

    @property
    def source(self) -> str:
        """`metered` when every minute is; `fallback` when any minute fell back to the miners' sum; else `miners`."""
        if self.fallback_minutes:
            return FALLBACK
        return METERED if self.minutes and self.metered_minutes == self.minutes else MINERS

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

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "start": self.start,
            "end": self.end,
            "kwh": self.kwh,
            "source": self.source,
            "metered_kwh": self.metered_kwh,
            "carried_kwh": self.carried_kwh,
            "miners_kwh": self.miners_kwh,
            "gap_kwh": self.gap_kwh,
            "metered_minutes": self.metered_minutes,
            "fallback_minutes": self.fallback_minutes,
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


_SUMS = 13  # the additive fields of a period, in _add's order (peak is a maximum)


def _add(row: list[float], p: EnergyPeriod | EnergyMinute) -> None:
    """Add a minute (or a period) into a row of sums."""
    if isinstance(p, EnergyMinute):
        metered = p.source == METERED
        gap = p.metered_kwh - p.miners_kwh if metered else 0.0
        counts = (1.0, 1.0 if metered else 0.0, 1.0 if p.source == FALLBACK else 0.0)
    else:
        gap, counts = p.gap_kwh, (float(p.minutes), float(p.metered_minutes), float(p.fallback_minutes))
    values = (
        p.kwh,
        p.measured_kwh,
        p.estimated_kwh,
        p.covered_s,
        p.curtailed_s,
        p.baseline_kwh,
        p.not_drawn_kwh,
        p.metered_kwh,
        p.carried_kwh,
        gap,
        *counts,
    )
    for i, v in enumerate(values):
        row[i] += v
    row[_SUMS] = max(row[_SUMS], p.peak_kw)


def _period(start: int, seconds: int, r: list[float]) -> EnergyPeriod:
    return EnergyPeriod(
        start,
        seconds,
        kwh=r[0],
        measured_kwh=r[1],
        estimated_kwh=r[2],
        covered_s=r[3],
        curtailed_s=r[4],
        baseline_kwh=r[5],
        not_drawn_kwh=r[6],
        peak_kw=r[_SUMS],
        minutes=int(r[10]),
        metered_kwh=r[7],
        carried_kwh=r[8],
        gap_kwh=r[9],
        metered_minutes=int(r[11]),
        fallback_minutes=int(r[12]),
    )


def rollup(minutes: Iterable[EnergyMinute], period_s: int, offset_s: int = 0) -> list[EnergyPeriod]:
    """Sum minutes into periods of `period_s` (a multiple of 60), in time order; periods with no data are left out."""
    if period_s <= 0 or period_s % MINUTE_S:
        raise ValueError(f"period must be a positive multiple of 60 s, got {period_s}")
    acc: dict[int, list[float]] = {}
    for m in minutes:
        key = period_start(m.minute_ts, period_s, offset_s)
        row = acc.get(key)
        if row is None:
            row = acc[key] = [0.0] * (_SUMS + 1)
        _add(row, m)
    return [_period(start, period_s, r) for start, r in sorted(acc.items())]


def total(periods: Iterable[EnergyPeriod | EnergyMinute], start: int, seconds: int) -> EnergyPeriod:
    """One period over everything given (minutes or periods), labelled [start, start + seconds)."""
    row = [0.0] * (_SUMS + 1)
    for p in periods:
        _add(row, p)
    return _period(start, seconds, row)


@dataclass(frozen=True, slots=True)
class MinerTotal:
    kwh: float
    estimated_kwh: float  # the part of kwh from minutes the agent estimated
    minutes: int


# ---------------------------------------------------------------------------------------------- the site meter
@dataclass(frozen=True, slots=True)
class CounterReading:
    """One good reading of the site meter's import counter, at the caller's time `ts`."""

    ts: float
    wh: float
    epoch: int = 0  # the meter adapter's counter epoch: no delta is taken across two


class MeteredEnergy:
    """Energy from the site meter's import counter, with the miners' sum beside it.

    The miners' minutes (EnergyIntegrator) are held here until the counter has been read past their end, then
    released with a source:
    - *metered*: the counter covers the minute (less `slack_s`): kWh = its delta over the minute (a delta between two
      readings is spread over the time between them, split at minute boundaries: the trapezoid of the mean power).
    - *fallback*: the counter does not cover it (the meter stale, failed, refusing readings) within `wait_s` of its
      end: kWh = the miners' sum, marked so. A minute is never held longer than that: its quarter hour is pinned
      into the audit chain as it closes, so it cannot be rewritten when the meter comes back.

    Across a stale span the counter keeps counting. Its delta over time the fallback minutes hold (and over time no
    stored minute holds: the sweep stopped) is *carried*: booked, less what the fallback minutes already counted, in
    `carried_kwh` of the first metered minute after it, where the meter is read again. So the kWh of a run add up to
    the counter's delta (the counter is exact over any span; only where in the span it was drawn is unknown), each
    minute says which source it used, and a reader can spread the carried energy back over the span if they want.
    Never negative: a remainder below zero (the miners reported more than the meter counted over the span) is not
    booked, since the fallback minutes are pinned; it is counted in `overcount_kwh` for the log.

    A counter that went back, changed epoch (a reset or replaced meter, accepted by the adapter) or rose more than
    `max_kw` can draw in the time plus `wait_s` (the adapter refuses these; this is the net) is a break: nothing is
    taken across it, the minutes over it fall back, and what was owed from before it is dropped (`dropped_kwh`).
    A span between readings that the meter was seen stale in (`mark_stale`), or longer than `max_gap_s`, is not
    spread (its delta is carried): where in a stale span the energy was drawn is not known, so no minute in it is
    called metered. With `wait_s` the meter's own stale time, a minute waits past its end only while the meter is
    stale: a fresh meter's last reading is never older than that, so it has passed the minute's end by then.
    """

    def __init__(self, *, max_gap_s: float, wait_s: float, slack_s: float = 1.0, max_kw: float | None = None) -> None:
        for name, value in (("max_gap_s", max_gap_s), ("wait_s", wait_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(slack_s) and slack_s >= 0):
            raise ValueError(f"slack_s must be a finite number >= 0, got {slack_s!r}")
        if max_kw is not None and not (math.isfinite(max_kw) and max_kw > 0):
            raise ValueError(f"max_kw must be a finite number > 0, got {max_kw!r}")
        self.max_gap_s, self.wait_s, self.slack_s, self.max_kw = max_gap_s, wait_s, slack_s, max_kw
        self._prev: CounterReading | None = None
        self._parts: dict[int, list[float]] = {}  # minute -> [counter kWh, seconds covered]
        self._held: list[ClosedMinute] = []
        self._decided_to = -math.inf  # the end of the last minute released
        self._owed_kwh = 0.0  # counter energy over time no metered minute holds, since _owed_from
        self._owed_fallback_kwh = 0.0  # what the fallback minutes counted over that time
        self._owed_from: float | None = None
        self._breaks: list[tuple[float, float]] = []  # spans the counter cannot account for
        self._stale_seen = False
        self.overcount_kwh = 0.0
        self.dropped_kwh = 0.0

    @property
    def through(self) -> float | None:
        """The counter is known up to this time."""
        return None if self._prev is None else self._prev.ts

    @property
    def fallback_kwh(self) -> float:
        """What the fallback minutes since the last metered one counted (the miners' sum), to be reconciled."""
        return self._owed_fallback_kwh

    @property
    def owed_kwh(self) -> float:
        """Counter energy waiting for the next metered minute, less what fallback minutes counted for it."""
        return self._owed_kwh - self._owed_fallback_kwh

    def add_reading(self, r: CounterReading) -> None:
        if not (math.isfinite(r.ts) and math.isfinite(r.wh)) or r.wh < 0:
            raise ValueError(f"a counter reading must be finite and >= 0: {r!r}")
        prev = self._prev
        if prev is not None and r.ts <= prev.ts:
            return  # the same reading again, or a clock step back
        self._prev = r
        if prev is None:
            return
        dt, kwh = r.ts - prev.ts, (r.wh - prev.wh) / 1000.0
        # the slack: a reading's time is when its reply came, the count a little older (the meter's measuring
        # interval, the network); the adapter refuses a jump on its own, this is the net for an absurd one
        if (
            r.epoch != prev.epoch
            or kwh < 0
            or (self.max_kw is not None and kwh > self.max_kw * (dt + self.wait_s) / HOUR_S)
        ):
            self._breaks.append((prev.ts, r.ts))
        elif dt > self.max_gap_s or self._stale_seen:
            self._owe(kwh, prev.ts)
        else:
            self._spread(prev.ts, r.ts, kwh)
        self._stale_seen = False

    def mark_stale(self) -> None:
        """The meter was seen stale (no good reading for its stale time): the span from the last reading to the next
        is a stale span, whatever its length; its delta is carried, not spread."""
        if self._prev is not None:
            self._stale_seen = True

    def _owe(self, kwh: float, since: float) -> None:
        self._owed_kwh += kwh
        self._owed_from = since if self._owed_from is None else min(self._owed_from, since)

    def _spread(self, t0: float, t1: float, kwh: float) -> None:
        a = t0
        while a < t1:
            minute = int(a // MINUTE_S) * MINUTE_S
            b = min(t1, minute + MINUTE_S)
            part = kwh * (b - a) / (t1 - t0)
            if minute + MINUTE_S <= self._decided_to:
                self._owe(part, a)  # a minute already released (as fallback): carried
            else:
                cell = self._parts.setdefault(minute, [0.0, 0.0])
                cell[0] += part
                cell[1] += b - a
            a = b

    def add_minutes(self, closed: Iterable[ClosedMinute]) -> None:
        self._held.extend(closed)

    def release(self, now: float) -> list[ClosedMinute]:
        """The held minutes the counter has passed, or that waited `wait_s` past their end, in order."""
        out: list[ClosedMinute] = []
        while self._held:
            end = self._held[0][0].minute_ts + MINUTE_S
            if not (now - end >= self.wait_s or (self._prev is not None and self._prev.ts >= end)):
                break
            out.append(self._decide(*self._held.pop(0)))
        return out

    def flush(self) -> list[ClosedMinute]:
        """Release every held minute with what is known (on stop); what is still owed is dropped."""
        out = [self._decide(*held) for held in self._held]
        self._held.clear()
        if self._owed_kwh or self._owed_fallback_kwh:
            self.dropped_kwh += max(0.0, self.owed_kwh)
            self._owed_kwh = self._owed_fallback_kwh = 0.0
            self._owed_from = None
        return out

    def _decide(self, m: EnergyMinute, per_miner: dict[str, MinerMinute]) -> ClosedMinute:
        start = m.minute_ts
        for minute in [k for k in self._parts if k < start]:  # counter time no stored minute holds
            self._owe(self._parts.pop(minute)[0], minute)
        kwh, covered = self._parts.pop(start, (0.0, 0.0))
        self._decided_to = max(self._decided_to, start + MINUTE_S)
        if covered <= 0 or covered < m.covered_s - self.slack_s:
            self._owe(kwh, start)
            self._owed_fallback_kwh += m.kwh
            return replace(m, source=FALLBACK, metered_kwh=0.0, carried_kwh=0.0), per_miner
        carried = 0.0
        if self._owed_from is not None:
            since = self._owed_from
            if any(b0 < start and b1 > since for b0, b1 in self._breaks):
                self.dropped_kwh += max(0.0, self.owed_kwh)  # the counter's delta over the span is unknown
            elif self.owed_kwh < 0:
                self.overcount_kwh -= self.owed_kwh
            else:
                carried = self.owed_kwh
            self._owed_kwh = self._owed_fallback_kwh = 0.0
            self._owed_from = None
        self._breaks = [b for b in self._breaks if b[1] > start]
        return replace(m, kwh=kwh + carried, source=METERED, metered_kwh=kwh, carried_kwh=carried), per_miner
