"""Fleet telemetry against the simulated site over real TCP (unmodified pyasic): discovery and the identity
cache, the site picture against the simulator's truth, reachability transitions and their log lines,
estimates that are never zero, and re-identification after repeated failures."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from hashflex.agent.config import LoggingConfig
from hashflex.agent.core.snapshot import reading_hint as state_hint
from hashflex.agent.logging import configure_logging
from hashflex.agent.runtime.fleet import DiscoverProgress, Fleet, estimate_power_w
from hashflex.drivers.asic import PyasicDriver
from hashflex.drivers.base import DriverSettings, Family, Identity, MinerDriver, OnOff, Presets, Reading
from hashflex.sim.testing import SimProcess

pytestmark = pytest.mark.timeout(180)

BASE_IP = "127.21.0.1"  # this suite's loopback range (127.20-127.29)
SETTINGS = DriverSettings(read_timeout_s=2, command_timeout_s=4, identify_timeout_s=8)


@pytest.fixture(scope="module")
def site() -> Iterator[SimProcess]:
    with SimProcess(miners=30, base_ip=BASE_IP, seed=5, speed=30.0) as sim:
        yield sim


@pytest.fixture(scope="module")
def identities(site: SimProcess) -> list[Identity]:
    async def run() -> list[Identity]:
        return await Fleet(PyasicDriver(SETTINGS)).discover(site.ips)

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def _no_faults_left(site: SimProcess) -> Iterator[None]:
    yield
    site.set_faults({"mode": "clear"})


@pytest.fixture(autouse=True)
def _info_logging() -> None:
    """The log lines these tests read are at info: logging as the agent configures it by default, whatever an
    earlier test in this process left (the closed-loop harness quiets it; under xdist any file may run before)."""
    configure_logging(LoggingConfig(), force_json=True, stream=io.StringIO())


class CountingDriver:
    """The real driver, counting identifications (to prove a restart does none)."""

    name = "counting"

    def __init__(self, inner: MinerDriver) -> None:
        self.inner, self.identified = inner, 0

    async def identify(self, ip: str) -> Identity | None:
        self.identified += 1
        return await self.inner.identify(ip)

    def attach(self, identity: Identity) -> Any:
        return self.inner.attach(identity)


def fleet_for(identities: list[Identity], **kw: Any) -> tuple[Fleet, CountingDriver]:
    driver = CountingDriver(PyasicDriver(SETTINGS))
    fleet = Fleet(driver, read_timeout_s=2.0, **kw)
    fleet.attach_all(identities)
    return fleet, driver


# ---------------------------------------------------------------------------------------------- discovery
async def test_discover_reports_progress_and_hands_every_identity_to_the_hook(site: SimProcess) -> None:
    fleet = Fleet(PyasicDriver(SETTINGS), identify_concurrency=8)
    saved: list[list[Identity]] = []
    fleet.on_identified = saved.append
    seen: list[DiscoverProgress] = []
    nothing_there = "127.21.200.1-127.21.200.4"
    found = await fleet.discover([f"{BASE_IP}-{site.ips[-1]}", nothing_there], seen.append)
    assert [i.ip for i in found] == site.ips
    assert len(saved) == 1
    assert saved[0] == found  # one batch, for the store
    assert len(fleet) == len(site.ips)
    assert [p.done for p in seen] == list(range(1, len(site.ips) + 5))
    assert seen[-1].found == len(site.ips)
    assert seen[-1].total == len(site.ips) + 4
    families = {i.family for i in found}
    assert families == {Family.LUXOS, Family.WHATSMINER, Family.ANTMINER}


async def test_restart_attaches_saved_identities_and_sweeps_without_identifying(
    site: SimProcess, identities: list[Identity]
) -> None:
    fleet, driver = fleet_for(identities)
    snap = await fleet.sweep()
    assert driver.identified == 0
    assert snap.unreachable == 0
    assert set(snap.miners) == set(site.ips)


# ---------------------------------------------------------------------------------------------- the picture
async def test_site_picture_matches_the_truth(site: SimProcess, identities: list[Identity]) -> None:
    fleet, _ = fleet_for(identities)
    snap = await fleet.sweep()
    truth = {m["ip"]: m for m in (await asyncio.to_thread(site.truth))["miners"]}
    for ip, ms in snap.miners.items():
        assert ms.reachable
        assert ms.failures == 0
        assert ms.age_s is not None
        assert ms.age_s < 5
        assert ms.power_w > 0
        if ms.identity.reports_power:
            assert ms.measured
            assert ms.power_w == pytest.approx(truth[ip]["power_w"], rel=0.1)
        else:  # stock Antminer: estimated from nominal while hashing
            assert not ms.measured
            assert ms.power_w == ms.identity.nominal_w
        assert ms.state_hint == ("hashing" if truth[ip]["state"] == "hashing" else ms.state_hint)
    assert snap.power_w == pytest.approx((await asyncio.to_thread(site.truth))["site"]["power_w"], rel=0.1)
    assert snap.unreachable_share == 0.0
    assert snap.sweep_s > 0


async def test_unreachable_miners_are_flagged_estimated_never_zero_and_logged_once(
    site: SimProcess, identities: list[Identity]
) -> None:
    fleet, _ = fleet_for(identities)
    await fleet.sweep()  # last known power for everyone
    before = fleet.latest()
    dead = [site.ips[0], site.ips[1], site.ips[2]]
    await asyncio.to_thread(site.set_faults, {"mode": "refuse", "ips": dead})
    with structlog.testing.capture_logs() as logs:
        first = await fleet.sweep()
        second = await fleet.sweep()
    for ip in dead:
        for snap in (first, second):
            ms = snap.miners[ip]
            assert not ms.reachable
            assert not ms.measured
            assert ms.power_w > 0  # unknown is never zero
            assert ms.state_hint == "unknown"
            expected = before.miners[ip].power_w if ms.identity.reports_power else ms.identity.nominal_w
            assert ms.power_w == pytest.approx(expected)  # the last known, else nominal
        assert second.miners[ip].failures == 2
    assert first.unreachable_share == pytest.approx(3 / len(site.ips))
    warnings = [e for e in logs if e["event"] == "miner_unreachable"]
    assert sorted(e["ip"] for e in warnings) == sorted(dead)  # once each, not once per sweep
    assert all(e["log_level"] == "warning" for e in warnings)
    sweeps = [e for e in logs if e["event"] == "sweep"]
    assert len(sweeps) == 2  # one summary line per sweep
    assert sweeps[0]["unreachable"] == 3

    await asyncio.to_thread(site.set_faults, {"mode": "clear"})
    with structlog.testing.capture_logs() as logs:
        back = await fleet.sweep()
        await fleet.sweep()
    assert all(back.miners[ip].reachable for ip in dead)
    recovered = [e for e in logs if e["event"] == "miner_recovered"]
    assert sorted(e["ip"] for e in recovered) == sorted(dead)
    assert all(e["log_level"] == "info" and e["after_failures"] == 2 for e in recovered)


async def test_a_blackholed_miner_costs_one_deadline_not_the_sweep(
    site: SimProcess, identities: list[Identity]
) -> None:
    fleet, _ = fleet_for(identities, concurrency=4)
    await asyncio.to_thread(site.set_faults, {"mode": "blackhole", "ips": site.ips[:4]})
    snap = await fleet.sweep()
    # 4 slots, all four taken by blackholed miners for one 2 s deadline; the other 26 still get read
    assert snap.sweep_s < 2 * 2.0 + 3.0
    assert snap.unreachable == 4
    assert all(not snap.miners[ip].reachable for ip in site.ips[:4])
    assert all(snap.miners[ip].reachable for ip in site.ips[4:])


async def test_pyasic_does_not_spam_the_root_logger_during_sweeps(site: SimProcess, identities: list[Identity]) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler, level = Keep(level=logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        fleet, _ = fleet_for(identities)
        await asyncio.to_thread(
            site.set_faults, [{"mode": "refuse", "ips": site.ips[:3]}, {"mode": "blackhole", "ips": site.ips[3:5]}]
        )
        for _ in range(3):
            await fleet.sweep()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    pyasic_lines = [r for r in records if "/pyasic/" in r.pathname]
    assert pyasic_lines == [], [r.getMessage() for r in pyasic_lines[:5]]


async def test_repeated_failures_lead_to_reidentification(site: SimProcess, identities: list[Identity]) -> None:
    # the cache says LuxOS, but the miner at that address now runs other firmware (swapped, reflashed)
    real = next(i for i in identities if i.family is Family.WHATSMINER)
    stale = Identity(
        ip=real.ip,
        family=Family.LUXOS,
        make="AntMiner",
        model="S19 Pro",
        firmware="2024.1.1",
        driver_class="LUXMinerS19Pro",
        capability=Presets((2000, 3000)),
        nominal_w=3250.0,
        nominal_ths=110.0,
    )
    fleet, driver = fleet_for([stale], reidentify_after_failures=2)
    saved: list[Identity] = []
    fleet.on_identified = saved.extend
    await fleet.sweep()
    assert driver.identified == 0
    await fleet.sweep()  # second failure in a row: identify again, in the background
    for _ in range(100):
        if saved:
            break
        await asyncio.sleep(0.05)
    assert driver.identified == 1
    assert saved == [real]
    assert fleet.identities() == [real]
    snap = await fleet.sweep()
    assert snap.miners[real.ip].reachable
    assert snap.miners[real.ip].identity == real
    await fleet.aclose()


# ---------------------------------------------------------------------------------------------- estimates
def _ident(reports_power: bool = True) -> Identity:
    return Identity(
        ip="127.21.250.1",
        family=Family.ANTMINER if not reports_power else Family.LUXOS,
        make="x",
        model="y",
        firmware="z",
        driver_class="c",
        capability=OnOff(),
        nominal_w=3000.0,
        nominal_ths=100.0,
        reports_power=reports_power,
    )


def _reading(power: float | None, mining: bool | None, ths: float | None = None) -> Reading:
    return Reading(ts=0.0, power_w=power, hashrate_ths=ths, mining=mining, power_limit_w=None)


def test_estimate_is_last_known_then_nominal_and_never_zero() -> None:
    assert estimate_power_w(_ident(), None, 2500.0) == 2500.0
    assert estimate_power_w(_ident(), None, None) == 3000.0
    assert estimate_power_w(_ident(), None, 0.0) == 3000.0  # a last report of zero is no reason to assume zero
    assert estimate_power_w(_ident(reports_power=False), _reading(None, True), None) == 3000.0
    standby = estimate_power_w(_ident(reports_power=False), _reading(None, False), None)
    assert 0 < standby < 100
    no_nominal = dataclasses.replace(_ident(), nominal_w=0.0)  # a bad catalogue entry must not make it zero
    assert estimate_power_w(no_nominal, None, None) > 0


def test_state_hints() -> None:
    ident = _ident()
    assert state_hint(ident, None, 3000.0) == "unknown"
    assert state_hint(ident, _reading(3000.0, True, 100.0), 3000.0) == "hashing"
    assert state_hint(ident, _reading(20.0, False, 0.0), 20.0) == "sleeping"
    assert state_hint(ident, _reading(1500.0, False, 0.0), 1500.0) == "waking"
    assert state_hint(ident, _reading(1500.0, None), 1500.0) == "unknown"
