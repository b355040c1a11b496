"""The facility-load adapter (drivers/facility_modbus.py) over real Modbus TCP against the simulated site's cooling
devices (sim/facility.py), and what the simulated meter makes of them.

Loopback range of this file: 127.75.2.0/24 (miners from 127.75.2.1, devices on .200-.201, the meter on .250).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from hashflex.drivers.facility_modbus import FacilityDevice, FacilityDeviceConfig, FacilityDeviceError
from hashflex.sim.testing import SimError, SimProcess

COOLED = ["127.75.2.1", "127.75.2.2"]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    loads = [
        {
            "name": "fans",
            "address": "127.75.2.200:5021",
            "kind": "drive",
            "full_kw": 2.0,
            "miners": COOLED,
            "full_scale": 16384,
        },
        {"name": "pump", "address": "127.75.2.201:5021", "kind": "relay", "full_kw": 1.0, "miners": ["127.75.2.3"]},
    ]
    meter_cfg = {"cooling_share": 0.05, "noise": 0.0, "base_kw": 0.0, "loss_share": 0.0}
    extra = ["--meter", "127.75.2.250:5020", "--meter-config", json.dumps(meter_cfg), "--facility", json.dumps(loads)]
    with SimProcess(miners=4, mix="luxos:100", base_ip="127.75.2.1", seed=5, speed=1, extra_args=extra) as s:
        yield s


def drive() -> FacilityDevice:
    return FacilityDevice(
        FacilityDeviceConfig(
            kind="drive",
            host="127.75.2.200",
            port=5021,
            setpoint_register=1,
            full_scale=16384,
            speed_register=3,
            power_register=5,
        )
    )


def relay() -> FacilityDevice:
    return FacilityDevice(
        FacilityDeviceConfig(kind="relay", host="127.75.2.201", port=5021, setpoint_register=0, power_register=5)
    )


def test_a_drive_and_a_relay_are_set_and_read_back(sim: SimProcess) -> None:
    async def go() -> None:
        fans, pump = drive(), relay()
        try:
            first = await fans.read()
            assert (first.pct, first.speed_pct, first.watts) == (100.0, 100.0, 2000.0)
            await fans.set_pct(50.0)
            await pump.set_pct(0.0)
            half, off = await fans.read(), await pump.read()
            assert half.pct == pytest.approx(50.0, abs=0.01)
            assert half.speed_pct == pytest.approx(50.0, abs=0.01)
            assert half.watts == pytest.approx(250.0, abs=1.0)  # the fan law: power goes with the speed cubed
            assert (off.pct, off.watts) == (0.0, 0.0)
        finally:
            fans.close()
            pump.close()

    asyncio.run(go())
    truth = {ld["name"]: ld for ld in sim.facility_truth()}
    assert truth["fans"]["setpoint_pct"] == pytest.approx(50.0, abs=0.01)
    assert [p for _t, p in truth["pump"]["history"]] == [100.0, 0.0]
    # the meter adds the loads, and its automatic cooling share no longer covers the miners they cool
    meter = sim.meter_truth()
    miners = {m["ip"]: m["power_w"] for m in sim.truth()["miners"]}
    uncooled_w = sum(w for ip, w in miners.items() if ip not in [*COOLED, "127.75.2.3"])
    assert meter["facility_w"] == pytest.approx(250.0, abs=1.0)
    assert meter["cooling_w"] == pytest.approx(0.05 * uncooled_w, rel=0.05)
    assert meter["power_w"] == pytest.approx(meter["it_w"] + meter["cooling_w"] + meter["facility_w"], rel=1e-6)


def test_an_offline_or_refusing_device_is_an_error_with_its_reason(sim: SimProcess) -> None:
    async def attempt() -> str:
        fans = drive()
        try:
            await fans.set_pct(70.0)
        except FacilityDeviceError as exc:
            return str(exc)
        finally:
            fans.close()
        return ""

    sim.facility_fault("fans", "offline")
    assert "cannot connect" in asyncio.run(attempt())
    sim.facility_fault("fans", "refuse")
    assert "exception reply" in asyncio.run(attempt())
    sim.facility_fault("fans", "clear")
    assert asyncio.run(attempt()) == ""
    with pytest.raises(SimError, match="no facility load"):
        sim.facility_fault("nope", "offline")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ([], "non-empty JSON list"),
        (
            [{"name": "f", "address": "10.0.0.1:502", "kind": "drive", "full_kw": 1, "miners": ["127.0.0.1"]}],
            "loopback",
        ),
        (
            [{"name": "f", "address": "127.0.0.9:502", "kind": "damper", "full_kw": 1, "miners": ["127.0.0.1"]}],
            "kind is one of",
        ),
        (
            [
                {
                    "name": "f",
                    "address": "127.0.0.9:502",
                    "kind": "drive",
                    "full_kw": float("nan"),
                    "miners": ["127.0.0.1"],
                }
            ],
            "finite",
        ),
        (
            [{"name": "f", "address": "127.0.0.9:502", "kind": "drive", "full_kw": 1, "miners": ["127.0.0.7"]}],
            "miner addresses",
        ),
    ],
)
def test_the_simulator_refuses_a_bad_facility_spec(spec: object, words: str) -> None:
    from hashflex.sim.facility import FacilitySpecError, parse

    with pytest.raises(FacilitySpecError, match=words):
        parse(spec, {"127.0.0.1"})
