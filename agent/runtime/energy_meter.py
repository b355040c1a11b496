"""Energy accounting from the fleet picture: every snapshot is a sample for the pure integrator
(agent.core.energy), each closed minute goes to the store (site measured/estimated kWh, per-miner kWh, seconds
under curtailment, energy not drawn because of dispatch) and to the joules counter of the metrics. When the
controller sends commands, the last picture is pinned at that moment too (`hold`): a change the agent causes starts
when it was commanded, not back at the reading before it.

Every quarter hour whose minutes are all in is pinned into the audit chain (`Store.pin_energy_until`): a record of
its totals that `audit verify` recomputes from the energy table, so an edited kWh figure is found. Pinned as the
minutes close, and at start for what the last run left; never on the flush at stop, whose last minute is partial
and gets the rest of it after the restart.

With a site meter (site.meter), each minute's kWh is the meter's import counter over it (`metered`), the miners'
sum kept beside it; a minute the counter does not cover within the meter's stale time falls back to the miners' sum
(`fallback`), and the counter's delta over such a span is carried into the first metered minute after it
(agent.core.energy.MeteredEnergy says why). The counter is read from the adapter's last good reading whenever a
picture comes in (no I/O: the adapter polls on its own); its times are on the agent's clock, as the pictures' are.
What a stale span owes when the agent stops is not carried into the next run (each run starts its counter afresh,
as the miners' integrator does): the flush logs it as `meter energy not booked`.

Curtailed: while a dispatch, an override, a time-of-use window or the fail-safe binds the target. The baseline
(what the site would have drawn without it) is the site's power when the binding dispatch was accepted, or the
cap when nothing better is known (a window, the fail-safe).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hashflex.agent.config import SiteMeterConfig
from hashflex.agent.core.energy import (
    MINUTE_S,
    ClosedMinute,
    CounterReading,
    EnergyIntegrator,
    MeteredEnergy,
    SiteSample,
)
from hashflex.agent.core.model import Source, Target
from hashflex.agent.core.snapshot import FleetSnapshot
from hashflex.agent.io.records import DispatchRecord
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.metering import MeterControl
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import RuntimeMetrics
from hashflex.contract.status import EnergyDoc

log = get_logger("energy")

PER_MINER_BACKLOG = 600  # queued writes past which a refused minute keeps only its site figures


class EnergyMeter:
    def __init__(
        self,
        *,
        persist: WriteBehind,
        clock: Callable[[], float],
        curtailment: Callable[[], tuple[bool, float | None]],
        meter: MeterControl | None = None,
        meter_cfg: SiteMeterConfig | None = None,
        cap_kw: float = 0.0,
        max_gap_s: float = 120.0,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self.persist = persist
        self.clock = clock
        self.curtailment = curtailment  # (curtailed now?, the baseline in W): `curtailment` below
        self.meter = meter
        self.meter_cfg = meter_cfg
        self.cap_kw = cap_kw
        self.metrics = metrics
        self.integrator = EnergyIntegrator(max_gap_s=max_gap_s)
        self.max_gap_s = max_gap_s
        self.minutes = 0
        self.by_source: dict[str, int] = {}  # minutes recorded, by source (metered, fallback, miners)
        self.last_source: str | None = None  # of the last minute recorded
        self.metered: MeteredEnergy | None = None  # with a site meter: built on the first picture
        self._may_hold = True  # no command has gone out since the last reading

    def add(self, snap: FleetSnapshot) -> None:
        """A new fleet picture: a sample at the time it was taken."""
        self._add(snap, snap.ts)
        self._may_hold = True

    def hold(self, snap: FleetSnapshot, now: float) -> None:
        """Commands are about to go out: the last picture still holds up to `now` (nothing the agent did changed
        any miner's draw since it was taken), so pin it here. Without this, the change the commands cause would be
        spread back over the whole gap since that picture (the trapezoid runs from the last reading), and a
        dispatch would look as if it had started early. Once per picture: after the first batch, what the miners
        draw is no longer what the picture says, until the next reading."""
        if not self._may_hold:
            return
        self._may_hold = False
        self._add(snap, now)

    def _add(self, snap: FleetSnapshot, ts: float) -> None:
        curtailed, baseline_w = self.curtailment()
        sample = SiteSample(
            ts=ts,
            measured_w=snap.power_w_measured,
            estimated_w=snap.power_w_estimated,
            curtailed=curtailed,
            baseline_w=baseline_w,
        )
        miners = {ip: (ms.power_w, ms.measured) for ip, ms in snap.miners.items()}
        closed = self.integrator.add(sample, miners)
        metered = self._meter()
        if metered is None:
            self._record(closed)
            return
        metered.add_minutes(closed)
        self._record(metered.release(ts))

    def _meter(self) -> MeteredEnergy | None:
        """The counter side, with the adapter's last good reading taken in (None without a site meter)."""
        mc = self.meter
        if mc is None:
            return None
        if self.metered is None:
            cfg = self.meter_cfg
            assert cfg is not None  # a MeterControl is only made with site.meter
            max_kw = cfg.max_kw if cfg.max_kw is not None else 2.0 * self.cap_kw  # as the adapter bounds it
            self.metered = MeteredEnergy(max_gap_s=self.max_gap_s, wait_s=cfg.stale_after_s, slack_s=1.0, max_kw=max_kw)
        status = mc.meter.status()
        last = status.last
        if not status.fresh:
            self.metered.mark_stale()
        if last is not None:
            self.metered.add_reading(CounterReading(last.read_at, last.import_wh, last.counter_epoch))
        return self.metered

    def flush(self) -> None:
        """On stop: write what is known, the minute in progress too (its covered_s says how much of it)."""
        closed = self.integrator.close_until(math.inf)
        metered = self._meter()
        if metered is not None:
            metered.add_minutes(closed)
            closed = metered.flush()
            if metered.dropped_kwh or metered.overcount_kwh:
                log.info(
                    "meter energy not booked",
                    dropped_kwh=round(metered.dropped_kwh, 6),
                    overcount_kwh=round(metered.overcount_kwh, 6),
                )
        self._record(closed, pin=False)

    def pin_closed(self, upto: float) -> None:
        """Pin the quarter hours that end at or before `upto` (no minute before it can still arrive). Through the
        controller's write-behind: behind any minute the store refused earlier, never before it."""
        self.persist.call("pin_energy_until", upto, self.clock())

    def doc(self) -> EnergyDoc:
        """The status document's `energy` section: where the site's kWh come from now."""
        m = self.metered
        return {
            "source": self.last_source,
            "minutes": self.minutes,
            "by_source": dict(self.by_source),
            # the miners' sum booked by fallback minutes since the last metered one: reconciled with the counter
            # (carried) at the next metered minute; dropped: counter energy lost to a reset (not knowable)
            "fallback_kwh": None if m is None else round(m.fallback_kwh, 6),
            "dropped_kwh": None if m is None else round(m.dropped_kwh, 6),
        }

    def _record(self, closed: list[ClosedMinute], *, pin: bool = True) -> None:
        for minute, per_miner in closed:
            # a store that refuses writes: the minute waits in the write-behind; past an hour of them only the site
            # figures do (per-miner detail for a big fleet is ~1 MB a minute, too much to hold for long)
            detail = per_miner if self.persist.backlog < PER_MINER_BACKLOG else None
            self.persist.call("record_energy_minute", minute, detail)
            self.minutes += 1
            self.by_source[minute.source] = self.by_source.get(minute.source, 0) + 1
            if minute.source != self.last_source and self.last_source is not None:
                log.info("energy source", source=minute.source, was=self.last_source, minute=minute.minute_ts)
            self.last_source = minute.source
            if self.metrics is not None:
                self.metrics.add_energy_minute(minute.kwh, minute.miners_kwh, minute.source)
        if pin and closed:
            self.pin_closed(closed[-1][0].minute_ts + MINUTE_S)


def curtailment(t: Target | None, dispatches: dict[str, DispatchRecord]) -> tuple[bool, float | None]:
    """Is the site curtailed under target `t`, and from what baseline (W)?"""
    if t is None or t.source is Source.CAP:
        return False, None
    rec = dispatches.get(t.binding_id or "")
    if rec is not None and rec.dispatch.baseline_kw is not None:
        return True, rec.dispatch.baseline_kw * 1000.0
    return True, t.cap_kw * 1000.0
