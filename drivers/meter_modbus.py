"""The site meter adapter: polls a Modbus TCP meter and hands out validated readings (the only agent-side module
that imports pymodbus).

    meter = ModbusMeter(MeterConfig(host="10.0.0.50", port=502, map="sunspec", bounds=MeterBounds(max_w=2.4e7)),
                        clock=agent_clock)
    meter.start()                      # background polling every poll_s (wall seconds); hz_poll_s on a thread
    meter.reading()                    # the latest good reading if fresh, else None
    meter.status()                     # freshness, stale since when, the fault kinds seen since the last good one
    await meter.stop()

Register maps (drivers/meter_maps.py): "sunspec" finds the "SunS" marker at 40000, 0 or 50000 and walks the models
to the first meter model (201–204 int + scale factor, 211–214 float32; `sunspec_model` picks one), a preset name
("eastron-sdm630", "carlo-gavazzi-em24"), or a MeterMap from configuration.

A reading is good only if every register read answered, every figure is finite and within MeterBounds, and the
import counter neither went back nor rose more than max_w could have drawn since the last good reading. Anything
else is refused: not returned as a reading, logged once per kind of fault (until a good reading comes back), and
reported through `on_fault` and `status().faults` for the caller to raise as an alarm. Registers that stop changing
for `frozen_after_s` are a frozen meter: refused too. With no good reading for `stale_after_s` the meter is stale
(`status().fresh` False, `stale_since` the time of the last good one). A counter that went back (a reset meter, a
replaced one) stays refused until the caller accepts the new count with `rebase_counter()`, which starts a new
`counter_epoch` (energy accounting must not take a delta across epochs).

The fast frequency poll (`hz_poll_s`, frequency response) runs on a thread of its own with its own small
synchronous client and connection, not on the event loop: a reading must be taken on time even while the loop is
held by a long synchronous step (a control tick at 10,000 miners holds it 0.3-1 s), and a detector fed on that
thread sees the crossing on time. `on_frequency` is therefore called ON THAT THREAD (it must be thread-safe and
short; agent.runtime.frequency runs the pure detector under a lock and hands a trip to the loop with
`call_soon_threadsafe`). Refusals from the thread are handed to the loop the same way, so fault bookkeeping, its
log line and `on_fault` stay on the loop. The register map comes from the full poll (SunSpec discovery runs
there); the thread reads nothing until it is known.

Times: `read_at` and every freshness rule use the clock passed in (its `monotonic()`, site seconds: the agent's
clock, scaled in a simulation run so that counter deltas and elapsed time agree); poll periods and network timeouts
are wall seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient
from pymodbus.exceptions import ModbusException

from hashflex.drivers.meter_maps import (
    FLOAT_METERS,
    INT_METERS,
    MAX_READ_REGISTERS,
    PRESETS,
    SUNSPEC_BASES,
    SUNSPEC_END,
    SUNSPEC_MARKER,
    DecodedValues,
    MeterBounds,
    MeterDataError,
    MeterFault,
    MeterMap,
    ReadBlock,
    RegisterField,
    RegisterType,
    check_counter,
    check_values,
    decode_field,
    decode_map,
    read_plan,
    sunspec_meter_map,
    sunspec_model_length,
)
from hashflex.drivers.modbus_tcp import ModbusConnectError, connect_tcp

log = structlog.get_logger(component="drivers.meter")
# pymodbus logs every failed request at ERROR with a hex dump of the exchange, poll after poll while a meter is
# down; this adapter reports each kind of fault once with its reason, so pymodbus's own lines stay out of the log
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

MAX_SUNSPEC_MODELS = 64  # a walk that has not found the end marker by then is reading garbage


class MonotonicClock(Protocol):
    def monotonic(self) -> float: ...


class _WallClock:
    def monotonic(self) -> float:
        return time.monotonic()


class MeterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=255, description="Modbus unit (device) id")
    map: str | MeterMap = Field("sunspec", description="'sunspec', a preset name, or a register map")
    sunspec_model: int | None = Field(
        None, description="with map 'sunspec': use this meter model (e.g. 213) when the meter offers several"
    )
    bounds: MeterBounds
    poll_s: float = Field(1.0, ge=0.02, le=60.0, description="wall seconds between full readings")
    hz_poll_s: float | None = Field(
        None,
        ge=0.02,
        le=60.0,
        description="wall seconds between frequency-only readings (e.g. 0.1); none = with the rest",
    )
    timeout_s: float = Field(1.0, gt=0, le=30.0, description="connect and reply timeout, wall seconds")
    stale_after_s: float = Field(5.0, gt=0, description="no good reading for this long (clock s): stale")
    frozen_after_s: float = Field(10.0, gt=0, description="registers unchanged for this long (clock s): frozen")

    @model_validator(mode="after")
    def _check(self) -> MeterConfig:
        if isinstance(self.map, str) and self.map != "sunspec" and self.map not in PRESETS:
            raise ValueError(f"map must be 'sunspec', one of {', '.join(PRESETS)}, or a register map")
        if self.sunspec_model is not None and self.sunspec_model not in INT_METERS | FLOAT_METERS:
            raise ValueError("sunspec_model must be one of 201-204, 211-214")
        return self


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One good reading at the point of interconnection (SI units; import only: the site is a load)."""

    watts: float  # total active power
    phase_watts: tuple[float, float, float] | None  # L1, L2, L3 where the meter gives them
    import_wh: float  # the import energy counter
    hz: float
    volts: tuple[float, float, float] | None  # line-to-neutral L1, L2, L3
    read_at: float  # clock.monotonic() when the last register reply arrived
    counter_epoch: int  # bumped by rebase_counter(): no energy delta across epochs
    counter_resolution_wh: float  # one count of the counter
    source: str  # which map: "sunspec-203", "eastron-sdm630", …


@dataclass(frozen=True, slots=True)
class FrequencyReading:
    hz: float
    read_at: float


@dataclass(frozen=True, slots=True)
class MeterRefusal:
    fault: MeterFault
    detail: str
    at: float  # clock.monotonic()


@dataclass(frozen=True, slots=True)
class MeterStatus:
    fresh: bool  # a good reading within stale_after_s, registers not frozen
    last: MeterReading | None  # the last good reading, however old
    stale_since: float | None  # no good reading since (clock s): the last good one, or the start; None if fresh
    faults: tuple[MeterFault, ...]  # kinds refused since the last good reading
    last_refusal: MeterRefusal | None
    counter_epoch: int


class ModbusMeter:
    def __init__(
        self,
        cfg: MeterConfig,
        *,
        clock: MonotonicClock | None = None,
        on_reading: Callable[[MeterReading], None] | None = None,
        on_fault: Callable[[MeterRefusal], None] | None = None,
        on_frequency: Callable[[FrequencyReading], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock: MonotonicClock = clock or _WallClock()
        self.on_reading = on_reading
        self.on_fault = on_fault
        self.on_frequency = on_frequency
        self.name = f"{cfg.host}:{cfg.port}"
        self._client: AsyncModbusTcpClient | None = None
        self._map: MeterMap | None = (
            None if cfg.map == "sunspec" else (cfg.map if isinstance(cfg.map, MeterMap) else PRESETS[cfg.map])
        )
        self._plan: list[ReadBlock] = (
            [] if self._map is None else read_plan(list(self._map.fields().values()), self._map.max_gap)
        )
        self._started_at = self.clock.monotonic()
        self._last: MeterReading | None = None
        self._counter_seen_at = 0.0  # when the last good reading's counter value was first read
        self._epoch = 0
        self._rebase = False
        self._active: dict[MeterFault, MeterRefusal] = {}
        self._last_refusal: MeterRefusal | None = None
        self._last_raw: tuple[int, ...] | None = None
        self._unchanged_since: float | None = None
        self._frozen = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._hz_thread: threading.Thread | None = None
        self._hz_stop = threading.Event()
        # the full poll and the frequency poll share one connection and one discovery
        self._setup_lock = asyncio.Lock()
        self._discover_lock = asyncio.Lock()

    # -- connection ---------------------------------------------------------------------------------------
    async def _connected(self) -> AsyncModbusTcpClient:
        async with self._setup_lock:
            return await self._connect()

    async def _connect(self) -> AsyncModbusTcpClient:
        old, self._client = self._client, None
        try:
            self._client = await connect_tcp(
                old, host=self.cfg.host, port=self.cfg.port, timeout_s=self.cfg.timeout_s, name=f"meter {self.name}"
            )
        except ModbusConnectError as exc:
            raise MeterDataError(MeterFault.OFFLINE, f"cannot connect to {self.name}: {exc}") from None
        return self._client

    async def _read(self, rtype: RegisterType, address: int, count: int) -> list[int]:
        client = await self._connected()
        read = client.read_input_registers if rtype is RegisterType.INPUT else client.read_holding_registers
        try:
            rr = await asyncio.wait_for(read(address, count=count, device_id=self.cfg.unit), self.cfg.timeout_s * 2)
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            self._client = None
            raise MeterDataError(
                MeterFault.OFFLINE, f"{rtype} {address}+{count}: {exc or type(exc).__name__}"
            ) from None
        if rr.isError():
            code = getattr(rr, "exception_code", "?")
            raise MeterDataError(MeterFault.PROTOCOL, f"{rtype} {address}+{count}: exception reply {code}")
        regs = list(rr.registers)
        if len(regs) != count:
            raise MeterDataError(MeterFault.PROTOCOL, f"{rtype} {address}+{count}: {len(regs)} registers back")
        return regs

    async def _read_image(self, plan: list[ReadBlock]) -> dict[tuple[RegisterType, int], int]:
        image: dict[tuple[RegisterType, int], int] = {}
        for block in plan:
            regs = await self._read(block.register_type, block.address, block.count)
            image.update({(block.register_type, block.address + i): r for i, r in enumerate(regs)})
        return image

    async def discover(self) -> MeterMap:
        """The SunSpec meter model: the marker at 40000, 0 or 50000, then the model chain to a meter model."""
        base = None
        for candidate in SUNSPEC_BASES:
            try:
                if tuple(await self._read(RegisterType.HOLDING, candidate, 2)) == SUNSPEC_MARKER:
                    base = candidate
                    break
            except MeterDataError as exc:
                if exc.fault is MeterFault.OFFLINE:
                    raise
        if base is None:
            raise MeterDataError(MeterFault.DISCOVERY, f"no SunSpec marker at {SUNSPEC_BASES}")
        addr = base + 2
        found: dict[int, int] = {}
        for _ in range(MAX_SUNSPEC_MODELS):
            model_id, length = await self._read(RegisterType.HOLDING, addr, 2)
            if model_id == SUNSPEC_END:
                break
            if model_id in INT_METERS | FLOAT_METERS:
                if length != sunspec_model_length(model_id):
                    raise MeterDataError(MeterFault.DISCOVERY, f"model {model_id} at {addr} has length {length}")
                found.setdefault(model_id, addr)
                if self.cfg.sunspec_model in (None, model_id):
                    break
            addr += 2 + length
            if addr > 0xFFFF:
                break
        want = self.cfg.sunspec_model
        if not found or (want is not None and want not in found):
            raise MeterDataError(
                MeterFault.DISCOVERY,
                f"no SunSpec meter model{f' {want}' if want else ''} (meter models seen: {sorted(found)})",
            )
        model_id = want if want is not None else next(iter(found))
        meter_map = sunspec_meter_map(model_id, found[model_id])
        log.info("meter discovered", meter=self.name, model=model_id, address=found[model_id], marker=base)
        return meter_map

    # -- one reading --------------------------------------------------------------------------------------
    async def _resolved(self) -> MeterMap:
        if self._map is None:
            async with self._discover_lock:
                if self._map is None:
                    found = await self.discover()
                    self._plan = read_plan(list(found.fields().values()), found.max_gap)
                    self._map = found
        return self._map

    async def _decoded(self) -> tuple[MeterMap, DecodedValues, tuple[int, ...]]:
        meter_map = await self._resolved()
        try:
            image = await self._read_image(self._plan)
        except MeterDataError as exc:
            if exc.fault is MeterFault.PROTOCOL and self.cfg.map == "sunspec":
                self._map = None  # the layout may have moved (a firmware update): find it again next time
            raise
        raw = tuple(image[k] for k in sorted(image))
        return meter_map, decode_map(meter_map, image), raw

    async def poll_once(self) -> MeterReading | MeterRefusal:
        """Read, validate, remember: a good reading, or why there is none."""
        try:
            meter_map, values, raw = await self._decoded()
            now = self.clock.monotonic()
            check_values(values, self.cfg.bounds)
            self._check_frozen(raw, now)
            self._check_counter(values, now)
        except MeterDataError as exc:
            return self._refuse(exc.fault, exc.detail)
        if self._rebase:
            self._epoch += 1
            self._rebase = False
            log.warning("meter counter rebased", meter=self.name, epoch=self._epoch, import_wh=values.import_wh)
        reading = MeterReading(
            watts=values.watts,
            phase_watts=values.phase_watts,
            import_wh=values.import_wh,
            hz=values.hz,
            volts=values.volts,
            read_at=now,
            counter_epoch=self._epoch,
            counter_resolution_wh=values.import_resolution_wh,
            source=meter_map.name,
        )
        if self._active:
            log.info("meter readings good again", meter=self.name, after=sorted(self._active))
            self._active.clear()
        prev = self._last
        if prev is None or (reading.import_wh, reading.counter_epoch) != (prev.import_wh, prev.counter_epoch):
            self._counter_seen_at = now
        self._last = reading
        if self.on_reading is not None:
            self.on_reading(reading)
        return reading

    def _check_frozen(self, raw: tuple[int, ...], now: float) -> None:
        if raw != self._last_raw:
            self._last_raw, self._unchanged_since, self._frozen = raw, now, False
            return
        since = self._unchanged_since if self._unchanged_since is not None else now
        if now - since >= self.cfg.frozen_after_s:
            self._frozen = True
            raise MeterDataError(MeterFault.FROZEN, f"registers unchanged for {now - since:.3g} s")

    def _check_counter(self, values: DecodedValues, now: float) -> None:
        last = self._last
        if last is None or self._rebase:
            return
        # elapsed since the count was first seen, not since the last reading: a counter that stood still (a frozen
        # meter, a coarse count) has all that time to catch up
        check_counter(
            last.import_wh,
            values.import_wh,
            now - self._counter_seen_at,
            max(values.import_resolution_wh, last.counter_resolution_wh),
            self.cfg.bounds,
        )

    def _refuse(self, fault: MeterFault, detail: str) -> MeterRefusal:
        refusal = MeterRefusal(fault, detail, self.clock.monotonic())
        self._last_refusal = refusal
        if fault not in self._active:
            self._active[fault] = refusal
            log.warning("meter reading refused", meter=self.name, fault=str(fault), detail=detail)
            if self.on_fault is not None:
                self.on_fault(refusal)
        return refusal

    async def read_frequency(self) -> FrequencyReading | MeterRefusal:
        """Only the frequency register(s): for fast polling of frequency response."""
        try:
            field: RegisterField = (await self._resolved()).hz
            image = await self._read_image(read_plan([field], MAX_READ_REGISTERS))
            got = decode_field("hz", field, image)
            if got is None:
                raise MeterDataError(MeterFault.NOT_IMPLEMENTED, "hz is not implemented by the meter")
            hz = got[0]
            if not self.cfg.bounds.hz_min <= hz <= self.cfg.bounds.hz_max:
                raise MeterDataError(MeterFault.OUT_OF_RANGE, f"frequency {hz:.6g} Hz")
        except MeterDataError as exc:
            return self._refuse(exc.fault, exc.detail)
        out = FrequencyReading(hz, self.clock.monotonic())
        if self.on_frequency is not None:
            self.on_frequency(out)
        return out

    # -- the frequency thread -----------------------------------------------------------------------------
    def _hz_thread_main(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        """Read the frequency register every `period` wall seconds on this thread, with a client of its own."""
        client: ModbusTcpClient | None = None

        def refuse(fault: MeterFault, detail: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody left to tell
                loop.call_soon_threadsafe(self._refuse, fault, detail)

        next_at = time.monotonic()
        try:
            while not self._hz_stop.is_set():
                meter_map = self._map
                if meter_map is not None:
                    try:
                        client = client if client is not None and client.connected else self._hz_connect(client)
                        out = self._hz_read(client, meter_map.hz)
                    except MeterDataError as exc:
                        if exc.fault is MeterFault.OFFLINE and client is not None:
                            client.close()  # type: ignore[no-untyped-call]  # pymodbus's sync client is untyped
                            client = None
                        refuse(exc.fault, exc.detail)
                    except Exception as exc:  # a bug here must not end polling: log it (the meter goes stale)
                        log.exception("meter frequency poll failed", meter=self.name, error=repr(exc))
                    else:
                        if self.on_frequency is not None:
                            self.on_frequency(out)
                next_at = max(next_at + period, time.monotonic())  # no burst to catch up after a slow read
                self._hz_stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if client is not None:
                client.close()  # type: ignore[no-untyped-call]

    def _hz_connect(self, old: ModbusTcpClient | None) -> ModbusTcpClient:
        if old is not None:
            old.close()  # type: ignore[no-untyped-call]
        client = ModbusTcpClient(
            self.cfg.host,
            port=self.cfg.port,
            timeout=self.cfg.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=f"meter {self.name} hz",
        )
        try:
            ok = client.connect()  # type: ignore[no-untyped-call]
        except (OSError, ModbusException) as exc:
            ok, why = False, str(exc) or type(exc).__name__
        else:
            why = "connection refused or timed out"
        if not ok:
            client.close()  # type: ignore[no-untyped-call]
            raise MeterDataError(MeterFault.OFFLINE, f"frequency poll cannot connect to {self.name}: {why}")
        return client

    def _hz_read(self, client: ModbusTcpClient, field: RegisterField) -> FrequencyReading:
        """The frequency register(s), validated as `read_frequency` does (blocking: the thread's own client)."""
        image: dict[tuple[RegisterType, int], int] = {}
        for block in read_plan([field], MAX_READ_REGISTERS):
            read = (
                client.read_input_registers
                if block.register_type is RegisterType.INPUT
                else client.read_holding_registers
            )
            where = f"{block.register_type} {block.address}+{block.count}"
            try:
                rr = read(block.address, count=block.count, device_id=self.cfg.unit)
            except (OSError, ModbusException) as exc:
                raise MeterDataError(MeterFault.OFFLINE, f"{where}: {exc or type(exc).__name__}") from None
            if rr.isError():
                code = getattr(rr, "exception_code", "?")
                raise MeterDataError(MeterFault.PROTOCOL, f"{where}: exception reply {code}")
            regs = list(rr.registers)
            if len(regs) != block.count:
                raise MeterDataError(MeterFault.PROTOCOL, f"{where}: {len(regs)} registers back")
            image.update({(block.register_type, block.address + i): r for i, r in enumerate(regs)})
        got = decode_field("hz", field, image)
        if got is None:
            raise MeterDataError(MeterFault.NOT_IMPLEMENTED, "hz is not implemented by the meter")
        hz = got[0]
        if not self.cfg.bounds.hz_min <= hz <= self.cfg.bounds.hz_max:
            raise MeterDataError(MeterFault.OUT_OF_RANGE, f"frequency {hz:.6g} Hz")
        return FrequencyReading(hz, self.clock.monotonic())

    # -- what the caller sees -----------------------------------------------------------------------------
    def status(self) -> MeterStatus:
        now = self.clock.monotonic()
        last = self._last
        fresh = last is not None and not self._frozen and now - last.read_at <= self.cfg.stale_after_s
        stale_since = None
        if not fresh:
            stale_since = last.read_at if last is not None else self._started_at
            if self._frozen and self._unchanged_since is not None:
                stale_since = min(stale_since, self._unchanged_since)
        return MeterStatus(
            fresh=fresh,
            last=last,
            stale_since=stale_since,
            faults=tuple(sorted(self._active)),
            last_refusal=self._last_refusal,
            counter_epoch=self._epoch,
        )

    def reading(self) -> MeterReading | None:
        """The latest good reading while the meter is fresh; None when stale (fall back, alarm)."""
        return self._last if self.status().fresh else None

    def listen(
        self,
        *,
        on_hz: Callable[[FrequencyReading], None],
        on_reading: Callable[[MeterReading], None],
    ) -> None:
        """Hand every reading to these as it arrives, from now on: for a listener built after the meter (the
        agent's frequency response reads this meter, so it is made second). `on_hz` is called on the frequency
        thread (see the module's docstring)."""
        self.on_frequency, self.on_reading = on_hz, on_reading

    def rebase_counter(self) -> None:
        """Accept the counter as the meter now gives it (after a reset or a replaced meter): a new epoch."""
        self._rebase = True

    # -- polling ------------------------------------------------------------------------------------------
    async def _loop(self, period: float, step: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping:  # (as well as the cancel: Python 3.11's wait_for can swallow one)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end polling: log it, keep the meter honest (stale)
                log.exception("meter poll failed", meter=self.name, error=repr(exc))
            next_at = max(next_at + period, loop.time())  # no burst to catch up after a slow read
            await asyncio.sleep(next_at - loop.time())

    def start(self) -> None:
        if self._tasks:
            return
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._loop(self.cfg.poll_s, self.poll_once)))
        if self.cfg.hz_poll_s is not None:
            self._hz_stop.clear()
            self._hz_thread = threading.Thread(
                target=self._hz_thread_main, args=(loop, self.cfg.hz_poll_s), name=f"meter-hz {self.name}", daemon=True
            )
            self._hz_thread.start()

    async def stop(self) -> None:
        thread, self._hz_thread = self._hz_thread, None
        if thread is not None:
            self._hz_stop.set()
            await asyncio.to_thread(thread.join, 2 * self.cfg.timeout_s + 1.0)
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # a cancel that a read's wait_for swallowed still ends the loop at its next round (`_stopping`); never
        # wait for ever: the agent stopping hung here for 30 s until it was killed (demo, 2 runs in 3)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2 * self.cfg.timeout_s + self.cfg.poll_s + 1.0)
            if pending:
                log.error("meter poll did not stop", meter=self.name, tasks=len(pending))
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("meter poll ended with an error", meter=self.name, error=repr(task.exception()))
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
