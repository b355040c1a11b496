"""Whatsminer (API v3 firmware) through unmodified pyasic: identified as BTMinerV3 thanks to the 4028 stubs,
readings against the truth, a continuous power limit in watts, power off/on, and the v3 token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pyasic
import pytest

from hashflex.sim.families.whatsminer import v3_token
from hashflex.sim.testing import SimProcess
from tests.sim.conftest import truth_of, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(
        miners=4, mix="whatsminer:1", base_ip="127.13.0.1", seed=5, speed=20.0, extra_args=["--wake-s", "60"]
    ) as site:
        yield site


async def v3(ip: str, obj: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(ip, 4433)
    body = json.dumps(obj).encode()
    writer.write(len(body).to_bytes(4, "little") + body)
    n = int.from_bytes(await reader.readexactly(4), "little")
    reply: dict[str, Any] = json.loads(await reader.readexactly(n))
    writer.close()
    return reply


async def test_pyasic_picks_the_v3_backend_and_the_model(sim: SimProcess) -> None:
    for ip in sim.ips:
        truth = truth_of(sim, ip)
        miner = await pyasic.get_miner(ip)
        assert miner is not None
        assert "BTMinerV3" in [c.__name__ for c in type(miner).__mro__]
        assert miner.make == "WhatsMiner"
        assert str(miner.model).startswith(truth["model"] + " V")


async def test_get_data_matches_the_truth(sim: SimProcess) -> None:
    ip = sim.ips[0]
    miner = await pyasic.get_miner(ip)
    data = await miner.get_data()
    truth = truth_of(sim, ip)
    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=0.01)
    assert data.wattage == pytest.approx(truth["power_w"], abs=2)
    assert data.wattage_limit == truth["power_limit_w"]
    assert data.mac == truth["mac"]
    assert data.serial_number
    assert truth["serial"] in data.serial_number
    assert data.fw_ver
    assert data.fw_ver.startswith("2025")
    assert data.uptime
    assert data.uptime > 3600
    assert [f.speed for f in data.fans]
    assert all(f.speed for f in data.fans)
    assert len(data.hashboards) == 3
    assert sum(float(b.hashrate) for b in data.hashboards) == pytest.approx(truth["hashrate_ths"], rel=0.02)
    assert data.errors == []


async def test_power_limit_is_applied_in_watts_and_out_of_range_refused(sim: SimProcess) -> None:
    ip = sim.ips[1]
    miner = await pyasic.get_miner(ip)
    assert await miner.set_power_limit(2200)
    assert truth_of(sim, ip)["power_limit_w"] == 2200
    t = wait_until(lambda: (t := truth_of(sim, ip))["power_w"] < 2200 * 1.03 and t, 5, "power under the limit")
    assert (await miner.get_data(include=["wattage_limit"])).wattage_limit == 2200
    assert t["hashrate_ths"] < t["nominal_ths"] * 0.85
    # the firmware refuses a limit below the model's floor (pyasic does not check the reply)
    reply = await miner.rpc.send_command("set.miner.power_limit", parameters=500)
    assert reply["code"] == -2
    assert truth_of(sim, ip)["power_limit_w"] == 2200


async def test_power_off_and_on(sim: SimProcess) -> None:
    ip = sim.ips[2]
    miner = await pyasic.get_miner(ip)
    assert await miner.stop_mining()
    assert truth_of(sim, ip)["state"] == "sleeping"
    wait_until(lambda: truth_of(sim, ip)["power_w"] < 60, 5, "standby draw")
    data = await miner.get_data(include=["hashrate", "wattage"])
    assert float(data.hashrate) == 0
    assert await miner.resume_mining()
    assert truth_of(sim, ip)["state"] == "waking"
    wait_until(lambda: truth_of(sim, ip)["state"] == "hashing", 10, "hashing again")


async def test_a_wrong_password_or_stale_token_is_refused(sim: SimProcess) -> None:
    ip = sim.ips[3]
    miner = await pyasic.get_miner(ip)
    miner.rpc.pwd = "not-the-password"
    assert not await miner.stop_mining()
    assert truth_of(sim, ip)["state"] == "hashing"
    salt = (await v3(ip, {"cmd": "get.device.info", "param": "salt"}))["msg"]["salt"]
    cmd = "set.miner.service"
    stale = int(time.time()) - 3600
    reply = await v3(
        ip, {"cmd": cmd, "param": "stop", "ts": stale, "account": "super", "token": v3_token(cmd, "super", salt, stale)}
    )
    assert reply["code"] == -1
    now = int(time.time())
    reply = await v3(
        ip, {"cmd": cmd, "param": "stop", "ts": now, "account": "super", "token": v3_token(cmd, "super", salt, now)}
    )
    assert reply["code"] == 0
    assert reply["msg"] == "ok"
    assert truth_of(sim, ip)["state"] == "sleeping"
