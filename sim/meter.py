"""The site meter at the point of interconnection, served over Modbus TCP (pymodbus) on its own loopback address.

What it measures (sim time t, from the site's clock):

    site power = Σ miners' wall power + cooling + base load + transformer losses (+ measurement noise)
    cooling    follows cooling_share × IT power through a first-order lag (time constant cooling_tau_s)
    losses     loss_share × rated_w × (load / rated_w)²  (1 % at full load by default)

The import counter is the integral of the noise-free site power on the sim clock: the miners' share exactly (the
sum of their energy integrals), cooling exactly for an IT power that is linear between integration steps (≤ 2 s),
losses by trapezoids. Measurement noise (seeded, a pure function of sim time) is on the reported power only.
The meter refreshes its power figures every `update_ms` of wall time (a real meter's measuring interval; it also
bounds the CPU the sums over 10,000 miners cost); frequency and voltages are read at every request.

One meter, several register layouts at once, so tests can read each (a real meter has one):
  holding 40000  SunSpec: "SunS", common model 1, meter model 203 (int16 + scale factors), meter model 213
                 (float32), end marker 0xFFFF; offsets from the SunSpec model definitions (sunspec/models json)
  input  0x0000  Eastron SDM630 (float32, high word first), from Eastron's input register table
  holding 0x0000 Carlo Gavazzi EM24 DIN Ethernet (INT32 low word first, V×10 W×10 kWh×10, Hz×10)
  holding 19000  Janitza UMG 96RM / 604 "frequently required readings" (float32, SI units)
Registers not listed are undefined (an exception reply, as a real meter gives) and every register is read-only.
The layouts here are written from the vendor tables on their own, not imported from drivers/, so a test over Modbus
checks the adapter's maps against an independent encoding.

Faults (POST /meter): offline (listener and connections closed: connection refused), frozen (the registers keep
the values they had), garbage (kind "nan": floats NaN and integers at SunSpec's not-implemented code; kind
"absurd": huge values), counter_reset (the register counter restarts from 0; not undone by clear), clear.
Grid events (POST /grid): see sim/grid.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import struct
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from hashflex.sim.grid import GridModel, GridSpecError
from hashflex.sim.transport import http_response

if TYPE_CHECKING:
    from hashflex.sim.facility import FacilityLoads
    from hashflex.sim.site import Site
    from hashflex.sim.transport import HttpRequest

log = structlog.get_logger("sim.meter")

DEFAULT_PORT = 5020  # 502 needs root (or CAP_NET_BIND_SERVICE); --meter HOST:502 works when allowed
FAULTS = ("offline", "frozen", "garbage", "counter_reset", "clear")
PF = 0.98  # miners' PSUs correct their power factor; the site's is about this
SQRT3 = math.sqrt(3.0)


class MeterSpecError(ValueError):
    pass


@dataclass(frozen=True)
class MeterParams:
    cooling_share: float = 0.05  # cooling power as a share of IT power, once settled
    cooling_tau_s: float = 60.0  # first-order lag of cooling behind IT power (sim s)
    base_kw: float = 2.0  # building base load
    loss_share: float = 0.01  # transformer and cable losses at rated load, as a share of it
    rated_kw: float | None = None  # rated site load; default: nominal IT × (1 + cooling share) + base
    noise: float = 0.001  # standard deviation of the reported power, as a share of it
    counter_kwh: float = 1000.0  # import counter at start
    voltage_v: float = 230.0  # nominal line-to-neutral voltage
    grid_hz: float = 50.0
    grid_noise_hz: float = 0.002
    update_ms: float = 200.0  # the meter's measuring interval (wall ms)
    unit: int = 1  # Modbus unit id
    max_step_s: float = 2.0  # integration step (sim s)

    @classmethod
    def from_json(cls, doc: Any) -> MeterParams:
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise MeterSpecError("--meter-config is a JSON object")
        names = set(cls.__dataclass_fields__)
        unknown = set(doc) - names
        if unknown:
            raise MeterSpecError(f"--meter-config: unknown keys {sorted(unknown)} (known: {sorted(names)})")
        for key, value in doc.items():
            if value is None and key == "rated_kw":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MeterSpecError(f"--meter-config: {key} must be a finite number")
        values: dict[str, Any] = {
            k: (int(v) if k == "unit" else (None if v is None else float(v))) for k, v in doc.items()
        }
        params = cls(**values)
        params.check()
        return params

    def check(self) -> None:
        rules = [
            (0.0 <= self.cooling_share <= 1.0, "cooling_share in [0, 1]"),
            (0.0 < self.cooling_tau_s <= 86400.0, "cooling_tau_s in (0, 86400]"),
            (0.0 <= self.base_kw <= 1e6, "base_kw in [0, 1e6]"),
            (0.0 <= self.loss_share <= 0.2, "loss_share in [0, 0.2]"),
            (self.rated_kw is None or 0.0 < self.rated_kw <= 1e7, "rated_kw in (0, 1e7]"),
            (0.0 <= self.noise <= 0.1, "noise in [0, 0.1]"),
            (0.0 <= self.counter_kwh <= 4e6, "counter_kwh in [0, 4e6] (SunSpec acc32 in Wh)"),
            (50.0 <= self.voltage_v <= 1e5, "voltage_v in [50, 1e5]"),
            (1.0 <= self.update_ms <= 10_000.0, "update_ms in [1, 10000]"),
            (1 <= self.unit <= 247, "unit in [1, 247]"),
            (0.01 <= self.max_step_s <= 60.0, "max_step_s in [0.01, 60]"),
        ]
        bad = [what for ok, what in rules if not ok]
        if bad:
            raise MeterSpecError("meter: need " + "; ".join(bad))


def parse_address(spec: str) -> tuple[str, int]:
    """HOST[:PORT] on loopback; the port defaults to 5020."""
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        host, port_text = spec, str(DEFAULT_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise MeterSpecError(f"--meter: bad port {port_text!r}") from None
    if not 1 <= port <= 65535:
        raise MeterSpecError("--meter: port in 1..65535")
    if not host.startswith("127."):
        raise MeterSpecError("--meter: a 127.x.y.z loopback address (the simulator never listens elsewhere)")
    return host, port


# ----------------------------------------------------------------------------------------------- the physics
@dataclass(frozen=True)
class Figures:
    """The meter's noise-free quantities at one sim time."""

    t: float
    it_w: float
    cooling_w: float
    base_w: float
    losses_w: float
    energy_j: float  # integral of total_w since start
    facility_w: float = 0.0  # facility loads (sim/facility.py): cooling of the miners they cool, set over Modbus

    @property
    def total_w(self) -> float:
        return self.it_w + self.cooling_w + self.base_w + self.losses_w + self.facility_w


class MeterModel:
    """Cooling lag, losses and the energy integral, stepped forward in sim time (never back)."""

    def __init__(self, params: MeterParams, site: Site, facility: FacilityLoads | None = None) -> None:
        self.params = params
        self.site = site
        # miners a facility load cools get its power instead of the automatic cooling share
        self.facility = facility
        nominal = sum(d.spec.nominal_w for d in site.devices)
        self.base_w = params.base_kw * 1000.0
        self.rated_w = (
            params.rated_kw * 1000.0
            if params.rated_kw is not None
            else nominal * (1.0 + params.cooling_share) + self.base_w
        )
        self._k = params.loss_share / self.rated_w if self.rated_w > 0 else 0.0
        self._max_steps = max(1, min(200, 20_000 // max(1, len(site.devices))))
        t = site.clock.now()
        self.t = t
        self.it_w = self._it_power(t)
        self.it_energy_j = self._it_energy(t)
        self.auto_w = self._auto_w(t, self.it_w)
        self.cooling_w = params.cooling_share * self.auto_w  # the site has been running: cooling has settled
        self.energy_j = 0.0

    def _it_power(self, t: float) -> float:
        return sum(d.physics.power_w(t) for d in self.site.devices)

    def _it_energy(self, t: float) -> float:
        return sum(d.physics.energy_at(t) for d in self.site.devices)

    def _auto_w(self, t: float, it_w: float) -> float:
        """IT power whose cooling is the automatic share: all of it but what facility loads cool."""
        return it_w if self.facility is None else it_w - self.facility.cooled_it_w(t)

    def _facility_w(self, t: float) -> float:
        return 0.0 if self.facility is None else self.facility.power_w(t)

    def losses(self, it_w: float, cooling_w: float) -> float:
        load = it_w + cooling_w + self.base_w
        return self._k * load * load

    def advance(self, t: float) -> Figures:
        p = self.params
        if t > self.t:
            # a long silence (or a high --speed) is caught up in few steps: each sums every miner (15 ms at
            # 10,000), so at most ~20 ms of sums per call; the miners' energy stays exact whatever the step
            n = max(1, math.ceil((t - self.t) / p.max_step_s))
            n = min(n, self._max_steps)
            h = (t - self.t) / n
            s, tau = p.cooling_share, p.cooling_tau_s
            for i in range(1, n + 1):
                b = t if i == n else self.t + h
                step = b - self.t
                u_b = self._it_power(b)
                e_b = self._it_energy(b)
                a_b = self._auto_w(b, u_b)
                g_a, g_b = s * self.auto_w, s * a_b
                f_a, f_b = self._facility_w(self.t), self._facility_w(b)  # piecewise constant: exact energy below
                fac_j = 0.0 if self.facility is None else self.facility.energy_j(self.t, b)
                k = (g_b - g_a) / step
                decay = math.exp(-step / tau)
                c_a = self.cooling_w
                # exact for cooling' = (g(t) − cooling) / tau with g linear over the step
                c_b = g_b - k * tau + (c_a - g_a + k * tau) * decay
                cool_j = (g_a + g_b) * 0.5 * step - k * tau * step + (c_a - g_a + k * tau) * tau * (1.0 - decay)
                loss_j = (self.losses(self.it_w, c_a + f_a) + self.losses(u_b, c_b + f_b)) * 0.5 * step
                self.energy_j += (e_b - self.it_energy_j) + cool_j + self.base_w * step + loss_j + fac_j
                self.t, self.it_w, self.it_energy_j, self.cooling_w, self.auto_w = b, u_b, e_b, c_b, a_b
        fac_w = self._facility_w(self.t)
        return Figures(
            self.t,
            self.it_w,
            self.cooling_w,
            self.base_w,
            self.losses(self.it_w, self.cooling_w + fac_w),
            self.energy_j,
            fac_w,
        )


def _gauss(seed: int, what: str, t: float, resolution_s: float) -> float:
    bucket = math.floor(t / resolution_s)
    digest = hashlib.blake2b(f"{seed}:{what}:{bucket}".encode(), digest_size=8).digest()
    return random.Random(digest).gauss(0.0, 1.0)


@dataclass(frozen=True)
class Served:
    """What the registers say: the figures with noise, split per phase, as the meter last measured them."""

    t: float
    total_w: float
    phase_w: tuple[float, float, float]
    counter_wh: float
    export_wh: float
    volts: tuple[float, float, float]
    hz: float

    def currents(self) -> tuple[float, float, float]:
        a, b, c = (p / (v * PF) if v > 0 else 0.0 for p, v in zip(self.phase_w, self.volts, strict=True))
        return a, b, c


# ----------------------------------------------------------------------------------------------- encodings
def _f32(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def _i32_lsw_first(value: int) -> list[int]:
    value = max(-(2**31), min(2**31 - 1, value))
    hi, lo = struct.unpack(">HH", struct.pack(">i", value))
    return [lo, hi]


def _u16(value: int) -> int:
    return value & 0xFFFF


def _i16(value: float) -> int:
    return _u16(max(-32767, min(32767, round(value))))


def _acc32(value: float) -> list[int]:
    v = max(0, min(2**32 - 1, math.floor(value)))
    return [v >> 16, v & 0xFFFF]


def _text(value: str, regs: int) -> list[int]:
    raw = value.encode()[: regs * 2].ljust(regs * 2, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def _sf_for(max_abs: float, finest: int) -> int:
    """The smallest scale factor ≥ finest that keeps max_abs within int16."""
    sf = finest
    while max_abs / 10.0**sf > 32767 and sf < 10:
        sf += 1
    return sf


NI16 = 0x8000  # SunSpec int16 / sunssf "not implemented"
SUNSPEC_BASE = 40000
COMMON_AT = SUNSPEC_BASE + 2
M203_AT = COMMON_AT + 2 + 66
M213_AT = M203_AT + 2 + 105
END_AT = M213_AT + 2 + 124


class Layouts:
    """Builds every register image the meter serves from one `Served` state."""

    def __init__(self, rated_w: float, unit: int, serial: str, counter_wh: float = 0.0) -> None:
        self.unit = unit
        self.serial = serial
        # scale factors fixed at start from the rating, as a real meter's are by its CT/VT ratios
        self.w_sf = _sf_for(rated_w * 1.5, -1)
        self.a_sf = _sf_for(rated_w * 1.5 / (3 * 100.0 * PF), -2)
        # acc32 counters: Wh while 30 days at 1.5 × rated fit in 32 bits, else 10 Wh, 100 Wh, …
        self.wh_sf = 0
        while (counter_wh + rated_w * 1.5 * 720.0) / 10.0**self.wh_sf >= 2**32 and self.wh_sf < 6:
            self.wh_sf += 1

    # SunSpec -------------------------------------------------------------------------------------------
    def sunspec(self, s: Served, garbage: str | None) -> dict[int, int]:
        out: dict[int, int] = {}
        out.update(enumerate([0x5375, 0x6E53], SUNSPEC_BASE))
        common = [
            1,
            66,
            *_text("hashflex", 16),
            *_text("sim site meter", 16),
            *_text("", 8),
            *_text("0.1", 8),
            *_text(self.serial, 16),
            self.unit,
            NI16,
        ]
        out.update(enumerate(common, COMMON_AT))
        out.update(enumerate(self._m203(s, garbage), M203_AT))
        out.update(enumerate(self._m213(s, garbage), M213_AT))
        out.update(enumerate([0xFFFF, 0], END_AT))
        return out

    def _m203(self, s: Served, garbage: str | None) -> list[int]:
        r = [NI16] * 107
        r[0], r[1] = 203, 105
        w_sf, a_sf, v_sf, hz_sf, pf_sf = self.w_sf, self.a_sf, -1, -2, -1
        amps = s.currents()
        va = [p / PF for p in s.phase_w]
        var = [math.sqrt(max(0.0, x * x - p * p)) for x, p in zip(va, s.phase_w, strict=True)]
        ll = [v * SQRT3 for v in s.volts]

        def put(offset: int, values: list[float], sf: int) -> None:
            for i, v in enumerate(values):
                r[offset + i] = _i16(v / 10.0**sf)

        put(2, [sum(amps), *amps], a_sf)
        r[6] = _u16(a_sf)
        put(7, [sum(s.volts) / 3, *s.volts, sum(ll) / 3, *ll], v_sf)
        r[15] = _u16(v_sf)
        put(16, [s.hz], hz_sf)
        r[17] = _u16(hz_sf)
        put(18, [s.total_w, *s.phase_w], w_sf)
        r[22] = _u16(w_sf)
        put(23, [sum(va), *va], w_sf)
        r[27] = _u16(w_sf)
        put(28, [sum(var), *var], w_sf)
        r[32] = _u16(w_sf)
        put(33, [PF * 100] * 4, pf_sf)
        r[37] = _u16(pf_sf)
        phase_wh = [s.counter_wh * p / s.total_w if s.total_w > 0 else s.counter_wh / 3 for p in s.phase_w]
        for i in range(38, 105):
            r[i] = 0  # acc32 "not accumulated"
        for offset, value in (
            (38, s.export_wh),
            (46, s.counter_wh),
            (48, phase_wh[0]),
            (50, phase_wh[1]),
            (52, phase_wh[2]),
        ):
            r[offset : offset + 2] = _acc32(value / 10.0**self.wh_sf)
        r[54] = _u16(self.wh_sf)  # TotWh_SF
        r[71] = r[104] = NI16  # VAh and varh scale factors: not implemented
        r[105] = r[106] = 0  # Evt
        if garbage == "nan":
            for i in (2, 3, 4, 5, 7, 8, 9, 10, 16, 18, 19, 20, 21):
                r[i] = NI16
        elif garbage == "absurd":
            r[18] = 0x7FFF
            r[22] = _u16(10)  # W = 32767 × 10^10 W
            r[16] = 0  # 0 Hz
            r[46:48] = [0xFFFF, 0xFFFF]
        return r

    def _m213(self, s: Served, garbage: str | None) -> list[int]:
        r = [0] * 126
        r[0], r[1] = 213, 124
        amps = s.currents()
        va = [p / PF for p in s.phase_w]
        var = [math.sqrt(max(0.0, x * x - p * p)) for x, p in zip(va, s.phase_w, strict=True)]
        ll = [v * SQRT3 for v in s.volts]
        phase_wh = [s.counter_wh * p / s.total_w if s.total_w > 0 else s.counter_wh / 3 for p in s.phase_w]
        values = [
            sum(amps),
            *amps,
            sum(s.volts) / 3,
            *s.volts,
            sum(ll) / 3,
            *ll,
            s.hz,
            s.total_w,
            *s.phase_w,
            sum(va),
            *va,
            sum(var),
            *var,
            PF,
            PF,
            PF,
            PF,
            s.export_wh,
            0.0,
            0.0,
            0.0,
            s.counter_wh,
            *phase_wh,
        ]
        for i, v in enumerate(values):
            r[2 + 2 * i : 4 + 2 * i] = _f32(v)
        for offset in range(76, 124, 2):
            r[offset : offset + 2] = _f32(math.nan)  # VAh, varh: not implemented (float32 NaN)
        r[124] = r[125] = 0  # Evt
        if garbage == "nan":
            for offset in (26, 28, 68):
                r[offset : offset + 2] = _f32(math.nan)
        elif garbage == "absurd":
            r[28:30] = _f32(3.0e38)
            r[26:28] = _f32(-1.0)
            r[68:70] = _f32(-5.0e9)
        return r

    # Eastron SDM630 (input registers, float32 high word first; Eastron's SDM630 Modbus protocol table) --------
    def sdm630(self, s: Served, garbage: str | None) -> dict[int, int]:
        amps = s.currents()
        va = [p / PF for p in s.phase_w]
        var = [math.sqrt(max(0.0, x * x - p * p)) for x, p in zip(va, s.phase_w, strict=True)]
        values: dict[int, float] = {
            0x0000: s.volts[0],
            0x0002: s.volts[1],
            0x0004: s.volts[2],  # phase 1-3 line to neutral volts
            0x0006: amps[0],
            0x0008: amps[1],
            0x000A: amps[2],  # phase 1-3 current
            0x000C: s.phase_w[0],
            0x000E: s.phase_w[1],
            0x0010: s.phase_w[2],  # phase 1-3 power (W)
            0x0012: va[0],
            0x0014: va[1],
            0x0016: va[2],  # phase 1-3 volt amps
            0x0018: var[0],
            0x001A: var[1],
            0x001C: var[2],  # phase 1-3 volt amps reactive
            0x001E: PF,
            0x0020: PF,
            0x0022: PF,  # phase 1-3 power factor
            0x002A: sum(s.volts) / 3,  # average line to neutral volts
            0x0030: sum(amps),  # sum of line currents
            0x0034: s.total_w,  # total system power (W)
            0x0038: sum(va),  # total system volt amps
            0x003C: sum(var),  # total system VAr
            0x003E: PF,  # total system power factor
            0x0046: s.hz,  # frequency of supply voltages
            0x0048: s.counter_wh / 1000.0,  # import Wh since last reset (kWh)
            0x004A: s.export_wh / 1000.0,  # export Wh since last reset (kWh)
        }
        if garbage == "nan":
            values.update({0x0034: math.nan, 0x0046: math.nan, 0x0048: math.nan})
        elif garbage == "absurd":
            values.update({0x0034: 3.0e38, 0x0046: 0.0, 0x0048: -1.0e9})
        out: dict[int, int] = {}
        for addr, v in values.items():
            out.update(enumerate(_f32(v), addr))
        return out

    # Carlo Gavazzi EM24 DIN Ethernet (holding; INT32 LSW first) ----------------------------------------
    # Janitza UMG 96RM / 604 "frequently required readings" (holding, float32 high word first, SI units) ------
    def janitza(self, s: Served, garbage: str | None) -> dict[int, int]:
        amps = s.currents()
        ll = [v * SQRT3 for v in s.volts]
        va = [p / PF for p in s.phase_w]
        var = [math.sqrt(max(0.0, x * x - p * p)) for x, p in zip(va, s.phase_w, strict=True)]
        phase_wh = [s.counter_wh * p / s.total_w if s.total_w > 0 else s.counter_wh / 3 for p in s.phase_w]
        seq = [
            *s.volts,
            *ll,
            *amps,
            sum(amps),
            *s.phase_w,
            s.total_w,
            *va,
            sum(va),
            *var,
            sum(var),
            PF,
            PF,
            PF,
            s.hz,
            0.0,
            *phase_wh,
            s.counter_wh,
            *phase_wh,
            s.counter_wh,
            0.0,
            0.0,
            0.0,
            s.export_wh,
        ]
        # 19000 U L-N ×3, 19006 U L-L ×3, 19012 I ×3, 19018 I sum, 19020 P ×3, 19026 P sum, 19028 S ×3, 19034 S sum,
        # 19036 Q ×3, 19042 Q sum, 19044 cos phi ×3, 19050 Hz, 19052 rotation field, 19054 Wh ×3, 19060 Wh sum,
        # 19062 Wh consumed ×3, 19068 Wh consumed sum, 19070 Wh delivered ×3, 19076 Wh delivered sum
        values = dict(zip(range(19000, 19078, 2), seq, strict=True))
        if garbage == "nan":
            values.update({19026: math.nan, 19050: math.nan, 19068: math.nan})
        elif garbage == "absurd":
            values.update({19026: 3.0e38, 19050: 0.0, 19068: -1.0e9})
        out: dict[int, int] = {}
        for addr, v in values.items():
            out.update(enumerate(_f32(v), addr))
        return out

    def em24(self, s: Served, garbage: str | None) -> dict[int, int]:
        amps = s.currents()
        ll = [s.volts[0] * SQRT3, s.volts[1] * SQRT3, s.volts[2] * SQRT3]
        ints: dict[int, int] = {
            0x0000: round(s.volts[0] * 10),
            0x0002: round(s.volts[1] * 10),
            0x0004: round(s.volts[2] * 10),
            0x0006: round(ll[0] * 10),
            0x0008: round(ll[1] * 10),
            0x000A: round(ll[2] * 10),  # V L-L
            0x000C: round(amps[0] * 1000),
            0x000E: round(amps[1] * 1000),
            0x0010: round(amps[2] * 1000),
            0x0012: round(s.phase_w[0] * 10),
            0x0014: round(s.phase_w[1] * 10),
            0x0016: round(s.phase_w[2] * 10),
            0x0028: round(s.total_w * 10),  # W sys
            0x0034: math.floor(s.counter_wh / 100.0),  # kWh (+) TOT, kWh × 10
            0x004E: math.floor(s.export_wh / 100.0),  # kWh (−) TOT
        }
        phase_wh = [s.counter_wh * p / s.total_w if s.total_w > 0 else s.counter_wh / 3 for p in s.phase_w]
        for i, wh in enumerate(phase_wh):
            ints[0x0040 + 2 * i] = math.floor(wh / 100.0)  # kWh (+) L1..L3
        hz = round(s.hz * 10)
        if garbage in ("nan", "absurd"):
            # integers have no NaN: the register garbage a confused meter gives is their extreme value
            ints.update({0x0028: 2**31 - 1, 0x0034: -(2**31)})
            hz = 0xFFFF
        out: dict[int, int] = {}
        for addr, v in ints.items():
            out.update(enumerate(_i32_lsw_first(v), addr))
        out[0x0032] = 0  # phase sequence: 0 = L1-L2-L3
        out[0x0033] = _u16(hz)  # Hz × 10
        return out


def _runs(addresses: list[int]) -> list[tuple[int, int]]:
    """Contiguous (start, count) runs of sorted addresses."""
    runs: list[tuple[int, int]] = []
    for a in sorted(addresses):
        if runs and runs[-1][0] + runs[-1][1] == a:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((a, 1))
    return runs


# ----------------------------------------------------------------------------------------------- the meter
class SiteMeter:
    def __init__(
        self, site: Site, params: MeterParams, host: str, port: int, facility: FacilityLoads | None = None
    ) -> None:
        params.check()
        self.site = site
        self.params = params
        self.host, self.port = host, port
        self.facility = facility
        self.model = MeterModel(params, site, facility)
        self.grid = GridModel(nominal_hz=params.grid_hz, noise_hz=params.grid_noise_hz, seed=site.seed)
        self.layouts = Layouts(self.model.rated_w, params.unit, f"SIM{site.seed:05d}", params.counter_kwh * 1000.0)
        rng = random.Random(f"{site.seed}:meter:phases")
        shares = [1.0 + rng.uniform(-0.015, 0.015) for _ in range(3)]
        self.phase_shares = tuple(x / sum(shares) for x in shares)
        self.volt_offsets = tuple(rng.uniform(-0.01, 0.01) for _ in range(3))
        self.counter_offset_j = 0.0  # energy at the last counter reset
        self.counter_base_wh = params.counter_kwh * 1000.0  # the count then: 0 after a reset
        self.resets = 0
        self.fault: str | None = None
        self.garbage_kind = "nan"
        self._served: Served | None = None
        self._served_wall = -math.inf
        self._frozen: tuple[dict[int, int], dict[int, int]] | None = None
        self._server: ModbusTcpServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.requests = 0
        # which addresses each image defines: fixed at start, so the pymodbus device can be built once
        probe = self._measure(self.site.clock.now())
        self._defined_hr = sorted(
            {*self.layouts.sunspec(probe, None), *self.layouts.em24(probe, None), *self.layouts.janitza(probe, None)}
        )
        self._defined_ir = sorted(self.layouts.sdm630(probe, None))

    # -- measurement ----------------------------------------------------------------------------------------
    def _measure(self, t: float) -> Served:
        f = self.model.advance(t)
        p = self.params
        noisy = f.total_w * (1.0 + p.noise * _gauss(self.site.seed, "meter:w", t, 0.01)) if p.noise else f.total_w
        phases = (noisy * self.phase_shares[0], noisy * self.phase_shares[1], noisy * self.phase_shares[2])
        return Served(
            t=t,
            total_w=noisy,
            phase_w=phases,
            counter_wh=self.counter_wh(f.energy_j),
            export_wh=0.0,
            volts=self._volts(t, f.total_w),
            hz=self.grid.hz(t),
        )

    def counter_wh(self, energy_j: float) -> float:
        return self.counter_base_wh + (energy_j - self.counter_offset_j) / 3600.0

    def _volts(self, t: float, total_w: float) -> tuple[float, float, float]:
        load = total_w / self.model.rated_w if self.model.rated_w > 0 else 0.0
        v = self.params.voltage_v * (1.0 - 0.02 * load)  # a little droop with load
        a, b, c = (
            v * (1.0 + off + 0.0005 * _gauss(self.site.seed, f"meter:v{i}", t, 0.1))
            for i, off in enumerate(self.volt_offsets)
        )
        return a, b, c

    def served(self) -> Served:
        """The registers' state: power refreshed every update_ms of wall time, frequency and volts now."""
        wall = time.monotonic()
        t = self.site.clock.now()
        if self._served is None or wall - self._served_wall >= self.params.update_ms / 1000.0:
            self._served = self._measure(t)
            self._served_wall = wall
        s = self._served
        return Served(
            t=t,
            total_w=s.total_w,
            phase_w=s.phase_w,
            counter_wh=s.counter_wh,
            export_wh=s.export_wh,
            volts=self._volts(t, s.total_w),
            hz=self.grid.hz(t),
        )

    def images(self) -> tuple[dict[int, int], dict[int, int]]:
        """(holding, input) register images as served right now."""
        if self.fault == "frozen" and self._frozen is not None:
            return self._frozen
        s = self.served()
        garbage = self.garbage_kind if self.fault == "garbage" else None
        holding = self.layouts.sunspec(s, garbage)
        holding.update(self.layouts.em24(s, garbage))
        holding.update(self.layouts.janitza(s, garbage))
        return holding, self.layouts.sdm630(s, garbage)

    # -- Modbus -------------------------------------------------------------------------------------------
    async def _action(  # noqa: PLR0917 (pymodbus's SimAction signature)
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # read-only meter
        self.requests += 1
        holding, inputs = self.images()
        image = inputs if function_code == 4 else holding
        for addr in range(address, address + count):
            value = image.get(addr)
            if value is not None:
                registers[addr - start_address] = value
        return None

    def _device(self) -> SimDevice:
        def block(addresses: list[int]) -> list[SimData]:
            return [
                SimData(address=a, count=n, values=0, datatype=DataType.REGISTERS, readonly=True)
                for a, n in _runs(addresses)
            ]

        bits = [SimData(address=0, values=False, datatype=DataType.BITS, readonly=True)]
        return SimDevice(
            id=self.params.unit,
            simdata=(list(bits), list(bits), block(self._defined_hr), block(self._defined_ir)),
            action=self._action,
        )

    async def _listen(self) -> None:
        server = ModbusTcpServer(self._device(), address=(self.host, self.port))
        await server.serve_forever(background=True)
        if server.transport is None:
            raise OSError(f"meter: cannot listen on {self.host}:{self.port}")
        self._server = server

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]  # closes the listener and every connection

    async def start(self) -> None:
        try:
            await self._listen()
        except RuntimeError as exc:  # pymodbus: "Could not start listen"
            raise OSError(f"meter: cannot listen on {self.host}:{self.port} ({exc})") from None
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await self._unlisten()

    async def _tick(self) -> None:
        # the counter integrates whether or not anyone reads the meter
        while True:
            await asyncio.sleep(1.0)
            self.model.advance(self.site.clock.now())

    # -- faults -------------------------------------------------------------------------------------------
    async def set_fault(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or doc.get("fault") not in FAULTS:
            raise MeterSpecError(f'a meter fault is {{"fault": one of {", ".join(FAULTS)}}}')
        unknown = set(doc) - {"fault", "kind"}
        if unknown or ("kind" in doc and doc["fault"] != "garbage"):
            raise MeterSpecError(f"unknown keys {sorted(unknown or {'kind'})}")
        kind = doc.get("kind", "nan")
        if kind not in ("nan", "absurd"):
            raise MeterSpecError("garbage kind is nan or absurd")
        fault = doc["fault"]
        t = self.site.clock.now()
        if fault == "counter_reset":
            self.counter_offset_j = self.model.advance(t).energy_j
            self.counter_base_wh = 0.0
            self.resets += 1
            self._served = None  # the next request measures afresh
            self._frozen = None if self.fault != "frozen" else self._frozen
        elif fault == "clear":
            if self.fault == "offline":
                await self._listen()
            self.fault, self._frozen = None, None
        else:
            if self.fault == "offline" and fault != "offline":
                await self._listen()
            if fault == "offline" and self.fault != "offline":
                await self._unlisten()
            if fault == "frozen":
                self._frozen = self.images() if self.fault != "frozen" else self._frozen
            else:
                self._frozen = None
            self.fault = fault
            self.garbage_kind = kind
        log.info("meter fault", fault=fault, kind=kind if fault == "garbage" else None)
        return self.truth()

    # -- truth --------------------------------------------------------------------------------------------
    def truth(self) -> dict[str, Any]:
        t = self.site.clock.now()
        f = self.model.advance(t)
        total = f.total_w
        served = self._served
        return {
            "address": f"{self.host}:{self.port}",
            "unit": self.params.unit,
            "power_w": round(total, 3),
            "it_w": round(f.it_w, 3),
            "cooling_w": round(f.cooling_w, 3),
            "facility_w": round(f.facility_w, 3),
            "base_w": round(f.base_w, 3),
            "losses_w": round(f.losses_w, 3),
            "non_miner_w": round(total - f.it_w, 3),
            "phase_w": [round(total * s, 3) for s in self.phase_shares],
            "energy_kwh": round(f.energy_j / 3.6e6, 9),
            "counter_kwh": round(self.counter_wh(f.energy_j) / 1000.0, 9),
            "counter_resets": self.resets,
            "hz": round(self.grid.hz(t), 6),
            "base_hz": round(self.grid.base_hz(t), 6),
            "volts": [round(v, 3) for v in self._volts(t, total)],
            "rated_w": round(self.model.rated_w, 3),
            "fault": self.fault,
            "garbage_kind": self.garbage_kind if self.fault == "garbage" else None,
            "served": None
            if served is None
            else {
                "sim_time_s": round(served.t, 3),
                "power_w": round(served.total_w, 3),
                "counter_kwh": round(served.counter_wh / 1000.0, 9),
            },
            "requests": self.requests,
            "params": asdict(self.params),
            **({"facility": self.facility.truth()} if self.facility is not None else {}),
        }

    # -- HTTP (through the site's truth endpoint) ----------------------------------------------------------
    def handle_http(self, request: HttpRequest) -> bytes | asyncio.Future[bytes]:
        def reply(status: int, doc: Any) -> bytes:
            return http_response(status, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

        try:
            body = json.loads(request.body or b"null") if request.method == "POST" else None
        except ValueError as exc:
            return reply(400, {"error": f"bad JSON: {exc}"})
        if request.path == "/meter":
            if request.method == "GET":
                return reply(200, {"meter": self.truth()})
            if request.method == "POST":

                async def post() -> bytes:
                    try:
                        return reply(200, {"meter": await self.set_fault(body)})
                    except MeterSpecError as exc:
                        return reply(400, {"error": str(exc)})
                    except OSError as exc:  # back online, but its address is taken meanwhile
                        return reply(500, {"error": str(exc)})

                return asyncio.get_running_loop().create_task(post())
        if request.path == "/facility":
            if self.facility is None:
                return reply(404, {"error": "no facility loads: start the sim with --facility JSON"})
            answer = self.facility.handle(request.method, request.body)
            if isinstance(answer, tuple):
                return reply(*answer)

            async def facility_reply() -> bytes:
                return reply(*await answer)

            return asyncio.get_running_loop().create_task(facility_reply())
        if request.path == "/grid":
            t = self.site.clock.now()
            if request.method == "GET":
                return reply(200, {"sim_time_s": round(t, 3), "grid": self.grid.describe(t)})
            if request.method == "POST":
                try:
                    applied = self.grid.apply(body, t)
                except GridSpecError as exc:
                    return reply(400, {"error": str(exc)})
                log.info("grid event", grid_event=applied["event"], at_s=applied["at_s"])
                return reply(200, {"applied": applied, "sim_time_s": round(t, 3), "grid": self.grid.describe(t)})
        return reply(405, {"error": "GET or POST /meter, /grid"})
