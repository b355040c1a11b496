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
draw (`ignores_commands`) and retried now and then. At site level, once the fleet has settled, measured power above
the level (beyond control.tolerance_kw) lowers the planning level by the excess; when it falls back, the correction
is given back within the ramp allowance. The planning level never rises above the target: room left because miners
draw less than their limits is not spent (the worst case stays under the target and the cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from agent.commands import (
    Command,
)
from agent.config import AgentConfig
from agent.core import failsafe as fs
from agent.core.addresses import expand
from agent.core.arbitration import ArbitrationInputs, ArbitrationRules, arbitrate, event_windows, retention_s
from agent.core.audit import AuditKind
from agent.core.circuits import Circuit, CircuitTree
from agent.core.efficiency import DEFAULT_CURVE, stock_w
from agent.core.model import Dispatch, MinerState, MinerView, Plan, SleepAction, Source, Target
from agent.core.planner import PlannerRules, plan, plan_sleep_only
from agent.core.ramp import WakeStaggerRule, prune_wake_times, ramp_allowance_kw, ramp_step, wake_budget
from agent.core.schedule import ScheduleRule
from agent.logging import get_logger
from agent.protocol import Channel, Reply
from agent.runtime import readout
from agent.runtime.actuator import Actuator, Change, Op, OpResult, Report, diff
from agent.runtime.apply import SAFE_START_ID, apply_command
from agent.runtime.clock import Clock
from agent.runtime.crashpoints import crash_point
from agent.runtime.energy_meter import EnergyMeter
from agent.runtime.events import EventLog
from agent.runtime.memory import DispatchRecord, MinerMemory, ended_copy
from agent.runtime.service import payload_digest
from drivers.base import OnOff

log = get_logger("controller")

MAX_RECOMMANDS = 2  # re-sends of an unconfirmed command before the miner is counted as ignoring commands
SLEEP_CONFIRM_SHARE = 0.25  # asleep: draws under this share of nominal
LIMIT_CONFIRM_SLACK = 1.08  # obeying a limit: draws at most this × the limit (+ LIMIT_CONFIRM_W)
LIMIT_CONFIRM_W = 100.0
MIN_EARLY_GAP_S = 0.2  # wall seconds between early ticks
_COMPLIANCE_FIELDS = ("level_kw", "received_at", "commands_sent_at", "target_met_at", "time_to_target_s",
                      "max_overshoot_kw")  # fmt: skip
CONTROLS_SAVE_EVERY_S = 30.0


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
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.store = store
        self.actuator = actuator
        self.clock = clock
        self.events = events
        self.metrics = metrics
        self.notifier = notifier
        self.broker_status = broker_status
        self.gateway_health = gateway_health
        self.status_sinks: list[StatusSink] = []
        ctl = cfg.control

        self.licensed_cap_kw = cfg.site.cap_kw
        self.runtime_cap_kw: float | None = None
        self.tree = CircuitTree(cfg.site.cap_kw, [Circuit(c.id, c.parent, c.cap_kw) for c in cfg.site.circuits])
        self.circuit_of = _address_map([(c.id, c.miners) for c in cfg.site.circuits])
        self.priority_of = _priority_map(cfg)
        self.schedule = [
            ScheduleRule.from_hhmm(w.name, w.start, w.end, w.days, w.target_kw, w.utc_offset_h) for w in cfg.schedule
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
        self.wake_times: tuple[float, ...] = ()
        self.target: Target | None = None
        self.plan: Plan | None = None
        self.level_kw: float | None = None  # the ramped level planned for last tick
        self.bias_kw = 0.0  # closed-loop correction: measured above target → plan lower
        self.alarms: dict[str, str] = {}
        self.in_flight: dict[str, Change] = {}  # commands sent and not yet answered
        self.seen_on: dict[str, bool] = {}
        self.tick_n = 0
        self.tick_ms = 0.0
        self.tick_at: float | None = None
        self.last_report: Report | None = None
        self.status_doc: dict[str, Any] = {}

        self._inbox: asyncio.Queue[tuple[Command, asyncio.Future[Reply]]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._early = False
        self._fast_done = False
        self._stopping = False
        self._actuations: set[asyncio.Task[None]] = set()
        self._dirty_controls: set[str] = set()
        self._controls_saved_at = 0.0
        self._last_snapshot_ts: float | None = None
        self._last_ack_at = -math.inf  # when a miner last acknowledged a command
        self._energy = EnergyMeter(max_gap_s=max(120.0, 10 * cfg.polling.interval_s, 30 * clock.scale))
        self._watchdog_every: float | None = None
        self._watchdog_at = 0.0
        self.sweep_request: asyncio.Event | None = None  # set by the app: ask the sweep loop for a fresh picture
        # set by the app: called with True when a command batch goes out while none is on the wire, False when the
        # last one is answered (the fleet pauses its sweeps in between: commands first)
        self.on_actuating: Callable[[bool], None] | None = None
        self._batches_out = 0

    # ============================================================================================= start-up
    @property
    def cap_kw(self) -> float:
        """The licensed cap: no command may ask for more."""
        return self.licensed_cap_kw

    def effective_cap_kw(self) -> float:
        rc = self.runtime_cap_kw
        return self.licensed_cap_kw if rc is None else min(self.licensed_cap_kw, rc)

    def restore(self, *, safe_start: str | None = None) -> None:
        """Load state from the store (after the first sweep, before the first tick)."""
        now = self.clock.time()
        snap = self.fleet.latest()
        present_kw = snap.power_w / 1000.0
        rc = self.store.get_state("runtime_cap_kw", None)
        self.runtime_cap_kw = float(rc) if isinstance(rc, int | float) else None
        for ip, control in self.store.load_controls().items():
            self.memory[ip] = MinerMemory.from_control(control)
        for d, status, progress in self.store.load_dispatches(active_only=True):
            rec = DispatchRecord.from_stored(d, status, dict(progress or {}))
            self.dispatches[d.id] = rec
            if rec.open and d.expired_at(now):
                self.close_dispatch(rec, now, "expired", "expired while the agent was down", commit=True)
        self._energy.pin_closed(now - now % 60, self)  # what the last run recorded is complete up to this minute
        self.failsafe = fs.start(now, self.fs_rules, hold_kw=min(present_kw, self.effective_cap_kw()))
        self.level_kw = min(present_kw, self.effective_cap_kw())
        if safe_start is not None:
            self._enter_safe_start(now, present_kw, safe_start)
        log.info(
            "state restored", dispatches=sum(1 for r in self.dispatches.values() if r.open),
            controls=len(self.memory), runtime_cap_kw=self.runtime_cap_kw, failsafe=self.failsafe.active,
            present_kw=round(present_kw, 2),
        )  # fmt: skip

    def _enter_safe_start(self, now: float, present_kw: float, why: str) -> None:
        level = self.fs_rules.level_kw if self.fs_rules.level_kw is not None else present_kw
        level = min(level, self.effective_cap_kw())
        d = Dispatch(SAFE_START_ID, Source.OPERATOR, now, now, None, target_kw=round(level, 3))
        rec = DispatchRecord(d, "active", now, channel="agent")
        self.dispatches[d.id] = rec
        self._raise_alarm("safe_start", f"{why}; holding {level:.1f} kW until an operator runs `hashflex resume`")
        with contextlib.suppress(Exception):  # the store may be the thing that is broken
            self.store.save_dispatch(d, rec.status, **rec.progress())

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

    def record_refusal(self, verb: str, channel: Channel, reply: Reply, payload: bytes) -> None:
        self.store.append_audit(
            AuditKind.COMMAND,
            {"verb": verb, "id": reply.id, "channel": channel.value, "status": "error", "code": reply.error_code,
             "message": reply.error_message, **payload_digest(payload)},
            self.clock.time(),
        )  # fmt: skip

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

        def write() -> None:
            self.store.save_dispatch(rec.dispatch, status, **rec.progress())
            crash_point("closing")
            self.store.append_audit(AuditKind.COMPLIANCE, data, now)

        if commit:
            with self.store.transaction():
                write()
        else:
            write()
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
                self._drain_inbox()
                due = time.monotonic() >= last_tick + tick_wall
                early = self._early and time.monotonic() >= last_tick + MIN_EARLY_GAP_S
                if due or early:
                    self._early = False
                    last_tick = time.monotonic()
                    self.tick()
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
        self._advance_dispatches(now)
        target = self._arbitrate(now)
        views = self._views(snap, now)
        by_ip = {v.id: v for v in views}
        present_kw = snap.power_w / 1000.0
        measured_fresh = self._last_snapshot_ts != snap.ts
        self._last_snapshot_ts = snap.ts
        prev_level = self.level_kw if self.level_kw is not None else present_kw
        if measured_fresh:
            self._correct(present_kw, prev_level)
        level = ramp_step(prev_level, target.kw, dt, down_kw_per_min=target.ramp_kw_per_min, ceiling_kw=target.cap_kw)
        self.level_kw = level
        plan_kw = max(0.0, min(target.cap_kw, level - self.bias_kw))
        self.wake_times = prune_wake_times(self.wake_times, now, self.stagger)
        budget = wake_budget(self.wake_times, now, self.stagger)
        allowance = ramp_allowance_kw(self.cfg.control.ramp_up_kw_per_min, dt)
        fast = level < prev_level - 1e-6 or (
            measured_fresh and present_kw > plan_kw + self.cfg.control.tolerance_kw and not self._fast_done
        )
        planner = plan_sleep_only if fast else plan
        t_plan = time.perf_counter()
        new_plan = planner(
            plan_kw, views, self.tree, self.planner_rules, now, wake_budget=budget, ramp_allowance_kw=allowance
        )
        plan_ms = (time.perf_counter() - t_plan) * 1000
        self.plan = new_plan
        self._fast_done = fast
        self._plan_alarms(new_plan)
        changes = diff(
            new_plan.actions, by_ip, use_power_limits=self.cfg.control.use_power_limits,
            pending=self._blocked(), rank=_efficiency_rank,
        )  # fmt: skip
        changes += self._recommands(new_plan, {c.ip for c in changes}, now)
        if changes:
            log.debug("changes", changes=[f"{c.ip} {c.op.value} {c.watts or ''}".strip() for c in changes[:50]])
            crash_point("planned")
            self._launch(changes, new_plan, fast, now)
            if fast and any(v.state in _RUNNING and ip not in self.in_flight for ip, v in by_ip.items()):
                # the optimal plan follows as soon as the fast one is out, to limit the miners the fast one left
                # running; when it is sleeping all of them there is nothing to plan until its results are in
                # (they tick again), and a tick now would only take CPU from the batch
                self.trigger()
        self._mark_commands_sent(now, len(changes))
        self._dispatch_progress(snap, present_kw, now)
        self._save_controls()
        self.tick_ms = (time.perf_counter() - started) * 1000
        if self.metrics is not None:
            self.metrics.observe_tick(self.tick_ms / 1000)
        self._publish_status(snap, now)
        self._notify_systemd()
        log.info(
            "tick", n=self.tick_n, target_kw=round(target.kw, 2), reason=target.reason, level_kw=round(plan_kw, 2),
            cap_kw=round(target.cap_kw, 2), power_kw=round(present_kw, 2),
            worst_case_kw=round(new_plan.worst_case_kw, 2), method=new_plan.method, planned=len(new_plan.actions),
            sent=len(changes), in_flight=len(self.in_flight), unreachable=snap.unreachable,
            failsafe=target.failsafe, plan_ms=round(plan_ms, 1), dur_ms=round(self.tick_ms, 1),
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------- arbitration
    def _advance_dispatches(self, now: float) -> None:
        keep_s = retention_s(self.arb_rules)
        for rec in list(self.dispatches.values()):
            if rec.open:
                if rec.dispatch.expired_at(now):
                    self.close_dispatch(rec, now, "expired", "window ended", commit=True)
                elif rec.status == "pending" and rec.dispatch.active_at(now):
                    rec.status = "active"
                    self.store.update_dispatch(rec.dispatch.id, status="active")
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
        if self.failsafe.active != prev.active:
            kind = "failsafe_entered" if self.failsafe.active else "failsafe_exited"
            data = {"reason": self.failsafe.reason or prev.reason, "level_kw": self.failsafe.level_kw}
            audit = AuditKind.FAILSAFE_ENTER if self.failsafe.active else AuditKind.FAILSAFE_EXIT
            self.store.append_audit(audit, data, now)
            self.events.emit(kind, **data)
            log.warning(kind, **data) if self.failsafe.active else log.info(kind, **data)
        inputs = ArbitrationInputs(
            licensed_cap_kw=self.licensed_cap_kw,
            runtime_cap_kw=self.runtime_cap_kw,
            dispatches=[r.dispatch for r in self.dispatches.values() if r.status != "failed"],
            schedule=self.schedule,
            failsafe_kw=fs.limit_kw(self.failsafe),
            rules=self.arb_rules,
        )
        target = arbitrate(inputs, now)
        old = self.target
        if old is None or abs(old.kw - target.kw) > 1e-6 or old.reason != target.reason or old.cap_kw != target.cap_kw:
            data = {"kw": round(target.kw, 3), "reason": target.reason, "source": target.source.value,
                    "cap_kw": target.cap_kw, "failsafe": target.failsafe, "detail": target.detail,
                    "from_kw": None if old is None else round(old.kw, 3)}  # fmt: skip
            self.store.append_audit(AuditKind.TARGET_CHANGE, data, now)
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
            if hint in ("sleeping", "waking") and now - mem.limited_at < self.cfg.control.confirm_after_s:
                hint = "hashing"  # re-tuning to the limit it just accepted
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
            views.append(
                MinerView(
                    id=ip, family=ident.family, capability=cap, nominal_w=ident.nominal_w,
                    nominal_ths=ident.nominal_ths, state=state, power_w=ms.power_w if fresh else None,
                    commanded_w=commanded, asleep_by_us=mem.asleep_by_us, last_transition=mem.last_transition,
                    circuit=self.circuit_of.get(ip), priority=self.priority_of.get(ip, 0),
                    ignores_commands=mem.ignores_commands,
                )
            )  # fmt: skip
        return views

    def _track_transition(self, ip: str, mem: MinerMemory, state: MinerState, now: float) -> None:
        """A miner seen switching on or off by itself (or by someone else) starts its min on/off time too."""
        on = state is not MinerState.SLEEPING
        was = self.seen_on.get(ip)
        self.seen_on[ip] = on
        if was is not None and was != on and mem.pending_op is None:
            mem.last_transition = now
            self._dirty_controls.add(ip)

    def _confirm(self, ip: str, ms: Any, mem: MinerMemory, *, fresh: bool, snap_ts: float, now: float) -> None:
        """Closed loop per miner: did the last acknowledged command show in telemetry?"""
        if mem.pending_op is None or not fresh or ms.age_s is None:
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
        if mem.recommands >= MAX_RECOMMANDS:
            mem.ignores_commands = True
            mem.retry_at = now + 10 * self.cfg.control.confirm_after_s
            self._dirty_controls.add(ip)
            msg = f"{ip} acknowledged {mem.pending_op} {mem.recommands + 1} times and draws {power:.0f} W"
            log.warning("miner ignores commands", ip=ip, op=mem.pending_op, power_w=round(power), told_w=mem.pending_w)
            self._raise_alarm(f"ignores:{ip}", msg, quiet=True)
            return
        mem.resend_due = True

    def _blocked(self) -> dict[str, Op]:
        """Miners the diff leaves alone: a command is on the wire. (An acknowledged command awaiting confirmation
        needs no block: the views already take it as done, so the diff only sends what the plan changes.)"""
        return {ip: c.op for ip, c in self.in_flight.items()}

    def _recommands(self, new_plan: Plan, skip: set[str], now: float) -> list[Change]:
        """Re-send acknowledged commands telemetry has not confirmed in time, where the plan still wants them
        (`skip`: miners the diff already sends something else). Miners counted as ignoring commands are tried
        again now and then."""
        out: list[Change] = []
        confirm = self.cfg.control.confirm_after_s
        for ip, mem in self.memory.items():
            if mem.pending_op is None or ip in self.in_flight or ip in skip or now - mem.pending_at < confirm:
                continue
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
    def _correct(self, present_kw: float, level_kw: float) -> None:
        """Site-level closed loop from measurement, once the fleet has settled (nothing in flight or unconfirmed,
        no command acknowledged within confirm_after_s: miners may still be ramping).

        Draws more than the level (beyond tolerance_kw; a miner drifting above its limit, a reading higher than
        the plan counts): plan lower by the excess, at once. Draws less again: give that correction back, in
        steps no larger than the ramp allows. Room the plan leaves because miners draw less than it counts is
        not spent: the plan's worst case stays at or under the target (and the cap) whatever they draw.
        """
        if self.in_flight or any(m.pending_op and not m.ignores_commands for m in self.memory.values()):
            return
        if self.clock.time() - self._last_ack_at < self.cfg.control.confirm_after_s:
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
    def _launch(self, changes: list[Change], new_plan: Plan, fast: bool, now: float) -> None:
        self._energy.hold(self.fleet.latest(), now, self)  # what miners drew until now is what was last read
        for c in changes:
            self.in_flight[c.ip] = c
        wakes = sum(1 for c in changes if c.op is Op.WAKE)
        if wakes:  # the stagger counts wakes when they are sent
            self.wake_times = (*self.wake_times, *([now] * wakes))
        task = asyncio.get_running_loop().create_task(self._actuate(changes, new_plan, fast), name="actuate")
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

    async def _actuate(self, changes: list[Change], new_plan: Plan, fast: bool) -> None:
        try:
            report = await self.actuator.apply(
                changes, wake_batch=self.stagger.max_per_interval, on_result=self._on_result
            )
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
        try:
            self.store.append_audit(AuditKind.ACTIONS, data, self.clock.time())
        except Exception:
            log.exception("could not audit an action batch")
        log.info("actions", **{k: v for k, v in data.items() if k != "failed"})
        if self.sweep_request is not None:
            self.sweep_request.set()  # confirm from a fresh picture, soon
        self.trigger()

    def _on_result(self, r: OpResult) -> None:
        now = self.clock.time()
        mem = self.memory.setdefault(r.ip, MinerMemory())
        if self.metrics is not None:
            self.metrics.observe_command(r.op.value, r.outcome, r.latency_s)
        if r.ok:
            self._last_ack_at = now
            if r.op is Op.SLEEP:
                if self.seen_on.get(r.ip, True):
                    mem.last_transition = now
                mem.asleep_by_us = True
            elif r.op is Op.WAKE:
                if not self.seen_on.get(r.ip, False):
                    mem.last_transition = now
                mem.asleep_by_us = False
                if r.watts is not None and "limit not set" not in r.detail:
                    mem.commanded_w = float(r.watts)
            else:
                mem.commanded_w = float(r.watts) if r.watts is not None else mem.commanded_w
                mem.limited_at = now
            if (mem.pending_op, mem.pending_w) != (r.op.value, r.watts):
                mem.recommands = 0  # a new command, not a re-send of the last one
            mem.pending_op, mem.pending_w, mem.pending_at = r.op.value, r.watts, now
            self.seen_on[r.ip] = r.op is not Op.SLEEP
        elif r.outcome == "unsupported" and r.op is Op.SET_POWER:
            mem.limits_unsupported = True
            log.warning("miner refuses power limits; treated as on/off", ip=r.ip, detail=r.detail)
        elif r.outcome != "skipped":
            log.warning("miner command failed", ip=r.ip, op=r.op.value, outcome=r.outcome, detail=r.detail)
        self._dirty_controls.add(r.ip)
        if r.ok:
            crash_point("in_flight")

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
                self.store.update_dispatch(rec.dispatch.id, commands_sent_at=now)
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
                    self.store.update_dispatch(d.id, target_met_at=snap.ts)
                    secs = snap.ts - rec.received_at
                    self.events.emit("target_reached", id=d.id, level_kw=round(level, 3),
                                     power_kw=round(present_kw, 3), after_s=round(secs, 3))  # fmt: skip
                    if self.metrics is not None:
                        self.metrics.observe_time_to_target(secs)
                continue
            over = present_kw - level
            if over > rec.max_overshoot_kw + 1e-3:
                rec.max_overshoot_kw = over
                self.store.update_dispatch(d.id, max_overshoot_kw=over)

    # ----------------------------------------------------------------------------------------- bookkeeping
    def _raise_alarm(self, key: str, message: str, *, quiet: bool = False) -> None:
        if self.alarms.get(key) == message:
            return
        self.alarms[key] = message
        if not quiet:
            log.warning("alarm", key=key, message=message)
        self.events.emit("alarm", key=key, message=message)
        with contextlib.suppress(Exception):
            self.store.append_audit(AuditKind.ALARM, {"key": key, "message": message}, self.clock.time())

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
        self.store.save_controls({ip: self.memory[ip].to_control() for ip in dirty if ip in self.memory})
        self._controls_saved_at = now

    def _notify_systemd(self) -> None:
        if self.notifier is None:
            return
        if self._watchdog_every is None:
            from agent.io.sdnotify import watchdog_interval  # noqa: PLC0415

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
        for sink in self.status_sinks:
            try:
                sink(self.status_doc)
            except Exception:
                log.exception("status sink failed")

    def status(self) -> dict[str, Any]:
        """The STATUS DOC (APIS.md) as of the last tick."""
        if not self.status_doc:
            self.status_doc = readout.build_status(self, self.fleet.latest(), self.clock.time())
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


def _efficiency_rank(view: MinerView, watts: int) -> float:
    """Wakes and increases go to the most efficient miners first (lowest J/TH at the planned level)."""
    return DEFAULT_CURVE.j_per_th(watts, view.nominal_w, view.nominal_ths) - view.priority * 1e6


def _address_map(groups: Iterable[tuple[str, list[str]]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, specs in groups:
        for ip in expand(specs):
            out.setdefault(ip, name)
    return out


def _priority_map(cfg: AgentConfig) -> dict[str, int]:
    out: dict[str, int] = {}
    for group in cfg.miners.priority_groups:
        for ip in expand(group.addresses):
            out.setdefault(ip, group.priority)
    return out
