"""Site meter register maps: what a Modbus meter's registers mean, decoded without any I/O.

Pure module (no sockets, no pymodbus): the register map type, the codec for the data types and word/byte orders
meters use, SunSpec meter models (201–204 integer + scale factor, 211–214 float32), vendor presets, and the
validation of a decoded reading against physical bounds and the previous good reading. `drivers/meter_modbus.py`
does the reading; the simulated meter (`sim/meter.py`) encodes its registers on its own, from the same vendor
tables, so a test over Modbus checks one against the other.

Addresses are 0-based protocol addresses (what goes in the request PDU), not the 1-based "register numbers"
(30001, 40001, …) vendor tables often print: register number 30053 is address 52 = 0x0034.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_READ_REGISTERS = 125  # Modbus application protocol v1.1b3, 6.3/6.4: at most 125 registers per read


class RegisterType(StrEnum):
    HOLDING = "holding"  # function code 3
    INPUT = "input"  # function code 4


class DataType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"


class Order(StrEnum):
    BIG = "big"  # high word (byte) first: the Modbus default
    LITTLE = "little"  # low word (byte) first: Carlo Gavazzi's INT32 words, some gateways' swapped bytes


_STRUCT = {DataType.INT16: "h", DataType.UINT16: "H", DataType.INT32: "i", DataType.UINT32: "I", DataType.FLOAT32: "f"}
_WORDS = {DataType.INT16: 1, DataType.UINT16: 1, DataType.INT32: 2, DataType.UINT32: 2, DataType.FLOAT32: 2}


def register_count(data_type: DataType) -> int:
    return _WORDS[data_type]


def decode_registers(
    regs: Sequence[int], data_type: DataType, word_order: Order = Order.BIG, byte_order: Order = Order.BIG
) -> int | float:
    """The value held by `regs` (16-bit register values in address order)."""
    n = _WORDS[data_type]
    if len(regs) != n:
        raise ValueError(f"{data_type} needs {n} registers, got {len(regs)}")
    if any(not 0 <= r <= 0xFFFF for r in regs):
        raise ValueError("register values are 16-bit")
    words = list(regs) if word_order is Order.BIG else list(reversed(regs))
    raw = b"".join(w.to_bytes(2, "big" if byte_order is Order.BIG else "little") for w in words)
    value: int | float = struct.unpack(">" + _STRUCT[data_type], raw)[0]
    return value


def encode_registers(
    value: int | float, data_type: DataType, word_order: Order = Order.BIG, byte_order: Order = Order.BIG
) -> list[int]:
    """The registers (in address order) that hold `value`; the inverse of decode_registers."""
    raw = struct.pack(">" + _STRUCT[data_type], value)
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    regs = [int.from_bytes(w, "big" if byte_order is Order.BIG else "little") for w in words]
    return regs if word_order is Order.BIG else list(reversed(regs))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Address = Annotated[int, Field(ge=0, le=0xFFFF)]


class RegisterField(_Model):
    """One quantity: where it is, how it is coded, and how to scale it to SI units (W, Wh, Hz, V).

    value = raw × scale × 10^sf, where sf is the int16 in `scale_factor_address` (SunSpec sunssf) when given.
    `not_implemented` is the raw value the meter uses for "no such measurement" (SunSpec: 0x8000 for int16 ...).
    """

    address: Address
    register_type: RegisterType = RegisterType.HOLDING
    data_type: DataType = DataType.FLOAT32
    scale: float = 1.0
    scale_factor_address: Address | None = None
    word_order: Order = Order.BIG
    byte_order: Order = Order.BIG
    not_implemented: int | None = None

    @model_validator(mode="after")
    def _check(self) -> RegisterField:
        if self.scale == 0:
            raise ValueError("scale must be non-zero")
        if self.address + _WORDS[self.data_type] - 1 > 0xFFFF:
            raise ValueError("field runs past address 65535")
        if self.scale_factor_address is not None and self.data_type is DataType.FLOAT32:
            raise ValueError("a scale-factor register applies to integer types only")
        return self

    @property
    def count(self) -> int:
        return _WORDS[self.data_type]

    def spans(self) -> list[tuple[RegisterType, int, int]]:
        """(type, first address, count) of every register this field needs."""
        out = [(self.register_type, self.address, self.count)]
        if self.scale_factor_address is not None:
            out.append((self.register_type, self.scale_factor_address, 1))
        return out


Phases = tuple[RegisterField, RegisterField, RegisterField]


class MeterMap(_Model):
    """Where a meter keeps the figures the agent needs. Per-phase fields are optional; the rest are not."""

    name: str = Field(min_length=1, max_length=64)
    total_w: RegisterField
    import_wh: RegisterField
    hz: RegisterField
    phase_w: Phases | None = None
    volts: Phases | None = None
    # registers one read may span between two fields: reading a gap is harmless on a meter whose whole range is
    # defined (a SunSpec model) and an exception on one that is not (most vendor maps), so presets say which
    max_gap: int = Field(0, ge=0, le=MAX_READ_REGISTERS)
    source: str = ""  # the vendor document and table the addresses come from

    def fields(self) -> dict[str, RegisterField]:
        out = {"total_w": self.total_w, "import_wh": self.import_wh, "hz": self.hz}
        for name, group in (("phase_w", self.phase_w), ("volts", self.volts)):
            if group is not None:
                out.update({f"{name}{i}": f for i, f in enumerate(group)})
        return out


@dataclass(frozen=True, slots=True)
class ReadBlock:
    register_type: RegisterType
    address: int
    count: int


def read_plan(fields: Sequence[RegisterField], max_gap: int = 0) -> list[ReadBlock]:
    """The fewest reads (each ≤ 125 registers, gaps ≤ max_gap) that cover every register of `fields`."""
    spans: dict[RegisterType, list[tuple[int, int]]] = {}
    for f in fields:
        for rtype, addr, count in f.spans():
            spans.setdefault(rtype, []).append((addr, addr + count))
    blocks: list[ReadBlock] = []
    for rtype in (RegisterType.HOLDING, RegisterType.INPUT):
        start = end = -1
        for a, b in sorted(spans.get(rtype, [])):
            if start >= 0 and a - end <= max_gap and max(b, end) - start <= MAX_READ_REGISTERS:
                end = max(end, b)
                continue
            if start >= 0:
                blocks.append(ReadBlock(rtype, start, end - start))
            start, end = a, b
        if start >= 0:
            blocks.append(ReadBlock(rtype, start, end - start))
    return blocks


RegisterImage = Mapping[tuple[RegisterType, int], int]


class MeterFault(StrEnum):
    """Why a reading was refused or the meter is not giving good ones: each kind is logged once and alarmed."""

    OFFLINE = "offline"  # no connection, or no reply in time
    PROTOCOL = "protocol"  # an exception reply or a malformed one
    DISCOVERY = "discovery"  # no SunSpec meter model found
    NOT_IMPLEMENTED = "not_implemented"  # a required figure carries the "not implemented" code
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    COUNTER_BACKWARDS = "counter_backwards"
    COUNTER_JUMP = "counter_jump"
    FROZEN = "frozen"  # the registers stopped changing


class MeterDataError(ValueError):
    def __init__(self, fault: MeterFault, detail: str) -> None:
        super().__init__(f"{fault}: {detail}")
        self.fault = fault
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DecodedValues:
    watts: float
    import_wh: float
    import_resolution_wh: float  # one count of the counter: a smaller change is not a change
    hz: float
    phase_watts: tuple[float, float, float] | None
    volts: tuple[float, float, float] | None


def _raw(image: RegisterImage, rtype: RegisterType, address: int, count: int) -> list[int]:
    try:
        return [image[(rtype, address + i)] for i in range(count)]
    except KeyError as exc:
        raise MeterDataError(MeterFault.PROTOCOL, f"register {exc.args[0]} was not read") from None


SF_RANGE = 10  # SunSpec sunssf: -10 … 10


def decode_field(name: str, f: RegisterField, image: RegisterImage) -> tuple[float, float] | None:
    """(value, resolution) of one field; None when it carries the not-implemented code. Non-finite refused."""
    raw = decode_registers(_raw(image, f.register_type, f.address, f.count), f.data_type, f.word_order, f.byte_order)
    if f.not_implemented is not None and isinstance(raw, int) and raw == f.not_implemented:
        return None
    factor = f.scale
    if f.scale_factor_address is not None:
        sf = decode_registers(_raw(image, f.register_type, f.scale_factor_address, 1), DataType.INT16)
        if not -SF_RANGE <= int(sf) <= SF_RANGE:  # also SunSpec's 0x8000 "not implemented"
            raise MeterDataError(
                MeterFault.NOT_IMPLEMENTED if sf == -0x8000 else MeterFault.OUT_OF_RANGE, f"{name}: scale factor {sf}"
            )
        factor *= 10.0 ** int(sf)
    value = float(raw) * factor
    if not math.isfinite(value):
        raise MeterDataError(MeterFault.NON_FINITE, f"{name}: {value}")
    if f.data_type is DataType.FLOAT32:
        # a float32 counts in steps of its last mantissa bit (24 bits): for |x| = m·2^e, m in [0.5, 1), 2^(e−24)
        resolution = abs(factor) * 2.0 ** (math.frexp(float(raw))[1] - 24) if raw else 0.0
    else:
        resolution = abs(factor)
    return value, resolution


def _required(name: str, f: RegisterField, image: RegisterImage) -> tuple[float, float]:
    got = decode_field(name, f, image)
    if got is None:
        raise MeterDataError(MeterFault.NOT_IMPLEMENTED, f"{name} is not implemented by the meter")
    return got


def _phases(name: str, group: Phases | None, image: RegisterImage) -> tuple[float, float, float] | None:
    if group is None:
        return None
    values = [decode_field(f"{name}[{i}]", f, image) for i, f in enumerate(group)]
    if any(v is None for v in values):
        return None  # optional figures: a meter without them still gives the totals
    a, b, c = (v[0] for v in values if v is not None)
    return a, b, c


def decode_map(meter_map: MeterMap, image: RegisterImage) -> DecodedValues:
    """Every figure of `meter_map` from the registers read. Raises MeterDataError (garbage, not a reading)."""
    watts, _ = _required("total_w", meter_map.total_w, image)
    import_wh, resolution = _required("import_wh", meter_map.import_wh, image)
    hz, _ = _required("hz", meter_map.hz, image)
    return DecodedValues(
        watts=watts,
        import_wh=import_wh,
        import_resolution_wh=resolution,
        hz=hz,
        phase_watts=_phases("phase_w", meter_map.phase_w, image),
        volts=_phases("volts", meter_map.volts, image),
    )


# ------------------------------------------------------------------------------------------------ validation
class MeterBounds(_Model):
    """What a site meter may physically read. Anything outside is garbage, not a reading."""

    max_w: float = Field(gt=0, description="Largest plausible site import (e.g. 2 × the licensed cap).")
    min_w: float | None = Field(
        None, description="Smallest plausible reading; default −5 % of max_w (a load site exports little or nothing)."
    )
    hz_min: float = Field(40.0, gt=0)
    hz_max: float = Field(70.0, gt=0)
    v_min: float = Field(0.0, ge=0)
    v_max: float = Field(1e6, gt=0)  # MV-side meters report primary volts through their VT ratio
    # counter slack on top of max_w × elapsed time: the meter's own update interval and read jitter
    counter_slack_s: float = Field(2.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> MeterBounds:
        if self.hz_min >= self.hz_max or self.v_min >= self.v_max:
            raise ValueError("bounds must be min < max")
        if self.min_w is not None and self.min_w >= self.max_w:
            raise ValueError("min_w must be below max_w")
        return self

    @property
    def low_w(self) -> float:
        return -0.05 * self.max_w if self.min_w is None else self.min_w


def check_values(v: DecodedValues, bounds: MeterBounds) -> None:
    """Physical range of one reading on its own. Raises MeterDataError."""
    lo, hi = bounds.low_w, bounds.max_w
    if not lo <= v.watts <= hi:
        raise MeterDataError(MeterFault.OUT_OF_RANGE, f"power {v.watts:.6g} W outside [{lo:.6g}, {hi:.6g}]")
    if v.phase_watts is not None and any(not lo <= p <= hi for p in v.phase_watts):
        raise MeterDataError(MeterFault.OUT_OF_RANGE, f"phase power {v.phase_watts} W outside [{lo:.6g}, {hi:.6g}]")
    if not bounds.hz_min <= v.hz <= bounds.hz_max:
        raise MeterDataError(
            MeterFault.OUT_OF_RANGE, f"frequency {v.hz:.6g} Hz outside [{bounds.hz_min}, {bounds.hz_max}]"
        )
    if v.volts is not None and any(not bounds.v_min <= u <= bounds.v_max for u in v.volts):
        raise MeterDataError(MeterFault.OUT_OF_RANGE, f"voltage {v.volts} V outside [{bounds.v_min}, {bounds.v_max}]")
    if v.import_wh < 0:
        raise MeterDataError(MeterFault.OUT_OF_RANGE, f"import counter {v.import_wh:.6g} Wh is negative")


def check_counter(
    previous_wh: float, current_wh: float, elapsed_s: float, resolution_wh: float, bounds: MeterBounds
) -> None:
    """The import counter since the last good reading: never back, never more than max_w can have drawn."""
    slack = 2.0 * resolution_wh
    if current_wh < previous_wh - slack:
        raise MeterDataError(
            MeterFault.COUNTER_BACKWARDS, f"import counter went back from {previous_wh:.6g} to {current_wh:.6g} Wh"
        )
    possible = bounds.max_w * (max(0.0, elapsed_s) + bounds.counter_slack_s) / 3600.0 + slack
    if current_wh - previous_wh > possible:
        raise MeterDataError(
            MeterFault.COUNTER_JUMP,
            f"import counter rose {current_wh - previous_wh:.6g} Wh in {elapsed_s:.3g} s "
            f"(at most {possible:.6g} Wh possible)",
        )


# --------------------------------------------------------------------------------------------------- SunSpec
SUNSPEC_MARKER = (0x5375, 0x6E53)  # "SunS"
SUNSPEC_BASES = (40000, 0, 50000)  # where the marker may be (SunSpec Modbus spec, "Device Modbus map")
SUNSPEC_END = 0xFFFF
INT_METERS = frozenset({201, 202, 203, 204})
FLOAT_METERS = frozenset({211, 212, 213, 214})
THREE_PHASE = frozenset({203, 204, 213, 214})

# Offsets from the model's ID register, from the SunSpec model definitions (github.com/sunspec/models
# json/model_203.json and model_213.json; 201/202/204 share 203's layout, 211/212/214 share 213's; checked
# point by point). Integer models: int16 values with sunssf scale factors, acc32 counters.
_INT_OFFSETS = {
    "PhVphA": 8,
    "V_SF": 15,
    "Hz": 16,
    "Hz_SF": 17,
    "W": 18,
    "WphA": 19,
    "W_SF": 22,
    "TotWhImp": 46,
    "TotWh_SF": 54,
}
_INT_LENGTH = 105  # L of 201–204 (points after ID and L)
_FLOAT_OFFSETS = {"PhVphA": 12, "Hz": 26, "W": 28, "WphA": 30, "TotWhImp": 68}
_FLOAT_LENGTH = 124  # L of 211–214


def sunspec_model_length(model_id: int) -> int:
    if model_id in INT_METERS:
        return _INT_LENGTH
    if model_id in FLOAT_METERS:
        return _FLOAT_LENGTH
    raise ValueError(f"not a SunSpec meter model: {model_id}")


def sunspec_meter_map(model_id: int, base: int) -> MeterMap:
    """The map of SunSpec meter model `model_id` whose ID register is at address `base` (holding registers)."""
    sunspec_model_length(model_id)
    three = model_id in THREE_PHASE
    if model_id in INT_METERS:
        o = {k: base + v for k, v in _INT_OFFSETS.items()}

        def i16(addr: int, sf: int) -> RegisterField:
            return RegisterField(
                address=addr, data_type=DataType.INT16, scale_factor_address=sf, not_implemented=-0x8000
            )

        return MeterMap(
            name=f"sunspec-{model_id}",
            total_w=i16(o["W"], o["W_SF"]),
            hz=i16(o["Hz"], o["Hz_SF"]),
            # acc32: unsigned, 0 means "not accumulated" (a valid count for a new meter, so no sentinel)
            import_wh=RegisterField(
                address=o["TotWhImp"], data_type=DataType.UINT32, scale_factor_address=o["TotWh_SF"]
            ),
            phase_w=(i16(o["WphA"], o["W_SF"]), i16(o["WphA"] + 1, o["W_SF"]), i16(o["WphA"] + 2, o["W_SF"]))
            if three
            else None,
            volts=(i16(o["PhVphA"], o["V_SF"]), i16(o["PhVphA"] + 1, o["V_SF"]), i16(o["PhVphA"] + 2, o["V_SF"]))
            if three
            else None,
            max_gap=MAX_READ_REGISTERS,
            source=f"SunSpec model {model_id} (sunspec/models json/model_{model_id}.json)",
        )
    f = {k: base + v for k, v in _FLOAT_OFFSETS.items()}

    def f32(addr: int) -> RegisterField:
        return RegisterField(address=addr, data_type=DataType.FLOAT32)

    return MeterMap(
        name=f"sunspec-{model_id}",
        total_w=f32(f["W"]),
        hz=f32(f["Hz"]),
        import_wh=f32(f["TotWhImp"]),
        phase_w=(f32(f["WphA"]), f32(f["WphA"] + 2), f32(f["WphA"] + 4)) if three else None,
        volts=(f32(f["PhVphA"]), f32(f["PhVphA"] + 2), f32(f["PhVphA"] + 4)) if three else None,
        max_gap=MAX_READ_REGISTERS,
        source=f"SunSpec model {model_id} (sunspec/models json/model_{model_id}.json)",
    )


# --------------------------------------------------------------------------------------------------- presets
def _sdm630() -> MeterMap:
    # Eastron SDM630 Modbus V2 (SDM630MCT V2 the same): "Eastron SDM630 Modbus Protocol", table "Input Registers"
    # (function 04), "Modbus Protocol Start Address Hex" column; every value an IEEE 754 float32, high word first.
    # Cross-checked with Eastron tables reproduced in public drivers (SDM.h for Arduino, Oppleo SDM630v2.py).
    def ir(addr: int, scale: float = 1.0) -> RegisterField:
        return RegisterField(address=addr, register_type=RegisterType.INPUT, data_type=DataType.FLOAT32, scale=scale)

    return MeterMap(
        name="eastron-sdm630",
        volts=(ir(0x0000), ir(0x0002), ir(0x0004)),  # 30001/30003/30005 Phase 1/2/3 line to neutral volts
        phase_w=(ir(0x000C), ir(0x000E), ir(0x0010)),  # 30013/30015/30017 Phase 1/2/3 power (W)
        total_w=ir(0x0034),  # 30053 Total system power (W)
        hz=ir(0x0046),  # 30071 Frequency of supply voltages (Hz)
        import_wh=ir(0x0048, 1000.0),  # 30073 Import Wh since last reset, in kWh
        max_gap=6,  # spans only the phase currents 0x0006-0x000B between volts and power: one read of 0x0000-0x0011
        source="Eastron SDM630 Modbus Protocol, Input Registers table (3X, function 04)",
    )


def _em24() -> MeterMap:
    # Carlo Gavazzi EM24 DIN, Ethernet (EM24DINAV23XE1X / …V53XE1…): "EM24 DIN communication protocol", table
    # "Instantaneous variables and meters" (function 03 or 04). INT32 values with the LEAST significant word
    # first ("LSW→MSW"), fixed value weights: V×10, W×10, kWh×10; frequency an INT16 Hz×10 (0.1 Hz resolution:
    # too coarse for frequency response, which needs a meter giving mHz). Cross-checked with Victron's
    # dbus-modbus-client carlo_gavazzi.py (Reg_s32l, same addresses and weights).
    def hr(addr: int, scale: float) -> RegisterField:
        return RegisterField(address=addr, data_type=DataType.INT32, word_order=Order.LITTLE, scale=scale)

    return MeterMap(
        name="carlo-gavazzi-em24",
        volts=(hr(0x0000, 0.1), hr(0x0002, 0.1), hr(0x0004, 0.1)),  # V L1-N, V L2-N, V L3-N
        phase_w=(hr(0x0012, 0.1), hr(0x0014, 0.1), hr(0x0016, 0.1)),  # W L1, W L2, W L3
        total_w=hr(0x0028, 0.1),  # W Σ
        hz=RegisterField(address=0x0033, data_type=DataType.UINT16, scale=0.1),  # Hz
        import_wh=hr(0x0034, 100.0),  # kWh (+) TOT, in kWh×10
        max_gap=0,  # what lies between the fields (VA, var, PF) is not checked here: no read spans it
        source="Carlo Gavazzi EM24 DIN communication protocol, instantaneous variables and meters",
    )


def _janitza() -> MeterMap:
    # Janitza UMG 96RM / UMG 604 / UMG 512 (and Weidmüller's rebadged ones): the "frequently required readings"
    # table of the Janitza Modbus address list (function 03, float32 high word first, SI units). U L1-N..L3-N
    # 19000–19004, P L1..L3 19020–19024, P sum 19026, frequency 19050, consumed (imported) real energy sum L1-L3
    # 19068 Wh (delivered 19076). The block 19000–19077 is defined throughout, so one read may span the gaps.
    # Cross-checked with OpenEMS io.openems.edge.meter.janitza (umg96rme, umg604: same addresses and units).
    def hr(addr: int) -> RegisterField:
        return RegisterField(address=addr, data_type=DataType.FLOAT32)

    return MeterMap(
        name="janitza-umg",
        volts=(hr(19000), hr(19002), hr(19004)),
        phase_w=(hr(19020), hr(19022), hr(19024)),
        total_w=hr(19026),
        hz=hr(19050),
        import_wh=hr(19068),
        max_gap=24,  # one read of 19000-19069
        source="Janitza UMG Modbus address list, frequently required readings (19000-19077)",
    )


PRESETS: dict[str, MeterMap] = {m.name: m for m in (_sdm630(), _em24(), _janitza())}


def preset(name: str) -> MeterMap:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown meter preset {name!r} (one of {', '.join(PRESETS)})") from None


def map_from_config(doc: Mapping[str, Any]) -> MeterMap:
    """A custom map from configuration (YAML/JSON), validated: unknown keys, bad types, non-finite refused."""
    return MeterMap.model_validate(doc)
