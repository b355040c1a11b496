"""Facility loads at run time: each circuit's cooling (site.circuits[].cooling) set from its miners, every tick.

The controller calls `hold_wakes(changes, views, now)` once per tick, after its plan and its other holds:

- the miners' states per cooled circuit (its own miners and its sub-circuits'; waking and unreachable count as on)
  and the wakes the plan sends there step the pure rule (agent.core.facility) to a setpoint;
- a setpoint the device has not acknowledged is written in the background (only on change; a failed write is
  retried after a back-off, 1 s doubling to 60 s, and raises the alarm `cooling:<circuit>` once; a good answer
  clears it); the device is also read back every VERIFY_S, so one that went offline, or was set by hand, is seen
  without waiting for the next change;
- wakes on a circuit whose cooling is not ready (not acknowledged at the speed they need, or not yet running for
  `up_lead_s`) are held: returned out of the changes, counted as held, and planned again next tick. Sleeps and
  lower limits always go: a failed cooling device never blocks curtailment. It blocks wakes on its circuit only,
  and `status()` (the status document's `facility`) says which circuit waits and why.

Counting the cooling's power: with a site meter (site.meter), a facility load is part of the metered non-miner load
(meter − Σ miners), which the planner counts at its recent maximum plus `site.meter.cooling_pct` of a planned rise
(agent.core.site_meter). Because a wake waits until its cooling has run for `up_lead_s`, the meter already reads the
raised cooling when the miners are planned up: it is measured, not estimated (the wake is planned again every tick
while it waits, each time with the meter's latest reading). Between the raise and the first reading that shows it,
the cooling is counted at `cooling_pct` of the rise the plan wanted; a relay that switches a load larger than that
can lift the meter above the level for a poll or two, and the next tick's plan (sleeps first) takes it back. Size
`cooling_pct` to the facility loads (their `full_kw` against the miners they cool). Without a meter the cap applies to
the miners' sum as before; reserve facility loads' `full_kw` in site.cap_kw (or the circuit's cap_kw, when the
load is fed from that circuit).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hashflex.agent.config import AgentConfig, CoolingConfig
from hashflex.agent.core import facility as core
from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.model import Change, MinerState, MinerView, Op
from hashflex.agent.logging import get_logger

log = get_logger("facility")

VERIFY_S = 15.0  # clock seconds between read-backs of a device that needs no write
BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 60.0
_ASLEEP = (MinerState.SLEEPING,)


class Reading(Protocol):
    @property
    def pct(self) -> float: ...


class CoolingPort(Protocol):
    name: str

    async def set_pct(self, pct: float) -> None: ...
    async def read(self) -> Reading: ...
    def close(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float: ...


def modbus_device(cfg: CoolingConfig) -> CoolingPort:
    """The Modbus adapter, imported only when a circuit has cooling (it brings pymodbus)."""
    from hashflex.drivers.facility_modbus import FacilityDevice, FacilityDeviceConfig  # noqa: PLC0415

    return FacilityDevice(
        FacilityDeviceConfig(
            kind=cfg.kind,
            host=cfg.host,
            port=cfg.port,
            unit=cfg.unit,
            setpoint_register=cfg.setpoint_register,
            full_scale=cfg.full_scale,
            speed_register=cfg.speed_register,
            power_register=cfg.power_register,
            timeout_s=cfg.timeout_s,
        )
    )


def rule_of(circuit: str, cfg: CoolingConfig) -> core.CoolingRule:
    return core.CoolingRule(
        circuit=circuit,
        kind=cfg.kind,
        min_pct=cfg.minimum_pct,
        idle_pct=cfg.idle_pct,
        curve=cfg.curve_shares(),
        down_after_s=cfg.down_after_s,
        up_lead_s=cfg.up_lead_s,
    )


@dataclass
class _Load:
    circuit: str
    node: int  # the circuit's index in the tree: a miner counts when it is on the node's path
    rule: core.CoolingRule
    device: CoolingPort
    resolution_pct: float  # one step of the device's reference: a read-back this close is what was written
    state: core.CoolingState | None = None  # None until the device first answered (its speed is unknown till then)
    miners: core.CircuitMiners = field(default_factory=lambda: core.CircuitMiners(0, 0))
    task: asyncio.Task[None] | None = None
    failures: int = 0
    retry_at: float = -math.inf
    verified_at: float = -math.inf
    error: str | None = None
    held: int = 0  # wakes held this tick
    history: list[tuple[float, float]] = field(default_factory=list)


class FacilityControl:
    def __init__(
        self,
        loads: Sequence[tuple[str, CoolingConfig, CoolingPort]],
        tree: CircuitTree,
        clock: Clock,
        *,
        raise_alarm: Callable[[str, str], None],
        clear_alarm: Callable[[str], Any],
    ) -> None:
        self.tree = tree
        self.clock = clock
        self.raise_alarm, self.clear_alarm = raise_alarm, clear_alarm
        self.loads = [
            _Load(
                cid,
                tree.index(cid),
                rule_of(cid, cfg),
                device,
                100.0 if cfg.kind == "relay" else 100.0 / cfg.full_scale,
            )
            for cid, cfg, device in loads
        ]
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(
        cls,
        cfg: AgentConfig,
        tree: CircuitTree,
        clock: Clock,
        *,
        raise_alarm: Callable[[str, str], None],
        clear_alarm: Callable[[str], Any],
        device: Callable[[CoolingConfig], CoolingPort] = modbus_device,
    ) -> FacilityControl | None:
        loads = [(c.id, c.cooling, device(c.cooling)) for c in cfg.site.circuits if c.cooling is not None]
        if not loads:
            return None
        return cls(loads, tree, clock, raise_alarm=raise_alarm, clear_alarm=clear_alarm)

    # -- the tick -----------------------------------------------------------------------------------------------
    def hold_wakes(self, changes: list[Change], views: Sequence[MinerView], now: float) -> tuple[list[Change], int]:
        """Step every cooling load from its miners; return the changes without the wakes its cooling is not ready
        for, and how many it held."""
        by_ip = {v.id: v for v in views}
        wakes = [c for c in changes if c.op is Op.WAKE]
        held: set[str] = set()
        for ld in self.loads:
            total = on = 0
            for v in views:
                if self._feeds(ld, v.circuit):
                    total += 1
                    on += v.state not in _ASLEEP
            wanted = [c.ip for c in wakes if c.ip in by_ip and self._feeds(ld, by_ip[c.ip].circuit)]
            ld.miners = core.CircuitMiners(total=total, on=on, wanted=len(wanted))
            if ld.state is not None:
                ld.state = core.step(ld.rule, ld.state, ld.miners, now)
            self._apply(ld, now)
            ready = ld.state is not None and core.ready_for_wake(ld.rule, ld.state, ld.miners, now)
            ld.held = 0 if ready else len(wanted)
            if not ready:
                held.update(wanted)
        if not held:
            return changes, 0
        return [c for c in changes if c.ip not in held], len(held)

    def _feeds(self, ld: _Load, circuit: str | None) -> bool:
        return circuit is not None and self.tree.knows(circuit) and ld.node in self.tree.path(circuit)

    def _apply(self, ld: _Load, now: float) -> None:
        if ld.task is not None or now < ld.retry_at:
            return
        if ld.state is None:  # first contact: read what it runs at (nothing is stepped down before the delay)
            self._spawn(ld, self._first_read(ld))
        elif ld.state.acked_pct != ld.state.setpoint_pct:
            self._spawn(ld, self._write(ld, ld.state.setpoint_pct))
        elif now - ld.verified_at >= VERIFY_S:
            self._spawn(ld, self._verify(ld))

    def _spawn(self, ld: _Load, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"cooling {ld.circuit}")
        ld.task = task
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            ld.task = None

        task.add_done_callback(done)

    # -- device calls (background) ----------------------------------------------------------------------------
    async def _first_read(self, ld: _Load) -> None:
        try:
            reading = await ld.device.read()
        except Exception as exc:  # any failure of the device is an alarm, never a crash of the loop
            self._failed(ld, "read", exc)
            return
        now = self.clock.time()
        start = core.CoolingState(setpoint_pct=reading.pct)
        ld.state = core.step(ld.rule, core.acknowledged(ld.rule, start, reading.pct, now), ld.miners, now)
        ld.verified_at = now
        self._ok(ld, f"read {reading.pct:g} %")

    async def _write(self, ld: _Load, pct: float) -> None:
        try:
            await ld.device.set_pct(pct)
        except Exception as exc:
            self._failed(ld, f"set {pct:g} %", exc)
            return
        now = self.clock.time()
        if ld.state is not None:
            ld.state = core.acknowledged(ld.rule, ld.state, pct, now)
        ld.verified_at = now
        ld.history = [*ld.history[-49:], (now, pct)]
        log.info(
            "cooling set", circuit=ld.circuit, device=ld.device.name, pct=pct, on=ld.miners.on, total=ld.miners.total
        )
        self._ok(ld, f"set {pct:g} %")

    async def _verify(self, ld: _Load) -> None:
        try:
            reading = await ld.device.read()
        except Exception as exc:
            self._failed(ld, "read", exc)
            return
        now = self.clock.time()
        ld.verified_at = now
        acked = None if ld.state is None else ld.state.acked_pct
        if ld.state is not None and (acked is None or abs(reading.pct - acked) > ld.resolution_pct):
            # set by hand, or restarted at its own default: what it runs at is what it says; the next tick rewrites
            log.warning("cooling changed outside the agent", circuit=ld.circuit, pct=reading.pct)
            ld.state = core.acknowledged(ld.rule, ld.state, reading.pct, now)
        self._ok(ld, "verified")

    def _ok(self, ld: _Load, what: str) -> None:
        if ld.error is not None:
            log.info("cooling device back", circuit=ld.circuit, device=ld.device.name, after=what)
            self.clear_alarm(f"cooling:{ld.circuit}")
        ld.failures, ld.retry_at, ld.error = 0, -math.inf, None

    def _failed(self, ld: _Load, what: str, exc: Exception) -> None:
        now = self.clock.time()
        ld.failures += 1
        ld.retry_at = now + min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (ld.failures - 1))
        if ld.state is not None:
            ld.state = core.lost(ld.state)
        first = ld.error is None
        ld.error = f"{what}: {exc}"
        if first:
            log.warning("cooling device failed", circuit=ld.circuit, device=ld.device.name, error=ld.error)
        # the same words while it lasts (a new message each retry would be a new alarm, audited each time)
        self.raise_alarm(
            f"cooling:{ld.circuit}",
            f"cooling of circuit {ld.circuit} ({ld.device.name}) does not answer; retrying; wakes on {ld.circuit} "
            "are held until it does (sleeps go on)",
        )

    # -- read side ----------------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        out = []
        for ld in self.loads:
            s = ld.state
            out.append(
                {
                    "circuit": ld.circuit,
                    "kind": ld.rule.kind,
                    "device": ld.device.name,
                    "setpoint_pct": None if s is None else s.setpoint_pct,
                    "acknowledged_pct": None if s is None else s.acked_pct,
                    "stepping_down_since": None if s is None else s.below_since,
                    "miners_on": ld.miners.on,
                    "miners": ld.miners.total,
                    "wakes_held": ld.held,
                    "error": ld.error,
                    "wakes": "blocked: device not answering"
                    if ld.error
                    else "held: cooling coming up"
                    if ld.held
                    else "allowed",
                }
            )
        return out

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for ld in self.loads:
            ld.device.close()
