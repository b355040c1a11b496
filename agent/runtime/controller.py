"""The controller: the one writer of the site's control state (evcc's Site.Run).

Every tick (control.tick_s, and early on a new dispatch, cap, fail-safe change or fresh telemetry):
read the latest FleetSnapshot → build MinerViews (telemetry + the controller's memory of what it told each miner)
→ confirm earlier commands from telemetry → fail-safe → arbitrate → ramp level, wake budget → plan (fast first:
when the level drops, a sleep-only plan at once; the hashrate-optimal plan with power limits on the next tick)
→ the actuator sends only the diff, in the background → record (store, audit, events, status doc).

Commands reach it through `submit()`: a queue drained by `run()`, so they are applied one at a time by this task
(agent/runtime/apply.py says what each one changes), persisted (change + reply + audit in one transaction)
before the reply is returned, and trigger an early tick.

Closed loop: a command acknowledged by a miner is confirmed from telemetry within control.confirm_after_s; if the
miner still draws well above what it was told, it is re-commanded, then (after MAX_RECOMMANDS) counted at its real
draw (`ignores_commands`) and retried now and then; one that keeps drawing above a power limit is still slept and
woken (`limits_unsupported`: on/off from then on, at what it draws). Once confirmed, a miner is still watched: every
plan counts it at no less than its settled measured draw (on its circuit and the site), and one measured above its
limit beyond the confirmation slack is re-commanded the same way. A command that fails (refused, timed out) is not
sent again before a back-off (confirm_after_s, doubling per failure in a row, at most FAILED_BACKOFF_MAX_S);
meanwhile the miner is counted at its worst case, like an unreachable one, and a failed wake does not count against
the wake stagger. Configured addresses no miner answered at are counted at a worst case until the fleet identifies
them (an alarm names them). At site level, once the last plan was carried out and has settled, measured power above
the level (beyond control.tolerance_kw, and beyond what the plan already counts per miner) lowers the planning level
by the excess; when it falls back, the correction is given back within the ramp allowance. Never before the first
plan went out, nor while its commands settle: that excess is what they cut. The planning level never rises above the
target: room left because miners draw less than their limits is not spent (the worst case stays under the target and
the cap). """

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from hashflex.agent.commands import (
    Command,
)
from hashflex.agent.config import AgentConfig
from hashflex.agent.core import failsafe as fs
from hashflex.agent.core import timeline
from hashflex.agent.core.accounting import excess_w, largest_full_w
from hashflex.agent.core.addresses import expand
from hashflex.agent.core.arbitration import (
    ArbitrationInputs,
    ArbitrationRules,
    arbitrate,
    effective_cap_kw,
    event_windows,
    ramped_level,
    retention_s,
)
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.circuits import Circuit, CircuitTree, membership
from hashflex.agent.core.efficiency import DEFAULT_CURVE, stock_w
from hashflex.agent.core.model import Dispatch, MinerState, MinerView, Plan, SleepAction, Source, Target
from hashflex.agent.core.planner import PlannerRules, plan, plan_sleep_only
from hashflex.agent.core.ramp import (
    WakeStaggerRule,
    prune_wake_times,
    ramp_credit_cap_kw,
    ramp_credit_kw,
    spend_ramp_credit,
    wake_budget,
)
from hashflex.agent.core.schedule import ScheduleRule
from hashflex.agent.io.records import MinerControl
from hashflex.agent.io.store import StoreError
from hashflex.agent.logging import get_logger
from hashflex.agent.protocol import Reply
from hashflex.agent.runtime import readout
from hashflex.agent.runtime.actuator import Actuator, Change, Op, OpResult, Report, diff
from hashflex.agent.runtime.apply import SAFE_START_ID, apply_command
from hashflex.agent.runtime.clock import Clock, boot_clock, steady
from hashflex.agent.runtime.crashpoints import crash_point
from hashflex.agent.runtime.energy_meter import EnergyMeter
from hashflex.agent.runtime.events import EventLog, iso
from hashflex.agent.runtime.facility import FacilityControl
from hashflex.agent.runtime.frequency import STATE_KEY as FREQUENCY_STATE_KEY
from hashflex.agent.runtime.frequency import FrequencyResponse
from hashflex.agent.runtime.memory import DispatchRecord, MinerMemory, ended_copy, raises_draw, save_on_timeline
from hashflex.agent.runtime.metering import MeterControl, MeterTick, SiteMeterPort
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.drivers.base import Family, OnOff

log = get_logger("controller")

SETTLED_SHARE = 0.03  # two readings after a change within this share (or SETTLED_W) of each other: settled
SETTLED_W = 50.0
# a steady reading at least this share of its setting shows what a miner draws at it, its drift above it gone too
# (`_lowers_excess`); under it, it is still booting or re-tuning (LuxOS: a few % of its setting for seconds)
EXCESS_GONE_SHARE = 0.5
UNIDENTIFIED_NAMED = 20  # addresses named in the `unidentified` alarm (then a count)
MAX_RECOMMANDS = 2  # re-sends of an unconfirmed command before the miner is counted as ignoring commands
SLEEP_CONFIRM_SHARE = 0.25  # asleep: draws under this share of nominal
LIMIT_CONFIRM_SLACK = 1.08  # obeying a limit: draws at most this × the limit (+ LIMIT_CONFIRM_W)
LIMIT_CONFIRM_W = 100.0
MIN_EARLY_GAP_S = 0.2  # wall seconds between early ticks
# a miner whose command failed is left alone for confirm_after_s, doubling with each failure in a row up to this
# (clock seconds): a miner that refuses commands (a session another client holds, firmware errors) is not hammered
FAILED_BACKOFF_MAX_S = 300.0
_COMPLIANCE_FIELDS = ("level_kw", "received_at", "commands_sent_at", "target_met_at", "time_to_target_s",
                      "max_overshoot_kw")  # fmt: skip
CONTROLS_SAVE_EVERY_S = 30.0
CAPS_STATE_KEY = "caps"  # {"grid_kw": float | None, "operator_kw": float | None}
FAILSAFE_STATE_KEY = "failsafe"  # the grid link as this run leaves it for the next (failsafe.link_doc)
# with a site meter, the miners' level follows the non-miner load's recent maximum, which creeps up with meter noise:
# a fall of the miners' level smaller than this share of the licensed cap goes to the ordinary plan on this tick,
# not to a sleep-only one (which can only sleep whole miners, and the next plan would wake them back)
METER_FAST_DROP_SHARE = 0.005
# the non-miner load counted moves down only once its recent maximum is this share of the licensed cap below it
# (up at once): a maximum wandering by meter noise would move every miner's limit every tick
METER_BAND_SHARE = 0.005


class SnapshotSource(Protocol):
    def latest(self) -> Any: ...


class StatusSink(Protocol):
    def __call__(self, doc: dict[str, Any]) -> None: ...


class Controller:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        fleet: SnapshotSource,
        store: Any,
        actuator: Actuator,
        clock: Clock,
        events: EventLog,
        metrics: Any = None,
        notifier: Any = None,
        grid_link: bool = True,
        broker_status: Callable[[], dict[str, Any]] | None = None,
        gateway_health: Callable[[], dict[str, Any]] | None = None,
        meter: SiteMeterPort | None = None,
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.store = store
        # the loop's own records go through this: a store that refuses writes must not stop the control loop
        self.persist = WriteBehind(store)
        self.actuator = actuator
        # elapsed-time rules (heartbeat timeout, min on/off, stagger, confirmation, a dispatch's start at receipt)
        # read a time that never steps with the wall clock; a step is alarmed (_check_clock)
        self.clock = steady(clock)
        self._clock_step_s: float | None = None  # the wall-clock step alarmed, if any
        self.events = events
        self.metrics = metrics
        self.notifier = notifier
        self.broker_status = broker_status
        self.gateway_health = gateway_health
        self.status_sinks: list[StatusSink] = []
        ctl = cfg.control

        self.licensed_cap_kw = cfg.site.cap_kw
        # run-time caps by source (separate inputs, the lower binds): a grid `cap` (signed, MQTT) and an operator
        # `cap` (local socket); None = not set. Persisted together under CAPS_STATE_KEY.
        self.grid_cap_kw: float | None = None
        self.operator_cap_kw: float | None = None
        self.tree = CircuitTree(cfg.site.cap_kw, [Circuit(c.id, c.parent, c.cap_kw) for c in cfg.site.circuits])
        self.circuit_of = membership(self.tree, [(c.id, c.miners) for c in cfg.site.circuits])  # deepest listing
        self.priority_of = _priority_map(cfg)
        self.schedule = [
            ScheduleRule.from_hhmm(w.name, w.start, w.end, w.days, w.target_kw, cfg.site.tzinfo) for w in cfg.schedule
        ]
        self.arb_rules = ArbitrationRules(
            debounce_s=cfg.dispatch.debounce_s,
            min_hold_s=cfg.dispatch.min_hold_s,
            cooldown_s=cfg.dispatch.cooldown_s,
            max_event_s=cfg.dispatch.max_event_s,
        )
        self.planner_rules = PlannerRules(
            min_on_s=ctl.min_on_s, min_off_s=ctl.min_off_s, headroom_pct=ctl.headroom_pct,
            use_power_limits=ctl.use_power_limits,
        )  # fmt: skip
        self.stagger = WakeStaggerRule(ctl.wake.max_per_interval, ctl.wake.interval_s)
        level = cfg.failsafe.level
        self.fs_rules = fs.FailsafeRules(
            enabled=cfg.failsafe.enabled,
            grid_link=grid_link,
            heartbeat_timeout_s=cfg.failsafe.heartbeat_timeout_s,
            level_kw=None if level == "hold" else float(level),
            hold_at_start=cfg.failsafe.hold_at_start,
            release_after_s=cfg.failsafe.release_after_s,
        )

        # state (this task is its only writer)
        self.dispatches: dict[str, DispatchRecord] = {}
        self.memory: dict[str, MinerMemory] = {}
        self.failsafe: fs.FailsafeState | None = None
        self._fs_saved: tuple[bool, float | None, bool] | None = None  # what the last failsafe record showed
        self.wake_times: tuple[float, ...] = ()
        self.target: Target | None = None
        self.plan: Plan | None = None
        self.level_kw: float | None = None  # the ramped level planned for last tick
        self.ramps: dict[str, float] = {}  # where each ramped input's own path is (arbitration.ramped_level)
        self.ramp_credit_kw = 0.0  # ramp-up credit left unspent (ramp.ramp_credit_kw: a token bucket)
        self._arb_inputs = ArbitrationInputs(cfg.site.cap_kw)  # what the last arbitration was given
        self.bias_kw = 0.0  # closed-loop correction: measured above target → plan lower
        self.alarms: dict[str, str] = {}
        self.in_flight: dict[str, Change] = {}  # commands sent and not yet answered
        self.decreasing: set[str] = set()  # told to sleep, not yet seen asleep (_hold_rises)
        self.seen_on: dict[str, bool] = {}
        self.tick_n = 0
        self.tick_ms = 0.0
        self.tick_at: float | None = None
        self.last_report: Report | None = None
        self.status_doc: dict[str, Any] = {}
        self._status_stale = False  # a command changed what the doc shows since it was built

        self._inbox: asyncio.Queue[tuple[Command, asyncio.Future[Reply]]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._early = False
        self._fast_done = False
        self._stopping = False
        self._actuations: set[asyncio.Task[None]] = set()
        self._dirty_controls: set[str] = set()
        self._rises_held = False  # wakes and raises held while the store cannot write them ahead (_write_ahead)
        self._controls_saved_at = 0.0
        self._last_snapshot_ts: float | None = None
        self._last_ack_at = -math.inf  # when a miner last acknowledged a command
        # since when the plan in force has been carried out in full (a tick found nothing to send, nothing on the
        # wire, nothing awaiting confirmation); None: not yet, or a later plan changed something
        self._settled_at: float | None = None
        self._energy = EnergyMeter(max_gap_s=max(120.0, 10 * cfg.polling.interval_s, 30 * clock.scale))
        self._watchdog_every: float | None = None
        self._watchdog_at = 0.0
        self.sweep_request: asyncio.Event | None = None  # set by the app: ask the sweep loop for a fresh picture
        # set by the app: called with True when a command batch goes out while none is on the wire, False when the
        # last one is answered (the fleet pauses its sweeps in between: commands first)
        self.on_actuating: Callable[[bool], None] | None = None
        self._batches_out = 0
        # the site meter (site.meter): the cap and every target apply to what it reads (agent.runtime.metering)
        mcfg = cfg.site.meter
        self.meter: MeterControl | None = None
        if meter is not None and mcfg is not None:
            # the miners' sum must hold for the meter's lag and one sweep before metered − Σ miners is a sample
            self.meter = MeterControl(meter, mcfg, started_at=self.clock.time(),
                                      band_kw=METER_BAND_SHARE * cfg.site.cap_kw,
                                      align_s=mcfg.lag_s + cfg.polling.interval_s)  # fmt: skip
        # under-frequency response (frequency_response): sheds a tripped stage at once, holds it through arbitration
        self.frequency: FrequencyResponse | None = None
        if cfg.frequency_response is not None and self.meter is not None:
            port = self.meter.meter
            self.frequency = FrequencyResponse(
                cfg.frequency_response, self, clock=self.clock.time, meter_fresh=lambda: port.status().fresh,
                wall_scale=clock.scale, meter_poll_s=self.meter.cfg.poll_s, prepare=self.actuator.prepare,
            )  # fmt: skip
            self.meter.frequency = self.frequency
        self.miner_level_kw: float | None = None  # the miners' share of the level, planned for last tick
        self.plan_kw: float | None = None  # what the planner was given last tick (the miners' level less the bias)
        # cooling that follows circuits' miners (site.circuits[].cooling): a wake waits for it (agent.runtime.facility)
        self.facility = FacilityControl.from_config(cfg, self.tree, self.clock, raise_alarm=self._raise_alarm,
                                                    clear_alarm=lambda key: self.alarms.pop(key, None))  # fmt: skip

    # ============================================================================================= start-up
    @property
    def cap_kw(self) -> float:
        """The licensed cap: no command may ask for more."""
        return self.licensed_cap_kw

    @property
    def runtime_cap_kw(self) -> float | None:
        """The lower of the run-time caps (grid, operator), or None when neither is set."""
        caps = [c for c in (self.grid_cap_kw, self.operator_cap_kw) if c is not None]
        return min(caps) if caps else None

    def effective_cap_kw(self) -> float:
        return effective_cap_kw(self.licensed_cap_kw, self.grid_cap_kw, self.operator_cap_kw)

    @property
    def settled_at(self) -> float | None:
        """Since when the plan in force has been carried out in full (None: the fleet is still being moved)."""
        return self._settled_at

    def counted_present_kw(self) -> float:
        """The site's power now as the last plan counted it: what the miners draw (measured, or estimated where a
        miner reports no watts), and every miner it cannot read at the worst case the plan counts it at. "Curtail by X"
        is taken from this: the planner holds the level against the same count, so a level taken from the readings
        alone falls below what the silent miners are counted at and sleeps every miner that answers. (Not the plan's
        own worst case: waking miners count there at full power, and "by X" is from what the site draws now.)"""
        read_kw = self.fleet.latest().power_w / 1000.0
        miners_kw = read_kw if self.plan is None else self.plan.counted_now_kw
        # with a site meter, targets apply at the meter: the rest of the site (what it reads above the miners, or
        # the allowance while it is stale) is part of what the site draws now
        t = None if self.meter is None else self.meter.last
        if t is None:
            return miners_kw
        return miners_kw + (t.base_kw if t.non_miner_kw is None else max(0.0, t.non_miner_kw))

    def save_caps(self) -> None:
        self.store.set_state(CAPS_STATE_KEY, {"grid_kw": self.grid_cap_kw, "operator_kw": self.operator_cap_kw})

    def _save_failsafe(self, now: float) -> None:
        """Record the grid link for the next run (failsafe.resume), in wall time, when what it shows changed: once
        a heartbeat (the tick after it), on entering or leaving the fail-safe, and on a wall-clock step."""
        f = self.failsafe
        shown = None if f is None else (f.active, f.last_heartbeat, self._clock_step_s is not None)
        if f is None or shown == self._fs_saved:
            return
        self._fs_saved = shown
        link = fs.saved_link(f, now, self.clock.wall(), clock_stepped=self._clock_step_s is not None,
                             boot=boot_clock(self.clock))  # fmt: skip
        self.persist.call("set_state", FAILSAFE_STATE_KEY, fs.link_doc(link), now)

    def _load_caps(self) -> None:
        def kw(value: Any) -> float | None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            return float(value) if ok else None

        caps = self.store.get_state(CAPS_STATE_KEY, None)
        if isinstance(caps, dict):
            self.grid_cap_kw, self.operator_cap_kw = kw(caps.get("grid_kw")), kw(caps.get("operator_kw"))
        else:
            # state written before caps were kept by source: one cap of unknown source. Taken as the grid's, the
            # safe reading (a local `cap` cannot lift it without --lift-grid-cap)
            self.grid_cap_kw, self.operator_cap_kw = kw(self.store.get_state("runtime_cap_kw", None)), None

    def restore(self, *, safe_start: str | None = None) -> None:
        """Load state from the store (after the first sweep, before the first tick)."""
        now = self.clock.time()
        snap = self.fleet.latest()
        present_kw = snap.power_w / 1000.0
        self._load_caps()
        # what the last run stored is on its time, which the wall may have stepped away from while it ran: moved
        # onto this run's (core.timeline), or an override would end early, or late, after a wall-clock step
        shift = timeline.shift_s(self.store.get_state(timeline.TIMELINE_STATE_KEY, None),
                                 wall_offset_s=self.clock.wall_offset_s(), threshold_s=self.clock.step_threshold_s)
        moved_controls: dict[str, MinerControl] = {}
        ahead_s = 0.0  # how far times recorded by the last run are ahead of the clock now: the wall went back
        for ip, stored_control in self.store.load_controls().items():
            control = dataclasses.replace(stored_control, since=stored_control.since + shift)
            if shift:
                moved_controls[ip] = control
            mem = self.memory[ip] = MinerMemory.from_control(control)
            if mem.pending_op is not None:
                mem.pending_at = now  # a wake the last run may have sent: telemetry confirms it from now on
            if mem.last_transition > now:  # its min on/off time runs from now, not from a time still to come
                ahead_s = max(ahead_s, mem.last_transition - now)
                mem.last_transition = now
        for stored, status, progress in self.store.load_dispatches(active_only=True):
            rec = DispatchRecord.from_stored(stored, status, dict(progress or {})).moved(shift)
            d = rec.dispatch
            if rec.status == "active" and d.start > now:
                # it was binding when the last run stopped: a wall clock that went back must not un-bind it (the
                # store keeps the start the grid gave; this run holds it from now)
                ahead_s = max(ahead_s, d.start - now)
                rec.dispatch = dataclasses.replace(d, start=now)
            self.dispatches[d.id] = rec
            if rec.open and d.expired_at(now):
                self.close_dispatch(rec, now, "expired", "expired while the agent was down", commit=True)
        moved = [rec for rec in self.dispatches.values() if rec.open] if shift else []
        doc = timeline.timeline_doc(self.clock.wall_offset_s())
        self.persist.write("timeline", lambda store: save_on_timeline(store, doc, moved_controls, moved))
        if shift:
            self._raise_alarm("clock_step", f"the wall clock was {shift:+.0f} s from the last run's time (it "
                              "stepped while the agent ran); the dispatch windows, overrides and min on/off times "
                              "that run stored keep its time, moved onto the wall's: check the gateway's time (NTP)")
        self._energy.pin_closed(now - now % 60, self)  # what the last run recorded is complete up to this minute
        # an under-frequency event the last run held holds on, from the first plan, until its restore rule is met
        saved_event = self.store.get_state(FREQUENCY_STATE_KEY, None)
        if self.frequency is not None:
            self.frequency.resume(saved_event, shift_s=shift, now=now)
        elif saved_event is not None:
            log.warning("an under-frequency event was held when the agent stopped; frequency response is off now")
            self.persist.call("delete_state", FREQUENCY_STATE_KEY)
        # within the heartbeat timeout of a healthy link the site carries on uncurtailed (failsafe.resume)
        saved_link = fs.link_from_doc(self.store.get_state(FAILSAFE_STATE_KEY, None))
        self.failsafe = fs.resume(
            now,
            self.clock.wall(),
            self.fs_rules,
            min(present_kw, self.effective_cap_kw()),
            saved_link,
            boot=boot_clock(self.clock),
            jump_tolerance_s=self.clock.step_threshold_s * self.clock.scale,
        )
        if saved_link is not None and not self.failsafe.active and self.failsafe.last_heartbeat is not None:
            log.info("grid link resumed: healthy when the agent stopped, no fail-safe",
                     heartbeat_age_s=round(now - self.failsafe.last_heartbeat, 1))  # fmt: skip
        self.level_kw = min(present_kw, self.effective_cap_kw())
        # the correction starts at nothing and learns only from a plan that was carried out (_correct): what the
        # site draws above its cap at start is what the first plan cuts, not model error
        self.bias_kw = 0.0
        self._settled_at = None
        if safe_start is not None:
            self._enter_safe_start(now, present_kw, safe_start)
        if ahead_s > self.clock.step_threshold_s:
            self._raise_alarm("clock_step", f"the wall clock is {ahead_s:.0f} s behind times the last run recorded "
                              "(it went back while the agent was down); bound dispatches stay bound, min on/off "
                              "times run from now: check the gateway's time (NTP)")  # fmt: skip
        log.info(
            "state restored", dispatches=sum(1 for r in self.dispatches.values() if r.open),
            controls=len(self.memory), grid_cap_kw=self.grid_cap_kw, operator_cap_kw=self.operator_cap_kw,
            failsafe=self.failsafe.active,
            present_kw=round(present_kw, 2),
        )  # fmt: skip

    def _enter_safe_start(self, now: float, present_kw: float, why: str) -> None:
        level = self.fs_rules.level_kw if self.fs_rules.level_kw is not None else present_kw
        level = min(level, self.effective_cap_kw())
        d = Dispatch(SAFE_START_ID, Source.OPERATOR, now, now, None, target_kw=round(level, 3))
        rec = DispatchRecord(d, "active", now, channel="agent", accepted_at=now)
        self.dispatches[d.id] = rec
        self._raise_alarm("safe_start", f"{why}; holding {level:.1f} kW until an operator runs `hashflex resume`")
        # the store may be the thing that is broken (the safe start is also remembered outside it: app.open_store)
        self.persist.call("save_dispatch", d, rec.status, **rec.progress())

    # ============================================================================================= commands
    async def submit(self, command: Command, timeout_s: float = 30.0) -> Reply:
        """Hand a validated command to the control loop; returns once it is applied and persisted."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        await self._inbox.put((command, future))
        self._wake.set()
        async with asyncio.timeout(timeout_s):
            return await future

    def stored_reply(self, key: str) -> dict[str, Any] | None:
        stored = self.store.get_reply(key)
        return dict(stored) if stored is not None else None

    def heartbeat(self, payload: bytes) -> None:
        """HeartbeatSink: a grid heartbeat arrived."""
        if self.failsafe is None:
            return
        self.failsafe = fs.heartbeat(self.failsafe, self.clock.time())
        if self.failsafe.active:
            self.trigger()

    def trigger(self) -> None:
        """Ask for an early tick."""
        self._early = True
        self._wake.set()

    def record_refusal(self, summary: dict[str, Any]) -> None:
        """One audit record for an interval's refused commands (counts per channel and code, a digest sample):
        see agent.runtime.service.RefusalAudit. Never one record per refusal."""
        self.store.append_audit(AuditKind.COMMAND, {"status": "refused", **summary}, self.clock.time())

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, future = self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                return
            if future.done():
                continue
            try:
                reply = apply_command(self, command)
            except Exception as exc:
                log.exception("command failed", verb=command.verb, id=command.id)
                future.set_exception(exc)
                continue
            if reply.is_ok:  # the last tick's doc no longer shows the caps, dispatches and alarms: rebuilt on read
                self._status_stale = True
            future.set_result(reply)

    def close_dispatch(
        self,
        rec: DispatchRecord,
        now: float,
        status: str,
        reason: str,
        *,
        events: list[tuple[str, dict[str, Any]]] | None = None,
        commit: bool = False,
    ) -> None:
        """End a dispatch (cancelled, expired, failed), persist it and audit its compliance."""
        if status == "cancelled":
            rec.dispatch = ended_copy(rec.dispatch, now)  # arbitration still sees it for holds and debounce
        rec.status, rec.closed_at, rec.close_reason = status, now, reason
        data = {"id": rec.dispatch.id, "source": rec.dispatch.source.value, "status": status, "reason": reason}
        data.update({k: v for k, v in rec.doc().items() if k in _COMPLIANCE_FIELDS})

        dispatch, progress, record = rec.dispatch, rec.progress(), dict(data)

        def write(store: Any) -> None:
            store.save_dispatch(dispatch, status, **progress)
            crash_point("closing")
            store.append_audit(AuditKind.COMPLIANCE, record, now)

        def write_together(store: Any) -> None:
            with store.transaction():
                write(store)

        if commit:  # the loop's own close (expired): write-behind, so a refusing store does not stop the loop
            self.persist.write(f"close {rec.dispatch.id}", write_together)
        else:  # inside a command's transaction: commits with the command, or the command is refused
            write(self.store)
        event = {"cancelled": "cancelled", "expired": "expired"}.get(status, "failed")
        if events is None:
            self.events.emit(event, **data)
        else:
            events.append((event, data))
        if self.metrics is not None:
            self.metrics.count_dispatch(status)
        log.info("dispatch closed", **data)

    # ============================================================================================= loop
    async def run(self) -> None:
        """Tick until cancelled. Commands are applied as they arrive; ticks every tick_s and early on demand."""
        tick_wall = self.clock.to_wall(self.cfg.control.tick_s)
        last_tick = -math.inf
        try:
            while not self._stopping:
                wait = max(0.0, last_tick + tick_wall - time.monotonic())
                if self._early:
                    wait = min(wait, max(0.0, last_tick + MIN_EARLY_GAP_S - time.monotonic()))
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                self._wake.clear()
                commanded = not self._inbox.empty()
                self._drain_inbox()
                due = time.monotonic() >= last_tick + tick_wall
                early = self._early and time.monotonic() >= last_tick + MIN_EARLY_GAP_S
                if (due or early) and not commanded and self.frequency is not None and self.frequency.defer_tick():
                    # an under-frequency stage's sleeps are on the wire, or about to be: no tick holds the loop
                    # under them (bounded, agent.runtime.frequency.DEFER_TICK_MAX_S; the batch's end asks for a
                    # tick); a command just applied is planned at once
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self._wake.wait()
                    continue
                if due or early:
                    self._early = False
                    last_tick = time.monotonic()
                    try:
                        self.tick()
                    except StoreError as exc:  # a store call not behind the write-behind: the loop goes on
                        log.exception("tick: state store error")
                        self._raise_alarm("store_unavailable", f"the state store failed in a tick: {exc}")
        finally:
            self._fail_waiting()
            for task in list(self._actuations):
                task.cancel()
            if self._actuations:
                await asyncio.gather(*self._actuations, return_exceptions=True)
            with contextlib.suppress(Exception):
                self._save_controls(force=True)
            with contextlib.suppress(Exception):
                self._energy.flush(self)
            if self.facility is not None:
                await self.facility.close()

    def _fail_waiting(self) -> None:
        while not self._inbox.empty():
            _cmd, future = self._inbox.get_nowait()
            if not future.done():
                future.set_exception(TimeoutError("the agent is stopping"))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def on_snapshot(self, snap: Any) -> None:
        """The sweep loop has a new picture: account energy, and tick early when it can confirm or correct."""
        self._energy.add(snap, self)
        if any(m.pending_op for m in self.memory.values()) or self._unmet_dispatch():
            self.trigger()

    def _unmet_dispatch(self) -> bool:
        return any(r.open and r.target_met_at is None for r in self.dispatches.values())

    # ============================================================================================= tick
    def tick(self) -> None:
        started = time.perf_counter()
        now = self.clock.time()
        snap = self.fleet.latest()
        dt = self.cfg.control.tick_s if self.tick_at is None else max(0.0, now - self.tick_at)
        self.tick_at = now
        self.tick_n += 1
        self._check_clock()
        self._advance_dispatches(now)
        target = self._arbitrate(now)
        views = self._views(snap, now)
        by_ip = {v.id: v for v in views}
        present_kw = snap.power_w / 1000.0
        measured_fresh = self._last_snapshot_ts != snap.ts
        self._last_snapshot_ts = snap.ts
        prev_level = self.level_kw if self.level_kw is not None else present_kw
        metered = None if self.meter is None else self._observe_meter(present_kw, now)
        if self.frequency is not None:  # the pre-armed shed list, current for a stage that trips before next tick
            self.frequency.arm(views, self.in_flight, None if metered is None else metered.metered_kw, now)
        # the correction works on the miners (their sum against their share of the level); with a meter, what the
        # rest of the site draws is counted by its own rule (agent.core.site_meter), not corrected twice
        prev_miner_level = prev_level if metered is None or self.miner_level_kw is None else self.miner_level_kw
        if measured_fresh:
            # what the plan already counts per miner (measured above its setting) is not the site's to correct
            explained_kw = sum(excess_w(v, self.planner_rules.sleep_w) for v in views) / 1000.0
            self._correct(present_kw - explained_kw, prev_miner_level, snap.ts)
        # each input ramps on its own (an input without a ramp binds at once): the level is the lowest of them
        ramped = ramped_level(self._arb_inputs, now, dt, self.ramps, from_kw=prev_level)
        level, self.ramps = ramped.kw, ramped.ramps
        self.level_kw = level
        if self.meter is None:
            miner_level = level
            plan_kw = max(0.0, min(target.cap_kw, level - self.bias_kw))
            fast_drop = 1e-6
        else:
            miner_level = self.meter.miners_share(min(target.cap_kw, level), present_kw).miner_level_kw
            plan_kw = max(0.0, miner_level - self.bias_kw)
            fast_drop = max(1e-6, METER_FAST_DROP_SHARE * self.licensed_cap_kw)
        self.miner_level_kw, self.plan_kw = miner_level, plan_kw
        self.wake_times = prune_wake_times(self.wake_times, now, self.stagger)
        budget = wake_budget(self.wake_times, now, self.stagger)
        # the meter stale, or an under-frequency event holding (a grid in trouble gets no load back before the
        # event restores, even under its level): nothing wakes, no limit rises (held below too); sleeps still go
        hold_rises = (metered is not None and not metered.fresh) or (
            self.frequency is not None and self.frequency.held_kw is not None
        )
        if hold_rises:
            budget = 0
        up = self.cfg.control.ramp_up_kw_per_min
        # the ramp-up allowance builds up between ticks (a rate below one miner per tick must still wake miners)
        allowance = None if up is None else ramp_credit_kw(
            self.ramp_credit_kw, up, dt, ramp_credit_cap_kw(up, self.cfg.control.tick_s, largest_full_w(views) / 1000)
        )  # fmt: skip
        fast = miner_level < prev_miner_level - fast_drop or (
            measured_fresh and present_kw > plan_kw + self.cfg.control.tolerance_kw and not self._fast_done
        )
        # while sleeps sent earlier settle, rises are held (_hold_rises): an optimal plan now would lower running
        # miners to make room for wakes and raises that cannot go out, and the site would sink below its level
        # until the sleeps show (soak: 52 kW under a 62 kW time-of-use level after a fast cut). Sleep-only, no
        # wakes, meanwhile: it cuts only what the level needs; the optimal plan follows once they are confirmed.
        settling = self._settle_decreases(by_ip)
        if settling:
            budget = 0
        planner = plan_sleep_only if fast or settling else plan
        t_plan = time.perf_counter()
        new_plan = planner(
            plan_kw, views, self.tree, self.planner_rules, now, wake_budget=budget, ramp_allowance_kw=allowance
        )
        plan_ms = (time.perf_counter() - t_plan) * 1000
        self.ramp_credit_kw = spend_ramp_credit(allowance, new_plan.worst_case_kw - new_plan.ramp_from_kw)
        self.plan = new_plan
        self._fast_done = fast
        self._plan_alarms(new_plan)
        held_raises_w: list[float] = []
        changes = diff(
            new_plan.actions, by_ip, use_power_limits=self.cfg.control.use_power_limits,
            pending=self._blocked(), rank=_efficiency_rank, held_raises_w=held_raises_w,
            no_raise=self._just_lowered(now),
        )  # fmt: skip
        if allowance is not None and held_raises_w:
            # raises too small to send took ramp credit for a rise the site does not make: given back, or the
            # credit never grows past them and a ramped site creeps nowhere (soak: 7 miners asleep for good
            # under a dispatch at twice what it drew)
            self.ramp_credit_kw = min(allowance, self.ramp_credit_kw + sum(held_raises_w) / 1000.0)
        changes += self._recommands(new_plan, {c.ip for c in changes}, now)
        changes, held = self._hold_rises(changes, by_ip)
        changes, unwritten = self._write_ahead(changes)
        held += unwritten
        if hold_rises:
            changes, unmetered = self._hold_unmetered(changes)
            held += unmetered
        if self.facility is not None:  # every tick: cooling steps down with no change to send too; sleeps never wait
            changes, uncooled = self.facility.hold_wakes(changes, views, now)
            held += uncooled
        if changes:
            log.debug("changes", changes=[f"{c.ip} {c.op.value} {c.watts or ''}".strip() for c in changes[:50]])
            log.debug("planned from", views=[_describe(v) for v in views[:50]], worst_case_kw=new_plan.worst_case_kw)
            crash_point("planned")
            self._launch(changes, new_plan, fast, now)
            if fast and any(v.state in _RUNNING and ip not in self.in_flight for ip, v in by_ip.items()):
                # the optimal plan follows as soon as the fast one is out, to limit the miners the fast one left
                # running; when it is sleeping all of them there is nothing to plan until its results are in
                # (they tick again), and a tick now would only take CPU from the batch
                self.trigger()
        unconfirmed = any(m.pending_op and not m.ignores_commands for m in self.memory.values())
        if changes or held or self.in_flight or unconfirmed:
            self._settled_at = None
        elif self._settled_at is None:
            self._settled_at = now
        self._mark_commands_sent(now, len(changes))
        # targets apply where the site is measured: at the meter when there is one (its fallback when stale)
        self._dispatch_progress(snap, present_kw if metered is None else metered.site_kw, now)
        self._save_controls()
        self._store_health()
        self.tick_ms = (time.perf_counter() - started) * 1000
        if self.metrics is not None:
            self.metrics.observe_tick(self.tick_ms / 1000)
        self._publish_status(snap, now)
        self._notify_systemd()
        log.info(
            "tick", n=self.tick_n, target_kw=round(target.kw, 2), reason=target.reason, level_kw=round(plan_kw, 2),
            cap_kw=round(target.cap_kw, 2), power_kw=round(present_kw, 2),
            worst_case_kw=round(new_plan.worst_case_kw, 2), method=new_plan.method, planned=len(new_plan.actions),
            site_kw=None if metered is None else round(metered.site_kw, 2),
            sent=len(changes), in_flight=len(self.in_flight), unreachable=snap.unreachable,
            failsafe=target.failsafe, plan_ms=round(plan_ms, 1), dur_ms=round(self.tick_ms, 1),
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------- arbitration
    def _check_clock(self) -> None:
        """Alarm on a wall-clock step: the agent keeps its own time (SteadyClock), so nothing un-binds or fires
        early, but an operator must know the gateway's clock jumped (and that dispatch windows keep the old one)."""
        offset = self.clock.wall_offset_s()
        threshold = self.clock.step_threshold_s
        if abs(offset) > threshold:
            if self._clock_step_s is None or abs(offset - self._clock_step_s) > threshold:
                self._clock_step_s = offset
                self._save_timeline(offset)
                self._raise_alarm(
                    "clock_step",
                    f"the wall clock stepped {offset:+.0f} s from the agent's time; timers and dispatch windows keep "
                    f"the agent's time, which follows the wall at most {self.clock.max_slew * 100:.2g} % (a restart "
                    "adopts the wall clock and moves them onto it): check the gateway's time (NTP)",
                )  # fmt: skip
        elif self._clock_step_s is not None:  # (the alarm restore raises for a clock behind the store stays)
            self._clock_step_s = None
            self._save_timeline(offset)
            self.alarms.pop("clock_step", None)
            log.info("wall clock back in step with the agent's time", offset_s=round(offset, 3))

    def _save_timeline(self, wall_offset_s: float) -> None:
        """Record how far the wall is from this run's time: the next run reads this run's times with it."""
        self.persist.call("set_state", timeline.TIMELINE_STATE_KEY, timeline.timeline_doc(wall_offset_s),
                          self.clock.time())  # fmt: skip

    def _advance_dispatches(self, now: float) -> None:
        keep_s = retention_s(self.arb_rules)
        for rec in list(self.dispatches.values()):
            if rec.open:
                if rec.dispatch.expired_at(now):
                    self.close_dispatch(rec, now, "expired", "window ended", commit=True)
                elif rec.status == "pending" and rec.dispatch.active_at(now):
                    rec.status = "active"
                    self.persist.call("update_dispatch", rec.dispatch.id, status="active")
            elif rec.closed_at is not None and now - rec.closed_at > keep_s and rec.dispatch.id in self.dispatches:
                # out of arbitration's reach: forget it here (the store keeps it)
                end = rec.dispatch.end if rec.dispatch.end is not None else rec.closed_at
                if now - max(end, rec.closed_at) > keep_s:
                    del self.dispatches[rec.dispatch.id]

    def _arbitrate(self, now: float) -> Target:
        assert self.failsafe is not None
        prev = self.failsafe
        hold = self.target.kw if self.target is not None else (self.level_kw or self.effective_cap_kw())
        self.failsafe = fs.evaluate(prev, now, self.fs_rules, hold)
        self._save_failsafe(now)
        if self.failsafe.active != prev.active:
            kind = "failsafe_entered" if self.failsafe.active else "failsafe_exited"
            data = {"reason": self.failsafe.reason or prev.reason, "level_kw": self.failsafe.level_kw}
            audit = AuditKind.FAILSAFE_ENTER if self.failsafe.active else AuditKind.FAILSAFE_EXIT
            self.persist.audit(audit, data, now)
            self.events.emit(kind, **data)
            log.warning(kind, **data) if self.failsafe.active else log.info(kind, **data)
        inputs = ArbitrationInputs(
            licensed_cap_kw=self.licensed_cap_kw,
            grid_cap_kw=self.grid_cap_kw,
            operator_cap_kw=self.operator_cap_kw,
            dispatches=[r.dispatch for r in self.dispatches.values() if r.status != "failed"],
            schedule=self.schedule,
            failsafe_kw=fs.limit_kw(self.failsafe),
            rules=self.arb_rules,
            frequency_kw=None if self.frequency is None else self.frequency.held_kw,
        )
        self._arb_inputs = inputs
        target = arbitrate(inputs, now)
        old = self.target
        if old is None or abs(old.kw - target.kw) > 1e-6 or old.reason != target.reason or old.cap_kw != target.cap_kw:
            data = {"kw": round(target.kw, 3), "reason": target.reason, "source": target.source.value,
                    "cap_kw": target.cap_kw, "failsafe": target.failsafe, "detail": target.detail,
                    "from_kw": None if old is None else round(old.kw, 3)}  # fmt: skip
            self.persist.audit(AuditKind.TARGET_CHANGE, data, now)
            self.events.emit("target_changed", **data)
            log.info("target changed", **data)
            self._fast_done = False
        self.target = target
        return target

    # ----------------------------------------------------------------------------------------- views
    def _views(self, snap: Any, now: float) -> list[MinerView]:
        stale = self.cfg.polling.stale_after_s
        views: list[MinerView] = []
        for ip, ms in snap.miners.items():
            mem = self.memory.get(ip)
            if mem is None:
                mem = self.memory[ip] = MinerMemory()
            ident = ms.identity
            fresh = ms.reachable and ms.age_s is not None and ms.age_s <= stale
            self._confirm(ip, ms, mem, fresh=fresh, snap_ts=snap.ts, now=now)
            cap = OnOff() if mem.limits_unsupported else ident.capability
            stock = stock_w(cap, ident.nominal_w)
            commanded = mem.commanded_w
            if commanded is None and ms.reading is not None and ms.reading.power_limit_w:
                commanded = float(ms.reading.power_limit_w)
            # a command in flight, or acknowledged and not yet seen in telemetry, is taken as done (so the next
            # plan does not count the miner twice); a miner that ignores commands is taken as it is
            told = self.in_flight.get(ip)
            told_op = told.op if told is not None else (Op(mem.pending_op) if mem.pending_op else None)
            told_w = told.watts if told is not None else mem.pending_w
            if mem.ignores_commands:
                told_op = None
            if told_op is Op.SET_POWER and told_w is not None:
                commanded = float(told_w)
            running = (
                MinerState.THROTTLED if commanded is not None and commanded < stock - 1 else MinerState.HASHING
            )
            hint = ms.state_hint
            if hint == "sleeping" and not mem.asleep_by_us:
                # off, and not by us: believe it once it lasts (a firmware re-tuning after a new limit, or a
                # restarting miner, shows off for a moment); until then it counts as running, which is safe
                if mem.off_seen_at is None:  # (found off at start-up: nothing to wait for)
                    first_look = ip not in self.seen_on
                    mem.off_seen_at = now - self.cfg.control.confirm_after_s if first_look else now
                if now - mem.off_seen_at < self.cfg.control.confirm_after_s:
                    hint = "hashing"
            else:
                mem.off_seen_at = None
            if hint in ("sleeping", "waking") and now - mem.limited_at < self.cfg.control.confirm_after_s \
                    and not mem.asleep_by_us:  # fmt: skip
                # re-tuning to the limit it just accepted; not when we slept it since (a fast cut right after a
                # raise: taken for a miner that had just come on, it was "kept on" by min-on and sent a limit)
                hint = "hashing"
            if not fresh:
                state = MinerState.UNREACHABLE
            elif told_op is Op.SLEEP:
                state = MinerState.SLEEPING
            elif told_op is Op.WAKE:
                state = MinerState.WAKING
            elif hint == "sleeping" or (hint == "unknown" and mem.asleep_by_us):
                state = MinerState.SLEEPING
            elif hint == "waking" and not mem.asleep_by_us:
                state = MinerState.WAKING
            elif hint == "waking":
                state = MinerState.SLEEPING  # not hashing, still drawing: we slept it and it is powering down
            else:
                state = running
            if fresh:
                self._track_transition(ip, mem, state, now)
            if state in _RUNNING:
                mem.woken_to_w = None  # up: it runs at its limit now, whatever it woke to
            up_at = commanded if commanded is not None else stock  # what it draws once up
            if fresh and mem.wake_sent_at is not None and not readout.still_waking(mem, ms, up_at, now):
                mem.wake_sent_at = None  # up by its power: the status shows it as it is from now on
            # what it reports drawing, once its present setting had time to take effect: counted at no less
            # (a command on the wire, or acknowledged within confirm_after_s, is still settling; a sleep not yet
            # seen is `_confirm`'s: re-sent, then the miner is counted at its real draw as ignoring commands)
            measured_w = None
            if (fresh and ms.measured and told is None and not mem.ignores_commands and ms.age_s is not None
                    and (state in _RUNNING or (state is MinerState.SLEEPING and mem.pending_op is None))
                    and self._settled(mem, snap.ts - ms.age_s, float(ms.power_w))):
                measured_w = float(ms.power_w)
                if state in _RUNNING:
                    setting = commanded if commanded is not None else stock
                    if self._lowers_excess(mem, snap.ts - ms.age_s, measured_w, setting):
                        mem.excess_w, mem.excess_setting_w = max(0.0, measured_w - setting), setting
                    else:  # coming up from a wake or a re-tune: what it drew above its setting is still counted
                        measured_w = max(measured_w, setting + mem.excess_w)
            elif state in _RUNNING and not mem.ignores_commands:
                # settling at a new setting: the excess it showed at the last one is still counted (not doing so
                # let the plan raise a drifting miner back over its circuit cap every time it moved its limit),
                # and so is a larger one it shows meanwhile above both settings (a drift that began meanwhile)
                setting = commanded if commanded is not None else stock
                if fresh and ms.measured and told is None:
                    above = float(ms.power_w) - max(setting, mem.excess_setting_w)
                    mem.excess_w = max(mem.excess_w, above)
                if mem.excess_w > 0:
                    measured_w = setting + mem.excess_w
            elif state is MinerState.WAKING and mem.excess_w > 0 and not mem.ignores_commands:
                # the excess it showed when it last ran is kept while it sleeps (a drifting PSU drifts after a wake
                # too) and counted from its wake on, above what it comes up at: forgotten at each sleep, a drifting
                # miner was woken at its bare limit and counted so until its readings settled, and the site ran
                # over its limit each time a cut slept one drifter and the re-plan woke another (soak 20261208)
                measured_w = (mem.woken_to_w or up_at) + mem.excess_w
            if mem.failed_op is not None and now < mem.failed_retry_at and told is None:
                # its last command failed and it is left alone until the back-off ends (`_blocked`); that command
                # may or may not have taken, so the plan counts it as one it cannot reach: no action, at the larger
                # of its full power and its draw (not at what the plan would like it to do)
                state = MinerState.UNREACHABLE
            views.append(
                MinerView(
                    id=ip, family=ident.family, capability=cap, nominal_w=ident.nominal_w,
                    nominal_ths=ident.nominal_ths, state=state, power_w=ms.power_w if fresh else None,
                    commanded_w=commanded, asleep_by_us=mem.asleep_by_us, last_transition=mem.last_transition,
                    circuit=self.circuit_of.get(ip), priority=self.priority_of.get(ip, 0),
                    ignores_commands=mem.ignores_commands, measured_w=measured_w,
                    woken_to_w=mem.woken_to_w if state is MinerState.WAKING else None,
                )
            )  # fmt: skip
        views.extend(self._unidentified_views(snap))
        return views

    def _settled(self, mem: MinerMemory, read_at: float, power_w: float) -> bool:
        """Has the miner's draw settled at its present setting, by this reading? Yes once confirm_after_s has
        passed since it acknowledged the change, or earlier once two readings after it agree (its ramp is over)."""
        if read_at >= mem.changed_at + self.cfg.control.confirm_after_s or mem.settled:
            return True
        if read_at <= mem.changed_at:
            return False  # taken before the change
        if mem.probe_at <= mem.changed_at:
            mem.probe_at, mem.probe_w = read_at, power_w  # the first reading since the change
            return False
        if read_at > mem.probe_at:
            if abs(power_w - mem.probe_w) <= max(SETTLED_W, SETTLED_SHARE * max(power_w, mem.probe_w)):
                mem.settled = True
                return True
            mem.probe_at, mem.probe_w = read_at, power_w
        return False

    @staticmethod
    def _lowers_excess(mem: MinerMemory, read_at: float, power_w: float, setting_w: float) -> bool:
        """May this settled reading of a running miner lower the excess it showed above its setting? Only once it
        draws what it will: two readings in a row that agree, near its setting or above. A miner coming up from a
        wake or re-tuning to a new limit reads low for a minute while it ramps to its drifted draw: taken at its
        word, the plan forgot the drift, counted it at its bare limit (or raised it) and the site ran over."""
        prev_at, prev_w = mem.last_read
        if read_at > prev_at:
            mem.last_read = (read_at, power_w)
        if power_w - setting_w >= mem.excess_w:
            return True
        steady = read_at > prev_at and abs(power_w - prev_w) <= max(SETTLED_W, SETTLED_SHARE * max(power_w, prev_w))
        return steady and power_w >= EXCESS_GONE_SHARE * setting_w

    def _unidentified_views(self, snap: Any) -> list[MinerView]:
        """Configured addresses no miner has answered at yet (booting, unplugged, refusing connections at start):
        the fleet retries them in the background; until one is identified it is held at a worst case (the fleet's
        `unknown_w`) on its circuit and the site, and an alarm names them. Zero would let the site run over its
        cap the moment they come back."""
        held: dict[str, float] = dict(getattr(snap, "unidentified", {}) or {})
        if not held:
            self.alarms.pop("unidentified", None)
            return []
        names = sorted(held, key=_ip_sort_key)
        shown = ", ".join(names[:UNIDENTIFIED_NAMED]) + (f" and {len(names) - UNIDENTIFIED_NAMED} more"
                                                        if len(names) > UNIDENTIFIED_NAMED else "")  # fmt: skip
        self._raise_alarm(
            "unidentified",
            f"{len(names)} configured addresses not identified yet, each counted at {max(held.values()):.0f} W "
            f"until it answers: {shown}",
        )
        return [
            MinerView(
                id=ip, family=Family.OTHER, capability=OnOff(), nominal_w=w, nominal_ths=0.0,
                state=MinerState.UNREACHABLE, power_w=None, commanded_w=None, circuit=self.circuit_of.get(ip),
                priority=self.priority_of.get(ip, 0),
            )
            for ip, w in held.items()
        ]  # fmt: skip

    def _track_transition(self, ip: str, mem: MinerMemory, state: MinerState, now: float) -> None:
        """A miner seen switching on or off by itself (or by someone else) starts its min on/off time too."""
        on = state is not MinerState.SLEEPING
        was = self.seen_on.get(ip)
        self.seen_on[ip] = on
        if was is not None and was != on and mem.pending_op is None:
            mem.last_transition = now
            self._dirty_controls.add(ip)

    def _confirm(self, ip: str, ms: Any, mem: MinerMemory, *, fresh: bool, snap_ts: float, now: float) -> None:
        """Closed loop per miner: did the last acknowledged command show in telemetry? And, once it did: does the
        miner still keep to it? (One measured above its limit beyond the slack is re-commanded, and after
        MAX_RECOMMANDS counted at its real draw as ignoring commands; until then the plan counts it at what it
        measures, see `_views`.)"""
        if not fresh or ms.age_s is None:
            return
        if mem.pending_op is None:
            self._watch_setting(ip, ms, mem, snap_ts=snap_ts, now=now)
            return
        read_at = snap_ts - ms.age_s
        if read_at <= mem.pending_at:
            return  # no reading taken after the command yet
        nominal = max(1.0, ms.identity.nominal_w)
        power = ms.power_w
        if mem.pending_op == Op.SLEEP:
            complied = ms.state_hint == "sleeping" or power < SLEEP_CONFIRM_SHARE * nominal
        elif mem.pending_op == Op.WAKE:
            complied = ms.state_hint in ("hashing", "waking") or power >= SLEEP_CONFIRM_SHARE * nominal
        else:
            limit = mem.pending_w or nominal
            complied = not ms.measured or power <= limit * LIMIT_CONFIRM_SLACK + LIMIT_CONFIRM_W
        if complied:
            if mem.ignores_commands:
                log.info("miner obeys again", ip=ip, op=mem.pending_op)
                self.alarms.pop(f"ignores:{ip}", None)
            mem.pending_op, mem.pending_w, mem.recommands, mem.ignores_commands = None, None, 0, False
            mem.resend_due = False
            self._dirty_controls.add(ip)
            return
        if now - mem.pending_at < self.cfg.control.confirm_after_s:
            return
        if mem.ignores_commands:
            return  # re-sent now and then by _recommands
        if mem.recommands >= MAX_RECOMMANDS and mem.pending_op == Op.SET_POWER.value:
            # it takes commands and keeps drawing above its limit (a drifting PSU, firmware re-tuning up): a miner
            # that ignores its limit, not one that ignores a sleep. Controlled by sleep and wake from now on, at
            # what it draws (its excess over stock is counted, `_views`); marked uncontrollable it was never slept,
            # not even by a fail-safe to 0 kW (soak: 4 drifting LuxOS miners held a site at 9.8 kW)
            msg = (f"{ip} acknowledged a {mem.pending_w or 0:.0f} W limit {MAX_RECOMMANDS + 1} times and draws "
                   f"{power:.0f} W: controlled by sleep and wake only, counted at what it draws")  # fmt: skip
            mem.limits_unsupported = True
            mem.pending_op, mem.pending_w, mem.recommands, mem.resend_due = None, None, 0, False
            self._dirty_controls.add(ip)
            log.warning("miner ignores its power limit", ip=ip, power_w=round(power))
            self._raise_alarm(f"ignores_limits:{ip}", msg, quiet=True)
            return
        if mem.recommands >= MAX_RECOMMANDS:
            mem.ignores_commands = True
            mem.retry_at = now + 10 * self.cfg.control.confirm_after_s
            self._dirty_controls.add(ip)
            msg = f"{ip} acknowledged {mem.pending_op} {mem.recommands + 1} times and draws {power:.0f} W"
            log.warning("miner ignores commands", ip=ip, op=mem.pending_op, power_w=round(power), told_w=mem.pending_w)
            self._raise_alarm(f"ignores:{ip}", msg, quiet=True)
            return
        mem.resend_due = True

    def _watch_setting(self, ip: str, ms: Any, mem: MinerMemory, *, snap_ts: float, now: float) -> None:
        """A confirmed limit is not the end of it: firmware drifts above its setting (PSU ageing, LuxOS ATM
        stepping its profile up). Measured above its limit beyond the confirmation slack, once its setting had time
        to take effect: send the limit again (the re-send and ignoring rules of `_confirm` take it from there)."""
        confirm = self.cfg.control.confirm_after_s
        limit = mem.commanded_w
        if limit is None or mem.asleep_by_us or mem.limits_unsupported or not ms.measured:
            return
        if ms.state_hint in ("sleeping", "waking") or snap_ts - ms.age_s < mem.changed_at + confirm:
            return
        if ms.power_w <= limit * LIMIT_CONFIRM_SLACK + LIMIT_CONFIRM_W:
            return
        mem.pending_op, mem.pending_w = Op.SET_POWER.value, int(limit)
        mem.pending_at = now - confirm  # due for a re-send on this tick (see _recommands)
        mem.recommands, mem.resend_due = 0, True
        self._dirty_controls.add(ip)
        log.warning("miner draws above its limit", ip=ip, power_w=round(ms.power_w), limit_w=round(limit))

    def _blocked(self) -> dict[str, Op]:
        """Miners the diff leaves alone: a command is on the wire, or one failed and its back-off is not over (the
        views count such a miner at its worst case). (An acknowledged command awaiting confirmation needs no
        block: the views already take it as done, so the diff only sends what the plan changes.)"""
        now = self.clock.time()
        out = {ip: Op(m.failed_op) for ip, m in self.memory.items() if m.failed_op and now < m.failed_retry_at}
        out.update({ip: c.op for ip, c in self.in_flight.items()})
        return out

    def _just_lowered(self, now: float) -> set[str]:
        """Miners whose limit went down less than confirm_after_s ago: a raise waits until then. Re-plans on
        readings that lag the limits they just sent traded one miner's limit against another's every tick for
        good (a LuxOS preset up, a Whatsminer down; then back), and a site that never settles serves nobody; a
        raise held is the safe side (the plan counts the miner at the raised limit)."""
        window = self.cfg.control.confirm_after_s
        return {ip for ip, m in self.memory.items() if now - m.lowered_at < window}

    def _recommands(self, new_plan: Plan, skip: set[str], now: float) -> list[Change]:
        """Re-send acknowledged commands telemetry has not confirmed in time, where the plan still wants them
        (`skip`: miners the diff already sends something else). Miners counted as ignoring commands are tried
        again now and then."""
        out: list[Change] = []
        confirm = self.cfg.control.confirm_after_s
        for ip, mem in self.memory.items():
            if mem.pending_op is None or ip in self.in_flight or ip in skip or now - mem.pending_at < confirm:
                continue
            if now < mem.failed_retry_at:
                continue  # its last command failed: backing off
            if mem.ignores_commands:
                if now < mem.retry_at:
                    continue
                mem.retry_at = now + 10 * confirm
            elif not mem.resend_due:
                continue
            else:
                mem.resend_due = False
                mem.recommands += 1
            op = Op(mem.pending_op)
            wanted = new_plan.actions.get(ip)
            if wanted is not None and isinstance(wanted, SleepAction) != (op is Op.SLEEP):
                continue  # the plan moved on; the diff sends what it wants
            if op is Op.SET_POWER and mem.pending_w is None:
                continue
            out.append(Change(ip, op, mem.pending_w if op is not Op.SLEEP else None, decrease=op is Op.SLEEP))
        return out

    # ----------------------------------------------------------------------------------------- correction
    def _correct(self, present_kw: float, level_kw: float, snap_ts: float) -> None:
        """Site-level closed loop from measurement, only on error the last executed plan explains: the plan in
        force was carried out in full (a tick found nothing left to send and nothing awaiting confirmation) and
        the picture was taken after that and at least confirm_after_s after the last acknowledged command (miners
        may still be ramping). Before the first plan went out, or while its commands settle, what the site draws
        above the level is what those commands are cutting, not model error: taking it for model error blacked a
        site out that started at twice its cap. `present_kw` leaves out what the plan counts per miner.

        Draws more than the level (beyond tolerance_kw; a miner drifting above its limit, a reading higher than
        the plan counts): plan lower by the excess, at once. Draws less again: give that correction back, in
        steps no larger than the ramp allows. Room the plan leaves because miners draw less than it counts is
        not spent: the plan's worst case stays at or under the target (and the cap) whatever they draw.
        """
        if self.in_flight or any(m.pending_op and not m.ignores_commands for m in self.memory.values()):
            return
        if self._settled_at is None or snap_ts <= self._settled_at:
            return
        if snap_ts - self._last_ack_at < self.cfg.control.confirm_after_s:
            return
        tol = self.cfg.control.tolerance_kw
        error = present_kw - level_kw
        if error > tol:
            self.bias_kw = min(level_kw, self.bias_kw + error)
        elif self.bias_kw > 0 and error < -tol:
            step = -error / 2
            if self.cfg.control.ramp_up_kw_per_min is not None:
                step = min(step, self.cfg.control.ramp_up_kw_per_min * self.cfg.control.tick_s / 60.0)
            self.bias_kw = max(0.0, self.bias_kw - step)

    # ----------------------------------------------------------------------------------------- actuation
    def _settle_decreases(self, by_ip: dict[str, MinerView]) -> bool:
        """Drop the sleeps that have settled from `decreasing`: confirmed, or their miner cannot be read or ignores
        commands (both counted at their worst case). True while any is still settling."""
        for ip in list(self.decreasing):
            mem, view = self.memory.get(ip), by_ip.get(ip)
            if ip in self.in_flight:
                continue
            if mem is None or mem.pending_op is None or mem.ignores_commands or view is None \
                    or view.state is MinerState.UNREACHABLE:  # fmt: skip
                self.decreasing.discard(ip)
        return bool(self.decreasing)

    def _hold_rises(self, changes: list[Change], by_ip: dict[str, MinerView]) -> tuple[list[Change], int]:
        """Wakes and limit raises wait until every sleep sent before them (or with them) shows in telemetry.

        The plan takes an acknowledged sleep or lower limit as done, but the miner ramps down over seconds while a
        wake or a raise can land sooner: spending that room at once lifted the site above its level (a re-plan that
        lowers some miners and wakes others; the first re-plan after a fast cut). A decrease stops holding rises once
        it is confirmed, or its miner cannot be read or ignores commands (both counted at their worst case).
        Returns the changes to send now and how many rises wait."""
        if not self._settle_decreases(by_ip) and not any(c.op is Op.SLEEP for c in changes):
            return changes, 0
        now_ = [c for c in changes if c.op is Op.SLEEP or c.decrease]
        return now_, len(changes) - len(now_)

    def _launch(self, changes: list[Change], new_plan: Plan, fast: bool, now: float) -> None:
        self._energy.hold(self.fleet.latest(), now, self)  # what miners drew until now is what was last read
        # sleeps only: a sleeping miner ramps down over seconds; limit changes settle in rounds and holding every
        # rise behind them stalled a site's way back up (each round lowers a miner or two a few watts)
        self.decreasing.update(c.ip for c in changes if c.op is Op.SLEEP)
        for c in changes:
            self.in_flight[c.ip] = c
        wakes = sum(1 for c in changes if c.op is Op.WAKE)
        if wakes:  # the stagger counts wakes when they are sent
            self.wake_times = (*self.wake_times, *([now] * wakes))
        task = asyncio.get_running_loop().create_task(self._actuate(changes, new_plan, fast, now), name="actuate")
        self._actuations.add(task)
        task.add_done_callback(self._actuation_done)
        self._batches_out += 1
        if self._batches_out == 1 and self.on_actuating is not None:
            self.on_actuating(True)

    def _actuation_done(self, task: asyncio.Task[None]) -> None:
        self._actuations.discard(task)
        self._batches_out -= 1
        if self._batches_out == 0 and self.on_actuating is not None:
            self.on_actuating(False)

    async def _actuate(self, changes: list[Change], new_plan: Plan, fast: bool, sent_at: float) -> None:
        try:
            report = await self.actuator.apply(
                changes, wake_batch=self.stagger.max_per_interval,
                on_result=functools.partial(self._on_result, sent_at=sent_at),
            )  # fmt: skip
        finally:
            for c in changes:
                self.in_flight.pop(c.ip, None)
        self.last_report = report
        failed = [r for r in report.results if not r.ok]
        data = {
            "method": new_plan.method, "fast": fast, "target_kw": round(new_plan.target_kw, 3),
            "worst_case_kw": round(new_plan.worst_case_kw, 3), "sent": report.sent, "by_op": report.by_op(),
            "retries": report.retries, "dur_ms": round((report.finished_at - report.started_at) * 1000, 1),
            "failed": [{"ip": r.ip, "op": r.op.value, "outcome": r.outcome, "detail": r.detail[:120]}
                       for r in failed[:50]],
            "failed_total": len(failed),
        }  # fmt: skip
        self.persist.audit(AuditKind.ACTIONS, data, self.clock.time())
        log.info("actions", **{k: v for k, v in data.items() if k != "failed"})
        if self.sweep_request is not None:
            self.sweep_request.set()  # confirm from a fresh picture, soon
        self.trigger()

    def _on_result(self, r: OpResult, *, sent_at: float | None = None) -> None:
        now = self.clock.time()
        if self.frequency is not None:
            self.frequency.on_result(r)
        mem = self.memory.setdefault(r.ip, MinerMemory())
        if self.metrics is not None:
            self.metrics.observe_command(r.op.value, r.outcome, r.latency_s)
        if r.ok:
            mem.failures, mem.failed_op, mem.failed_retry_at = 0, None, -1e18
        elif not (r.outcome == "unsupported" and r.op is Op.SET_POWER):  # (that one: on/off from now on, below)
            # back off before sending it anything again (`_blocked`); until then the plan counts it at its worst
            # case (`_views`): whatever the failed command was, it may or may not have taken
            mem.failures += 1
            backoff = min(FAILED_BACKOFF_MAX_S, self.cfg.control.confirm_after_s * 2 ** min(mem.failures - 1, 16))
            mem.failed_op, mem.failed_retry_at = r.op.value, now + backoff
            if r.op is Op.WAKE and sent_at is not None and sent_at in self.wake_times:
                # the stagger counts wakes that happen: a refused wake must not hold back every other miner's
                wt = list(self.wake_times)
                wt.remove(sent_at)
                self.wake_times = tuple(wt)
        if r.ok:
            self._last_ack_at = now
            if r.op is Op.SLEEP:
                if self.seen_on.get(r.ip, True):
                    mem.last_transition = now
                mem.asleep_by_us = True
                mem.woken_to_w = None
                mem.wake_sent_at = None
            elif r.op is Op.WAKE:
                if not self.seen_on.get(r.ip, False):
                    mem.last_transition = now
                mem.asleep_by_us = False
                mem.woken_to_w = None
                mem.wake_sent_at = now  # `waking` (readout.state_of) until its power shows it up (_views)
                if r.watts is not None and "limit not set" not in r.detail:
                    mem.commanded_w = float(r.watts)
                    mem.woken_to_w = float(r.watts)  # accepted after the wake: it comes up at this limit
            else:
                if r.watts is not None and mem.commanded_w is not None and r.watts < mem.commanded_w:
                    mem.lowered_at = now
                mem.commanded_w = float(r.watts) if r.watts is not None else mem.commanded_w
                mem.limited_at = now
            if (mem.pending_op, mem.pending_w) != (r.op.value, r.watts):
                mem.recommands = 0  # a new command, not a re-send of the last one
                mem.changed_at, mem.settled = now, False
            mem.pending_op, mem.pending_w, mem.pending_at = r.op.value, r.watts, now
            self.seen_on[r.ip] = r.op is not Op.SLEEP
        elif r.outcome == "unsupported" and r.op is Op.SET_POWER:
            mem.limits_unsupported = True
            log.warning("miner refuses power limits; treated as on/off", ip=r.ip, detail=r.detail)
        elif r.outcome != "skipped":
            log.warning("miner command failed", ip=r.ip, op=r.op.value, outcome=r.outcome, detail=r.detail,
                        failures=mem.failures, retry_in_s=round(mem.failed_retry_at - now, 1))  # fmt: skip
        self._dirty_controls.add(r.ip)
        if r.ok:
            crash_point("in_flight")

    # ----------------------------------------------------------------------------------------- frequency
    def fire_frequency_shed(self, changes: list[Change], level_kw: float, now: float) -> None:
        """A tripped under-frequency stage: its pre-armed sleeps go out now, through the ordinary launch (memory,
        commands in flight, the actions audit), not at the next tick (agent.runtime.frequency)."""
        shed = Plan(actions={c.ip: SleepAction() for c in changes}, worst_case_kw=level_kw, expected_kw=level_kw,
                    expected_ths=0.0, target_kw=level_kw, method="frequency")  # fmt: skip
        self._launch(changes, shed, True, now)

    def frequency_audit(self, data: dict[str, Any], now: float) -> None:
        self.persist.audit(AuditKind.FREQUENCY, data, now)
        self._status_stale = True

    def frequency_brace(self, on: bool) -> None:
        """Sweeps pause between polls while a stage may trip (agent.runtime.frequency._brace), as for a batch."""
        if self._batches_out == 0 and self.on_actuating is not None:
            self.on_actuating(on)

    def frequency_save(self, doc: dict[str, Any] | None, now: float, audits: Collection[dict[str, Any]] = ()) -> None:
        records = [dict(a) for a in audits]

        def write(store: Any) -> None:
            with store.transaction():  # one commit: the event and its records
                if doc is None:
                    store.delete_state(FREQUENCY_STATE_KEY)
                else:
                    store.set_state(FREQUENCY_STATE_KEY, doc, now)
                for record in records:
                    store.append_audit(AuditKind.FREQUENCY, record, now)

        self.persist.write("frequency event", write)
        if records:
            self._status_stale = True

    # ----------------------------------------------------------------------------------------- dispatches
    def _binding_records(self, now: float) -> list[DispatchRecord]:
        windows = event_windows([r.dispatch for r in self.dispatches.values()], self.arb_rules)
        return [
            r for r in self.dispatches.values()
            if r.open and r.dispatch.id in windows and windows[r.dispatch.id].binds_at(now)
        ]  # fmt: skip

    def _mark_commands_sent(self, now: float, sent: int) -> None:
        for rec in self._binding_records(now):
            if rec.commands_sent_at is None:
                rec.commands_sent_at = now
                self.persist.call("update_dispatch", rec.dispatch.id, commands_sent_at=now)
                self.events.emit("commands_sent", id=rec.dispatch.id, commands=sent, in_flight=len(self.in_flight))

    def _dispatch_progress(self, snap: Any, present_kw: float, now: float) -> None:
        tol = self.cfg.control.tolerance_kw
        for rec in self._binding_records(now):
            d = rec.dispatch
            if snap.ts < rec.received_at or (d.target_kw is None and d.baseline_kw is None):
                continue
            level = d.level_kw()
            if rec.target_met_at is None:
                if present_kw <= level + tol:
                    rec.target_met_at = snap.ts
                    self.persist.call("update_dispatch", d.id, target_met_at=snap.ts)
                    secs = snap.ts - rec.received_at
                    self.events.emit("target_reached", id=d.id, level_kw=round(level, 3),
                                     power_kw=round(present_kw, 3), after_s=round(secs, 3))  # fmt: skip
                    if self.metrics is not None:
                        self.metrics.observe_time_to_target(secs)
                continue
            over = present_kw - level
            if over > rec.max_overshoot_kw + 1e-3:
                rec.max_overshoot_kw = over
                self.persist.call("update_dispatch", d.id, max_overshoot_kw=over)

    # ----------------------------------------------------------------------------------------- bookkeeping
    def _raise_alarm(self, key: str, message: str, *, quiet: bool = False) -> None:
        if self.alarms.get(key) == message:
            return
        self.alarms[key] = message
        if not quiet:
            log.warning("alarm", alarm=key, message=message)  # `key=` would be redacted as a secret
        self.events.emit("alarm", key=key, message=message)
        self.persist.audit(AuditKind.ALARM, {"key": key, "message": message}, self.clock.time())

    def _plan_alarms(self, p: Plan) -> None:
        current = {a.split(":", 1)[0] + ":" + a.split(":", 2)[1] if a.count(":") >= 1 else a for a in p.alarms}
        for stale in [k for k in self.alarms if k.startswith(("cannot_meet:", "min_on_overridden", "unknown_circuit"))]:
            if stale not in current:
                self.alarms.pop(stale)
        for alarm in p.alarms:
            key = alarm.split(":", 2)
            self._raise_alarm(":".join(key[:2]) if len(key) > 1 else alarm, alarm)

    def _save_controls(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self._dirty_controls or (not force and now - self._controls_saved_at < CONTROLS_SAVE_EVERY_S / 10):
            return
        dirty, self._dirty_controls = self._dirty_controls, set()
        # a command on the wire that raises a miner's draw stays written ahead until its reply is in
        controls = {ip: self.memory[ip].to_control(self.in_flight.get(ip)) for ip in dirty if ip in self.memory}
        self.persist.call("save_controls", controls)
        self._controls_saved_at = now

    def _write_ahead(self, changes: list[Change]) -> tuple[list[Change], int]:
        """Store every wake and limit raise as done before it goes out (MinerMemory.to_control): killed between
        the miner taking it and its reply being stored, the next run must not count that miner at its old, lower
        figures (chaos kill -9: a restart woke miners into the room miners the dead run had woken were booting
        into). A rise that cannot be stored first (the store refuses writes) is held: the site sheds, it does not
        rise, until the store takes writes again. Returns the changes to send and how many were held."""
        rising = [c for c in changes if raises_draw(c, self.memory.setdefault(c.ip, MinerMemory()).commanded_w)]
        if not rising:
            return changes, 0
        ahead = {c.ip: self.memory[c.ip].to_control(c) for c in rising}
        if self.persist.call("save_controls", ahead):
            self._rises_held = False
            return changes, 0
        # queued behind the refused writes: once it lands, the next save puts the miner's own figures back
        self._dirty_controls.update(ahead)
        if not self._rises_held:  # (the store_unavailable alarm says the rest)
            log.warning("rises held: the state store cannot record them before they go out", held=len(rising))
        self._rises_held = True
        return [c for c in changes if c.ip not in ahead], len(rising)

    def _hold_unmetered(self, changes: list[Change]) -> tuple[list[Change], int]:
        """The site meter is stale: no wake and no limit raise goes out (the site may be nearer its cap than the
        miners' sum and the allowance say); sleeps and lower limits still do. Returns what to send, how many held."""
        rising = {c.ip for c in changes if raises_draw(c, self.memory.setdefault(c.ip, MinerMemory()).commanded_w)}
        return [c for c in changes if c.ip not in rising], len(rising)

    def _observe_meter(self, miners_kw: float, now: float) -> MeterTick:
        """This tick's picture at the meter; alarms for a stale meter and refused readings, cleared when good."""
        assert self.meter is not None
        t = self.meter.observe(miners_kw, now)
        name, allowance = self.meter.meter.name, self.meter.cfg.non_miner_allowance_kw
        if t.fresh or t.starting:
            if self.alarms.pop("meter_stale", None) is not None:
                log.info("alarm cleared", key="meter_stale", meter=name)
        else:
            # the same words for as long as it lasts (a changing message would be a new alarm, audited, each tick)
            since = "it started" if t.read_at is None else iso(t.read_at)
            faults = f" ({', '.join(t.faults)})" if t.faults else ""
            self._raise_alarm(
                "meter_stale",
                f"site meter {name}: no good reading since {since}{faults}; counting the miners plus the "
                f"{allowance:g} kW non-miner allowance and holding every increase until it is back",
            )
        if t.faults and t.fresh:  # refused readings between good ones: said once per kind (the adapter logs why)
            self._raise_alarm("meter_fault", f"site meter {name} refused readings: {', '.join(t.faults)}")
        elif not t.faults:
            self.alarms.pop("meter_fault", None)
        return t

    def _store_health(self) -> None:
        """Retry the writes the store refused; alarm while it refuses them, clear the alarm once all are in."""
        self.persist.flush()
        if self.persist.error is not None:
            self._raise_alarm(
                "store_unavailable",
                f"the state store refuses writes ({self.persist.error}); controlling from memory, retrying; "
                "commands are refused until it takes writes again",
            )
        elif self.alarms.pop("store_unavailable", None) is not None:
            log.info("alarm cleared", key="store_unavailable")

    def _notify_systemd(self) -> None:
        if self.notifier is None:
            return
        if self._watchdog_every is None:
            from hashflex.agent.io.sdnotify import watchdog_interval  # noqa: PLC0415

            self._watchdog_every = watchdog_interval() or 0.0
        if self._watchdog_every and time.monotonic() - self._watchdog_at >= self._watchdog_every / 2:
            self.notifier.watchdog()
            self._watchdog_at = time.monotonic()
        if self.target is not None and self.tick_n % 6 == 1:
            snap = self.fleet.latest()
            n = len(snap.miners)
            self.notifier.status(
                f"tick {self.tick_n} target {self.target.kw / 1000:.2f} MW cap {self.target.cap_kw / 1000:.2f} MW "
                f"{n - snap.unreachable}/{n} reachable"
            )

    # ============================================================================================= read side
    def _publish_status(self, snap: Any, now: float) -> None:
        self.status_doc = readout.build_status(self, snap, now)
        if self.facility is not None:
            self.status_doc["facility"] = self.facility.status()
        self._status_stale = False
        for sink in self.status_sinks:
            try:
                sink(self.status_doc)
            except Exception:
                log.exception("status sink failed")

    def status(self) -> dict[str, Any]:
        """The STATUS DOC (APIS.md) as of the last tick, or of the last accepted command where that came later."""
        if not self.status_doc or self._status_stale:
            self.status_doc = readout.build_status(self, self.fleet.latest(), self.clock.time())
            if self.facility is not None:
                self.status_doc["facility"] = self.facility.status()
            self._status_stale = False
        return self.status_doc

    def miner_rows(self, state: str | None, sort: str, desc: bool, limit: int | None) -> list[dict[str, Any]]:
        return readout.miner_rows(self, state, sort, desc, limit)

    def preview(self, target_kw: float) -> dict[str, Any]:
        return readout.preview(self, target_kw)

    def dispatch_docs(self, include_closed: bool) -> list[dict[str, Any]]:
        return readout.dispatch_docs(self, include_closed)

    # ============================================================================================= shutdown
    async def shutdown_miners(self) -> None:
        """control.on_shutdown: leave (default: no surge on restart), sleep, or wake every reachable miner."""
        mode = self.cfg.control.on_shutdown
        if mode == "leave":
            return
        snap = self.fleet.latest()
        op = Op.SLEEP if mode == "sleep" else Op.WAKE
        changes = [Change(ip, op) for ip, ms in snap.miners.items() if ms.reachable]
        log.info("on_shutdown", mode=mode, miners=len(changes))
        report = await self.actuator.apply(changes, wake_batch=self.stagger.max_per_interval, on_result=self._on_result)
        self._save_controls(force=True)
        self.store.append_audit(AuditKind.ACTIONS, {"on_shutdown": mode, "sent": report.sent, "by_op": report.by_op()},
                                self.clock.time())  # fmt: skip


_RUNNING = (MinerState.HASHING, MinerState.THROTTLED)


def _describe(v: MinerView) -> str:
    """One miner as the plan saw it, for the debug log: id, state, limit, reading, counted draw."""
    parts = [v.id, v.state.value, f"cmd={v.commanded_w}", f"pw={v.power_w}", f"meas={v.measured_w}"]
    if v.woken_to_w is not None:
        parts.append(f"woken_to={v.woken_to_w}")
    return " ".join(parts)


def _efficiency_rank(view: MinerView, watts: int) -> float:
    """Wakes and increases go to the most efficient miners first (lowest J/TH at the planned level)."""
    return DEFAULT_CURVE.j_per_th(watts, view.nominal_w, view.nominal_ths) - view.priority * 1e6


def _ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in ip.split("."))
    except ValueError:
        return (1 << 16,)


def _priority_map(cfg: AgentConfig) -> dict[str, int]:
    out: dict[str, int] = {}
    for group in cfg.miners.priority_groups:
        for ip in expand(group.addresses):
            out.setdefault(ip, group.priority)
    return out
