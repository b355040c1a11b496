"""The controller's read side: the STATUS DOC (and its publishing), the miners table and the preview, and
`SiteReader`, which answers the read verbs (status, miners, preview, dispatches) with them.

Functions over the control loop's state (`SiteState`, a port the controller satisfies) that read it and never change
it (a miner's state, for the counts, the table and the preview, is agent.core.observe's: pure), so transports may call
them at any time from the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hashflex.agent import __version__
from hashflex.agent.config import AgentConfig
from hashflex.agent.core import failsafe as fs
from hashflex.agent.core.model import MinerState, Plan, RunAction, SleepAction, Target
from hashflex.agent.core.observe import Observation, observe
from hashflex.agent.core.planning import plan
from hashflex.agent.core.ramp import wake_budget
from hashflex.agent.core.site_meter import miner_level
from hashflex.agent.core.snapshot import FleetSnapshot
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.actuator import diff
from hashflex.agent.runtime.caps import Caps
from hashflex.agent.runtime.commanding import Commander
from hashflex.agent.runtime.dispatches import DispatchBook
from hashflex.agent.runtime.energy_meter import EnergyMeter
from hashflex.agent.runtime.facility import FacilityControl
from hashflex.agent.runtime.level import PlanningLevel
from hashflex.agent.runtime.metering import MeterControl
from hashflex.agent.runtime.ports import Notifier, SnapshotSource
from hashflex.agent.runtime.rules import ControlRules
from hashflex.contract.status import BrokerDoc, DispatchDoc, GatewayDoc, StatusDoc

log = get_logger("controller")


class Clock(Protocol):
    def time(self) -> float: ...


class SiteState(Protocol):
    """What the read side reads of the control loop (agent.runtime.controller.Controller): never changed here."""

    cfg: AgentConfig
    fleet: SnapshotSource
    rules: ControlRules
    caps: Caps
    book: DispatchBook
    commands: Commander
    energy: EnergyMeter
    target: Target | None
    failsafe: fs.FailsafeState | None
    plan: Plan | None
    level: PlanningLevel
    tick_n: int
    tick_ms: float
    tick_at: float | None
    gateway_health: Callable[[], GatewayDoc] | None

    @property
    def alarms(self) -> Mapping[str, str]: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def meter(self) -> MeterControl | None: ...
    @property
    def facility(self) -> FacilityControl | None: ...


def observe_now(site: SiteState) -> Observation:
    """What every miner is doing now, for the read side: nothing applied (no memory written, no alarm)."""
    commands = site.commands
    return observe(site.fleet.latest(), commands.memory, commands.in_flight, site.clock.time(), site.rules.observe)


StatusSink = Callable[[StatusDoc], None]


class StatusPublisher:
    """The status document: built after every tick (and on read, after a command changed what it shows), handed to
    the sinks (MQTT state, the flexibility offer); and the service manager's watchdog and status line.

    It keeps the last document, not the loop: the state it renders is handed to it (`publish`, `current`), so it is
    built before the controller (agent.runtime.assembly) and handed to it like any other part."""

    def __init__(self, notifier: Notifier | None) -> None:
        self.notifier = notifier
        self.doc: StatusDoc | None = None
        self.stale = False  # a command changed what the doc shows since it was built
        self._sinks: list[StatusSink] = []
        self._broker: Callable[[], BrokerDoc] | None = None  # the grid link's connection (`show_broker`)
        self._watchdog_every: float | None = None
        self._watchdog_at = 0.0

    def add_sink(self, sink: StatusSink) -> None:
        """Hand every doc built after a tick to `sink` too (registered before the loop runs)."""
        self._sinks.append(sink)

    def show_broker(self, status: Callable[[], BrokerDoc]) -> None:
        """The grid link's connection in the doc (registered before the loop runs: the link is built after the
        controller, through the command service it needs); without one the doc says `disabled`."""
        self._broker = status

    def _broker_doc(self) -> BrokerDoc:
        return self._broker() if self._broker is not None else {"state": "disabled", "since": None}

    def mark_stale(self) -> None:
        """What the doc shows changed since it was built (a command, a frequency record): rebuilt on the next read."""
        self.stale = True

    def publish(self, site: SiteState, snap: FleetSnapshot, now: float, obs: Observation | None) -> None:
        doc = self.doc = build_status(site, snap, now, obs or observe_now(site), self._broker_doc())
        self.stale = False
        for sink in self._sinks:
            try:
                sink(doc)
            except Exception:
                log.exception("status sink failed")

    def current(self, site: SiteState) -> StatusDoc:
        """The STATUS DOC (APIS.md) as of the last tick, or of the last accepted command where that came later."""
        doc = self.doc
        if doc is None or self.stale:
            doc = self.doc = build_status(
                site, site.fleet.latest(), site.clock.time(), observe_now(site), self._broker_doc()
            )
            self.stale = False
        return doc

    def notify(self, tick_n: int, target: Target | None, snap: FleetSnapshot) -> None:
        """sd_notify: the watchdog at half its interval, and a status line every sixth tick."""
        if self.notifier is None:
            return
        if self._watchdog_every is None:
            from hashflex.agent.io.sdnotify import watchdog_interval  # noqa: PLC0415

            self._watchdog_every = watchdog_interval() or 0.0
        if self._watchdog_every and time.monotonic() - self._watchdog_at >= self._watchdog_every / 2:
            self.notifier.watchdog()
            self._watchdog_at = time.monotonic()
        if target is not None and tick_n % 6 == 1:
            n = len(snap.miners)
            self.notifier.status(
                f"tick {tick_n} target {target.kw / 1000:.2f} MW cap {target.cap_kw / 1000:.2f} MW "
                f"{n - snap.unreachable}/{n} reachable"
            )


class SiteReader:
    """The read verbs' answers (agent.runtime.service.Reader) from the loop's state and its last status doc."""

    def __init__(self, site: SiteState, publisher: StatusPublisher) -> None:
        self.site = site
        self.publisher = publisher

    def status(self) -> StatusDoc:
        """The STATUS DOC (APIS.md) as of the last tick, or of the last accepted command where that came later."""
        return self.publisher.current(self.site)

    def miner_rows(self, state: str | None, sort: str, desc: bool, limit: int | None) -> list[dict[str, Any]]:
        return miner_rows(self.site, state, sort, desc, limit)

    def preview(self, target_kw: float) -> dict[str, Any]:
        return preview(self.site, target_kw)

    def dispatch_docs(self, include_closed: bool) -> list[DispatchDoc]:
        return self.site.book.docs(include_closed)


_SORT_KEYS = {
    "ip": "ip",
    "model": "model",
    "state": "state",
    "power": "power_w",
    "limit": "limit_w",
    "hashrate": "hashrate_ths",
    "efficiency": "efficiency_j_th",
    "temp": "temp_c",
    "last_seen": "age_s",
}


def build_status(ctl: SiteState, snap: FleetSnapshot, now: float, obs: Observation, broker: BrokerDoc) -> StatusDoc:
    """The STATUS DOC from the controller's state, `snap`, what `obs` (agent.core.observe) says of its miners and
    the grid link's connection (`broker`)."""
    hashrate = 0.0
    for ms in snap.miners.values():
        if ms.reachable and ms.reading is not None:
            hashrate += ms.reading.hashrate_ths or 0.0
    # configured addresses not identified yet: unreachable miners as far as anyone can tell (and counted so)
    unidentified = len(snap.unidentified)
    counts = obs.counts(unidentified)
    t, f = ctl.target, ctl.failsafe
    released_by, releases_at = (None, None) if f is None else fs.release(f, now, ctl.rules.failsafe)
    doc: StatusDoc = {
        "ts": iso(now),
        "site_id": ctl.cfg.site.id,
        "version": __version__,
        "target_kw": None if t is None else round(t.kw, 3),
        "target_reason": None if t is None else t.reason,
        "target_source": None if t is None else t.source.value,
        "target_detail": None if t is None else t.detail,
        "planning_level_kw": ctl.level.planning_level_kw(ctl.meter is not None),
        "cap_kw": ctl.caps.effective_kw(),
        "licensed_cap_kw": ctl.caps.licensed_kw,
        "grid_cap_kw": ctl.caps.grid_kw,  # run-time caps by source (None = not set); the lowest cap binds
        "operator_cap_kw": ctl.caps.operator_kw,
        # power_kw_measured: what miners reported; power_kw_estimated (= power_kw): the site's power with an
        # estimate for every miner that did not report (unknown is never zero); power_kw_unmeasured: those estimates
        "power_kw": round(snap.power_w / 1000, 3),
        "power_kw_measured": round(snap.power_w_measured / 1000, 3),
        "power_kw_estimated": round(snap.power_w / 1000, 3),
        "power_kw_unmeasured": round(snap.power_w_estimated / 1000, 3),
        # never below what the site draws now, whatever the plan counts (a miner still spinning down, …)
        "power_kw_worst_case": None if ctl.plan is None else round(max(ctl.plan.worst_case_kw, snap.power_w / 1000), 3),
        "hashrate_ths": round(hashrate, 3),
        "miners": counts,
        "dispatches": [r.doc() for r in ctl.book.open_records()],
        "failsafe": {
            "active": bool(f and f.active),
            "since": iso(f.since) if f else None,
            "reason": f.reason if f else None,
            "last_heartbeat": iso(f.last_heartbeat) if f and f.last_heartbeat else None,
            "applies": ctl.rules.failsafe.applies,
            # what releases an active fail-safe (failsafe.release: "grid_command", "next_heartbeat", "heartbeat"),
            # and when it releases by itself if the heartbeat holds (null: not before a heartbeat)
            "released_by": released_by,
            "releases_at": iso(releases_at),
            "release_after_s": ctl.rules.failsafe.release_after_s,
        },
        "broker": broker,
        "alarms": [{"key": k, "message": v} for k, v in sorted(ctl.alarms.items())],
        "gateway": ctl.gateway_health() if ctl.gateway_health else {},
        "tick": {"n": ctl.tick_n, "dur_ms": round(ctl.tick_ms, 2), "ts": iso(ctl.tick_at)},
        "sweep": {"ts": iso(snap.ts), "dur_s": round(snap.sweep_s, 3), "unreachable": snap.unreachable + unidentified},
        "plan": None
        if ctl.plan is None
        else {
            "method": ctl.plan.method,
            "expected_kw": round(ctl.plan.expected_kw, 3),
            "expected_ths": round(ctl.plan.expected_ths, 3),
            "baseline_ths": None if ctl.plan.baseline_ths is None else round(ctl.plan.baseline_ths, 3),
        },
        "in_flight": len(ctl.commands.in_flight),
        # since when the plan in force has been carried out in full (nothing to send, on the wire, held back or
        # awaiting confirmation); null while the agent is still moving the fleet
        "settled_since": iso(ctl.commands.settled_at),
        # the site meter (site.meter; null without one): what it reads, the non-miner load (meter − miners) and
        # what the plan counts for it, whether the agent has fallen back to the miners' sum plus the allowance
        "meter": None if ctl.meter is None else ctl.meter.doc(now),
        # where the site's kWh come from (agent/runtime/energy_meter.py): the last minute's source (metered, miners,
        # fallback), minutes by source, counter energy waiting to be carried into the next metered minute
        "energy": ctl.energy.doc(),
    }
    if ctl.facility is not None:
        doc["facility"] = ctl.facility.status()
    return doc


def miner_rows(ctl: SiteState, state: str | None, sort: str, desc: bool, limit: int | None) -> list[dict[str, Any]]:
    snap = ctl.fleet.latest()
    obs = observe_now(ctl)
    rows: list[dict[str, Any]] = []
    for ip, ms in snap.miners.items():
        st = obs.shown[ip].value
        if state is not None and st != state:
            continue
        r, ident, mem = ms.reading, ms.identity, ctl.commands.memory.get(ip)
        power = ms.power_w if st != "unreachable" else None
        ths = r.hashrate_ths if r is not None and st != "unreachable" else None
        rows.append(
            {
                "ip": ip,
                "model": ident.model,
                "make": ident.make,
                "family": ident.family.value,
                "firmware": ident.firmware,
                "state": st,
                "power_w": power,
                "measured": ms.measured,
                "limit_w": (
                    mem.commanded_w
                    if mem and mem.commanded_w is not None
                    else (r.power_limit_w if r is not None else None)
                ),
                "nominal_w": ident.nominal_w,
                "hashrate_ths": ths,
                "efficiency_j_th": round(power / ths, 2) if power and ths else None,
                "temp_c": max(r.temps_c) if r is not None and r.temps_c else None,
                "last_seen": iso(snap.ts - ms.age_s) if ms.age_s is not None else None,
                "age_s": None if ms.age_s is None else round(ms.age_s, 1),
                "asleep_by_us": bool(mem and mem.asleep_by_us),
                "ignores_commands": bool(mem and mem.ignores_commands),
                "circuit": ctl.rules.circuit_of.get(ip),
                "priority": ctl.rules.priority_of.get(ip, 0),
                "error": ms.last_error,
            }
        )
    if state is None or state == MinerState.UNREACHABLE.value:
        for ip, held_w in snap.unidentified.items():
            rows.append(
                {
                    "ip": ip,
                    "model": None,
                    "make": None,
                    "family": None,
                    "firmware": None,
                    "state": "unreachable",
                    "power_w": None,
                    "measured": False,
                    "limit_w": None,
                    "nominal_w": held_w,
                    "hashrate_ths": None,
                    "efficiency_j_th": None,
                    "temp_c": None,
                    "last_seen": None,
                    "age_s": None,
                    "asleep_by_us": False,
                    "ignores_commands": False,
                    "circuit": ctl.rules.circuit_of.get(ip),
                    "priority": ctl.rules.priority_of.get(ip, 0),
                    "error": f"not identified yet; counted at {held_w:.0f} W until it answers",
                }
            )
    key = _SORT_KEYS[sort]
    rows.sort(key=lambda row: (row[key] is None, row[key] if row[key] is not None else 0), reverse=desc)
    if desc:  # keep unknowns last either way
        rows.sort(key=lambda row: row[key] is None)
    return rows[:limit] if limit else rows


def preview(ctl: SiteState, target_kw: float) -> dict[str, Any]:
    """What the planner would do for `target_kw` now, without doing it."""
    now = ctl.clock.time()
    snap = ctl.fleet.latest()
    views = observe_now(ctl).views  # pure: the preview raises no alarm and writes nothing
    kw = min(target_kw, ctl.caps.effective_kw())
    budget = wake_budget(ctl.commands.wake_times, now, ctl.rules.stagger)
    miners_kw = kw
    if ctl.meter is not None and ctl.meter.last is not None:  # at the meter: the miners get the site level's share
        miners_kw = miner_level(
            kw,
            miners_now_kw=snap.power_w / 1000,
            non_miner_kw=ctl.meter.last.base_kw,
            cooling_share=ctl.meter.cfg.cooling_share,
        ).miner_level_kw
    started = time.perf_counter()
    p = plan(miners_kw, views, ctl.rules.tree, ctl.rules.planner, now, wake_budget=budget, ramp_allowance_kw=None)
    by_ip = {v.id: v for v in views}
    changes = diff(p.actions, by_ip, use_power_limits=ctl.cfg.control.use_power_limits)
    ops: dict[str, int] = {}
    for c in changes:
        ops[c.op.value] = ops.get(c.op.value, 0) + 1
    return {
        "target_kw": kw,
        "requested_kw": target_kw,
        "method": p.method,
        "worst_case_kw": round(p.worst_case_kw, 3),
        "expected_kw": round(p.expected_kw, 3),
        "expected_ths": round(p.expected_ths, 3),
        "baseline_ths": None if p.baseline_ths is None else round(p.baseline_ths, 3),
        "present_kw": round(snap.power_w / 1000, 3),
        "running": sum(1 for a in p.actions.values() if isinstance(a, RunAction)),
        "sleeping": sum(1 for a in p.actions.values() if isinstance(a, SleepAction)),
        "uncontrolled": len(p.uncontrolled),
        "changes": ops,
        "alarms": list(p.alarms),
        "circuits": {k: round(v, 3) for k, v in p.circuit_worst_case_kw.items()},
        "wake_budget": budget,
        "plan_ms": round((time.perf_counter() - started) * 1000, 2),
    }
