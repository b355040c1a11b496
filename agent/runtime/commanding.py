"""Miner commands on their way: what the controller hands over goes out in background batches (agent.runtime.actuator),
and each result comes back through the controller's inbox (`deliver`), to be taken in (`take`) by the controller's
task, the one writer of the miners' memory.

Before a batch goes out (`gate`): wakes and limit raises wait until every sleep sent before them shows in telemetry
(`hold_rises`), are written ahead to the store (`write_ahead`: killed between the miner taking one and its reply being
stored, the next run must not count that miner at its old, lower figures) and, while the site meter is stale, wait
for it. A command that fails (refused, timed out) is not sent again before a back-off (confirm_after_s, doubling per
failure in a row, at most FAILED_BACKOFF_MAX_S); a failed wake does not count against the wake stagger, and one that
took counts from when it took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.efficiency import DEFAULT_CURVE
from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, MinerState, MinerView, Op, Plan, SleepAction, raises_draw
from hashflex.agent.core.ramp import WakeStaggerRule
from hashflex.agent.core.recommand import blocked, just_lowered, recommands
from hashflex.agent.core.snapshot import FleetSnapshot
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.actuator import Actuator, OpResult, Report, diff
from hashflex.agent.runtime.crashpoints import crash_point
from hashflex.agent.runtime.memory import control_of
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import RuntimeMetrics

log = get_logger("controller")

# a miner whose command failed is left alone for confirm_after_s, doubling with each failure in a row up to this
# (clock seconds): a miner that refuses commands (a session another client holds, firmware errors) is not hammered
FAILED_BACKOFF_MAX_S = 300.0
CONTROLS_SAVE_EVERY_S = 30.0

Deliver = Callable[[OpResult, float | None], None]


class CoolingGate(Protocol):
    """Wakes wait for the cooling of their circuit (agent.runtime.facility.FacilityControl)."""

    def hold_wakes(self, changes: list[Change], views: Sequence[MinerView], now: float) -> tuple[list[Change], int]: ...


@dataclass(frozen=True, slots=True)
class HandOff:
    sent: list[Change]
    held: int  # changes that wait (rises)
    unsent_raises_kw: float  # planned limit raises too small to send, or held a moment after a lower limit


class Commander:
    def __init__(
        self,
        *,
        actuator: Actuator,
        persist: WriteBehind,
        clock: Callable[[], float],
        stagger: WakeStaggerRule,
        confirm_after_s: float,
        deliver: Deliver,
        batch_done: Callable[[], None],
        before_send: Callable[[float], None],
        metrics: RuntimeMetrics | None = None,
        on_actuating: Callable[[bool], None] | None = None,
        on_result: Callable[[OpResult], None] | None = None,
    ) -> None:
        self.actuator = actuator
        self.persist = persist
        self.clock = clock
        self.stagger = stagger
        self.confirm_after_s = confirm_after_s
        self.deliver = deliver  # a result to the controller's inbox
        self.batch_done = batch_done  # a batch is answered: confirm from a fresh picture, tick again
        self.before_send = before_send  # a batch is about to go out (energy: the last picture holds until now)
        self.metrics = metrics
        self.on_result = on_result  # every result, as it is taken in (frequency)
        # called with True when a command batch goes out while none is on the wire, False when the last one is
        # answered (the fleet pauses its sweeps in between: commands first)
        self.on_actuating = on_actuating
        self.memory: dict[str, MinerMemory] = {}  # what the agent told each miner, and how it answered
        self.in_flight: dict[str, Change] = {}  # commands sent and not yet answered
        self.decreasing: set[str] = set()  # told to sleep, not yet seen asleep (hold_rises)
        self.wake_times: tuple[float, ...] = ()
        self.last_report: Report | None = None
        self.last_ack_at = -float("inf")  # when a miner last acknowledged a command
        # since when the plan in force has been carried out in full (a hand-off found nothing to send, nothing on
        # the wire, nothing awaiting confirmation); None: not yet, or a later plan changed something
        self.settled_at: float | None = None
        self.dirty: set[str] = set()  # miners whose stored control figures are behind
        self._rises_held = False  # wakes and raises held while the store cannot write them ahead (write_ahead)
        self._controls_saved_at = 0.0
        self._actuations: set[asyncio.Task[None]] = set()
        self._batches_out = 0

    @property
    def unconfirmed(self) -> bool:
        """Is any acknowledged command (of a miner that obeys) not yet seen in telemetry?"""
        return any(m.pending_op and not m.ignores_commands for m in self.memory.values())

    def settled(self, snap_ts: float) -> bool:
        """May the site-level correction learn from the picture taken at `snap_ts`? Only from error the last
        executed plan explains: the plan in force was carried out in full and the picture was taken after that, and
        at least confirm_after_s after the last acknowledged command (miners may still be ramping)."""
        if self.in_flight or self.unconfirmed or self.settled_at is None or snap_ts <= self.settled_at:
            return False
        return snap_ts - self.last_ack_at >= self.confirm_after_s

    # ----------------------------------------------------------------------------------------- before sending
    def changes_for(
        self,
        planned: Plan,
        by_ip: Mapping[str, MinerView],
        now: float,
        *,
        use_power_limits: bool,
        held_raises_w: list[float],
    ) -> list[Change]:
        """What takes the miners to the plan: the diff (miners with a command on the wire or backing off left alone;
        a raise waits a moment after a lower limit), and the re-sends telemetry asks for (core.recommand)."""
        changes = diff(
            planned.actions,
            by_ip,
            use_power_limits=use_power_limits,
            pending=blocked(self.memory, self.in_flight, now),
            rank=_efficiency_rank,
            held_raises_w=held_raises_w,
            no_raise=just_lowered(self.memory, now, self.confirm_after_s),
        )
        resent, updated = recommands(
            self.memory,
            planned,
            self.in_flight,
            skip={c.ip for c in changes},
            now=now,
            confirm_after_s=self.confirm_after_s,
        )
        self.memory.update(updated)
        return changes + resent

    def settle_decreases(self, by_ip: Mapping[str, MinerView]) -> bool:
        """Drop the sleeps that have settled from `decreasing`: confirmed, or their miner cannot be read or ignores
        commands (both counted at their worst case). True while any is still settling."""
        for ip in list(self.decreasing):
            mem, view = self.memory.get(ip), by_ip.get(ip)
            if ip in self.in_flight:
                continue
            if (
                mem is None
                or mem.pending_op is None
                or mem.ignores_commands
                or view is None
                or view.state is MinerState.UNREACHABLE
            ):
                self.decreasing.discard(ip)
        return bool(self.decreasing)

    def gate(
        self, changes: list[Change], by_ip: Mapping[str, MinerView], *, meter_stale: bool
    ) -> tuple[list[Change], int]:
        """What of `changes` may go out now, and how many rises wait (hold_rises, write_ahead, a stale meter)."""
        changes, held = self.hold_rises(changes, by_ip)
        changes, unwritten = self.write_ahead(changes)
        held += unwritten
        if meter_stale:
            # the site meter is stale: no wake and no limit raise goes out (the site may be nearer its cap than the
            # miners' sum and the allowance say); sleeps and lower limits still do
            rising = {c.ip for c in changes if raises_draw(c, self.memory.setdefault(c.ip, MinerMemory()).commanded_w)}
            changes, held = [c for c in changes if c.ip not in rising], held + len(rising)
        return changes, held

    def hold_rises(self, changes: list[Change], by_ip: Mapping[str, MinerView]) -> tuple[list[Change], int]:
        """Wakes and limit raises wait until every sleep sent before them (or with them) shows in telemetry.

        The plan takes an acknowledged sleep or lower limit as done, but the miner ramps down over seconds while a
        wake or a raise can land sooner: spending that room at once lifted the site above its level (a re-plan that
        lowers some miners and wakes others; the first re-plan after a fast cut). A decrease stops holding rises once
        it is confirmed, or its miner cannot be read or ignores commands (both counted at their worst case).
        Returns the changes to send now and how many rises wait."""
        if not self.settle_decreases(by_ip) and not any(c.op is Op.SLEEP for c in changes):
            return changes, 0
        now_ = [c for c in changes if c.op is Op.SLEEP or c.decrease]
        return now_, len(changes) - len(now_)

    def write_ahead(self, changes: list[Change]) -> tuple[list[Change], int]:
        """Store every wake and limit raise as done before it goes out (memory.control_of): killed between the miner
        taking it and its reply being stored, the next run must not count that miner at its old, lower figures
        (chaos kill -9: a restart woke miners into the room miners the dead run had woken were booting into). A rise
        that cannot be stored first (the store refuses writes) is held: the site sheds, it does not rise, until the
        store takes writes again. Returns the changes to send and how many were held."""
        rising = [c for c in changes if raises_draw(c, self.memory.setdefault(c.ip, MinerMemory()).commanded_w)]
        if not rising:
            return changes, 0
        ahead = {c.ip: control_of(self.memory[c.ip], c) for c in rising}
        if self.persist.call("save_controls", ahead):
            self._rises_held = False
            return changes, 0
        # queued behind the refused writes: once it lands, the next save puts the miner's own figures back
        self.dirty.update(ahead)
        if not self._rises_held:  # (the store_unavailable alarm says the rest)
            log.warning("rises held: the state store cannot record them before they go out", held=len(rising))
        self._rises_held = True
        return [c for c in changes if c.ip not in ahead], len(rising)

    # ----------------------------------------------------------------------------------------- sending
    def hand_off(
        self,
        planned: Plan,
        views: Sequence[MinerView],
        by_ip: Mapping[str, MinerView],
        *,
        fast: bool,
        meter_stale: bool,
        now: float,
        use_power_limits: bool,
        cooling: CoolingGate | None,
    ) -> HandOff:
        """Send what takes the miners to the plan, less what must wait (rises behind settling sleeps, the store, a
        stale meter, cooling not ready; sleeps never wait). The plan is settled from the first hand-off that finds
        nothing to send or hold, nothing on the wire and nothing awaiting confirmation (`settled`)."""
        held_raises_w: list[float] = []
        changes = self.changes_for(planned, by_ip, now, use_power_limits=use_power_limits, held_raises_w=held_raises_w)
        changes, held = self.gate(changes, by_ip, meter_stale=meter_stale)
        if cooling is not None:  # every tick: cooling steps down with no change to send too
            changes, uncooled = cooling.hold_wakes(changes, views, now)
            held += uncooled
        if changes:
            log.debug("changes", changes=[f"{c.ip} {c.op.value} {c.watts or ''}".strip() for c in changes[:50]])
            log.debug("planned from", views=[_describe(v) for v in views[:50]], worst_case_kw=planned.worst_case_kw)
            crash_point("planned")
            self.launch(changes, planned, fast, now)
        if changes or held or self.in_flight or self.unconfirmed:
            self.settled_at = None
        elif self.settled_at is None:
            self.settled_at = now
        return HandOff(changes, held, sum(held_raises_w) / 1000.0)

    def launch(self, changes: list[Change], planned: Plan, fast: bool, now: float) -> None:
        self.before_send(now)
        # sleeps only: a sleeping miner ramps down over seconds; limit changes settle in rounds and holding every
        # rise behind them stalled a site's way back up (each round lowers a miner or two a few watts)
        self.decreasing.update(c.ip for c in changes if c.op is Op.SLEEP)
        for c in changes:
            self.in_flight[c.ip] = c
        wakes = sum(1 for c in changes if c.op is Op.WAKE)
        if wakes:  # the stagger counts wakes when they are sent
            self.wake_times = (*self.wake_times, *([now] * wakes))
        task = asyncio.get_running_loop().create_task(self._actuate(changes, planned, fast, now), name="actuate")
        self._actuations.add(task)
        task.add_done_callback(self._actuation_done)
        self._batches_out += 1
        if self._batches_out == 1 and self.on_actuating is not None:
            self.on_actuating(True)

    def fire_shed(self, changes: list[Change], level_kw: float, now: float) -> None:
        """A tripped under-frequency stage: its pre-armed sleeps go out now, through the ordinary launch (memory,
        commands in flight, the actions audit), not at the next tick (agent.runtime.frequency)."""
        shed = Plan(
            actions={c.ip: SleepAction() for c in changes},
            worst_case_kw=level_kw,
            expected_kw=level_kw,
            expected_ths=0.0,
            target_kw=level_kw,
            method="frequency",
        )
        self.launch(changes, shed, True, now)

    def brace(self, on: bool) -> None:
        """Sweeps pause between polls (True) or go on (False) while an under-frequency stage may trip, as for a
        batch; a batch already out holds them anyway (and lets them go when it ends)."""
        if self._batches_out == 0 and self.on_actuating is not None:
            self.on_actuating(on)

    def _actuation_done(self, task: asyncio.Task[None]) -> None:
        self._actuations.discard(task)
        self._batches_out -= 1
        if self._batches_out == 0 and self.on_actuating is not None:
            self.on_actuating(False)

    async def _actuate(self, changes: list[Change], planned: Plan, fast: bool, sent_at: float) -> None:
        try:
            report = await self.actuator.apply(
                changes, wake_batch=self.stagger.max_per_interval, on_result=lambda r: self.deliver(r, sent_at)
            )
        finally:
            for c in changes:
                self.in_flight.pop(c.ip, None)
        self.last_report = report
        failed = [r for r in report.results if not r.ok and r.outcome != "held"]
        data = {
            "method": planned.method,
            "fast": fast,
            "target_kw": round(planned.target_kw, 3),
            "worst_case_kw": round(planned.worst_case_kw, 3),
            "sent": report.sent,
            "held": report.count("held"),  # rises not sent: a decrease of the batch failed (actuator.apply)
            "by_op": report.by_op(),
            "retries": report.retries,
            "dur_ms": round((report.finished_at - report.started_at) * 1000, 1),
            "failed": [
                {"ip": r.ip, "op": r.op.value, "outcome": r.outcome, "detail": r.detail[:120]} for r in failed[:50]
            ],
            "failed_total": len(failed),
        }
        self.persist.audit(AuditKind.ACTIONS, data, self.clock())
        log.info("actions", **{k: v for k, v in data.items() if k != "failed"})
        self.batch_done()

    async def stop(self) -> None:
        """Cancel the batches on the wire (their miners are confirmed from telemetry by the next run)."""
        for task in list(self._actuations):
            task.cancel()
        if self._actuations:
            await asyncio.gather(*self._actuations, return_exceptions=True)

    async def shutdown(self, mode: str, snap: FleetSnapshot) -> None:
        """control.on_shutdown (the loop has stopped): leave (default: no surge on restart), or sleep or wake every
        reachable miner, in one batch awaited."""
        if mode == "leave":
            return
        reachable = [ip for ip, ms in snap.miners.items() if ms.reachable]
        op = Op.SLEEP if mode == "sleep" else Op.WAKE
        changes = [Change(ip, op) for ip in reachable]
        log.info("on_shutdown", mode=mode, miners=len(changes))
        report = await self.actuator.apply(changes, wake_batch=self.stagger.max_per_interval, on_result=self.take)
        self.save_controls(force=True)
        self.persist.store.append_audit(
            AuditKind.ACTIONS, {"on_shutdown": mode, "sent": report.sent, "by_op": report.by_op()}, self.clock()
        )

    # ----------------------------------------------------------------------------------------- results
    def _uncount_wake(self, sent_at: float | None) -> None:
        """The stagger counts wakes that happen: a wake refused or never sent must not hold back every other
        miner's."""
        if sent_at is not None and sent_at in self.wake_times:
            wt = list(self.wake_times)
            wt.remove(sent_at)
            self.wake_times = tuple(wt)

    def take(self, r: OpResult, sent_at: float | None = None) -> None:
        """A command's result, into the miner's memory (called by the controller's task only)."""
        now = self.clock()
        if self.on_result is not None:
            self.on_result(r)
        if r.outcome == "held":  # never sent (a decrease of its batch failed): the miner is as it was
            if r.op is Op.WAKE:
                self._uncount_wake(sent_at)
            return
        mem = self.memory.setdefault(r.ip, MinerMemory())
        if self.metrics is not None:
            self.metrics.observe_command(r.op.value, r.outcome, r.latency_s)
        if r.ok:
            mem.failures, mem.failed_op, mem.failed_retry_at = 0, None, -1e18
        elif not (r.outcome == "unsupported" and r.op is Op.SET_POWER):  # (that one: on/off from now on, below)
            # back off before sending it anything again (core.recommand.blocked); until then the plan counts it at its
            # worst case (observe): whatever the failed command was, it may or may not have taken
            mem.failures += 1
            backoff = min(FAILED_BACKOFF_MAX_S, self.confirm_after_s * 2 ** min(mem.failures - 1, 16))
            mem.failed_op, mem.failed_retry_at = r.op.value, now + backoff
            if r.op is Op.WAKE:
                self._uncount_wake(sent_at)
        if r.ok and r.op is Op.WAKE and sent_at is not None and sent_at in self.wake_times:
            # a wake counts from when it took, not from when it was sent: one held up behind slow commands in its
            # batch (limits first, a miner slow to answer) landed seconds after it was counted, and the next
            # interval's wake landed right behind it (soak 20261204, seed 61: two miners woke within 10 s)
            wt = list(self.wake_times)
            wt[wt.index(sent_at)] = max(sent_at, now)
            self.wake_times = tuple(wt)
        if r.ok:
            self.last_ack_at = now
            _acknowledged(mem, r, now)
        elif r.outcome == "unsupported" and r.op is Op.SET_POWER:
            mem.limits_unsupported = True
            log.warning("miner refuses power limits; treated as on/off", ip=r.ip, detail=r.detail)
        elif r.outcome != "skipped":
            log.warning(
                "miner command failed",
                ip=r.ip,
                op=r.op.value,
                outcome=r.outcome,
                detail=r.detail,
                failures=mem.failures,
                retry_in_s=round(mem.failed_retry_at - now, 1),
            )
        self.dirty.add(r.ip)
        if r.ok:
            crash_point("in_flight")

    def save_controls(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.dirty or (not force and now - self._controls_saved_at < CONTROLS_SAVE_EVERY_S / 10):
            return
        dirty, self.dirty = self.dirty, set()
        # a command on the wire that raises a miner's draw stays written ahead until its reply is in
        controls = {ip: control_of(self.memory[ip], self.in_flight.get(ip)) for ip in dirty if ip in self.memory}
        self.persist.call("save_controls", controls)
        self._controls_saved_at = now


def _acknowledged(mem: MinerMemory, r: OpResult, now: float) -> None:
    """A miner acknowledged `r`: what it was told, pending until telemetry shows it (agent.core.observe)."""
    if r.op is Op.SLEEP:
        if mem.seen_on is None or mem.seen_on:
            mem.last_transition = now
        mem.asleep_by_us = True
        mem.woken_to_w = None
        mem.wake_sent_at = None
    elif r.op is Op.WAKE:
        mem.left_w = None  # it comes up from asleep
        if not mem.seen_on:
            mem.last_transition = now
        mem.asleep_by_us = False
        mem.woken_to_w = None
        mem.wake_sent_at = now  # `waking` (observe.shown_state) until its power shows it up
        if r.watts is not None and "limit not set" not in r.detail:
            mem.commanded_w = float(r.watts)
            mem.woken_to_w = float(r.watts)  # accepted after the wake: it comes up at this limit
    else:
        if r.watts is not None and mem.commanded_w is not None and r.watts < mem.commanded_w:
            mem.lowered_at = now
        if r.watts is not None and r.watts != mem.commanded_w:
            mem.left_w = mem.commanded_w
        mem.commanded_w = float(r.watts) if r.watts is not None else mem.commanded_w
        mem.limited_at = now
    if (mem.pending_op, mem.pending_w) != (r.op.value, r.watts):
        mem.recommands = 0  # a new command, not a re-send of the last one
        mem.changed_at, mem.settled = now, False
    mem.pending_op, mem.pending_w, mem.pending_at = r.op.value, r.watts, now
    mem.seen_on = r.op is not Op.SLEEP


def _efficiency_rank(view: MinerView, watts: int) -> float:
    """Wakes and increases go to the most efficient miners first (lowest J/TH at the planned level)."""
    return DEFAULT_CURVE.j_per_th(watts, view.nominal_w, view.nominal_ths) - view.priority * 1e6


def _describe(v: MinerView) -> str:
    """One miner as the plan saw it, for the debug log: id, state, limit, reading, counted draw."""
    parts = [v.id, v.state.value, f"cmd={v.commanded_w}", f"pw={v.power_w}", f"meas={v.measured_w}"]
    if v.woken_to_w is not None:
        parts.append(f"woken_to={v.woken_to_w}")
    return " ".join(parts)
