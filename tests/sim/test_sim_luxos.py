"""LuxOS through unmodified pyasic over real TCP: identification, readings against the truth, profiles, sleep and
wake with the wake-up ramp, and LuxOS sessions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pyasic
import pytest
from pyasic.errors import APIError

from hashflex.sim.testing import SimProcess
from tests.sim.conftest import truth_of, wait_until

pytestmark = pytest.mark.timeout(120)
SPEED = 20.0
WAKE_S = 60.0  # 3 s of wall time at SPEED


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(
        miners=4, mix="luxos:1", base_ip="127.12.0.1", seed=3, speed=SPEED, extra_args=["--wake-s", str(WAKE_S)]
    ) as site:
        yield site


async def raw(ip: str, obj: dict[str, object]) -> Any:
    reader, writer = await asyncio.open_connection(ip, 4028)
    writer.write(json.dumps(obj).encode())
    data = await reader.read()
    writer.close()
    return json.loads(data)


async def test_pyasic_identifies_luxos_with_its_model(sim: SimProcess) -> None:
    for ip in sim.ips:
        truth = truth_of(sim, ip)
        miner = await pyasic.get_miner(ip)
        assert miner is not None
        assert type(miner).__name__.startswith("LUXMiner")
        assert miner.firmware == "LuxOS"
        assert miner.make == "AntMiner"
        assert truth["model"].lower() == ("Antminer " + str(miner.model).removesuffix(" (LuxOS)")).lower()


async def test_get_data_matches_the_truth(sim: SimProcess) -> None:
    ip = sim.ips[0]
    miner = await pyasic.get_miner(ip)
    data = await miner.get_data()
    truth = truth_of(sim, ip)
    assert truth["state"] == "hashing"
    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=0.01)
    assert data.wattage == pytest.approx(truth["power_w"], abs=2)
    assert data.wattage_limit == truth["power_limit_w"] == truth["nominal_w"]  # the default profile
    assert data.temperature_avg == pytest.approx(truth["temp_c"] - 16, abs=4)  # board temperature
    assert len(data.fans) == 4
    assert all(f.speed and f.speed > 1000 for f in data.fans)
    assert data.uptime
    assert data.uptime > 3600
    assert data.fw_ver
    assert data.api_ver == "3.7"
    assert float(data.expected_hashrate) == pytest.approx(truth["nominal_ths"], rel=0.01)
    assert [b.chips for b in data.hashboards] == [b.expected_chips for b in data.hashboards]


async def test_power_limit_takes_the_highest_profile_not_above_it(sim: SimProcess) -> None:
    ip = sim.ips[1]
    miner = await pyasic.get_miner(ip)
    profiles = (await raw(ip, {"command": "profiles"}))["PROFILES"]
    watts = sorted(p["Watts"] for p in profiles)
    assert len(watts) >= 8
    assert await miner.set_power_limit(watts[2] + 10)
    truth = truth_of(sim, ip)
    assert truth["power_limit_w"] == watts[2]
    assert truth["atm"] is True  # pyasic switched ATM off around profileset and back on
    wait_until(lambda: truth_of(sim, ip)["power_w"] < watts[2] * 1.03, 5, "power down to the profile")
    data = await miner.get_data(include=["wattage", "wattage_limit", "hashboards"])
    assert data.wattage_limit == watts[2]
    assert data.wattage == pytest.approx(truth_of(sim, ip)["power_w"], abs=2)
    assert not await miner.set_power_limit(watts[0] - 1)  # no profile that low: nothing changes
    assert truth_of(sim, ip)["power_limit_w"] == watts[2]


async def test_sleep_then_wake_follows_the_ramp(sim: SimProcess) -> None:
    ip = sim.ips[2]
    miner = await pyasic.get_miner(ip)
    full = truth_of(sim, ip)["power_w"]
    assert await miner.stop_mining()
    assert truth_of(sim, ip)["state"] == "sleeping"
    asleep = wait_until(lambda: (t := truth_of(sim, ip))["power_w"] < 60 and t, 5, "sleep draw")
    assert asleep["hashrate_ths"] == 0
    assert (await miner.get_data(include=["wattage"])).wattage == pytest.approx(asleep["power_w"], abs=2)
    assert await miner.resume_mining()
    booting = truth_of(sim, ip)
    assert booting["state"] == "waking"
    assert booting["power_w"] < 0.1 * full
    ramping = wait_until(lambda: (t := truth_of(sim, ip))["power_w"] > 0.4 * full and t, 10, "ramp")
    assert ramping["state"] == "waking"
    assert 0 < ramping["hashrate_ths"] < ramping["nominal_ths"]
    done = wait_until(lambda: (t := truth_of(sim, ip))["state"] == "hashing" and t, 10, "hashing again")
    assert done["power_w"] == pytest.approx(full, rel=0.01)


async def test_privileged_commands_need_the_session(sim: SimProcess) -> None:
    ip = sim.ips[3]
    before = truth_of(sim, ip)
    denied = await raw(ip, {"command": "curtail", "parameter": "deadbeef,sleep"})
    assert denied["STATUS"][0]["STATUS"] == "E"
    assert truth_of(sim, ip)["state"] == before["state"] == "hashing"
    session = (await raw(ip, {"command": "session"}))["SESSION"][0]["SessionID"]
    if not session:
        session = (await raw(ip, {"command": "logon"}))["SESSION"][0]["SessionID"]
    again = await raw(ip, {"command": "logon"})
    assert again["STATUS"][0]["Code"] == 402
    assert "SESSION" not in again
    assert (await raw(ip, {"command": "logoff", "parameter": session}))["STATUS"][0]["STATUS"] == "S"
    miner = await pyasic.get_miner(ip)
    with pytest.raises(APIError):
        await miner.rpc.send_command("profileset", "wrongid", "default")
    assert await miner.stop_mining()  # pyasic logs on by itself
    assert truth_of(sim, ip)["state"] == "sleeping"
    assert await miner.resume_mining()


async def test_atm_stays_within_the_profiles_atmset_bounds_it_to(sim: SimProcess) -> None:
    ip = sim.ips[0]
    session = (await raw(ip, {"command": "session"}))["SESSION"][0]["SessionID"]
    if not session:
        session = (await raw(ip, {"command": "logon"}))["SESSION"][0]["SessionID"]

    async def privileged(command: str, *args: str) -> str:
        reply = await raw(ip, {"command": command, "parameter": ",".join((session, *args))})
        return str(reply["STATUS"][0]["STATUS"])

    profiles = (await raw(ip, {"command": "profiles"}))["PROFILES"]
    names = [p["Profile Name"] for p in sorted(profiles, key=lambda p: p["Watts"])]
    watts = sorted(p["Watts"] for p in profiles)
    assert await privileged("atmset", "enabled=false") == "S"
    assert await privileged("profileset", names[5]) == "S"
    assert await privileged("atmset", "enabled=true", f"max_profile={names[5]}", f"min_profile={names[3]}") == "S"
    atm = (await raw(ip, {"command": "atm"}))["ATM"][0]
    assert (atm["Enabled"], atm["MaxProfile"], atm["MinProfile"]) == (True, names[5], names[3])
    assert await privileged("atmset", "enabled=false", "max_profile=bogus") == "E"  # an invalid value changes nothing
    assert (await raw(ip, {"command": "atm"}))["ATM"][0]["Enabled"] is True
    sim.set_faults({"mode": "atm", "ips": [ip], "interval_s": 20, "direction": "up"})  # one step a second at 20x
    try:
        await asyncio.sleep(2.5)
        assert truth_of(sim, ip)["power_limit_w"] == watts[5]  # at its max already: ATM cannot step up
        sim.set_faults({"mode": "atm", "ips": [ip], "interval_s": 20, "direction": "down"})
        wait_until(lambda: truth_of(sim, ip)["power_limit_w"] == watts[3], 5, "ATM stepping down to its min")
        await asyncio.sleep(2.5)
        assert truth_of(sim, ip)["power_limit_w"] == watts[3]  # and no further
        assert await privileged("atmset", "min_profile=", "max_profile=+0") == "S"  # relative: the default's step
        atm = (await raw(ip, {"command": "atm"}))["ATM"][0]
        assert (atm["MaxProfile"], atm["MinProfile"]) == ("default", "")
    finally:
        sim.set_faults({"mode": "clear", "ips": [ip], "modes": ["atm"]})
