"""Frequency response at run time: watch the frequency as the meter reads it, shed a tripped stage at once.

The rules are agent.core.frequency's; this module wires them to the meter, the actuator and the controller:
- every tick the controller re-arms the shed list (`arm`): the miners that can shed now, ranked so each stage's kW
  takes the fewest commands, and the site's power they are shed from;
- every reading the meter takes (`on_hz` for the fast frequency-only poll, frequency_response.poll_s; `on_reading`
  for the full one) goes straight into the detector, without waiting for a tick. The fast poll runs on the meter
  adapter's own thread (drivers/meter_modbus.py), and `on_hz` runs the pure detector right there, under a lock
  held only for the detector's step: a reading is taken, and a crossing seen, on time even while a tick holds the
  event loop (0.3-1 s at 10,000 miners), and the for_s timer runs on the readings' own times. What a decision
  does (commands, audit, the hold) touches the controller, so it is handed to the loop (`call_soon_threadsafe`),
  in the order decided. A thread rather than a tick cut into cooperative slices: the tick's work is one
  synchronous plan over the whole fleet, and slicing it would make every step of it re-entrant against commands
  and readings arriving in between; a thread needs only the detector's few fields guarded. A stage
  that trips fires its sleeps from the armed list through the controller's own launch path (so its memory, the
  commands in flight and the audit are the ordinary ones) and holds the site at what it drew less the stage's kW:
  `held_kw`, an input to arbitration like the others (the target's source reads "frequency");
- a reading taken while the meter is stale is not trusted: the detector forgets the time above the restore
  threshold (and below the stages), so a stale meter never restores an event, and the controller holds every rise
  while it is stale anyway;
- restore: the hold is dropped and the site comes back through the ordinary plan (ramp limit, wake stagger);
- an event survives a restart: while one holds, it is kept in the store's control state (`STATE_KEY`: the stage,
  what it was shed from, the level held, the miners it slept, the lowest frequency, when it tripped, the restore
  time running), written when it trips and when any of that changes, deleted when it restores. The next run
  resumes it before its first tick (`resume`): the hold is in force from the first plan, the stage does not trip
  again on a frequency still below it, and the event restores by the same rule on this run's readings (the time
  above the threshold starts again: nothing was read while the agent was down).

Each step of an event is one audit record (kind "frequency"): tripped (with the first reading below the
threshold), commands_out, commands_acked, shed_reached (the meter at or under the level), resumed (after a
restart), restored (with the lowest frequency seen). Times are on the controller's clock (the meter's readings are
taken on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hashflex.agent.config import AgentConfig, FrequencyResponseConfig
from hashflex.agent.core.audit import AuditKind
from hashflex.agent.core.frequency import (
    Candidate,
    FrequencyRules,
    FrequencyState,
    ShedList,
    Stage,
    observe,
    resumed,
    send_order,
    shed_list,
    unknown,
)
from hashflex.agent.core.model import Change, MinerState, MinerView, Op
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.actuator import OpResult
from hashflex.agent.runtime.metering import HzReading, MeterControl, MeterReadingView
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import ControlStore
from hashflex.drivers.base import CONTROL_COST_MS, Family

log = get_logger("frequency")

_SHEDDING = (MinerState.HASHING, MinerState.THROTTLED)
# readings further apart than this many fast polls (at least MIN_GAP_WALL_S of wall time) are not continuous: a
# busy event loop (a tick at 10,000 miners) may delay one or two polls, not more
GAP_POLLS = 5
MIN_GAP_WALL_S = 1.0
# while a stage's sleeps are on the wire the controller starts no tick (`defer_tick`), for at most this long (wall
# s): a tick at 10,000 miners holds the event loop 0.3-1 s, time the batch's own replies would wait behind it, and
# meanwhile the sleeps in flight count as done anyway; past this the tick runs whatever is still unanswered. The
# trade: no re-plan for that long, the stage's own sleeps being the decrease under way; a command (a dispatch, a
# cap) still ticks at once (Controller.run), and nothing rises while an event holds anyway
DEFER_TICK_MAX_S = 5.0
# bracing (`_brace`): from the first reading below a stage not yet held, for its ride-through (for_s, at most
# BRACE_MAX_S wall s, plus BRACE_MARGIN_S), no tick starts and sweeps pause between polls (the controller holds
# them as for a batch), so a trip's sleeps do not go out behind a tick or beside a sweep's polls; at most once per
# BRACE_EVERY_S wall s, so a frequency hovering at a threshold never holds telemetry back for long
BRACE_MAX_S = 1.0
BRACE_MARGIN_S = 0.3
BRACE_EVERY_S = 10.0
# the store's control state (kv) key of the event that holds, if one does (see the module's docstring)
STATE_KEY = "frequency_event"
STATE_VERSION = 1


class ShedCommands(Protocol):
    """Where a stage's sleeps go out (agent.runtime.commanding.Commander)."""

    @property
    def in_flight(self) -> Mapping[str, Change]: ...
    def fire_shed(self, changes: list[Change], level_kw: float, now: float) -> None: ...
    def brace(self, on: bool) -> None:
        """A stage's ride-through began (True: hold sweeps between polls) or ended without a trip (False)."""


class EventRecords(Protocol):
    """Where an event's steps are kept (FrequencyRecords)."""

    def audit(self, data: dict[str, Any], now: float) -> None: ...
    def save(self, doc: dict[str, Any] | None, now: float, audits: Collection[dict[str, Any]] = ()) -> None:
        """Keep `doc` as the event that holds (STATE_KEY), or none (None), with `audits` (frequency records) in
        the same transaction: one commit (one fsync) where a trip has three things to write."""


class FrequencyRecords:
    """EventRecords in the state store, through the loop's write-behind; `shown`: a record changes what the status
    document shows (it is rebuilt on the next read)."""

    def __init__(self, persist: WriteBehind, shown: Callable[[], None]) -> None:
        self.persist = persist
        self.shown = shown

    def audit(self, data: dict[str, Any], now: float) -> None:
        self.persist.audit(AuditKind.FREQUENCY, data, now)
        self.shown()

    def save(self, doc: dict[str, Any] | None, now: float, audits: Collection[dict[str, Any]] = ()) -> None:
        records = [dict(a) for a in audits]

        def write(store: ControlStore) -> None:
            with store.transaction():  # one commit: the event and its records
                if doc is None:
                    store.delete_state(STATE_KEY)
                else:
                    store.set_state(STATE_KEY, doc, now)
                for record in records:
                    store.append_audit(AuditKind.FREQUENCY, record, now)

        self.persist.write("frequency event", write)
        if records:
            self.shown()


def rules_from_config(
    cfg: FrequencyResponseConfig, *, wall_scale: float = 1.0, meter_poll_s: float = 1.0
) -> FrequencyRules:
    """The core's rules; `wall_scale`: site seconds per wall second (a simulation run), for the gap allowance."""
    poll = cfg.poll_s if cfg.poll_s is not None else meter_poll_s
    stages = tuple(
        Stage(
            s.below_hz,
            s.for_s,
            shed_pct=s.shed_pct,
            shed_kw=s.shed_kw,
            restore_above_hz=s.restore_above_hz,
            restore_after_s=s.restore_after_s,
        )
        for s in cfg.stages
    )
    return FrequencyRules(
        stages, cfg.restore_above_hz, cfg.restore_after_s, max_gap_s=max(MIN_GAP_WALL_S, GAP_POLLS * poll) * wall_scale
    )


@dataclass(slots=True)
class Event:
    """One under-frequency event as the runtime follows it (the detector's state has the frequency side)."""

    base_kw: float  # the miners' draw when the first stage tripped: a % stage is a share of it
    site_kw: float  # the site's power then (at the meter): the hold is this less the stage's kW
    depth: int = 0
    shed_kw: float = 0.0
    level_kw: float = 0.0
    fired: dict[str, float] = field(default_factory=dict)  # miner -> kW it drew, slept by this event
    awaiting: set[str] = field(default_factory=set)  # commands not yet answered
    ok: int = 0
    failed: int = 0
    fired_at: float | None = None
    acked_at: float | None = None
    reached_at: float | None = None
    first_below_at: float | None = None
    tripped_at: float | None = None


def _number(doc: dict[str, Any], key: str, *, optional: bool = False) -> float | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} = {value!r}: not a finite number")
    return float(value)


def _shifted(value: float | None, shift_s: float) -> float | None:
    return None if value is None else value + shift_s


class FrequencyResponse:
    @classmethod
    def for_site(
        cls,
        cfg: AgentConfig,
        commands: ShedCommands,
        records: EventRecords,
        meter: MeterControl | None,
        *,
        trigger: Callable[[], None],
        clock: Callable[[], float],
        wall_scale: float,
        prepare: Callable[[list[str]], Awaitable[set[str]]] | None,
    ) -> FrequencyResponse | None:
        """The site's response (None without frequency_response or a site meter), wired to the meter's section."""
        if cfg.frequency_response is None or meter is None:
            return None
        port = meter.meter
        response = cls(
            cfg.frequency_response,
            commands,
            records,
            trigger=trigger,
            clock=clock,
            meter_fresh=lambda: port.status().fresh,
            wall_scale=wall_scale,
            meter_poll_s=meter.cfg.poll_s,
            prepare=prepare,
        )
        meter.frequency = response
        return response

    def __init__(
        self,
        cfg: FrequencyResponseConfig,
        commands: ShedCommands,
        records: EventRecords,
        *,
        trigger: Callable[[], None],
        clock: Callable[[], float],
        meter_fresh: Callable[[], bool],
        wall_scale: float = 1.0,
        meter_poll_s: float = 1.0,
        prepare: Callable[[list[str]], Awaitable[set[str]]] | None = None,
    ) -> None:
        self.cfg = cfg
        # fetches ahead what the armed miners' first commands would fetch on the way (Actuator.prepare): the batch
        # a trip fires is then one exchange per miner
        self.prepare = prepare
        self._prepared: set[str] = set()
        self._preparing: asyncio.Task[None] | None = None
        self.rules = rules_from_config(cfg, wall_scale=wall_scale, meter_poll_s=meter_poll_s)
        self.wall_scale = wall_scale
        self.commands, self.records, self.trigger = commands, records, trigger
        self.clock = clock
        self.meter_fresh = meter_fresh
        self.state = FrequencyState.initial(self.rules)
        self.armed = ShedList(())
        self.armed_base_kw = 0.0  # the miners' draw at the last arm
        self.armed_site_kw: float | None = None  # the site at the meter at the last arm (None: not known)
        self.event: Event | None = None
        self.last_hz: float | None = None
        self.last_hz_at: float | None = None
        self.lowest_hz: float | None = None  # the lowest trusted reading since start (a dip ridden through shows)
        self.lowest_hz_at: float | None = None
        self.events_total = 0
        self._saved: tuple[Any, ...] | None = None  # what the stored event (STATE_KEY) shows, as last written
        # the detector's state is stepped on the meter's frequency thread and on the loop (full readings, arm):
        # one lock, held for a pure step only (never across I/O or a controller call)
        self._lock = threading.Lock()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built off a loop (unit tests): every reading is handled where it arrives
            self._loop = None
        self._loop_thread = threading.get_ident()
        self._fired_wall: float | None = None  # time.monotonic() when the last stage's sleeps went out
        # bracing for a trip (`_brace`): the detector's wish (meter thread, under the lock), and on the loop until
        # when (time.monotonic()) it holds, when it last began, and which brace an expiry timer belongs to
        self._brace_wanted = False
        self._brace_until = 0.0
        self._braced_at = -math.inf
        self._brace_n = 0
        # cyclic garbage collection held off (`_hold_gc`) while bracing and while a stage's sleeps are on the wire
        self._gc_held = False
        self._gc_until = 0.0

    # -------------------------------------------------------------------------------------------- per tick
    def arm(self, views: Iterable[MinerView], busy: Collection[str], site_kw: float | None, now: float) -> None:
        """Keep the shed list current: the miners that can shed now (running, reachable, obeying, nothing in
        flight), and what the site and the miners draw. `site_kw`: the metered site power (None: stale)."""
        if self._loop is None:  # built off the loop: the tick's loop is the one decisions are handed to
            with contextlib.suppress(RuntimeError):
                self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        candidates: list[Candidate] = []
        base = 0.0
        other = CONTROL_COST_MS[Family.OTHER]
        for v in views:
            w = v.power_w
            if w is None or v.state is MinerState.SLEEPING:
                continue
            base += w
            if w > 0 and v.state in _SHEDDING and not v.ignores_commands and v.id not in busy:
                candidates.append(Candidate(v.id, w / 1000.0, CONTROL_COST_MS.get(v.family, other)))
        base /= 1000.0
        self.armed = shed_list(candidates)
        self.armed_base_kw = base
        self.armed_site_kw = site_kw
        self._prepare_armed()
        if not self.meter_fresh():
            with self._lock:
                self.state = unknown(self.state, now)
                brace = self._brace_change()
            if brace is not None:
                self._brace(brace)
        if self.event is not None:
            self._save(now)  # written only when what it shows changed (the lowest frequency, the restore time)

    def _prepare_armed(self) -> None:
        """In the background, get the miners the deepest stage would sleep ready for one-exchange commands."""
        if self.prepare is None or self._loop is None or (self._preparing is not None and not self._preparing.done()):
            return
        deepest = self.rules.stages[-1].kw(self.armed_base_kw)
        todo = [c.id for c in self.armed.take(deepest) if c.id not in self._prepared]
        if todo:
            self._preparing = self._loop.create_task(self._prepare(todo), name="frequency-prepare")

    async def _prepare(self, ips: list[str]) -> None:
        assert self.prepare is not None
        started = time.monotonic()
        try:
            ready = await self.prepare(ips)
        except asyncio.CancelledError:
            return  # a trip's batch goes first (`_trip`); a later arm prepares what is left
        except Exception as exc:  # best effort: a batch from cold is only slower
            log.warning("preparing the armed shed list failed", error=repr(exc))
            return
        self._prepared |= ready
        log.info(
            "armed shed list prepared",
            miners=len(ips),
            ready=len(ready),
            dur_ms=round((time.monotonic() - started) * 1000),
        )

    def defer_tick(self) -> bool:
        """True while a tripped stage's sleeps are on the wire (not all answered), for at most DEFER_TICK_MAX_S,
        and while bracing for a trip (`_brace`): the controller starts no tick meanwhile, so the batch's sleeps do
        not go out, nor their replies wait, behind one."""
        ev, fired, now = self.event, self._fired_wall, time.monotonic()
        if now < self._brace_until:
            return True
        return bool(ev is not None and ev.awaiting and fired is not None and now - fired < DEFER_TICK_MAX_S)

    @property
    def held_kw(self) -> float | None:
        """The level an event holds the site at (arbitration's frequency input), None without one."""
        return None if self.event is None or self.event.depth == 0 else self.event.level_kw

    # -------------------------------------------------------------------------------------------- readings
    def on_hz(self, reading: HzReading) -> None:
        """A frequency reading (the fast poll, on the meter's frequency thread): straight into the detector."""
        self._observe(reading.hz, reading.read_at)

    def on_reading(self, reading: MeterReadingView) -> None:
        """A full meter reading: its frequency, and whether the shed has reached the meter."""
        self._observe(reading.hz, reading.read_at)
        ev = self.event
        if ev is not None and ev.depth and ev.reached_at is None and reading.watts / 1000.0 <= ev.level_kw:
            ev.reached_at = reading.read_at
            self._audit(
                "shed_reached",
                reading.read_at,
                metered_kw=round(reading.watts / 1000.0, 3),
                level_kw=round(ev.level_kw, 3),
                after_crossing_s=self._since(ev.first_below_at, reading.read_at),
                after_fired_s=self._since(ev.fired_at, reading.read_at),
            )

    def _observe(self, hz: float, at: float) -> None:
        """Step the detector (any thread); act on its decision on the loop."""
        fresh = self.meter_fresh()
        with self._lock:
            if not fresh:
                self.state = unknown(self.state, at)  # not a reading to act on, nor to restore on
                brace = self._brace_change()
            else:
                self.last_hz, self.last_hz_at = hz, at
                if self.lowest_hz is None or hz < self.lowest_hz:
                    self.lowest_hz, self.lowest_hz_at = hz, at
                self.state, decision = observe(self.state, self.rules, hz, at)
                first_below_at = self.state.first_below_at  # as of this reading (the loop may act later)
                brace = None if decision.tripped else self._brace_change()
        if brace is not None:
            self._on_loop(self._brace, brace)
        if not fresh:
            return
        if decision.tripped:
            self._on_loop(self._trip, decision.depth, hz, at, first_below_at)
        elif decision.restore:
            self._on_loop(self._restore, decision.ended, hz, at)

    def _brace_change(self) -> float | bool | None:
        """Under the lock, after a step: the for_s of the stage whose ride-through just began (brace), False when
        none runs any more (a dip ridden through, a stale meter: unbrace), None when nothing changed."""
        st = self.state
        running = [
            stage.for_s
            for stage, since in zip(self.rules.stages[st.depth :], st.below_since[st.depth :], strict=True)
            if since is not None
        ]
        if bool(running) == self._brace_wanted:
            return None
        self._brace_wanted = bool(running)
        return running[0] if running else False

    def _brace(self, for_s: float | bool) -> None:
        """On the loop: brace for a stage that may trip in `for_s` site seconds (see BRACE_MAX_S), or stop (False)."""
        now = time.monotonic()
        if for_s is False:
            if self._brace_until:
                self._brace_until = 0.0
                self.commands.brace(False)
                self._hold_gc(False)
            return
        if self._brace_until or now - self._braced_at < BRACE_EVERY_S:
            return
        self._braced_at = now
        hold_s = min(float(for_s) / max(self.wall_scale, 1e-9), BRACE_MAX_S) + BRACE_MARGIN_S
        self._brace_until = now + hold_s
        self._brace_n += 1
        self.commands.brace(True)
        self._hold_gc(True, hold_s)
        if self._loop is not None:
            self._loop.call_later(hold_s, self._brace_expired, self._brace_n)

    def _brace_expired(self, n: int) -> None:
        if n == self._brace_n and self._brace_until:
            self._brace(False)

    def _hold_gc(self, hold: bool, for_s: float = DEFER_TICK_MAX_S) -> None:
        """Hold off cyclic garbage collection (True, for `for_s` wall s at most) or let it run again (False).

        A full collection walks every object made since start-up (app.py freezes what was there then): at 2,000
        miners 20-90 ms, at 10,000 several times that, and a batch of a thousand sleeps or more allocates enough
        (tasks, futures, transports) to set one off, or several, while its replies wait. Reference counting frees
        everything else meanwhile, so a few seconds without the cycle collector cost no memory to speak of. Only
        with a running loop, which bounds the hold (`_gc_timeout`); idempotent."""
        if not hold:
            if self._gc_held:
                self._gc_held = False
                gc.enable()
            return
        if self._loop is None:
            return
        until = time.monotonic() + for_s
        if not self._gc_held:
            if not gc.isenabled():
                return  # someone else holds it: theirs to release
            gc.disable()
            self._gc_held = True
        if until > self._gc_until:
            self._gc_until = until
            self._loop.call_later(for_s, self._gc_timeout)

    def _gc_timeout(self) -> None:
        if self._gc_held and time.monotonic() >= self._gc_until - 1e-3:
            self._hold_gc(False)

    def close(self) -> None:
        """Let go of what this holds (the collector, the preparation): the agent is stopping."""
        self._hold_gc(False)
        if self._preparing is not None and not self._preparing.done():
            self._preparing.cancel()

    def _on_loop(self, action: Callable[..., None], *args: Any) -> None:
        """Run `action` on the event loop: now if this is the loop's thread, else as soon as the loop is free."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            action(*args)
        else:
            loop.call_soon_threadsafe(action, *args)

    # -------------------------------------------------------------------------------------------- actions
    def _trip(self, depth: int, hz: float, at: float, first_below_at: float | None) -> None:
        ev = self.event
        if ev is not None and depth <= ev.depth:
            return  # decided on the detector's state before an event was resumed (`resume`): held already
        # the stage's batch holds sweeps and ticks from here (Controller._launch, defer_tick): the brace's hold is
        # left in place (released and held again, every sweep worker waiting on it would wake and poll beside the
        # batch), and let go below only when there is nothing to send
        braced, self._brace_until = bool(self._brace_until), 0.0
        if ev is None:
            site = self.armed_site_kw
            # without a fresh site figure at the last arm the miners' draw stands in (the meter is fresh now, or
            # this reading would not count; the next tick corrects the level from the meter)
            site_kw = site if site is not None else self.armed_base_kw
            ev = self.event = Event(self.armed_base_kw, site_kw, first_below_at=first_below_at, tripped_at=at)
            self.events_total += 1
        stage = self.rules.stages[depth - 1]
        ev.depth = depth
        ev.shed_kw = stage.kw(ev.base_kw)
        ev.level_kw = max(0.0, ev.site_kw - ev.shed_kw)
        need = ev.shed_kw - sum(ev.fired.values())
        busy = set(ev.fired) | set(self.commands.in_flight)
        chosen = send_order(self.armed.take(need, skip=busy)) if need > 0 else []
        changes = [Change(c.id, Op.SLEEP, None, decrease=True, rank=-c.kw / max(c.cost_ms, 1e-6)) for c in chosen]
        for c in chosen:
            ev.fired[c.id] = c.kw
            ev.awaiting.add(c.id)
        now = self.clock()
        # the event, its trip and its commands in one commit, before the sleeps go out (they start once this
        # returns to the loop): a restart after it resumes the event; three commits were 20-40 ms of fsync here
        tripped = self._record(
            "tripped",
            at,
            stage=depth - 1,
            below_hz=stage.below_hz,
            for_s=stage.for_s,
            hz=round(hz, 4),
            first_below_at=iso(ev.first_below_at),
            shed_kw=round(ev.shed_kw, 3),
            level_kw=round(ev.level_kw, 3),
            site_kw=round(ev.site_kw, 3),
        )
        out = self._record(
            "commands_out",
            now,
            stage=depth - 1,
            sent=len(changes),
            planned_kw=round(sum(c.kw for c in chosen), 3),
            armed=len(self.armed.ranked),
            armed_kw=round(self.armed.total_kw, 3),
        )
        self._save(now, audits=(tripped, out))
        log.warning(
            "under-frequency stage tripped",
            stage=depth - 1,
            hz=round(hz, 4),
            below_hz=stage.below_hz,
            shed_kw=round(ev.shed_kw, 2),
            level_kw=round(ev.level_kw, 2),
            commands=len(changes),
        )
        if changes:
            if self._preparing is not None and not self._preparing.done():
                self._preparing.cancel()  # the batch goes first; what is left is prepared at a later arm
            ev.fired_at = now
            ev.acked_at = None
            self._fired_wall = time.monotonic()
            self._hold_gc(True)  # until every sleep is answered (`on_result`), DEFER_TICK_MAX_S at most
            self.commands.fire_shed(changes, ev.level_kw, now)
        if not changes:
            if braced:
                self.commands.brace(False)
            self._hold_gc(False)
            self.trigger()  # arbitration takes the hold at once
        # else: not now; a tick planning the whole fleet would hold the event loop while the sleeps go out, and
        # meanwhile the sleeps in flight count as done; the batch's end asks for a tick (Controller._actuate)

    def on_result(self, r: OpResult) -> None:
        """A command's answer (the controller hands every one in): an event's sleeps acknowledged."""
        ev = self.event
        if ev is None or not ev.awaiting or r.ip not in ev.awaiting or r.op is not Op.SLEEP:
            return
        ev.awaiting.discard(r.ip)
        if r.ok:
            ev.ok += 1
        else:
            ev.failed += 1
        if not ev.awaiting:
            self._hold_gc(False)
            now = self.clock()
            ev.acked_at = now
            self._audit(
                "commands_acked",
                now,
                ok=ev.ok,
                failed=ev.failed,
                after_fired_s=self._since(ev.fired_at, now),
                after_crossing_s=self._since(ev.first_below_at, now),
            )

    def _restore(self, ended: FrequencyState | None, hz: float, at: float) -> None:
        ev, self.event = self.event, None
        min_hz = None if ended is None or ended.min_hz is None else round(ended.min_hz, 4)
        self._audit(
            "restored",
            at,
            hz=round(hz, 4),
            min_hz=min_hz,
            min_hz_at=None if ended is None else iso(ended.min_hz_at),
            above_since=None if ended is None else iso(ended.restore_since),
            duration_s=None if ev is None else self._since(ev.first_below_at, at),
            slept=0 if ev is None else len(ev.fired),
        )
        log.info("under-frequency event restored", hz=round(hz, 4), min_hz=min_hz)
        self._save(self.clock())
        self.trigger()  # the hold is gone: the ordinary plan brings the site back (ramp, stagger)

    # -------------------------------------------------------------------------------------------- over a restart
    def event_doc(self) -> dict[str, Any] | None:
        """The event that holds, as kept in the store (None: none holds)."""
        ev, st = self.event, self.state
        if ev is None or ev.depth == 0:
            return None
        return {
            "v": STATE_VERSION,
            "depth": ev.depth,
            "base_kw": ev.base_kw,
            "site_kw": ev.site_kw,
            "shed_kw": ev.shed_kw,
            "level_kw": ev.level_kw,
            "fired": dict(ev.fired),
            "first_below_at": ev.first_below_at,
            "tripped_at": ev.tripped_at,
            "reached_at": ev.reached_at,
            "min_hz": st.min_hz,
            "min_hz_at": st.min_hz_at,
            "restore_since": st.restore_since,
        }

    def _save(self, now: float, audits: Collection[dict[str, Any]] = ()) -> None:
        """Write the event that holds (or that none does) when what the store has differs, or with `audits`."""
        ev, st = self.event, self.state
        shown = (
            None if ev is None else (ev.depth, ev.level_kw, len(ev.fired), ev.reached_at, st.min_hz, st.restore_since)
        )
        if shown == self._saved and not audits:
            return
        self._saved = shown
        self.records.save(self.event_doc(), now, audits)

    def resume(self, doc: object, *, shift_s: float, now: float) -> None:
        """Hold the event the last run held (its stored `doc`, None: none), before the first tick. `shift_s`: how
        far the last run's times are moved onto this run's clock (core.timeline, after a wall-clock step)."""
        if doc is None:
            return
        try:
            if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} event: {str(doc)[:80]!r}")
            depth = doc.get("depth")
            if isinstance(depth, bool) or not isinstance(depth, int):
                raise ValueError(f"depth = {depth!r}: not a stage count")
            fired = doc.get("fired")
            if not isinstance(fired, dict) or not all(isinstance(k, str) for k in fired):
                raise ValueError("fired: not a map of miners to kW")
            base_kw, site_kw = _number(doc, "base_kw") or 0.0, _number(doc, "site_kw") or 0.0
            slept = {ip: _number(fired, ip) or 0.0 for ip in fired}
            times = {
                k: _shifted(_number(doc, k, optional=True), shift_s)
                for k in ("first_below_at", "tripped_at", "reached_at", "min_hz_at", "restore_since")
            }
            min_hz = _number(doc, "min_hz", optional=True)
            state = resumed(
                self.rules,
                depth,
                first_below_at=times["first_below_at"],
                tripped_at=times["tripped_at"],
                min_hz=min_hz,
                min_hz_at=times["min_hz_at"],
            )
        except (TypeError, ValueError) as exc:
            # the shed it held is not known: the site comes back under the ordinary plan, and the stage trips
            # again if the frequency is still below it
            log.error("the stored under-frequency event is unreadable; not resumed", error=str(exc))
            self.records.save(None, now)
            return
        # the stage's kW and the level as this run's rules have them (a restart may come with a changed file)
        stage = self.rules.stages[state.depth - 1]
        shed_kw = stage.kw(base_kw)
        ev = Event(
            base_kw,
            site_kw,
            depth=state.depth,
            shed_kw=shed_kw,
            level_kw=max(0.0, site_kw - shed_kw),
            fired=slept,
            reached_at=times["reached_at"],
            first_below_at=times["first_below_at"],
            tripped_at=times["tripped_at"],
        )
        with self._lock:
            self.state = state
        self.event = ev
        self.events_total += 1
        self._saved = None
        self._save(now)  # what this run holds (the level, the stage, if the rules changed)
        above_hz, after_s = self.rules.restore_rule(state.depth)
        self._audit(
            "resumed",
            now,
            stage=state.depth - 1,
            level_kw=round(ev.level_kw, 3),
            shed_kw=round(shed_kw, 3),
            site_kw=round(site_kw, 3),
            slept=len(slept),
            first_below_at=iso(ev.first_below_at),
            tripped_at=iso(ev.tripped_at),
            min_hz=None if min_hz is None else round(min_hz, 4),
            min_hz_at=iso(times["min_hz_at"]),
            restoring_since_before=iso(times["restore_since"]),
            restore_above_hz=above_hz,
            restore_after_s=after_s,
            shift_s=round(shift_s, 3),
        )
        log.warning(
            "under-frequency event resumed: the shed holds until the restore rule is met",
            stage=state.depth - 1,
            level_kw=round(ev.level_kw, 2),
            slept=len(slept),
            restore_above_hz=above_hz,
            restore_after_s=after_s,
        )

    # -------------------------------------------------------------------------------------------- records
    @staticmethod
    def _since(start: float | None, at: float) -> float | None:
        return None if start is None else round(at - start, 3)

    @staticmethod
    def _record(step: str, at: float, **data: Any) -> dict[str, Any]:
        return {"step": step, "at": iso(at), **data}

    def _audit(self, step: str, at: float, **data: Any) -> None:
        self.records.audit(self._record(step, at, **data), self.clock())

    def doc(self) -> dict[str, Any]:
        """The status document's `meter.frequency_response` section."""
        ev, st = self.event, self.state
        restore_above_hz, restore_after_s = self.rules.restore_rule(0 if ev is None else ev.depth)
        stages = []
        for s in self.rules.stages:
            kw = s.kw(self.armed_base_kw)
            chosen = self.armed.take(kw)
            # prepared: how many of those commands are one exchange now (Actuator.prepare done for the miner)
            ready = len(chosen) if self.prepare is None else sum(1 for c in chosen if c.id in self._prepared)
            stages.append(
                {
                    "below_hz": s.below_hz,
                    "for_s": s.for_s,
                    "shed_kw": round(kw, 3),
                    "commands": len(chosen),
                    "prepared": ready,
                }
            )
        return {
            "active": ev is not None,
            "stage": None if ev is None else ev.depth - 1,
            "held_kw": None if ev is None else round(ev.level_kw, 3),
            "shed_kw": None if ev is None else round(ev.shed_kw, 3),
            "first_below_at": None if ev is None else iso(ev.first_below_at),
            "min_hz": None if ev is None or st.min_hz is None else round(st.min_hz, 4),
            "restoring_since": iso(st.restore_since) if ev is not None else None,
            "slept": 0 if ev is None else len(ev.fired),
            "awaiting_ack": 0 if ev is None else len(ev.awaiting),
            "shed_reached_at": None if ev is None else iso(ev.reached_at),
            "hz": None if self.last_hz is None else round(self.last_hz, 4),
            "lowest_hz": None if self.lowest_hz is None else round(self.lowest_hz, 4),
            "lowest_hz_at": iso(self.lowest_hz_at),
            "restore_above_hz": restore_above_hz,
            "restore_after_s": restore_after_s,
            "armed": stages,
            "events": self.events_total,
        }
