"""LuxOS ATM (Advanced Thermal Management) after a limit: back on, bounded above by the profile just set
(`atmset max_profile=`), so it may step the miner down but never above what the agent set (issue 11, soak
20261207). Over TCP against the simulator through unmodified pyasic, and the refusal paths against a stub."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from hashflex.drivers.asic import PyasicDriver
from hashflex.drivers.asic.luxos import set_profile
from hashflex.drivers.asic.vendor import APIError
from hashflex.drivers.base import DriverSettings, Ok, Presets
from hashflex.sim.testing import SimProcess

pytestmark = pytest.mark.timeout(120)

BASE_IP = "127.24.0.1"  # this suite's loopback range
SETTINGS = DriverSettings(read_timeout_s=3, command_timeout_s=6, identify_timeout_s=8)


@pytest.fixture(scope="module")
def site() -> Iterator[SimProcess]:
    with SimProcess(miners=1, mix="luxos:1", base_ip=BASE_IP, seed=5) as sim:
        yield sim


def _truth(sim: SimProcess) -> dict[str, Any]:
    miner: dict[str, Any] = sim.truth()["miners"][0]
    return miner


async def test_atm_cannot_step_a_miner_above_the_limit_the_driver_set(site: SimProcess) -> None:
    driver = PyasicDriver(SETTINGS)
    ident = await driver.identify(BASE_IP)
    assert ident is not None
    assert isinstance(ident.capability, Presets)
    watts = ident.capability.watts
    handle = driver.attach(ident)
    assert isinstance(await handle.set_power(watts[4]), Ok)
    miner = handle._miner
    atm = (await miner.rpc.atm())["ATM"][0]
    assert atm["Enabled"] is True  # ATM is back on, as pyasic leaves it
    assert atm["MaxProfile"] == (await asyncio.to_thread(_truth, site))["profile"]  # bounded to the profile set
    # the simulator's ATM acts on its once-a-second tick: a step a second
    await asyncio.to_thread(site.set_faults, {"mode": "atm", "ips": [BASE_IP], "interval_s": 0.2, "direction": "up"})
    try:
        await asyncio.sleep(2.5)
        assert (await asyncio.to_thread(_truth, site))["power_limit_w"] == watts[4]  # was: 2 steps up by now
        assert isinstance(await handle.set_power(watts[6]), Ok)  # a raise moves the bound with it
        await asyncio.sleep(2.5)
        assert (await asyncio.to_thread(_truth, site))["power_limit_w"] == watts[6]
        await asyncio.to_thread(site.set_faults, {"mode": "atm", "ips": [BASE_IP], "interval_s": 0.2})
        for _ in range(50):  # down it still may
            if (await asyncio.to_thread(_truth, site))["power_limit_w"] < watts[6]:
                break
            await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(_truth, site))["power_limit_w"] < watts[6]
    finally:
        await asyncio.to_thread(site.set_faults, {"mode": "clear", "ips": [BASE_IP], "modes": ["atm"]})


class _StubRpc:
    """LuxOS RPC as pyasic's LUXMinerRPCAPI calls it, recording what was sent; refuses what it is told to."""

    ip = "127.24.9.9"

    def __init__(self, *, refuse_bounds: bool = False, refuse_profile: bool = False) -> None:
        self.refuse_bounds = refuse_bounds
        self.refuse_profile = refuse_profile
        self.sent: list[str] = []

    async def profiles(self) -> dict[str, Any]:
        return {"PROFILES": [{"Profile Name": "low", "Watts": 2000}, {"Profile Name": "default", "Watts": 3000}]}

    async def atm(self) -> dict[str, Any]:
        return {"ATM": [{"Enabled": True}]}

    async def atmset(self, **keys: Any) -> dict[str, Any]:
        self.sent.append("atmset " + ",".join(f"{k}={v}" for k, v in keys.items()))
        if self.refuse_bounds and "max_profile" in keys:
            raise APIError("atmset: Invalid key max_profile")
        return {}

    async def profileset(self, name: str) -> dict[str, Any]:
        self.sent.append(f"profileset {name}")
        if self.refuse_profile:
            raise APIError("profileset: refused")
        return {"PROFILE": [{"Profile": name}]}


class _StubMiner:
    def __init__(self, rpc: _StubRpc) -> None:
        self.rpc = rpc


async def test_firmware_without_atm_bounds_gets_atm_back_on_unbounded() -> None:
    rpc = _StubRpc(refuse_bounds=True)
    assert await set_profile(_StubMiner(rpc), 2500) is True  # the limit took; ATM is not left off
    assert rpc.sent == [
        "atmset enabled=False",
        "profileset low",
        "atmset enabled=True,max_profile=low",
        "atmset enabled=True",
    ]


async def test_a_refused_profile_still_gets_atm_back_on() -> None:
    rpc = _StubRpc(refuse_profile=True)
    with pytest.raises(APIError):
        await set_profile(_StubMiner(rpc), 3000)
    assert rpc.sent == ["atmset enabled=False", "profileset default", "atmset enabled=True,max_profile=default"]


async def test_below_every_profile_nothing_is_sent() -> None:
    rpc = _StubRpc()
    assert await set_profile(_StubMiner(rpc), 1999) is False
    assert rpc.sent == []
