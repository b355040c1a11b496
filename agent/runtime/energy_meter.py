"""Energy accounting from the fleet picture: every snapshot is a sample for the pure integrator
(agent.core.energy), each closed minute goes to the store (site measured/estimated kWh, per-miner kWh, seconds
under curtailment, energy not drawn because of dispatch) and to the joules counter of the metrics. When the
controller sends commands, the last picture is pinned at that moment too (`hold`): a change the agent causes starts
when it was commanded, not back at the reading before it.

Every quarter hour whose minutes are all in is pinned into the audit chain (`Store.pin_energy_until`): a record of
its totals that `audit verify` recomputes from the energy table, so an edited kWh figure is found. Pinned as the
minutes close, and at start for what the last run left; never on the flush at stop, whose last minute is partial
and gets the rest of it after the restart.

Curtailed: while a dispatch, an override, a time-of-use window or the fail-safe binds the target. The baseline
(what the site would have drawn without it) is the site's power when the binding dispatch was accepted, or the
cap when nothing better is known (a window, the fail-safe).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from hashflex.agent.core.energy import MINUTE_S, EnergyIntegrator, SiteSample
from hashflex.agent.core.model import Source
from hashflex.agent.logging import get_logger

if TYPE_CHECKING:
    from hashflex.agent.runtime.controller import Controller

log = get_logger("energy")

PER_MINER_BACKLOG = 600  # queued writes past which a refused minute keeps only its site figures


class EnergyMeter:
    def __init__(self, max_gap_s: float = 120.0) -> None:
        self.integrator = EnergyIntegrator(max_gap_s=max_gap_s)
        self.minutes = 0
        self._may_hold = True  # no command has gone out since the last reading

    def add(self, snap: Any, ctl: Controller) -> None:
        """A new fleet picture: a sample at the time it was taken."""
        self._add(snap, snap.ts, ctl)
        self._may_hold = True

    def hold(self, snap: Any, now: float, ctl: Controller) -> None:
        """Commands are about to go out: the last picture still holds up to `now` (nothing the agent did changed
        any miner's draw since it was taken), so pin it here. Without this, the change the commands cause would be
        spread back over the whole gap since that picture (the trapezoid runs from the last reading), and a
        dispatch would look as if it had started early. Once per picture: after the first batch, what the miners
        draw is no longer what the picture says, until the next reading."""
        if not self._may_hold:
            return
        self._may_hold = False
        self._add(snap, now, ctl)

    def _add(self, snap: Any, ts: float, ctl: Controller) -> None:
        curtailed, baseline_w = _curtailment(ctl)
        sample = SiteSample(
            ts=ts, measured_w=snap.power_w_measured, estimated_w=snap.power_w_estimated,
            curtailed=curtailed, baseline_w=baseline_w,
        )  # fmt: skip
        miners = {ip: (ms.power_w, ms.measured) for ip, ms in snap.miners.items()}
        self._record(self.integrator.add(sample, miners), ctl)

    def flush(self, ctl: Controller) -> None:
        """On stop: write what is known, the minute in progress too (its covered_s says how much of it)."""
        self._record(self.integrator.close_until(math.inf), ctl, pin=False)

    def pin_closed(self, upto: float, ctl: Controller) -> None:
        """Pin the quarter hours that end at or before `upto` (no minute before it can still arrive). Through the
        controller's write-behind: behind any minute the store refused earlier, never before it."""
        ctl.persist.call("pin_energy_until", upto, ctl.clock.time())

    def _record(self, closed: list[Any], ctl: Controller, *, pin: bool = True) -> None:
        for minute, per_miner in closed:
            # a store that refuses writes: the minute waits in the write-behind; past an hour of them only the site
            # figures do (per-miner detail for a big fleet is ~1 MB a minute, too much to hold for long)
            detail = per_miner if ctl.persist.backlog < PER_MINER_BACKLOG else None
            ctl.persist.call("record_energy_minute", minute, detail)
            self.minutes += 1
            if ctl.metrics is not None:
                ctl.metrics.add_energy_kwh(minute.kwh)
        if pin and closed:
            self.pin_closed(closed[-1][0].minute_ts + MINUTE_S, ctl)


def _curtailment(ctl: Controller) -> tuple[bool, float | None]:
    t = ctl.target
    if t is None or t.source is Source.CAP:
        return False, None
    rec = ctl.dispatches.get(t.binding_id or "")
    if rec is not None and rec.dispatch.baseline_kw is not None:
        return True, rec.dispatch.baseline_kw * 1000.0
    return True, t.cap_kw * 1000.0
