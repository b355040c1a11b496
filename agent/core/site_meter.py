"""Control at the site meter: the miners' share of a site level, when the cap is held at the point of
interconnection and the meter there also counts what the miners do not report (cooling, losses, base load).

The non-miner load is what the meter reads minus what the miners report (metered − Σ miners). The planner holds
the miners to the site level minus that load at a worst case: its recent maximum (over a configured window, so a
pump cycling off for a minute does not hand its power to the miners) plus the cooling that would follow the miners
it plans to run above what they draw now (cooling lags the IT load, so the meter shows it only after the miners
have risen). With the meter stale or failed, the configured allowance stands in for the recent maximum.

    window = NonMinerWindow(900.0)
    miners.add(now, miners_kw)                     # SteadyMiners: sampled only while the miners' sum holds
    if miners.steady(band_kw):
        window.add(now, metered_kw - miners_kw)
    share = miner_level(site_level_kw, miners_now_kw=miners_kw, non_miner_kw=window.max_kw(now),
                        cooling_share=0.05)              # or non_miner_kw=allowance_kw when the meter is stale
    plan(share.miner_level_kw, ...)

Pure: no I/O, no clock of its own (times are passed in).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


class NonFiniteInput(ValueError):
    """An input that is NaN or infinite: refused, never planned with."""


def _finite(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise NonFiniteInput(f"{name} = {value!r}: must be a finite number")
    return float(value)


@dataclass(frozen=True, slots=True)
class MinerShare:
    """The miners' part of a site level, and what it keeps back for the rest of the site."""

    miner_level_kw: float  # what the planner may hold the miners to
    non_miner_worst_kw: float  # the non-miner load counted: base (recent max or allowance) + cooling to follow
    base_kw: float  # the recent maximum of the non-miner load (or the allowance), never below zero
    cooling_kw: float  # the cooling that would follow the miners' planned rise


def miner_level(site_level_kw: float, *, miners_now_kw: float, non_miner_kw: float, cooling_share: float) -> MinerShare:
    """The highest miner level L with L + base + cooling_share × max(0, L − miners_now) ≤ site_level (L ≥ 0).

    `non_miner_kw`: the recent maximum of metered − Σ miners, or the configured allowance when the meter is stale
    (a negative one, miners reporting above the meter, is counted as zero: the miners never get more than the
    site level). `miners_now_kw`: what the miners draw now; the cooling share is counted on a rise above it only
    (a fall lowers cooling later, and until then the meter and the recent maximum show it).
    """
    site = _finite("site_level_kw", site_level_kw)
    now = _finite("miners_now_kw", miners_now_kw)
    base = max(0.0, _finite("non_miner_kw", non_miner_kw))
    share = _finite("cooling_share", cooling_share)
    if share < 0:
        raise ValueError(f"cooling_share = {share!r}: must be at least 0")
    site, now = max(0.0, site), max(0.0, now)
    room = site - base  # the level with no rise above what the miners draw now
    # no rise: the room as it is; a rise of (L − now) brings share × (L − now) of cooling with it, so
    # L = now + (room − now) / (1 + share)
    level = max(0.0, room) if room <= now else now + (room - now) / (1.0 + share)
    cooling = share * max(0.0, level - now)
    return MinerShare(miner_level_kw=level, non_miner_worst_kw=base + cooling, base_kw=base, cooling_kw=cooling)


def counted_base(recent_max_kw: float, previous_kw: float | None, band_kw: float) -> float:
    """The non-miner load to count, from its recent maximum, with hysteresis: up at once to a new maximum (never
    less than it is counted), down only once the maximum has fallen more than `band_kw` below what is counted. A
    maximum that wanders by meter noise as samples age out of the window would otherwise move the miners' level,
    and with it their limits, every tick."""
    recent = _finite("recent_max_kw", recent_max_kw)
    band = max(0.0, _finite("band_kw", band_kw))
    if previous_kw is None:
        return recent
    previous = _finite("previous_kw", previous_kw)
    if recent >= previous or recent < previous - band:
        return recent
    return previous


class SteadyMiners:
    """The miners' own sum over the last `span_s`: has it held within a band? The meter's figure lags the miners'
    readings (its averaging interval and poll, the fleet's sweep): while the miners' sum moves, metered − Σ miners
    mixes a meter figure from before the change with a sum from after it. A shed of 25 % read that way looked like
    25 % more non-miner load; counted at its recent maximum, it slept as many miners again (demo, a frequency
    stage shed twice over). Non-miner samples are taken only while the sum is steady."""

    def __init__(self, span_s: float) -> None:
        span = _finite("span_s", span_s)
        if span < 0:
            raise ValueError(f"span_s = {span!r}: must be at least 0")
        self.span_s = span
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, at: float, kw: float) -> None:
        at, kw = _finite("at", at), _finite("kw", kw)
        if self._samples and at < self._samples[-1][0]:
            at = self._samples[-1][0]
        self._samples.append((at, kw))
        while len(self._samples) > 1 and at - self._samples[1][0] >= self.span_s:
            self._samples.popleft()  # keeps one sample at or before the span's start: the sum it began with

    def steady(self, band_kw: float) -> bool:
        band = max(0.0, _finite("band_kw", band_kw))
        if not self._samples:
            return True
        values = [kw for _, kw in self._samples]
        return max(values) - min(values) <= band


class NonMinerWindow:
    """The recent maximum of the non-miner load: samples (time, kW) kept for `window_s`; `max_kw` is the largest
    of those within the window (a monotonic deque: O(1) amortised per sample)."""

    def __init__(self, window_s: float) -> None:
        window = _finite("window_s", window_s)
        if window <= 0:
            raise ValueError(f"window_s = {window!r}: must be above 0")
        self.window_s = window
        self._samples: deque[tuple[float, float]] = deque()  # times rising, values falling
        self.last_kw: float | None = None
        self.last_at: float | None = None

    def add(self, at: float, kw: float) -> None:
        at, kw = _finite("at", at), _finite("kw", kw)
        if self.last_at is not None and at < self.last_at:
            at = self.last_at  # a sample never goes back in time (the window would keep it longer)
        while self._samples and self._samples[-1][1] <= kw:
            self._samples.pop()
        self._samples.append((at, kw))
        self.last_kw, self.last_at = kw, at
        self._expire(at)

    def _expire(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def max_kw(self, now: float) -> float | None:
        """The largest sample within the window before `now`; None when there is none."""
        self._expire(_finite("now", now))
        return self._samples[0][1] if self._samples else None

    def clear(self) -> None:
        self._samples.clear()
        self.last_kw = self.last_at = None
