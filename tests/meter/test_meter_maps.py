"""Register maps, pure: the codec (every data type, word and byte order), field decoding with scale factors and
not-implemented codes, refusal of non-finite and out-of-range figures, the counter rules, read plans, SunSpec model
offsets and map validation."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hashflex.drivers.meter_maps import (
    MAX_READ_REGISTERS,
    PRESETS,
    DataType,
    DecodedValues,
    MeterBounds,
    MeterDataError,
    MeterFault,
    MeterMap,
    Order,
    RegisterField,
    RegisterType,
    check_counter,
    check_values,
    decode_field,
    decode_map,
    decode_registers,
    encode_registers,
    map_from_config,
    read_plan,
    sunspec_meter_map,
)

RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
}
orders = st.sampled_from(list(Order))


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[DataType, int | float]:
    dtype = draw(st.sampled_from(list(DataType)))
    if dtype is DataType.FLOAT32:
        return dtype, draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
    lo, hi = RANGES[dtype]
    return dtype, draw(st.integers(lo, hi))


@settings(max_examples=500, deadline=None)
@given(typed_values(), orders, orders)
def test_encode_then_decode_gives_the_value_back(tv: tuple[DataType, int | float], wo: Order, bo: Order) -> None:
    dtype, value = tv
    regs = encode_registers(value, dtype, wo, bo)
    assert len(regs) == (1 if dtype in (DataType.INT16, DataType.UINT16) else 2)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert decode_registers(regs, dtype, wo, bo) == value


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_word_and_byte_orders_are_the_wire_layouts(raw: int) -> None:
    """Big/big is the Modbus wire order; little word order swaps the registers, little byte order each pair."""
    hi, lo = raw >> 16, raw & 0xFFFF

    def swap(w: int) -> int:
        return ((w & 0xFF) << 8) | (w >> 8)

    assert encode_registers(raw, DataType.UINT32, Order.BIG, Order.BIG) == [hi, lo]
    assert encode_registers(raw, DataType.UINT32, Order.LITTLE, Order.BIG) == [lo, hi]
    assert encode_registers(raw, DataType.UINT32, Order.BIG, Order.LITTLE) == [swap(hi), swap(lo)]
    assert encode_registers(raw, DataType.UINT32, Order.LITTLE, Order.LITTLE) == [swap(lo), swap(hi)]


def test_known_float_layouts() -> None:
    # 1.0f is 0x3F800000: IEEE 754 single precision
    assert encode_registers(1.0, DataType.FLOAT32) == [0x3F80, 0x0000]
    assert decode_registers([0x0000, 0x3F80], DataType.FLOAT32, Order.LITTLE) == 1.0
    assert decode_registers([0x803F, 0x0000], DataType.FLOAT32, Order.BIG, Order.LITTLE) == 1.0
    # Carlo Gavazzi INT32, least significant word first: −1234 W×10
    assert decode_registers([0xFB2E, 0xFFFF], DataType.INT32, Order.LITTLE) == -1234


def test_decode_refuses_wrong_lengths_and_non_16_bit_registers() -> None:
    with pytest.raises(ValueError, match="needs 2"):
        decode_registers([1], DataType.FLOAT32)
    with pytest.raises(ValueError, match="16-bit"):
        decode_registers([0x10000], DataType.UINT16)


def _image(field: RegisterField, regs: list[int], sf: int | None = None) -> dict[tuple[RegisterType, int], int]:
    image = {(field.register_type, field.address + i): r for i, r in enumerate(regs)}
    if field.scale_factor_address is not None and sf is not None:
        image[(field.register_type, field.scale_factor_address)] = sf & 0xFFFF
    return image


nan_payloads = st.integers(0x7F800001, 0x7FFFFFFF) | st.integers(0xFF800001, 0xFFFFFFFF)
infinities = st.sampled_from([0x7F800000, 0xFF800000])


@settings(max_examples=300, deadline=None)
@given(nan_payloads | infinities, orders, orders)
def test_non_finite_floats_are_refused_in_any_layout(bits: int, wo: Order, bo: Order) -> None:
    value = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
    assert not math.isfinite(value)
    field = RegisterField(address=100, data_type=DataType.FLOAT32, word_order=wo, byte_order=bo)
    with pytest.raises(MeterDataError) as err:
        decode_field("total_w", field, _image(field, encode_registers(value, DataType.FLOAT32, wo, bo)))
    assert err.value.fault is MeterFault.NON_FINITE


def test_a_huge_float_times_a_scale_overflowing_is_refused_too() -> None:
    field = RegisterField(address=0, data_type=DataType.FLOAT32, scale=1e300)
    with pytest.raises(MeterDataError) as err:
        decode_field("import_wh", field, _image(field, encode_registers(3.0e38, DataType.FLOAT32)))
    assert err.value.fault is MeterFault.NON_FINITE


@settings(max_examples=300, deadline=None)
@given(st.integers(-32767, 32767), st.integers(-10, 10))
def test_sunspec_scale_factor_applies_as_a_power_of_ten(raw: int, sf: int) -> None:
    field = RegisterField(address=10, data_type=DataType.INT16, scale_factor_address=14, not_implemented=-0x8000)
    got = decode_field("w", field, _image(field, [raw & 0xFFFF], sf))
    assert got is not None
    value, resolution = got
    assert value == pytest.approx(raw * 10.0**sf, rel=1e-12, abs=1e-300)
    assert resolution == pytest.approx(10.0**sf)


def test_not_implemented_codes() -> None:
    field = RegisterField(address=10, data_type=DataType.INT16, scale_factor_address=14, not_implemented=-0x8000)
    assert decode_field("w", field, _image(field, [0x8000], 0)) is None
    with pytest.raises(MeterDataError) as err:  # the scale factor itself not implemented
        decode_field("w", field, _image(field, [100], -0x8000))
    assert err.value.fault is MeterFault.NOT_IMPLEMENTED
    with pytest.raises(MeterDataError) as err:  # outside SunSpec's −10…10
        decode_field("w", field, _image(field, [100], 11))
    assert err.value.fault is MeterFault.OUT_OF_RANGE


def test_a_missing_register_is_a_protocol_fault() -> None:
    field = RegisterField(address=10, data_type=DataType.FLOAT32)
    with pytest.raises(MeterDataError) as err:
        decode_field("hz", field, {(RegisterType.HOLDING, 10): 0})
    assert err.value.fault is MeterFault.PROTOCOL


@settings(max_examples=200, deadline=None)
@given(st.floats(1.0, 1e9, width=32))
def test_float_counter_resolution_is_its_last_mantissa_bit(value: float) -> None:
    field = RegisterField(address=0, data_type=DataType.FLOAT32, scale=1000.0)
    got = decode_field("import_wh", field, _image(field, encode_registers(value, DataType.FLOAT32)))
    assert got is not None
    _, resolution = got
    # the next float32 up differs by exactly the resolution
    up = struct.unpack(">f", (struct.unpack(">I", struct.pack(">f", value))[0] + 1).to_bytes(4, "big"))[0]
    assert resolution == pytest.approx((up - value) * 1000.0)


BOUNDS = MeterBounds(max_w=100_000.0)


def _values(**kw: float) -> DecodedValues:
    base: dict[str, float] = {"watts": 40_000.0, "import_wh": 1e6, "hz": 50.0}
    base.update(kw)
    return DecodedValues(
        watts=base["watts"],
        import_wh=base["import_wh"],
        import_resolution_wh=1.0,
        hz=base["hz"],
        phase_watts=None,
        volts=(230.0, 231.0, 229.0),
    )


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"watts": 100_001.0}, "power"),
        ({"watts": -5_001.0}, "power"),
        ({"hz": 39.9}, "frequency"),
        ({"hz": 70.5}, "frequency"),
        ({"import_wh": -1.0}, "negative"),
    ],
)
def test_out_of_range_figures_are_refused(kw: dict[str, float], what: str) -> None:
    check_values(_values(), BOUNDS)
    with pytest.raises(MeterDataError, match=what) as err:
        check_values(_values(**kw), BOUNDS)
    assert err.value.fault is MeterFault.OUT_OF_RANGE


def test_volts_out_of_range_are_refused() -> None:
    v = DecodedValues(
        watts=1.0, import_wh=1.0, import_resolution_wh=1.0, hz=50.0, phase_watts=None, volts=(230.0, 2e6, 230.0)
    )
    with pytest.raises(MeterDataError, match="voltage"):
        check_values(v, BOUNDS)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e9), st.floats(0.01, 3600.0), st.floats(0.0, 1.2))
def test_counter_rule_accepts_what_max_w_can_draw_and_refuses_more(start: float, dt: float, share: float) -> None:
    possible = BOUNDS.max_w * (dt + BOUNDS.counter_slack_s) / 3600.0
    rise = possible * share
    if share <= 1.0:
        check_counter(start, start + rise, dt, 1.0, BOUNDS)
    elif rise > possible + 2.0:
        with pytest.raises(MeterDataError) as err:
            check_counter(start, start + rise, dt, 1.0, BOUNDS)
        assert err.value.fault is MeterFault.COUNTER_JUMP


def test_counter_going_back_is_refused_beyond_its_resolution() -> None:
    check_counter(1000.0, 999.0, 1.0, 1.0, BOUNDS)  # one count of jitter is not a reset
    with pytest.raises(MeterDataError) as err:
        check_counter(1000.0, 990.0, 1.0, 1.0, BOUNDS)
    assert err.value.fault is MeterFault.COUNTER_BACKWARDS


field_specs = st.builds(
    RegisterField,
    address=st.integers(0, 2000),
    register_type=st.sampled_from(list(RegisterType)),
    data_type=st.sampled_from(list(DataType)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(field_specs, min_size=1, max_size=12), st.integers(0, 40))
def test_read_plans_cover_every_register_within_the_protocol_limit(fields: list[RegisterField], gap: int) -> None:
    plan = read_plan(fields, gap)
    covered = {(b.register_type, b.address + i) for b in plan for i in range(b.count)}
    for f in fields:
        for i in range(f.count):
            assert (f.register_type, f.address + i) in covered
    assert all(1 <= b.count <= MAX_READ_REGISTERS for b in plan)
    needed = {(f.register_type, f.address + i) for f in fields for i in range(f.count)}
    # a block reads registers nobody needs only inside allowed gaps
    assert len(covered - needed) <= gap * len(plan)


def test_sunspec_offsets_follow_the_model_definitions() -> None:
    # offsets from the ID register in sunspec/models json/model_203.json and model_213.json
    m203 = sunspec_meter_map(203, 40070)
    assert (m203.total_w.address, m203.total_w.scale_factor_address) == (40070 + 18, 40070 + 22)
    assert (m203.hz.address, m203.hz.scale_factor_address) == (40070 + 16, 40070 + 17)
    assert (m203.import_wh.address, m203.import_wh.scale_factor_address) == (40070 + 46, 40070 + 54)
    assert m203.import_wh.data_type is DataType.UINT32
    assert m203.phase_w is not None
    assert [f.address for f in m203.phase_w] == [40089, 40090, 40091]
    assert m203.volts is not None
    assert [f.address for f in m203.volts] == [40078, 40079, 40080]
    m213 = sunspec_meter_map(213, 40177)
    assert [m213.hz.address, m213.total_w.address, m213.import_wh.address] == [40203, 40205, 40245]
    assert m213.phase_w is not None
    assert [f.address for f in m213.phase_w] == [40207, 40209, 40211]
    assert sunspec_meter_map(201, 0).phase_w is None  # single phase: totals only
    with pytest.raises(ValueError, match="not a SunSpec meter"):
        sunspec_meter_map(101, 0)
    # one read per model: everything the agent needs lies within 125 registers of the ID
    for model in (203, 213):
        m = sunspec_meter_map(model, 40000)
        assert len(read_plan(list(m.fields().values()), m.max_gap)) == 1


def test_presets_decode_their_own_vendor_layout() -> None:
    sdm = PRESETS["eastron-sdm630"]
    assert sdm.total_w.register_type is RegisterType.INPUT
    assert sdm.total_w.address == 0x0034
    em24 = PRESETS["carlo-gavazzi-em24"]
    assert em24.total_w.word_order is Order.LITTLE
    assert em24.import_wh.scale == 100.0
    image: dict[tuple[RegisterType, int], int] = {}
    for f, v in ((em24.total_w, 123456), (em24.import_wh, 98765), (em24.hz, 499)):
        image.update(
            {
                (f.register_type, f.address + i): r
                for i, r in enumerate(encode_registers(v, f.data_type, f.word_order, f.byte_order))
            }
        )
    for group, v in ((em24.phase_w, 41152), (em24.volts, 2301)):
        assert group is not None
        for f in group:
            image.update(
                {
                    (f.register_type, f.address + i): r
                    for i, r in enumerate(encode_registers(v, f.data_type, f.word_order, f.byte_order))
                }
            )
    got = decode_map(em24, image)
    assert got.watts == pytest.approx(12345.6)
    assert got.import_wh == pytest.approx(9876500.0)
    assert got.hz == pytest.approx(49.9)
    assert got.volts is not None
    assert list(got.volts) == pytest.approx([230.1] * 3)
    assert got.import_resolution_wh == 100.0


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "x", "total_w": {"address": 0, "scale": 0}, "import_wh": {"address": 2}, "hz": {"address": 4}},
        {
            "name": "x",
            "total_w": {"address": 0, "scale": float("nan")},
            "import_wh": {"address": 2},
            "hz": {"address": 4},
        },
        {"name": "x", "total_w": {"address": 65535}, "import_wh": {"address": 2}, "hz": {"address": 4}},
        {
            "name": "x",
            "total_w": {"address": 0, "data_type": "float32", "scale_factor_address": 9},
            "import_wh": {"address": 2},
            "hz": {"address": 4},
        },
        {"name": "x", "total_w": {"address": 0, "colour": "red"}, "import_wh": {"address": 2}, "hz": {"address": 4}},
        {
            "name": "x",
            "total_w": {"address": 0, "data_type": "int64"},
            "import_wh": {"address": 2},
            "hz": {"address": 4},
        },
        {"name": "x", "total_w": {"address": 0}, "hz": {"address": 4}},
    ],
)
def test_bad_maps_are_refused_with_a_clear_error(doc: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        map_from_config(doc)


def test_a_configured_map_round_trips() -> None:
    doc = {
        "name": "site-meter",
        "total_w": {
            "address": 100,
            "register_type": "input",
            "data_type": "int32",
            "scale": 0.1,
            "word_order": "little",
        },
        "import_wh": {"address": 102, "data_type": "uint32", "scale": 1000},
        "hz": {"address": 104, "data_type": "uint16", "scale": 0.01},
    }
    m = map_from_config(doc)
    assert isinstance(m, MeterMap)
    assert m.total_w.register_type is RegisterType.INPUT
    assert map_from_config(m.model_dump(mode="json")) == m


def test_bounds_validation() -> None:
    with pytest.raises(ValidationError):
        MeterBounds(max_w=float("inf"))
    with pytest.raises(ValidationError):
        MeterBounds(max_w=1.0, hz_min=60, hz_max=50)
    assert MeterBounds(max_w=1000.0).low_w == -50.0
