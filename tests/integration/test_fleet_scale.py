"""A 1,000-miner simulated site with 10 % unreachable and 10 % slow miners: identification is bounded and
complete, the telemetry sweep finishes in bounded time, the unreachable miners are flagged and estimated."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from hashflex.agent.runtime.fleet import Fleet
from hashflex.drivers.asic import PyasicDriver
from hashflex.drivers.base import DriverSettings
from hashflex.sim.testing import SimProcess

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

BASE_IP = "127.22.0.1"  # this suite's loopback range (127.20-127.29)
MINERS = 1000
READ_TIMEOUT_S = 3.0
CONCURRENCY = 200


@pytest.fixture(scope="module")
def site() -> Iterator[SimProcess]:
    with SimProcess(miners=MINERS, base_ip=BASE_IP, seed=21) as sim:
        yield sim


async def test_thousand_miner_site_with_unreachable_and_slow_miners(site: SimProcess) -> None:
    settings = DriverSettings(read_timeout_s=READ_TIMEOUT_S, identify_timeout_s=20, identify_concurrency=128)
    driver = PyasicDriver(settings)
    fleet = Fleet(driver, concurrency=CONCURRENCY, read_timeout_s=READ_TIMEOUT_S)

    # 1,000 identifications started at once: the driver lets 128 through at a time (pyasic alone bounds
    # nothing, and past ~700 concurrent get_miner calls none succeed)
    found = await asyncio.gather(*(driver.identify(ip) for ip in site.ips))
    assert all(i is not None for i in found)
    assert fleet.attach_all(i for i in found if i is not None) == MINERS

    # 10 % refuse connections, 10 % answer slowly: half of those within the deadline (a stock Antminer read
    # is ~4 HTTP round trips, so 300 ms each still fits 3 s), half far too late
    faults = [
        {"mode": "refuse", "share": 0.1, "seed": 1},
        {"mode": "slow", "count": 50, "seed": 2, "min_ms": 50, "max_ms": 300},
        {"mode": "slow", "count": 50, "seed": 3, "min_ms": 5000, "max_ms": 8000},
    ]
    await asyncio.to_thread(site.set_faults, faults)
    truth = await asyncio.to_thread(site.truth)
    dead = {m["ip"] for m in truth["miners"] if "refuse" in m["faults"]}
    slow = {m["ip"] for m in truth["miners"] if "slow" in m["faults"]}
    assert len(dead) == 100
    assert len(slow) >= 90  # two draws of 50 may overlap a little

    snap = await fleet.sweep()
    # the bound: ceil(N / concurrency) rounds of at most one deadline each, far less in practice
    bound = -(-MINERS // CONCURRENCY) * READ_TIMEOUT_S + 2.0
    assert snap.sweep_s < bound, f"sweep took {snap.sweep_s:.1f} s, bound {bound:.1f} s"
    unreachable = {ip for ip, m in snap.miners.items() if not m.reachable}
    assert dead <= unreachable  # every refused one is flagged
    assert unreachable <= dead | slow  # and nothing that answers in time
    too_slow = unreachable - dead
    assert 25 <= len(too_slow) <= 50  # the late half of the slow ones (minus overlaps with the refused)
    assert snap.unreachable_share == pytest.approx(len(unreachable) / MINERS)
    assert all(snap.miners[ip].reachable for ip in slow - unreachable)  # merely slow ones are read
    for ip in unreachable:
        ms = snap.miners[ip]
        assert not ms.measured
        assert ms.power_w >= 0.5 * ms.identity.nominal_w  # estimated at nominal (never read): never zero
        assert ms.state_hint == "unknown"
    assert snap.power_w_estimated >= sum(snap.miners[ip].power_w for ip in unreachable)
    # the picture as a whole is close to the truth: estimates at nominal for the unknown ones
    assert snap.power_w == pytest.approx(truth["site"]["power_w"], rel=0.15)
