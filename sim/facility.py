"""Facility loads of the simulated site: cooling drives (fans, pumps on a VFD) and relays, each a Modbus TCP device
(pymodbus) on a loopback address of its own, whose power the site meter adds to the site's (sim/meter.py).

Spec (--facility JSON or @file, a list; needs --meter, which measures them):

    [{"name": "fans-a", "address": "127.75.1.1:5021", "kind": "drive", "full_kw": 3.0,
      "miners": ["127.75.0.1", "127.75.0.2"], "unit": 1, "full_scale": 10000, "exponent": 3, "start_pct": 100}]

`miners` are the miners the load cools: the meter's automatic cooling share (MeterParams.cooling_share) no longer
applies to them; the load's own power does. Power: drive full_kw × (speed / 100) ** exponent (the fan affinity
law: 3 for fans and centrifugal pumps), relay full_kw while on. The speed follows the reference at once (a drive's
acceleration ramp is seconds, the delays that matter here are minutes), so power is piecewise constant and its
energy exact.

Registers (unit `unit`; every other address is an exception reply, as on a real device):
  drive  holding 1  speed reference, 0..full_scale (read/write)
         input   3  actual speed, 0..full_scale
         input 5-6  power, W, uint32 high word first
  relay  coil    0  on/off (read/write)
         input 5-6  power, W, uint32 high word first

Faults (POST /facility {"name", "fault"}): offline (listener and connections closed), refuse (writes answered with
an exception: a drive in local mode), clear. GET /facility: each load's setpoint, speed, power, fault, the history
of setpoint changes, the wakes of the miners it cools (exact sim time) and their sleeps (as seen, within 50 ms of
wall time), so a test can check the order of them.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

if TYPE_CHECKING:
    from hashflex.sim.site import Site

log = structlog.get_logger("sim.facility")

KINDS = ("drive", "relay")
FAULTS = ("offline", "refuse", "clear")
REFERENCE_AT, SPEED_AT, POWER_AT, COIL_AT = 1, 3, 5, 0
HISTORY = 500  # setpoint changes and wakes kept per load


class FacilitySpecError(ValueError):
    pass


@dataclass
class FacilityLoad:
    name: str
    host: str
    port: int
    kind: str
    full_w: float
    miners: tuple[str, ...]
    unit: int = 1
    full_scale: int = 10000
    exponent: float = 3.0
    pct: float = 100.0  # the setpoint (drive: the reference; relay: 100 on, 0 off)
    fault: str | None = None
    writes: int = 0
    # (sim t, pct) from t on; energy is exact over these steps
    steps: list[tuple[float, float]] = field(default_factory=list)
    wakes: list[tuple[float, str]] = field(default_factory=list)
    sleeps: list[tuple[float, str]] = field(default_factory=list)  # seen within 50 ms of wall time
    server: ModbusTcpServer | None = None

    def power_at_pct(self, pct: float) -> float:
        if self.kind == "relay":
            return self.full_w if pct > 0 else 0.0
        return self.full_w * math.pow(max(0.0, min(100.0, pct)) / 100.0, self.exponent)

    def power_w(self, t: float) -> float:
        return self.power_at_pct(self._pct_at(t))

    def _pct_at(self, t: float) -> float:
        pct = float(self.steps[0][1])
        for ts, p in self.steps:
            if ts > t:
                break
            pct = p
        return pct

    def energy_j(self, t0: float, t1: float) -> float:
        """Exact energy between two sim times (power is piecewise constant)."""
        if t1 <= t0:
            return 0.0
        total = 0.0
        for i, (ts, p) in enumerate(self.steps):
            end = self.steps[i + 1][0] if i + 1 < len(self.steps) else math.inf
            a, b = max(t0, ts), min(t1, end)
            if b > a:
                total += self.power_at_pct(p) * (b - a)
        first = self.steps[0][0]
        if t0 < first:  # before the first step: the start setting
            total += self.power_at_pct(self.steps[0][1]) * (min(t1, first) - t0)
        return total

    def set_pct(self, t: float, pct: float) -> None:
        pct = max(0.0, min(100.0, pct))
        if pct != self.pct:
            self.steps.append((t, pct))
            log.info("facility setpoint", load=self.name, pct=pct, sim_t=round(t, 3))
        self.pct = pct

    # -- Modbus ---------------------------------------------------------------------------------------------
    async def action(  # noqa: PLR0917 (pymodbus's SimAction signature)
        self,
        site: Site,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        t = site.clock.now()
        if set_values is not None:
            if self.fault == "refuse":
                return ExcCodes.DEVICE_FAILURE
            self.writes += 1
            if function_code in (5, 15):  # coil
                self.set_pct(t, 100.0 if bool(set_values[0]) else 0.0)
            elif address == REFERENCE_AT:
                value = int(set_values[0])
                if value > self.full_scale:
                    return ExcCodes.ILLEGAL_VALUE
                self.set_pct(t, value * 100.0 / self.full_scale)
            return None
        scaled = round(self.pct / 100.0 * self.full_scale)
        watts = max(0, min(2**32 - 1, round(self.power_w(t))))
        image = (
            {REFERENCE_AT: scaled}
            if function_code == 3
            else {SPEED_AT: scaled, POWER_AT: watts >> 16, POWER_AT + 1: watts & 0xFFFF}
        )
        if function_code in (1, 2):
            registers[0] = 1 if self.pct > 0 else 0
            return None
        for addr in range(address, address + count):
            if addr in image:
                registers[addr - start_address] = image[addr]
        return None

    def device(self, site: Site) -> SimDevice:
        async def act(*args: Any) -> ExcCodes | None:
            return await self.action(site, *args)

        if self.kind == "relay":
            coils = [SimData(address=COIL_AT, values=False, datatype=DataType.BITS)]
            holding = [SimData(address=100, values=0, datatype=DataType.REGISTERS, readonly=True)]
        else:
            coils = [SimData(address=100, values=False, datatype=DataType.BITS, readonly=True)]
            holding = [SimData(address=REFERENCE_AT, values=0, datatype=DataType.REGISTERS)]
        inputs = [
            SimData(
                address=SPEED_AT if self.kind == "drive" else POWER_AT,
                count=4 if self.kind == "drive" else 2,
                values=0,
                datatype=DataType.REGISTERS,
                readonly=True,
            )
        ]
        discrete = [SimData(address=0, values=False, datatype=DataType.BITS, readonly=True)]
        return SimDevice(id=self.unit, simdata=(coils, discrete, holding, inputs), action=act)

    def truth(self, t: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": f"{self.host}:{self.port}",
            "kind": self.kind,
            "unit": self.unit,
            "setpoint_pct": round(self.pct, 3),
            "speed_pct": round(self.pct, 3),
            "power_w": round(self.power_w(t), 3),
            "full_w": self.full_w,
            "fault": self.fault,
            "writes": self.writes,
            "miners": list(self.miners),
            "history": [[round(ts, 3), p] for ts, p in self.steps[-HISTORY:]],
            "wakes": [[round(ts, 3), ip] for ts, ip in self.wakes[-HISTORY:]],
            "sleeps": [[round(ts, 3), ip] for ts, ip in self.sleeps[-HISTORY:]],
        }


def parse(doc: Any, known_ips: set[str]) -> list[FacilityLoad]:
    if not isinstance(doc, list) or not doc:
        raise FacilitySpecError("--facility is a non-empty JSON list of loads")
    loads: list[FacilityLoad] = []
    allowed = {"name", "address", "kind", "full_kw", "miners", "unit", "full_scale", "exponent", "start_pct"}
    for i, item in enumerate(doc):
        where = f"--facility[{i}]"
        if not isinstance(item, dict):
            raise FacilitySpecError(f"{where}: a JSON object")
        unknown = set(item) - allowed
        if unknown:
            raise FacilitySpecError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(allowed)})")
        missing = {"name", "address", "kind", "full_kw", "miners"} - set(item)
        if missing:
            raise FacilitySpecError(f"{where}: missing {sorted(missing)}")
        if item["kind"] not in KINDS:
            raise FacilitySpecError(f"{where}: kind is one of {', '.join(KINDS)}")
        for key in ("full_kw", "exponent", "start_pct"):
            v = item.get(key, 1.0)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise FacilitySpecError(f"{where}: {key} must be a finite number")
        host, _, port_text = str(item["address"]).rpartition(":")
        if not host.startswith("127.") or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise FacilitySpecError(f"{where}: address is 127.x.y.z:PORT (the simulator listens on loopback only)")
        miners = tuple(str(m) for m in item["miners"]) if isinstance(item["miners"], list) else ()
        if not miners or set(miners) - known_ips:
            raise FacilitySpecError(f"{where}: miners is a list of the site's miner addresses")
        full_kw, start = float(item["full_kw"]), float(item.get("start_pct", 100.0))
        unit, full_scale = int(item.get("unit", 1)), int(item.get("full_scale", 10000))
        if not (0 < full_kw <= 1e5 and 0 <= start <= 100 and 1 <= unit <= 247 and 1 <= full_scale <= 65535):
            raise FacilitySpecError(
                f"{where}: need full_kw in (0, 1e5], start_pct in [0, 100], unit in [1, 247], full_scale in [1, 65535]"
            )
        if item["kind"] == "relay":
            start = 100.0 if start > 0 else 0.0
        loads.append(
            FacilityLoad(
                name=str(item["name"]),
                host=host,
                port=int(port_text),
                kind=item["kind"],
                full_w=full_kw * 1000.0,
                miners=miners,
                unit=unit,
                full_scale=full_scale,
                exponent=float(item.get("exponent", 3.0)),
                pct=start,
            )
        )
    names = [ld.name for ld in loads]
    if len(set(names)) != len(names):
        raise FacilitySpecError("--facility: load names must be unique")
    cooled = [m for ld in loads for m in ld.miners]
    if len(set(cooled)) != len(cooled):
        raise FacilitySpecError("--facility: a miner is cooled by one load at most")
    return loads


class FacilityLoads:
    """Every facility load of the site: power and energy for the meter, Modbus servers, truth and faults."""

    def __init__(self, site: Site, loads: list[FacilityLoad]) -> None:
        self.site = site
        self.loads = loads
        t = site.clock.now()
        for ld in loads:
            ld.steps = [(t, ld.pct)]
        self.cooled = [site.by_ip[ip] for ld in loads for ip in ld.miners]
        self._states = {d.ip: d.physics.current_state(t) for d in self.cooled}
        self._watcher: asyncio.Task[None] | None = None

    def cooled_it_w(self, t: float) -> float:
        """The miners' power whose cooling a facility load provides (the meter's automatic share skips it)."""
        return sum(d.physics.power_w(t) for d in self.cooled)

    def power_w(self, t: float) -> float:
        return sum(ld.power_w(t) for ld in self.loads)

    def energy_j(self, t0: float, t1: float) -> float:
        return sum(ld.energy_j(t0, t1) for ld in self.loads)

    async def _listen(self, ld: FacilityLoad) -> None:
        server = ModbusTcpServer(ld.device(self.site), address=(ld.host, ld.port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(f"facility {ld.name}: cannot listen on {ld.host}:{ld.port} ({exc})") from None
        if server.transport is None:
            raise OSError(f"facility {ld.name}: cannot listen on {ld.host}:{ld.port}")
        ld.server = server

    async def _unlisten(self, ld: FacilityLoad) -> None:
        server, ld.server = ld.server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    async def start(self) -> None:
        for ld in self.loads:
            await self._listen(ld)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for ld in self.loads:
            await self._unlisten(ld)

    async def _watch(self) -> None:
        # a wake's sim time, exactly, from the physics: also a wake this watcher did not see while it was waking (a
        # starved event loop on a loaded host looked from "sleeping" straight to "hashing" and recorded none)
        wake_s = self.site.physics_params.wake_s
        while True:
            await asyncio.sleep(0.05)
            t = self.site.clock.now()
            for ld in self.loads:
                for ip in ld.miners:
                    p = self.site.by_ip[ip].physics
                    state = p.current_state(t)
                    before = self._states.get(ip)
                    if state == "waking" and before != "waking":  # full power at state_until, wake_s after its wake
                        ld.wakes.append((p.state_until - wake_s, ip))
                    elif state == "hashing" and before == "sleeping" and p.wake_began is not None:
                        ld.wakes.append((p.wake_began, ip))
                    elif state == "sleeping" and before != "sleeping":
                        ld.sleeps.append((t, ip))
                    self._states[ip] = state

    def truth(self) -> list[dict[str, Any]]:
        t = self.site.clock.now()
        return [ld.truth(t) for ld in self.loads]

    async def set_fault(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or set(doc) != {"name", "fault"} or doc["fault"] not in FAULTS:
            raise FacilitySpecError(f'a facility fault is {{"name": load, "fault": one of {", ".join(FAULTS)}}}')
        ld = next((x for x in self.loads if x.name == doc["name"]), None)
        if ld is None:
            raise FacilitySpecError(f"no facility load {doc['name']!r}")
        fault = None if doc["fault"] == "clear" else str(doc["fault"])
        if fault == "offline" and ld.server is not None:
            await self._unlisten(ld)
        elif fault != "offline" and ld.server is None:
            await self._listen(ld)
        ld.fault = fault
        log.info("facility fault", load=ld.name, fault=doc["fault"])
        return ld.truth(self.site.clock.now())

    def handle(self, method: str, body: bytes | None) -> tuple[int, Any] | asyncio.Task[tuple[int, Any]]:
        if method == "GET":
            return 200, {"sim_time_s": round(self.site.clock.now(), 3), "facility": self.truth()}
        if method != "POST":
            return 405, {"error": "GET or POST /facility"}
        try:
            doc = json.loads(body or b"null")
        except ValueError as exc:
            return 400, {"error": f"bad JSON: {exc}"}

        async def post() -> tuple[int, Any]:
            try:
                return 200, {"facility": await self.set_fault(doc)}
            except FacilitySpecError as exc:
                return 400, {"error": str(exc)}
            except OSError as exc:
                return 500, {"error": str(exc)}

        return asyncio.get_running_loop().create_task(post())
