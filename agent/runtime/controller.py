"""The controller: the one writer of the site's control state, and the loop (evcc's Site.Run).

Every tick (control.tick_s, and early on a new dispatch, cap, fail-safe change or fresh telemetry): read the latest
FleetSnapshot → observe what every miner is doing (agent.core.observe: its state, what it is counted at, the
closed-loop decisions on earlier commands) → fail-safe → arbitrate → ramp level, wake budget → plan (fast first: when
the level drops, a sleep-only plan at once; the hashrate-optimal plan with power limits on the next tick) → hand the
diff to the commander (agent.runtime.commanding), which sends it in the background → record and publish.

Commands reach it through `submit()`, and the miners' answers through the commander's `deliver`: one inbox
(agent.runtime.inbox), drained by `run()`, so both are taken in one at a time by this task. A command is applied
by agent/runtime/apply.py, persisted (change + reply + audit in one transaction) before the reply is returned, and
triggers an early tick.

At site level, once the last plan was carried out and has settled, measured power above the level (beyond
control.tolerance_kw, and beyond what the plan already counts per miner) lowers the planning level by the excess;
when it falls back, the correction is given back within the ramp allowance (agent.runtime.level). Never
before the first plan went out, nor while its commands settle: that excess is what they cut. The planning level never
rises above the target: room left because miners draw less than their limits is not spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from hashflex.agent.commands import Command
from hashflex.agent.config import AgentConfig
from hashflex.agent.core import failsafe as fs
from hashflex.agent.core.arbitration import ArbitrationInputs
from hashflex.agent.core.closed_loop import RUNNING
from hashflex.agent.core.model import Plan, Target
from hashflex.agent.core.observe import Observation, observe
from hashflex.agent.core.planning import plan, plan_sleep_only
from hashflex.agent.core.ramp import prune_wake_times, wake_budget
from hashflex.agent.core.snapshot import FleetSnapshot
from hashflex.agent.io.store import StoreError
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime import continuity
from hashflex.agent.runtime.alarms import AlarmBoard
from hashflex.agent.runtime.apply import apply_command
from hashflex.agent.runtime.arbiter import Arbiter
from hashflex.agent.runtime.caps import Caps
from hashflex.agent.runtime.clock import SteadyClock
from hashflex.agent.runtime.commanding import Commander
from hashflex.agent.runtime.dispatches import DispatchBook
from hashflex.agent.runtime.energy_meter import EnergyMeter
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.facility import FacilityControl
from hashflex.agent.runtime.frequency import FrequencyResponse
from hashflex.agent.runtime.inbox import Inbox, Wake
from hashflex.agent.runtime.level import PlanningLevel
from hashflex.agent.runtime.metering import MeterControl
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import ControlStore, RuntimeMetrics, SnapshotSource
from hashflex.agent.runtime.readout import StatusPublisher
from hashflex.agent.runtime.rules import ControlRules
from hashflex.contract.reply import Reply
from hashflex.contract.status import GatewayDoc

log = get_logger("controller")

MIN_EARLY_GAP_S = 0.2  # wall seconds between early ticks


class Controller:
    """The loop over its parts, built by agent.runtime.assembly.build_controller."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        fleet: SnapshotSource,
        store: ControlStore,
        clock: SteadyClock,
        events: EventLog,
        persist: WriteBehind,
        metrics: RuntimeMetrics | None,
        publisher: StatusPublisher,
        gateway_health: Callable[[], GatewayDoc] | None,
        wake: Wake,
        inbox: Inbox,
        rules: ControlRules,
        alarms: AlarmBoard,
        caps: Caps,
        book: DispatchBook,
        commands: Commander,
        time_keeper: continuity.TimeKeeper,
        meter: MeterControl | None,
        energy: EnergyMeter,
        frequency: FrequencyResponse | None,
        arbiter: Arbiter,
        facility: FacilityControl | None,
    ) -> None:
        self.cfg, self.fleet, self.store, self.events, self.clock = cfg, fleet, store, events, clock
        self.persist, self.metrics, self.rules, self.alarms, self.caps = persist, metrics, rules, alarms, caps
        self.book, self.commands, self.time_keeper, self.meter = book, commands, time_keeper, meter
        self.energy, self.frequency, self.arbiter, self.facility = energy, frequency, arbiter, facility
        self._wake, self._inbox = wake, inbox
        self.gateway_health = gateway_health
        self.publisher = publisher  # renders this loop's state (the controller is its `SiteState`) after a tick

        # state (this task is its only writer)
        self.failsafe: fs.FailsafeState | None = None
        self.target: Target | None = None
        self.plan: Plan | None = None
        self.observation: Observation | None = None  # the last tick's
        self.level = PlanningLevel(cfg.control, cfg.site.cap_kw, persist)
        self.tick_n, self.tick_ms = 0, 0.0
        self.tick_at: float | None = None
        self._arb_inputs = ArbitrationInputs(cfg.site.cap_kw)  # what the last arbitration was given
        self._last_snapshot_ts: float | None = None
        self._stopping = False

    # ============================================================================================= start-up
    def restore(self, *, safe_start: str | None = None) -> None:
        """Load state from the store (after the first sweep, before the first tick)."""
        present_kw = self.fleet.latest().power_w / 1000.0
        self.failsafe = continuity.restore(
            store=self.store,
            persist=self.persist,
            clock=self.clock,
            caps=self.caps,
            book=self.book,
            commands=self.commands,
            alarms=self.alarms,
            fs_rules=self.rules.failsafe,
            present_kw=present_kw,
            pin_energy=self.energy.pin_closed,
            safe_start=safe_start,
            frequency=self.frequency,
            planning=self.level,
        )

    # ============================================================================================= inbox
    async def submit(self, command: Command, timeout_s: float = 30.0) -> Reply:
        """Hand a validated command to the control loop; returns once it is applied and persisted."""
        return await self._inbox.submit(command, timeout_s)

    def heartbeat(self, payload: bytes) -> None:
        """HeartbeatSink: a grid heartbeat arrived."""
        if self.failsafe is None:
            return
        self.failsafe = fs.heartbeat(self.failsafe, self.clock.time())
        if self.failsafe.active:
            self.trigger()

    def trigger(self) -> None:
        """Ask for an early tick."""
        self._wake.trigger()

    def _drain_inbox(self, *, stopping: bool = False) -> None:
        """The miners' answers taken in, the commands applied (or, `stopping`, failed), in the order they came."""
        if self._inbox.drain(lambda c: apply_command(self, c), self.commands.take, stopping=stopping):
            self.publisher.mark_stale()  # the last tick's doc no longer shows the caps, dispatches and alarms

    def _fail_waiting(self) -> None:
        self._drain_inbox(stopping=True)

    def on_snapshot(self, snap: FleetSnapshot) -> None:
        """The sweep loop has a new picture: account energy, and tick early when it can confirm or correct."""
        self.energy.add(snap)
        if any(m.pending_op for m in self.commands.memory.values()) or self.book.unmet():
            self.trigger()

    # ============================================================================================= loop
    async def run(self) -> None:
        """Tick until cancelled. Commands are applied as they arrive; ticks every tick_s and early on demand."""
        tick_wall = self.clock.to_wall(self.cfg.control.tick_s)
        last_tick = -math.inf
        try:
            while not self._stopping:
                wait = max(0.0, last_tick + tick_wall - time.monotonic())
                if self._wake.early:
                    wait = min(wait, max(0.0, last_tick + MIN_EARLY_GAP_S - time.monotonic()))
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.event.wait()
                self._wake.event.clear()
                commanded = not self._inbox.empty()
                self._drain_inbox()
                due = time.monotonic() >= last_tick + tick_wall
                early = self._wake.early and time.monotonic() >= last_tick + MIN_EARLY_GAP_S
                if (due or early) and not commanded and self.frequency is not None and self.frequency.defer_tick():
                    # an under-frequency stage's sleeps are on the wire, or about to be: no tick holds the loop
                    # under them (bounded, agent.runtime.frequency.DEFER_TICK_MAX_S; the batch's end asks for a
                    # tick); a command just applied is planned at once
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self._wake.event.wait()
                    continue
                if due or early:
                    self._wake.early = False
                    last_tick = time.monotonic()
                    try:
                        self.tick()
                    except StoreError as exc:  # a store call not behind the write-behind: the loop goes on
                        log.exception("tick: state store error")
                        self.alarms.raise_alarm("store_unavailable", f"the state store failed in a tick: {exc}")
        finally:
            self._fail_waiting()
            await self.commands.stop()
            self._fail_waiting()  # (answers that came in while the batches stopped)
            with contextlib.suppress(Exception):
                self.commands.save_controls(force=True)
            with contextlib.suppress(Exception):
                self.energy.flush()
            if self.facility is not None:
                await self.facility.close()

    def stop(self) -> None:
        self._stopping = True
        self._wake.event.set()

    # ============================================================================================= tick
    def tick(self) -> None:
        started = time.perf_counter()
        now = self.clock.time()
        snap = self.fleet.latest()
        dt = self.cfg.control.tick_s if self.tick_at is None else max(0.0, now - self.tick_at)
        self.tick_at = now
        self.tick_n += 1
        self.time_keeper.check_clock()
        self.book.advance(now)
        target = self._arbitrate(now)
        views = self._observe(snap, now).views
        by_ip = {v.id: v for v in views}
        present_kw = snap.power_w / 1000.0
        measured_fresh = self._last_snapshot_ts != snap.ts
        self._last_snapshot_ts = snap.ts
        metered = None if self.meter is None else self.meter.observe_alarmed(present_kw, now, self.alarms)
        if self.frequency is not None:  # the pre-armed shed list, current for a stage that trips before next tick
            self.frequency.arm(views, self.commands.in_flight, None if metered is None else metered.metered_kw, now)
        step = self.level.step(
            target,
            self._arb_inputs,
            views,
            present_kw=present_kw,
            now=now,
            dt=dt,
            measured_fresh=measured_fresh,
            may_correct=self.commands.settled(snap.ts),
            meter=self.meter,
            metered=metered,
            sleep_w=self.rules.planner.sleep_w,
        )
        commands, stagger = self.commands, self.rules.stagger
        commands.wake_times = prune_wake_times(commands.wake_times, now, stagger)
        # the meter stale, or an under-frequency event holding (a grid in trouble gets no load back before the
        # event restores, even under its level): nothing wakes, no limit rises (held in hand_off too); sleeps go
        meter_stale = (metered is not None and not metered.fresh) or (
            self.frequency is not None and self.frequency.held_kw is not None
        )
        # while sleeps sent earlier settle, rises are held (Commander.hold_rises): an optimal plan now would lower
        # running miners to make room for wakes and raises that cannot go out, and the site would sink below its
        # level until the sleeps show (soak: 52 kW under a 62 kW time-of-use level after a fast cut). Sleep-only, no
        # wakes, meanwhile: it cuts only what the level needs; the optimal plan follows once they are confirmed.
        # A stale meter wakes nothing until it is back (rises are held below too).
        settling = commands.settle_decreases(by_ip)
        budget = 0 if settling or meter_stale else wake_budget(commands.wake_times, now, stagger)
        planner = plan_sleep_only if step.fast or settling else plan
        t_plan = time.perf_counter()
        new_plan = planner(
            step.plan_kw,
            views,
            self.rules.tree,
            self.rules.planner,
            now,
            wake_budget=budget,
            ramp_allowance_kw=step.allowance_kw,
        )
        plan_ms = (time.perf_counter() - t_plan) * 1000
        self.plan = new_plan
        self.level.planned(step, new_plan)
        self.alarms.from_plan(new_plan)
        out = commands.hand_off(
            new_plan,
            views,
            by_ip,
            fast=step.fast,
            meter_stale=meter_stale,
            now=now,
            use_power_limits=self.cfg.control.use_power_limits,
            cooling=self.facility,
        )
        self.level.unsent(step, out.unsent_raises_kw)
        if out.sent and step.fast and any(v.state in RUNNING and v.id not in commands.in_flight for v in views):
            # the optimal plan follows as soon as the fast one is out, to limit the miners the fast one left running;
            # when it is sleeping all of them there is nothing to plan until its results are in (they tick again),
            # and a tick now would only take CPU from the batch
            self.trigger()
        changes = out.sent
        self.book.mark_commands_sent(now, len(changes), len(commands.in_flight))
        # targets apply where the site is measured: at the meter when there is one (its fallback when stale)
        self.book.track(snap.ts, present_kw if metered is None else metered.site_kw, now, self.cfg.control.tolerance_kw)
        commands.save_controls()
        self.alarms.store_health(self.persist)
        self.tick_ms = (time.perf_counter() - started) * 1000
        if self.metrics is not None:
            self.metrics.observe_tick(self.tick_ms / 1000)
        self.publisher.publish(self, snap, now, self.observation)
        self.publisher.notify(self.tick_n, self.target, snap)
        log.info(
            "tick",
            n=self.tick_n,
            target_kw=round(target.kw, 2),
            reason=target.reason,
            level_kw=round(step.plan_kw, 2),
            cap_kw=round(target.cap_kw, 2),
            power_kw=round(present_kw, 2),
            worst_case_kw=round(new_plan.worst_case_kw, 2),
            method=new_plan.method,
            planned=len(new_plan.actions),
            site_kw=None if metered is None else round(metered.site_kw, 2),
            sent=len(changes),
            in_flight=len(commands.in_flight),
            unreachable=snap.unreachable,
            failsafe=target.failsafe,
            plan_ms=round(plan_ms, 1),
            dur_ms=round(self.tick_ms, 1),
        )

    def _arbitrate(self, now: float) -> Target:
        assert self.failsafe is not None
        hold = self.target.kw if self.target is not None else (self.level.level_kw or self.caps.effective_kw())
        decision = self.arbiter.decide(self.failsafe, self.target, hold, now)
        self.failsafe, self.target, self._arb_inputs = decision.failsafe, decision.target, decision.inputs
        if decision.changed:
            self.level.fast_done = False
        return decision.target

    def _observe(self, snap: FleetSnapshot, now: float) -> Observation:
        """What every miner is doing (agent.core.observe), its decisions applied: memory, alarms, log lines."""
        obs = observe(snap, self.commands.memory, self.commands.in_flight, now, self.rules.observe)
        self.commands.memory = obs.memory
        self.commands.dirty |= obs.changed
        for note in obs.notes:
            (log.warning if note.level == "warning" else log.info)(note.event, **note.fields)
        self.alarms.apply(obs.alarms)
        self.observation = obs
        return obs
