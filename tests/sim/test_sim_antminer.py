"""Stock Antminer through unmodified pyasic: identification via the digest-protected web UI, readings (and no
wattage), sleep / normal / low-power work modes, and digest auth refusing a wrong password."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pyasic
import pytest
from pyasic.config import MinerConfig
from pyasic.config.mining import MiningModeConfig

from hashflex.sim.testing import SimProcess
from tests.sim.conftest import truth_of, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(
        miners=4, mix="antminer:1", base_ip="127.14.0.1", seed=9, speed=20.0, extra_args=["--wake-s", "60"]
    ) as site:
        yield site


async def test_pyasic_identifies_stock_antminers(sim: SimProcess) -> None:
    for ip in sim.ips:
        truth = truth_of(sim, ip)
        miner = await pyasic.get_miner(ip)
        assert miner is not None
        assert "AntminerModern" in [c.__name__ for c in type(miner).__mro__]
        assert miner.firmware == "Stock"
        assert truth["model"].lower() == ("Antminer " + str(miner.model).removesuffix(" (Stock)")).lower()
        assert truth["power_limit_w"] is None


async def test_get_data_matches_the_truth_without_wattage(sim: SimProcess) -> None:
    ip = sim.ips[0]
    miner = await pyasic.get_miner(ip)
    data = await miner.get_data()
    truth = truth_of(sim, ip)
    assert data.wattage is None
    assert data.wattage_limit is None
    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=0.01)
    assert data.is_mining is True
    assert data.mac == truth["mac"]
    assert data.serial_number == truth["serial"]
    assert data.uptime
    assert data.uptime > 3600
    assert [f.speed for f in data.fans]
    assert all(f.speed for f in data.fans)
    assert data.errors == []
    assert [b.chips for b in data.hashboards] == [b.expected_chips for b in data.hashboards]
    assert data.temperature_avg
    assert data.temperature_avg > 40


async def test_sleep_low_power_and_normal_modes(sim: SimProcess) -> None:
    ip = sim.ips[1]
    miner = await pyasic.get_miner(ip)
    full = truth_of(sim, ip)["power_w"]
    assert not await miner.set_power_limit(2000)  # no such thing on stock firmware
    assert await miner.stop_mining()
    assert truth_of(sim, ip)["state"] == "sleeping"
    assert truth_of(sim, ip)["mode"] == "sleep"
    assert (await miner.get_data(include=["is_mining"])).is_mining is False
    wait_until(lambda: truth_of(sim, ip)["power_w"] < 60, 5, "sleep draw")
    assert await miner.resume_mining()
    assert truth_of(sim, ip)["state"] == "waking"
    wait_until(lambda: truth_of(sim, ip)["state"] == "hashing", 10, "hashing")
    await miner.send_config(MinerConfig(mining_mode=MiningModeConfig.low()))
    assert truth_of(sim, ip)["mode"] == "low"
    low = wait_until(lambda: (t := truth_of(sim, ip))["power_w"] < 0.8 * full and t, 5, "low power")
    assert low["power_w"] == pytest.approx(0.78 * full, rel=0.02)


async def test_digest_auth_refuses_a_wrong_password(sim: SimProcess) -> None:
    ip = sim.ips[2]
    miner = await pyasic.get_miner(ip)
    miner.web.pwd = "wrong"
    reply = await miner.web.set_miner_conf({"miner-mode": 1})
    assert reply.get("success") is False
    assert truth_of(sim, ip)["state"] == "hashing"
    async with httpx.AsyncClient() as client:
        plain = await client.get(f"http://{ip}/cgi-bin/get_system_info.cgi")
        assert plain.status_code == 401
        assert 'realm="antMiner Configuration"' in plain.headers["www-authenticate"]
        bad = await client.get(f"http://{ip}/cgi-bin/get_system_info.cgi", auth=httpx.DigestAuth("root", "x"))
        assert bad.status_code == 401
        good = await client.get(f"http://{ip}/cgi-bin/get_system_info.cgi", auth=httpx.DigestAuth("root", "root"))
        assert good.status_code == 200
        assert good.json()["minertype"] == truth_of(sim, ip)["model"]
