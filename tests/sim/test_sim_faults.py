"""Every fault mode, switched on and off while the site runs, is observable through pyasic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pyasic
import pytest
from pyasic.errors import APIError

from hashflex.sim.testing import SimError, SimProcess
from tests.sim.conftest import ips_of, truth_of, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(
        miners=12,
        mix="luxos:1,whatsminer:1,antminer:1",
        base_ip="127.15.0.1",
        seed=13,
        speed=20.0,
        extra_args=["--wake-s", "40", "--reboot-s", "40"],
    ) as site:
        yield site


@pytest.fixture(autouse=True)
def clean(sim: SimProcess) -> Iterator[None]:
    yield
    sim.clear_faults()


async def test_refused_miners_are_unreachable_until_cleared(sim: SimProcess) -> None:
    ip = ips_of(sim, "whatsminer")[0]
    miner = await pyasic.get_miner(ip)
    reply = sim.set_faults({"mode": "refuse", "ips": [ip]})
    assert reply["active"] == {"refuse": [ip]}
    assert await pyasic.get_miner(ip) is None
    assert (await miner.get_data(include=["wattage"])).wattage is None
    truth = truth_of(sim, ip)
    assert truth["reachable"] is False
    assert truth["state"] == "hashing"
    sim.set_faults({"mode": "clear", "ips": [ip], "modes": ["refuse"]})
    assert (await miner.get_data(include=["wattage"])).wattage == pytest.approx(truth_of(sim, ip)["power_w"], abs=3)


async def test_blackholed_miners_accept_and_never_answer(sim: SimProcess) -> None:
    ip = ips_of(sim, "luxos")[0]
    miner = await pyasic.get_miner(ip)
    sim.set_faults({"mode": "blackhole", "ips": [ip]})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(miner.get_data(include=["wattage"]), 1.0)
    reader, writer = await asyncio.open_connection(ip, 4028)  # accepted: no quick refusal either
    writer.write(b'{"command":"version"}')
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(), 0.5)
    writer.close()
    assert truth_of(sim, ip)["reachable"] is False


async def test_slow_miners_answer_after_the_latency(sim: SimProcess) -> None:
    ip = ips_of(sim, "antminer")[0]
    miner = await pyasic.get_miner(ip)
    sim.set_faults({"mode": "slow", "ips": [ip], "min_ms": 400, "max_ms": 500})
    t0 = time.perf_counter()
    data = await miner.get_data(include=["hashrate"])
    assert time.perf_counter() - t0 >= 0.4
    assert float(data.hashrate) == pytest.approx(truth_of(sim, ip)["hashrate_ths"], rel=0.01)


async def test_error_replies_in_each_firmware_shape(sim: SimProcess) -> None:
    lux, wm, am = ips_of(sim, "luxos")[1], ips_of(sim, "whatsminer")[1], ips_of(sim, "antminer")[1]
    miners = {ip: await pyasic.get_miner(ip) for ip in (lux, wm, am)}
    sim.set_faults({"mode": "error", "ips": [lux, wm, am]})
    with pytest.raises(APIError):
        await miners[lux].rpc.power()
    assert (await miners[wm].rpc.get_miner_status_summary())["code"] != 0
    with pytest.raises(APIError):  # pyasic chokes on the firmware's string `msg` in an error reply
        await miners[wm].get_data(include=["wattage"])
    assert (await miners[am].web.get_miner_conf()).get("success") is False
    with pytest.raises(APIError):
        await miners[am].rpc.summary()
    # identification degrades: the error still names LUXminer, but no model comes back
    assert type(await pyasic.get_miner(lux)).__name__ == "LUXMiner"


async def test_ignored_commands_are_acknowledged_but_not_applied(sim: SimProcess) -> None:
    ips = [ips_of(sim, fam)[2] for fam in ("luxos", "whatsminer", "antminer")]
    miners = [await pyasic.get_miner(ip) for ip in ips]
    sim.set_faults({"mode": "ignore", "ips": ips})
    for ip, miner in zip(ips, miners, strict=True):
        assert await miner.stop_mining(), ip
        assert truth_of(sim, ip)["state"] == "hashing", ip
    assert await miners[1].set_power_limit(2000)
    assert truth_of(sim, ips[1])["power_limit_w"] != 2000


async def test_reboot_goes_offline_then_back_at_defaults(sim: SimProcess) -> None:
    ip = ips_of(sim, "luxos")[2]
    miner = await pyasic.get_miner(ip)
    nominal = truth_of(sim, ip)["nominal_w"]
    assert await miner.set_power_limit(int(nominal * 0.7))
    assert truth_of(sim, ip)["power_limit_w"] < nominal
    sim.set_faults({"mode": "reboot", "ips": [ip], "duration_s": 40})
    off = wait_until(lambda: (t := truth_of(sim, ip))["state"] == "offline" and t, 2, "offline")
    wait_until(lambda: truth_of(sim, ip)["power_w"] == 0, 2, "no draw")
    assert off["reachable"] is False
    assert await pyasic.get_miner(ip) is None
    back = wait_until(lambda: (t := truth_of(sim, ip))["state"] == "waking" and t["reachable"] and t, 6, "booting")
    assert back["power_limit_w"] == nominal
    assert back["profile"] == "default"
    fresh = await pyasic.get_miner(ip)
    assert fresh is not None
    assert (await fresh.get_data(include=["wattage_limit"])).wattage_limit == nominal
    wait_until(lambda: truth_of(sim, ip)["state"] == "hashing", 6, "hashing after boot")


async def test_a_luxos_session_held_by_another_client_blocks_control(sim: SimProcess) -> None:
    ip = ips_of(sim, "luxos")[3]
    miner = await pyasic.get_miner(ip)
    sim.set_faults({"mode": "session_held", "ips": [ip]})
    assert not await miner.stop_mining()
    with pytest.raises(APIError):
        await miner.set_power_limit(2000)
    assert truth_of(sim, ip)["state"] == "hashing"
    sim.set_faults({"mode": "clear", "ips": [ip]})
    assert await (await pyasic.get_miner(ip)).stop_mining()
    assert truth_of(sim, ip)["state"] == "sleeping"


async def test_thermal_management_moves_the_luxos_profile_by_itself(sim: SimProcess) -> None:
    ip = ips_of(sim, "luxos")[0]
    miner = await pyasic.get_miner(ip)
    first = (await miner.get_data(include=["wattage_limit"])).wattage_limit
    sim.set_faults({"mode": "atm", "ips": [ip], "interval_s": 20})  # one step a second at 20x
    wait_until(lambda: truth_of(sim, ip)["power_limit_w"] < first, 5, "ATM stepping down")
    await asyncio.sleep(1.5)
    second = (await miner.get_data(include=["wattage_limit"])).wattage_limit
    assert second is not None
    assert first is not None
    assert second < first
    sim.set_faults({"mode": "clear", "ips": [ip], "modes": ["atm"]})
    settled = truth_of(sim, ip)["power_limit_w"]
    await asyncio.sleep(1.5)
    assert truth_of(sim, ip)["power_limit_w"] == settled


async def test_drifting_miners_draw_above_their_limit(sim: SimProcess) -> None:
    ip = ips_of(sim, "whatsminer")[3]
    miner = await pyasic.get_miner(ip)
    assert await miner.set_power_limit(2500)
    wait_until(lambda: truth_of(sim, ip)["power_w"] < 2500 * 1.03, 5, "power down to the limit")
    sim.set_faults({"mode": "drift", "ips": [ip], "pct": 10})
    wait_until(lambda: truth_of(sim, ip)["power_w"] > 2500 * 1.06, 5, "drift above the limit")
    await asyncio.sleep(0.5)  # 10 s of sim time: the drift ramp (5 s) is over
    truth = truth_of(sim, ip)
    data = await miner.get_data(include=["wattage", "wattage_limit"])
    assert data.wattage_limit == 2500
    assert data.wattage == pytest.approx(truth["power_w"], abs=3)


def test_faults_given_at_start_are_active_from_the_first_request() -> None:
    spec = [{"mode": "refuse", "count": 1, "family": "antminer"}, {"mode": "drift", "pct": 5, "share": 1.0}]
    with SimProcess(miners=3, mix="antminer:1", base_ip="127.15.1.1", seed=2, faults=spec) as site:
        miners = site.truth()["miners"]
        assert sum(not m["reachable"] for m in miners) == 1
        assert all("drift" in m["faults"] for m in miners)
        with pytest.raises(SimError, match="400"):
            site.set_faults({"mode": "refuse", "count": 99})
        assert sum(not m["reachable"] for m in site.truth()["miners"]) == 1  # the bad spec changed nothing


async def test_every_family_reboots_to_its_factory_settings(sim: SimProcess) -> None:
    wm, am = ips_of(sim, "whatsminer")[2], ips_of(sim, "antminer")[3]
    wm_miner, am_miner = await pyasic.get_miner(wm), await pyasic.get_miner(am)
    assert await wm_miner.set_power_limit(2000)
    assert await am_miner.stop_mining()
    assert truth_of(sim, am)["mode"] == "sleep"
    sim.set_faults({"mode": "reboot", "ips": [wm, am], "duration_s": 20})
    wait_until(lambda: all(truth_of(sim, ip)["state"] == "waking" for ip in (wm, am)), 6, "both booting")
    assert truth_of(sim, wm)["power_limit_w"] == truth_of(sim, wm)["nominal_w"]
    assert truth_of(sim, am)["mode"] == "normal"
    assert (await am_miner.get_data(include=["is_mining"])).is_mining is True
