"""The controller's side of the site meter: what the meter says about the site this tick, and what the miners may
have of the site level (agent.core.site_meter does the arithmetic).

The meter itself (drivers/meter_modbus.py, started by the app) polls in the background; the controller sees it
through `SiteMeterPort`, a typed port, so the control loop neither imports pymodbus nor waits for a reading. Times
the meter reports (`read_at`, `stale_since`) are on the controller's clock (the app gives the meter that clock).

Fresh meter: site power is what it reads; the non-miner load (metered − Σ miners) is sampled every tick into a
window, and the miners get the site level minus its recent maximum and the cooling that follows their planned
rise. Stale or failed (no good reading for site.meter.stale_after_s, registers frozen, a refused counter): site
power is the miners' sum plus site.meter.non_miner_allowance_kw, which also stands in for the recent maximum, and
the controller holds every increase (no wake, no limit raise) until the meter is fresh again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hashflex.agent.config import AgentConfig, SiteMeterConfig
from hashflex.agent.core.model import Plan
from hashflex.agent.core.site_meter import MinerShare, NonMinerWindow, SteadyMiners, counted_base, miner_level
from hashflex.agent.core.snapshot import FleetSnapshot
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.logging import get_logger

log = get_logger("controller")

# the non-miner load counted moves down only once its recent maximum is this share of the licensed cap below it
# (up at once): a maximum wandering by meter noise would move every miner's limit every tick
METER_BAND_SHARE = 0.005


class HzReading(Protocol):
    """A frequency-only reading (drivers.meter_modbus.FrequencyReading, the fast poll)."""

    @property
    def hz(self) -> float: ...
    @property
    def read_at(self) -> float: ...


class MeterReadingView(Protocol):
    """One good reading (drivers.meter_modbus.MeterReading)."""

    @property
    def watts(self) -> float: ...
    @property
    def import_wh(self) -> float: ...
    @property
    def hz(self) -> float: ...
    @property
    def read_at(self) -> float: ...
    @property
    def source(self) -> str: ...
    @property
    def counter_epoch(self) -> int: ...  # energy (runtime/energy_meter.py) takes no counter delta across two


class MeterStatusView(Protocol):
    """The meter's freshness (drivers.meter_modbus.MeterStatus)."""

    @property
    def fresh(self) -> bool: ...
    @property
    def last(self) -> MeterReadingView | None: ...
    @property
    def stale_since(self) -> float | None: ...
    @property
    def faults(self) -> Sequence[str]: ...


class SiteMeterPort(Protocol):
    """What the controller needs of the site meter (drivers.meter_modbus.ModbusMeter provides it)."""

    name: str

    def reading(self) -> MeterReadingView | None: ...
    def status(self) -> MeterStatusView: ...
    def listen(
        self, *, on_hz: Callable[[HzReading], None], on_reading: Callable[[MeterReadingView], None]
    ) -> None: ...  # every reading as it arrives (the under-frequency detector), on the meter's own threads


class AlarmSink(Protocol):
    def raise_alarm(self, key: str, message: str, *, quiet: bool = False) -> None: ...
    def drop(self, key: str) -> bool: ...


class FrequencyDoc(Protocol):
    def doc(self) -> dict[str, object]: ...


@dataclass(frozen=True, slots=True)
class MeterTick:
    """The site at the meter, as one tick sees it."""

    fresh: bool
    starting: bool  # no good reading yet, within stale_after_s of the start: falls back, not alarmed yet
    site_kw: float  # metered, or (stale) the miners' sum plus the allowance
    metered_kw: float | None  # the fresh reading, else None
    non_miner_kw: float | None  # metered − Σ miners now (fresh only)
    base_kw: float  # the non-miner load counted: its recent maximum (fresh) or the allowance (stale)
    recent_max_kw: float | None  # the recent maximum itself (fresh only)
    read_at: float | None  # the last good reading's time, however old
    stale_since: float | None
    faults: tuple[str, ...]


class MeterControl:
    """Per-tick bookkeeping of the site meter for the controller (its only caller, on the event loop)."""

    def __init__(
        self, meter: SiteMeterPort, cfg: SiteMeterConfig, started_at: float, band_kw: float, align_s: float = 0.0
    ) -> None:
        self.meter = meter
        self.cfg = cfg
        self.started_at = started_at
        self.band_kw = band_kw  # hysteresis of the counted non-miner load (core.site_meter.counted_base)
        self._counted_kw: float | None = None
        # the miners' sum when the non-miner load counted was last measured: the cooling it holds follows the miners
        # up to that level, no further (None: no measure, stale)
        self._measured_at_miners_kw: float | None = None
        self.window = NonMinerWindow(cfg.non_miner_window_s)
        # how long the miners' sum must have held for metered − Σ miners to be a sample (core.site_meter.SteadyMiners)
        self.miners = SteadyMiners(align_s)
        self.last: MeterTick | None = None
        self.share: MinerShare | None = None
        # frequency response (agent.runtime.frequency), when configured: its state shows in the meter's section
        self.frequency: FrequencyDoc | None = None

    def observe(self, miners_kw: float, now: float) -> MeterTick:
        """Read the meter's latest (no I/O: the adapter polls on its own) and sample the non-miner load."""
        status = self.meter.status()
        reading = self.meter.reading() if status.fresh else None
        if reading is not None and not math.isfinite(reading.watts - 1000.0 * miners_kw):
            reading = None  # not a figure to plan with (the driver refuses non-finite readings; this is the net)
        last = status.last
        faults = tuple(str(f) for f in status.faults)
        self.miners.add(now, miners_kw)
        if reading is not None:
            metered_kw = reading.watts / 1000.0
            non_miner = metered_kw - miners_kw
            steady = self.miners.steady(self.band_kw)
            if steady:
                self.window.add(now, non_miner)
            recent = self.window.max_kw(now)
            basis = recent
            if basis is None:  # no steady sample in the window: the last count stands while the miners move
                basis = non_miner if steady or self._counted_kw is None else self._counted_kw
            if steady or self._counted_kw is None:
                self._measured_at_miners_kw = miners_kw
            self._counted_kw = counted_base(basis, self._counted_kw, self.band_kw)
            tick = MeterTick(
                fresh=True,
                starting=False,
                site_kw=metered_kw,
                metered_kw=metered_kw,
                non_miner_kw=non_miner,
                base_kw=max(0.0, self._counted_kw),
                recent_max_kw=recent,
                read_at=reading.read_at,
                stale_since=None,
                faults=faults,
            )
        else:
            allowance = self.cfg.non_miner_allowance_kw
            self._counted_kw = None  # back from stale: counted from the recent maximum again
            self._measured_at_miners_kw = None
            starting = last is None and now - self.started_at < self.cfg.stale_after_s
            tick = MeterTick(
                fresh=False,
                starting=starting,
                site_kw=miners_kw + allowance,
                metered_kw=None,
                non_miner_kw=None,
                base_kw=allowance,
                recent_max_kw=None,
                read_at=None if last is None else last.read_at,
                stale_since=status.stale_since,
                faults=faults,
            )
        self.last = tick
        return tick

    @classmethod
    def for_site(cls, cfg: AgentConfig, port: SiteMeterPort | None, *, started_at: float) -> MeterControl | None:
        """The site's meter control (None without site.meter or a meter adapter)."""
        mcfg = cfg.site.meter
        if port is None or mcfg is None:
            return None
        # the miners' sum must hold for the meter's lag and one sweep before metered − Σ miners is a sample
        return cls(
            port,
            mcfg,
            started_at=started_at,
            band_kw=METER_BAND_SHARE * cfg.site.cap_kw,
            align_s=mcfg.lag_s + cfg.polling.interval_s,
        )

    def observe_alarmed(self, miners_kw: float, now: float, alarms: AlarmSink) -> MeterTick:
        """`observe`, with alarms for a stale meter and refused readings, cleared when good."""
        t = self.observe(miners_kw, now)
        name, allowance = self.meter.name, self.cfg.non_miner_allowance_kw
        if t.fresh or t.starting:
            if alarms.drop("meter_stale"):
                log.info("alarm cleared", key="meter_stale", meter=name)
        else:
            # the same words for as long as it lasts (a changing message would be a new alarm, audited, each tick)
            since = "it started" if t.read_at is None else iso(t.read_at)
            faults = f" ({', '.join(t.faults)})" if t.faults else ""
            alarms.raise_alarm(
                "meter_stale",
                f"site meter {name}: no good reading since {since}{faults}; counting the miners plus the "
                f"{allowance:g} kW non-miner allowance and holding every increase until it is back",
            )
        if t.faults and t.fresh:  # refused readings between good ones: said once per kind (the adapter logs why)
            alarms.raise_alarm("meter_fault", f"site meter {name} refused readings: {', '.join(t.faults)}")
        elif not t.faults:
            alarms.drop("meter_fault")
        return t

    def miners_share(self, site_level_kw: float, miners_now_kw: float) -> MinerShare:
        """The miners' level under `site_level_kw` for the last observed tick (call `observe` first)."""
        assert self.last is not None
        # the cooling still to follow is counted from the level the non-miner load was measured at: while the miners'
        # sum moves no sample is taken (SteadyMiners), so a rise over several ticks, counted each tick only above
        # what the miners drew then, left the cooling of the part already risen out of both terms, and the meter
        # went over the cap by nearly the cooling share of the whole rise as the cooling caught up
        measured_at = self._measured_at_miners_kw
        self.share = miner_level(
            site_level_kw,
            miners_now_kw=miners_now_kw if measured_at is None else min(miners_now_kw, measured_at),
            non_miner_kw=self.last.base_kw,
            cooling_share=self.cfg.cooling_share,
        )
        return self.share

    def doc(self, now: float) -> dict[str, object]:
        """The status document's `meter` section."""
        t, share, last = self.last, self.share, self.meter.status().last
        read_at = None if t is None else t.read_at
        recent = None if t is None else t.recent_max_kw
        return {
            "address": self.meter.name,
            "source": None if last is None else last.source,
            "fresh": bool(t and t.fresh),
            "fallback": bool(t and not t.fresh),  # counting miners + allowance, increases held
            "age_s": None if read_at is None else round(max(0.0, now - read_at), 3),
            "stale_since": None if t is None else iso(t.stale_since),
            "faults": [] if t is None else list(t.faults),
            "power_kw": None if t is None or t.metered_kw is None else round(t.metered_kw, 3),
            "site_kw": None if t is None else round(t.site_kw, 3),
            "non_miner_kw": None if t is None or t.non_miner_kw is None else round(t.non_miner_kw, 3),
            "non_miner_max_kw": None if recent is None else round(recent, 3),
            "non_miner_counted_kw": None if share is None else round(share.non_miner_worst_kw, 3),
            "cooling_kw": None if share is None else round(share.cooling_kw, 3),
            "allowance_kw": self.cfg.non_miner_allowance_kw,
            "miner_level_kw": None if share is None else round(share.miner_level_kw, 3),
            "hz": None if last is None or not (t and t.fresh) else round(last.hz, 4),
            "import_kwh": None if last is None else round(last.import_wh / 1000.0, 3),
            "frequency_response": None if self.frequency is None else self.frequency.doc(),
        }


def counted_present_kw(snap: FleetSnapshot, planned: Plan | None, tick: MeterTick | None) -> float:
    """The site's power now as the last plan counted it: what the miners draw (measured, or estimated where a miner
    reports no watts), and every miner it cannot read at the worst case the plan counts it at. "Curtail by X" is taken
    from this: the planner holds the level against the same count, so a level taken from the readings alone falls
    below what the silent miners are counted at and sleeps every miner that answers. (Not the plan's own worst case:
    waking miners count there at full power, and "by X" is from what the site draws now.)"""
    miners_kw = snap.power_w / 1000.0 if planned is None else planned.counted_now_kw
    # with a site meter, targets apply at the meter: the rest of the site (what it reads above the miners, or the
    # allowance while it is stale) is part of what the site draws now
    if tick is None:
        return miners_kw
    return miners_kw + (tick.base_kw if tick.non_miner_kw is None else max(0.0, tick.non_miner_kw))
