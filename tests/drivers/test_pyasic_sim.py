"""PyasicDriver against the simulated site over real TCP, through unmodified pyasic: identification and its
cache, capability per family, telemetry against the simulator's truth, and control calls that change it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from hashflex.agent.core.model import Change, Op
from hashflex.agent.runtime.actuator import Actuator
from hashflex.drivers.asic import SLOW_FIELDS_EVERY, PyasicDriver, build_miner
from hashflex.drivers.base import (
    DriverSettings,
    Failed,
    Family,
    Identity,
    Ok,
    OnOff,
    PowerRange,
    Presets,
    ProtocolError,
    Unreachable,
    Unsupported,
    wakes_at_limit,
)
from hashflex.sim.testing import SimProcess
from tests.drivers.rawminers import whatsminer_v3_only

pytestmark = pytest.mark.timeout(180)

BASE_IP = "127.20.0.1"  # this suite's loopback range
SETTINGS = DriverSettings(read_timeout_s=3, command_timeout_s=6, identify_timeout_s=8)


@pytest.fixture(scope="module")
def site() -> Iterator[SimProcess]:
    with SimProcess(miners=12, mix="luxos:34,whatsminer:33,antminer:33", base_ip=BASE_IP, seed=11) as sim:
        yield sim


def truth_of(sim: SimProcess, ip: str) -> dict[str, Any]:
    return next(m for m in sim.truth()["miners"] if m["ip"] == ip)


async def atruth(sim: SimProcess, ip: str) -> dict[str, Any]:
    return await asyncio.to_thread(truth_of, sim, ip)


def ips_of(sim: SimProcess, family: str) -> list[str]:
    return [m["ip"] for m in sim.truth()["miners"] if m["family"] == family]


@pytest.fixture(scope="module")
def identities(site: SimProcess) -> dict[str, Identity]:
    async def run() -> dict[str, Identity]:
        driver = PyasicDriver(SETTINGS)
        found = await asyncio.gather(*(driver.identify(ip) for ip in site.ips))
        return {i.ip: i for i in found if i is not None}

    return asyncio.run(run())


def test_every_simulated_miner_is_identified_with_its_family_and_model(
    site: SimProcess, identities: dict[str, Identity]
) -> None:
    truth = {m["ip"]: m for m in site.truth()["miners"]}
    assert set(identities) == set(truth)
    for ip, ident in identities.items():
        assert ident.family == Family(truth[ip]["family"]), ip
        assert truth[ip]["model"].replace(" ", "").lower() in ident.model.replace(" ", "").lower() or (
            ident.model.replace(" ", "").lower() in truth[ip]["model"].replace(" ", "").lower()
        ), (ident.model, truth[ip]["model"])
        assert ident.nominal_w > 0
        assert ident.driver_class  # the pyasic class, to rebuild it without I/O
        build_miner(ident.driver_class, ip)


@pytest.mark.parametrize("family", ["luxos", "whatsminer", "antminer"])
def test_capability_per_family(site: SimProcess, identities: dict[str, Identity], family: str) -> None:
    for ip in ips_of(site, family):
        ident = identities[ip]
        if family == "luxos":
            assert isinstance(ident.capability, Presets), ident
            assert list(ident.capability.watts) == sorted(ident.capability.watts)
            assert len(ident.capability.watts) >= 2
            assert ident.reports_power
        elif family == "whatsminer":
            assert isinstance(ident.capability, PowerRange), ident
            assert 0 < ident.capability.min_w < ident.capability.max_w
            assert ident.reports_power
            assert ident.driver_class.endswith(":BTMinerV3"), ident.driver_class  # not the dead-port v2 backend
        else:
            assert isinstance(ident.capability, OnOff), ident
            assert not ident.reports_power  # stock firmware reports no watts: the fleet estimates


def test_identity_survives_a_round_trip_and_attaches_without_identifying(identities: dict[str, Identity]) -> None:
    driver = PyasicDriver(SETTINGS)
    for ident in identities.values():
        stored = dataclasses.asdict(ident)  # what a store would persist, more or less
        stored["capability"] = ident.capability
        restored = Identity(**stored)
        assert restored == ident
        assert driver.attach(restored).identity is restored


async def test_reading_matches_the_truth_per_family(site: SimProcess, identities: dict[str, Identity]) -> None:
    driver = PyasicDriver(SETTINGS)
    for ip, ident in identities.items():
        reading = await driver.attach(ident).read()
        truth = await atruth(site, ip)
        if truth["state"] != "hashing":
            continue  # another test may have slept it; the state-specific tests cover those
        assert reading.mining is True, (ip, reading)
        assert reading.hashrate_ths is not None
        assert reading.hashrate_ths == pytest.approx(truth["hashrate_ths"], rel=0.1), (ip, reading, truth)
        if ident.reports_power:
            assert reading.power_w == pytest.approx(truth["power_w"], rel=0.1), (ip, reading, truth)
        else:
            assert reading.power_w is None  # unknown, never zero
        if ident.family is Family.LUXOS:  # the others: on the handle's slow beat (see the test below)
            assert reading.temps_c


async def test_luxos_sleep_is_seen_although_pyasic_says_it_is_mining(
    site: SimProcess, identities: dict[str, Identity]
) -> None:
    ip = ips_of(site, "luxos")[0]
    handle = PyasicDriver(SETTINGS).attach(identities[ip])
    assert isinstance(await handle.sleep(), Ok)
    for _ in range(50):
        if (await atruth(site, ip))["state"] == "sleeping":
            break
        await asyncio.sleep(0.1)
    assert (await atruth(site, ip))["state"] == "sleeping"
    reading = await handle.read()
    assert reading.mining is False
    assert not reading.hashrate_ths
    # the trap, shown on pyasic itself: is_mining stays True, hashrate and limit alone are None
    miner = build_miner(identities[ip].driver_class, ip)
    assert (await miner.get_data(include=["is_mining"])).is_mining is True
    assert await miner.get_hashrate() is None
    assert await miner.get_wattage_limit() is None
    assert isinstance(await handle.wake(), Ok)
    assert (await atruth(site, ip))["state"] in ("waking", "hashing")


async def test_luxos_power_limit_takes_the_highest_profile_not_above_the_target(
    site: SimProcess, identities: dict[str, Identity]
) -> None:
    ip = ips_of(site, "luxos")[1]
    ident = identities[ip]
    assert isinstance(ident.capability, Presets)
    watts = ident.capability.watts
    target = (watts[0] + watts[1]) // 2 + 1  # between the two lowest profiles
    handle = PyasicDriver(SETTINGS).attach(ident)
    result = await handle.set_power(target)
    assert isinstance(result, Ok), result
    assert (await atruth(site, ip))["power_limit_w"] == watts[0]
    assert (await handle.read()).power_limit_w == watts[0]
    result = await handle.set_power(watts[0] - 1)
    assert isinstance(result, Failed)
    assert not result.retryable
    assert (await atruth(site, ip))["power_limit_w"] == watts[0]  # nothing changed
    assert isinstance(await handle.set_power(watts[-1]), Ok)
    assert (await atruth(site, ip))["power_limit_w"] == watts[-1]


async def test_whatsminer_power_limit_is_applied_in_watts(site: SimProcess, identities: dict[str, Identity]) -> None:
    ip = ips_of(site, "whatsminer")[0]
    ident = identities[ip]
    assert isinstance(ident.capability, PowerRange)
    handle = PyasicDriver(SETTINGS).attach(ident)
    target = ident.capability.min_w + 400
    result = await handle.set_power(target)
    assert isinstance(result, Ok), result
    assert (await atruth(site, ip))["power_limit_w"] == target
    result = await handle.set_power(ident.capability.min_w - 100)
    assert isinstance(result, Failed)
    assert (await atruth(site, ip))["power_limit_w"] == target


async def test_whatsminer_sleep_and_wake_change_the_truth(site: SimProcess, identities: dict[str, Identity]) -> None:
    ip = ips_of(site, "whatsminer")[1]
    handle = PyasicDriver(SETTINGS).attach(identities[ip])
    assert isinstance(await handle.sleep(), Ok)
    assert (await atruth(site, ip))["state"] == "sleeping"
    assert isinstance(await handle.wake(), Ok)
    assert (await atruth(site, ip))["state"] in ("waking", "hashing")


async def test_stock_antminer_sleeps_and_wakes_but_takes_no_limit(
    site: SimProcess, identities: dict[str, Identity]
) -> None:
    ip = ips_of(site, "antminer")[0]
    handle = PyasicDriver(SETTINGS).attach(identities[ip])
    assert isinstance(await handle.set_power(2000), Unsupported)
    result = await handle.sleep()
    assert isinstance(result, Ok), result  # confirmed by reading the work mode back
    assert (await atruth(site, ip))["state"] == "sleeping"
    assert (await handle.read()).mining is False
    result = await handle.wake()
    assert isinstance(result, Ok), result
    assert (await atruth(site, ip))["state"] in ("waking", "hashing")
    # coming up with no hashrate yet: the web work mode says it is on, so it counts as drawing power
    reading = await handle.read()
    assert reading.mining is True
    assert reading.power_w is None


@pytest.mark.parametrize("family", ["antminer", "whatsminer"])
async def test_slow_fields_are_refreshed_on_the_handles_beat_and_carried_over(
    site: SimProcess, identities: dict[str, Identity], family: str
) -> None:
    ip = ips_of(site, family)[1]
    handle = PyasicDriver(SETTINGS).attach(identities[ip])
    readings = [await handle.read() for _ in range(SLOW_FIELDS_EVERY + 2)]

    def board_temps(temps: tuple[float, ...]) -> tuple[float, ...]:
        return temps[:-1] if family == "whatsminer" else temps  # Whatsminer adds a fresh ambient reading

    # board temperatures (and errors) cost extra connections: each handle fetches them on its own beat, once
    # every SLOW_FIELDS_EVERY reads ...
    first = next(n for n, r in enumerate(readings) if board_temps(r.temps_c))
    assert first < SLOW_FIELDS_EVERY
    assert all(not board_temps(r.temps_c) for r in readings[:first])  # nothing made up before then
    # ... and carries them over
    assert all(board_temps(r.temps_c) == board_temps(readings[first].temps_c) for r in readings[first:])
    assert all(r.hashrate_ths and r.mining for r in readings)
    truth = await atruth(site, ip)
    assert readings[-1].hashrate_ths == pytest.approx(truth["hashrate_ths"], rel=0.1)


async def test_identification_is_bounded_so_a_burst_of_calls_all_succeed(site: SimProcess) -> None:
    # 12 miners x 20 calls at once: the driver lets identify_concurrency through at a time
    driver = PyasicDriver(DriverSettings(identify_timeout_s=30, identify_concurrency=16))
    found = await asyncio.gather(*(driver.identify(ip) for ip in site.ips * 20))
    assert all(i is not None for i in found)


async def test_luxos_session_held_elsewhere_fails_cleanly_then_the_handle_recovers(
    site: SimProcess, identities: dict[str, Identity]
) -> None:
    ip = ips_of(site, "luxos")[2]
    ident = identities[ip]
    assert isinstance(ident.capability, Presets)
    low, high = ident.capability.watts[0], ident.capability.watts[-1]
    handle = PyasicDriver(SETTINGS).attach(ident)
    assert isinstance(await handle.set_power(high), Ok)  # the handle now holds a session id
    await asyncio.to_thread(site.set_faults, {"mode": "session_held", "ips": [ip]})
    try:
        result = await handle.set_power(low)
        assert isinstance(result, Failed), result
        assert result.retryable
        assert (await atruth(site, ip))["power_limit_w"] == high  # refused, nothing changed
    finally:
        await asyncio.to_thread(site.set_faults, {"mode": "clear", "ips": [ip]})
    # its cached session id is stale now: the handle renews it by itself
    assert isinstance(await handle.set_power(low), Ok)
    assert (await atruth(site, ip))["power_limit_w"] == low


@pytest.mark.parametrize(("mode", "error"), [("refuse", Unreachable), ("error", ProtocolError)])
async def test_sim_faults_map_to_driver_errors(
    site: SimProcess, identities: dict[str, Identity], mode: str, error: type[Exception]
) -> None:
    for family in ("luxos", "whatsminer", "antminer"):
        ip = ips_of(site, family)[-1]
        handle = PyasicDriver(SETTINGS).attach(identities[ip])
        await asyncio.to_thread(site.set_faults, {"mode": mode, "ips": [ip]})
        try:
            with pytest.raises(error):
                await handle.read()
        finally:
            await asyncio.to_thread(site.set_faults, {"mode": "clear", "ips": [ip]})
        await handle.read()  # and back


@pytest.mark.parametrize("legacy", ["closed", "errors"])
async def test_whatsminer_v3_behind_a_dead_legacy_port_gets_the_v3_backend(site: SimProcess, legacy: str) -> None:
    # pyasic alone: with 4028 closed it picks the v2 backend (every later call goes to the dead port); with
    # 4028 answering errors it identifies nothing at all
    target = ips_of(site, "whatsminer")[-1]
    async with whatsminer_v3_only(target, legacy=legacy) as ip:
        import pyasic

        stock = await pyasic.get_miner(ip)
        if legacy == "closed":
            assert "BTMinerV2" in {c.__name__ for c in type(stock).__mro__}
        else:
            assert stock is None
        driver = PyasicDriver(SETTINGS)
        ident = await driver.identify(ip)
        assert ident is not None
        assert ident.family is Family.WHATSMINER
        assert ident.driver_class.endswith(":BTMinerV3")
        handle = driver.attach(ident)
        reading = await handle.read()
        assert reading.power_w == pytest.approx((await atruth(site, target))["power_w"], rel=0.1)
        assert isinstance(ident.capability, PowerRange)
        assert isinstance(await handle.set_power(ident.capability.min_w + 123), Ok)
        assert (await atruth(site, target))["power_limit_w"] == ident.capability.min_w + 123


@pytest.mark.parametrize("family", ["luxos", "whatsminer"])
async def test_a_limit_set_while_asleep_is_kept_and_the_actuator_wakes_to_it(
    site: SimProcess, identities: dict[str, Identity], family: str
) -> None:
    # the firmware fact `drivers.base.wakes_at_limit` states for these families (issue 11 finding 8): a limit is
    # taken while asleep (the miner stays asleep) and the wake starts from it; the actuator sets it before the wake
    ip = ips_of(site, family)[2]
    ident = identities[ip]
    assert wakes_at_limit(ident.family, ident.capability)
    cap = ident.capability
    low = cap.watts[0] if isinstance(cap, Presets) else cap.min_w + 200 if isinstance(cap, PowerRange) else 0
    handle = PyasicDriver(SETTINGS).attach(ident)
    assert isinstance(await handle.sleep(), Ok)
    result = await handle.set_power(low)
    assert isinstance(result, Ok), result
    truth = await atruth(site, ip)
    assert (truth["state"], truth["power_limit_w"]) == ("sleeping", low)
    assert isinstance(await handle.sleep(), Ok)
    high = cap.watts[1] if isinstance(cap, Presets) else low + 300
    report = await Actuator({ip: handle}.__getitem__, concurrency=1, command_timeout_s=6).apply(
        [Change(ip, Op.WAKE, high)]
    )
    (r,) = report.results
    assert r.ok, r
    truth = await atruth(site, ip)
    assert truth["state"] in ("waking", "hashing")
    assert truth["power_limit_w"] == high
