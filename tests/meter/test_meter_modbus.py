"""The meter adapter against the simulated site meter, over real Modbus TCP: SunSpec 203 and 213 and each vendor
preset read the figures /truth reports, an independent client (mbpoll) reads the same registers, and every meter
fault (offline, frozen, garbage, counter reset) ends in a refusal or a stale meter, never in a good reading.

Loopback range of this file: 127.160.0.0/16 (miners from 127.160.0.1, the meter on 127.160.1.250:5020)."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hashflex.agent.runtime.clock import ScaledClock
from hashflex.drivers.meter_maps import MeterBounds, MeterFault, map_from_config
from hashflex.drivers.meter_modbus import (
    FrequencyReading,
    MeterConfig,
    MeterReading,
    MeterRefusal,
    ModbusMeter,
)
from hashflex.sim.testing import SimProcess

pytestmark = pytest.mark.timeout(60)

SPEED = 20.0
METER = "127.160.1.250:5020"
UPDATE_S = 0.05  # the simulated meter's measuring interval (wall)
STALE_S = 10.0  # site seconds: 0.5 s of wall time at SPEED
FROZEN_S = 10.0


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    cfg = '{"noise": 0.001, "update_ms": 50, "base_kw": 3, "cooling_share": 0.06}'
    with SimProcess(
        miners=6,
        mix="luxos:1,whatsminer:1",
        base_ip="127.160.0.1",
        seed=16,
        speed=SPEED,
        extra_args=["--meter", METER, "--meter-config", cfg],
    ) as site:
        yield site


@pytest.fixture(autouse=True)
def clean(sim: SimProcess) -> Iterator[None]:
    yield
    sim.meter_fault("clear")
    sim.grid_event({"event": "nominal"})


def meter_for(sim: SimProcess, **kw: Any) -> ModbusMeter:
    host, port = sim.meter.split(":")
    rated = sim.meter_truth()["rated_w"]
    cfg = MeterConfig(
        host=host,
        port=int(port),
        bounds=MeterBounds(max_w=2.0 * rated),
        timeout_s=0.5,
        stale_after_s=STALE_S,
        frozen_after_s=FROZEN_S,
        **kw,
    )
    return ModbusMeter(cfg, clock=ScaledClock(SPEED))


async def good(meter: ModbusMeter) -> MeterReading:
    got = await meter.poll_once()
    assert isinstance(got, MeterReading), got
    return got


async def read_against_truth(sim: SimProcess, meter: ModbusMeter) -> tuple[MeterReading, dict[str, Any]]:
    before = sim.meter_truth()
    r = await good(meter)
    after = sim.meter_truth()
    # steady site: the reading differs from the noise-free truth by the noise (σ 0.1 %) and its resolution
    assert r.watts == pytest.approx(after["power_w"], rel=0.006, abs=20)
    # the counter lies between the truth read before and after it (less what the meter's last measuring
    # interval has not counted yet), within one count
    lag_wh = after["power_w"] * (UPDATE_S + 0.02) * SPEED / 3600.0
    assert before["counter_kwh"] * 1000 - lag_wh - r.counter_resolution_wh <= r.import_wh
    assert r.import_wh <= after["counter_kwh"] * 1000 + r.counter_resolution_wh
    assert r.hz == pytest.approx(after["base_hz"], abs=0.02 + (0.05 if r.source == "carlo-gavazzi-em24" else 0))
    assert r.volts is not None
    for got, want in zip(r.volts, after["volts"], strict=True):
        assert got == pytest.approx(want, rel=0.01)
    assert r.phase_watts is not None
    for got, want in zip(r.phase_watts, after["phase_w"], strict=True):
        assert got == pytest.approx(want, rel=0.006, abs=20)
    assert sum(r.phase_watts) == pytest.approx(r.watts, rel=0.001, abs=30)
    return r, after


async def test_sunspec_discovery_finds_model_203_and_reads_the_meter(sim: SimProcess) -> None:
    meter = meter_for(sim)
    try:
        r, truth = await read_against_truth(sim, meter)
        assert r.source == "sunspec-203"
        assert r.counter_resolution_wh == 1.0  # TotWh_SF 0: Wh
        # the meter sees more than the miners: cooling, base load and losses
        site = sim.truth()
        assert truth["it_w"] == pytest.approx(site["site"]["power_w"], abs=1)
        assert r.watts > truth["it_w"] * 1.06 + 3000 - 100
        status = meter.status()
        assert status.fresh
        assert status.faults == ()
        assert status.stale_since is None
        assert meter.reading() == r
    finally:
        meter.close()


async def test_sunspec_213_float_model(sim: SimProcess) -> None:
    meter = meter_for(sim, sunspec_model=213)
    try:
        r, _ = await read_against_truth(sim, meter)
        assert r.source == "sunspec-213"
        assert r.counter_resolution_wh < 0.2  # float32 Wh near 1 MWh: 1/16 Wh
    finally:
        meter.close()


@pytest.mark.parametrize("preset", ["eastron-sdm630", "carlo-gavazzi-em24", "janitza-umg"])
async def test_each_preset_reads_the_meter(sim: SimProcess, preset: str) -> None:
    meter = meter_for(sim, map=preset)
    try:
        r, _ = await read_against_truth(sim, meter)
        assert r.source == preset
        # successive readings: the counter advances with the power drawn
        await asyncio.sleep(0.3)
        r2 = await good(meter)
        elapsed_h = (r2.read_at - r.read_at) / 3600.0
        assert r2.import_wh - r.import_wh == pytest.approx(
            r.watts * elapsed_h, rel=0.25, abs=2 * r.counter_resolution_wh
        )
    finally:
        meter.close()


async def test_a_configured_map_reads_the_meter(sim: SimProcess) -> None:
    """A map written in configuration (here the EM24's totals, as an operator would type them from its manual)."""
    doc: dict[str, Any] = {
        "name": "site-em24",
        "total_w": {"address": 40, "data_type": "int32", "word_order": "little", "scale": 0.1},
        "import_wh": {"address": 52, "data_type": "int32", "word_order": "little", "scale": 100},
        "hz": {"address": 51, "data_type": "uint16", "scale": 0.1},
    }
    meter = meter_for(sim, map=map_from_config(doc))
    try:
        truth = sim.meter_truth()
        r = await good(meter)
        assert r.source == "site-em24"
        assert r.phase_watts is None
        assert r.volts is None
        assert r.watts == pytest.approx(truth["power_w"], rel=0.006)
        assert r.import_wh == pytest.approx(truth["counter_kwh"] * 1000, abs=200)
        # the same registers read with the wrong word order are garbage, refused
        wrong = {**doc, "total_w": {**doc["total_w"], "word_order": "big"}}
        bad = meter_for(sim, map=map_from_config(wrong))
        got = await bad.poll_once()
        bad.close()
        assert isinstance(got, MeterRefusal)
        assert got.fault is MeterFault.OUT_OF_RANGE
    finally:
        meter.close()


def test_mbpoll_reads_the_simulated_meter(sim: SimProcess) -> None:
    assert shutil.which("mbpoll"), "mbpoll (Debian package mbpoll) is needed: an independent Modbus client"
    host, port = sim.meter.split(":")

    def mbpoll(*args: str) -> dict[int, float]:
        out = subprocess.run(
            ["mbpoll", "-a", "1", "-1", "-0", "-o", "1", *args, host, "-p", port],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {int(a): float(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(\S+)", out, re.M)}

    # SunSpec marker "SunS", then the common model's ID and length (holding, 0-based references with -0)
    assert mbpoll("-r", "40000", "-c", "4", "-t", "4") == {40000: 0x5375, 40001: 0x6E53, 40002: 1, 40003: 66}
    truth = sim.meter_truth()
    # Eastron total system power: input register 0x0034, float32 high word first
    sdm = mbpoll("-r", str(0x34), "-c", "1", "-t", "3:float", "-B")
    assert sdm[0x34] == pytest.approx(truth["power_w"], rel=0.01)
    # Carlo Gavazzi W sys: holding 0x0028, INT32 low word first (mbpoll's default 32-bit order), W×10
    em24 = mbpoll("-r", str(0x28), "-c", "1", "-t", "4:int")
    assert em24[0x28] / 10 == pytest.approx(truth["power_w"], rel=0.01)
    # SunSpec 203 frequency with its scale factor (Hz, Hz_SF at ID + 16, + 17)
    hz = mbpoll("-r", str(40070 + 16), "-c", "2", "-t", "4")
    sf = hz[40087] - 0x10000 if hz[40087] >= 0x8000 else hz[40087]
    assert hz[40086] * 10**sf == pytest.approx(truth["base_hz"], abs=0.02)
    # the meter is read-only: a write is refused
    proc = subprocess.run(
        ["mbpoll", "-a", "1", "-1", "-0", "-r", "40070", "-t", "4", host, "-p", port, "--", "1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode != 0


async def test_offline_meter_is_refused_then_stale_then_back(sim: SimProcess) -> None:
    faults: list[MeterRefusal] = []
    meter = meter_for(sim)
    meter.on_fault = faults.append
    try:
        last = await good(meter)
        sim.meter_fault("offline")
        got = await meter.poll_once()
        # the open connection is closed under the request (no reply), then new ones are refused
        assert isinstance(got, MeterRefusal)
        assert got.fault is MeterFault.OFFLINE
        await asyncio.sleep(STALE_S / SPEED + 0.1)
        again = await meter.poll_once()
        assert isinstance(again, MeterRefusal)
        assert again.fault is MeterFault.OFFLINE
        assert "cannot connect" in again.detail
        status = meter.status()
        assert not status.fresh
        assert status.stale_since == last.read_at
        assert status.faults == (MeterFault.OFFLINE,)
        assert meter.reading() is None
        assert [f.fault for f in faults] == [MeterFault.OFFLINE]  # once per kind, not once per poll
        sim.meter_fault("clear")
        back = await good(meter)
        assert meter.status().fresh
        assert meter.status().faults == ()
        assert meter.reading() == back
    finally:
        meter.close()


@pytest.mark.parametrize("preset", ["sunspec", "eastron-sdm630"])
async def test_frozen_meter_goes_stale_after_the_configured_time(sim: SimProcess, preset: str) -> None:
    meter = meter_for(sim, map=preset)
    try:
        await good(meter)
        sim.meter_fault("frozen")
        frozen_at = meter.clock.monotonic()
        outcomes: list[MeterReading | MeterRefusal] = []
        deadline = time.monotonic() + 3 * FROZEN_S / SPEED + 1
        while time.monotonic() < deadline:
            outcomes.append(await meter.poll_once())
            if isinstance(outcomes[-1], MeterRefusal):
                break
            await asyncio.sleep(0.05)
        refused = outcomes[-1]
        assert isinstance(refused, MeterRefusal)
        assert refused.fault is MeterFault.FROZEN
        # not before frozen_after_s of unchanged registers (site seconds), nor much after
        assert FROZEN_S <= refused.at - frozen_at <= FROZEN_S + 1.0 * SPEED
        status = meter.status()
        assert not status.fresh
        assert meter.reading() is None
        assert status.stale_since is not None
        assert status.stale_since <= frozen_at + UPDATE_S * SPEED
        sim.meter_fault("clear")
        await asyncio.sleep(UPDATE_S * 2)
        await good(meter)
        assert meter.status().fresh
    finally:
        meter.close()


GARBAGE_FAULTS = {MeterFault.NON_FINITE, MeterFault.OUT_OF_RANGE, MeterFault.NOT_IMPLEMENTED}


@pytest.mark.parametrize("kind", ["nan", "absurd"])
@pytest.mark.parametrize(
    ("preset", "model"),
    [("sunspec", 203), ("sunspec", 213), ("eastron-sdm630", None), ("carlo-gavazzi-em24", None), ("janitza-umg", None)],
)
async def test_garbage_registers_are_refused(sim: SimProcess, kind: str, preset: str, model: int | None) -> None:
    meter = meter_for(sim, map=preset, sunspec_model=model)
    try:
        before = await good(meter)
        sim.meter_fault("garbage", kind=kind)
        await asyncio.sleep(UPDATE_S * 2)
        for _ in range(3):
            got = await meter.poll_once()
            assert isinstance(got, MeterRefusal), got
            assert got.fault in GARBAGE_FAULTS
        assert meter.status().last == before  # the last good reading stands, nothing replaced it
        assert len(meter.status().faults) == 1
    finally:
        meter.close()


async def test_counter_reset_is_refused_until_rebased(sim: SimProcess) -> None:
    meter = meter_for(sim, map="eastron-sdm630")
    try:
        before = await good(meter)
        truth = sim.meter_fault("counter_reset")
        assert truth["counter_resets"] >= 1
        assert truth["counter_kwh"] < 1.0
        await asyncio.sleep(UPDATE_S * 2)
        for _ in range(2):
            got = await meter.poll_once()
            assert isinstance(got, MeterRefusal)
            assert got.fault is MeterFault.COUNTER_BACKWARDS
        assert meter.status().last == before
        assert meter.status().counter_epoch == 0
        meter.rebase_counter()  # the operator accepts the new count
        after = await good(meter)
        assert after.counter_epoch == 1
        assert after.import_wh < 1000.0
        nxt = await good(meter)
        assert nxt.counter_epoch == 1
        assert nxt.import_wh >= after.import_wh
    finally:
        meter.close()


async def test_frequency_events_reach_the_adapter(sim: SimProcess) -> None:
    meter = meter_for(sim)
    try:
        sim.grid_event({"event": "step", "hz": 49.3})
        f = await meter.read_frequency()
        assert isinstance(f, FrequencyReading)
        assert f.hz == pytest.approx(49.3, abs=0.02)
        # a dip of 0.6 Hz lasting 40 sim s (2 wall s), read at the meter while it lasts and after
        sim.grid_event({"event": "nominal"})
        sim.grid_event({"event": "dip", "depth_hz": 0.6, "duration_s": 40.0})
        low = await meter.read_frequency()
        assert isinstance(low, FrequencyReading)
        assert low.hz == pytest.approx(49.4, abs=0.02)
        assert sim.meter_truth()["base_hz"] == pytest.approx(49.4)
        await asyncio.sleep(40.0 / SPEED + 0.2)
        high = await meter.read_frequency()
        assert isinstance(high, FrequencyReading)
        assert high.hz == pytest.approx(50.0, abs=0.02)
        # a recorded trace, t relative to now
        sim.grid_event({"event": "trace", "points": [[0, 50.0], [2, 49.8], [1000, 49.8]]})
        await asyncio.sleep(3 / SPEED + 0.1)
        r = await good(meter)
        assert r.hz == pytest.approx(49.8, abs=0.02)
    finally:
        meter.close()


async def test_background_polling_delivers_readings_and_fast_frequency(sim: SimProcess) -> None:
    readings: list[MeterReading] = []
    freqs: list[FrequencyReading] = []
    meter = meter_for(sim, poll_s=0.1, hz_poll_s=0.05)
    meter.on_reading, meter.on_frequency = readings.append, freqs.append
    meter.start()
    await asyncio.sleep(1.0)
    await meter.stop()
    assert 4 <= len(readings) <= 12  # 10 on a quiet machine: the loop keeps its period, never bursts
    assert len(freqs) >= 8
    assert all(b.import_wh >= a.import_wh for a, b in itertools.pairwise(readings))
    assert meter.reading() == readings[-1]


async def test_bad_configuration_is_refused() -> None:
    from pydantic import ValidationError

    for kw in (
        {"map": "no-such-meter"},
        {"sunspec_model": 101},
        {"poll_s": 0.0},
        {"port": 70000},
        {"stale_after_s": float("nan")},
    ):
        with pytest.raises(ValidationError):
            MeterConfig(host="127.0.0.1", bounds=MeterBounds(max_w=1e6), **kw)


def test_truth_reports_the_meter_next_to_the_miners(sim: SimProcess) -> None:
    doc = sim.truth()
    m = doc["meter"]
    assert m["it_w"] == pytest.approx(doc["site"]["power_w"], abs=1)
    assert m["non_miner_w"] == pytest.approx(m["cooling_w"] + m["base_w"] + m["losses_w"], abs=0.01)
    assert m["power_w"] == pytest.approx(m["it_w"] + m["non_miner_w"], abs=0.01)
    assert m["base_w"] == 3000.0
    assert m["address"] == METER
    assert m["energy_kwh"] > doc["site"]["energy_kwh"] - 1e-9
