"""The simulated site without its TCP front (tests/closedloop/inprocess.py): the driver contract on the sim's own
devices, physics and faults, on a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest

from hashflex.drivers.base import (
    DriverSettings,
    Failed,
    Family,
    Ok,
    OnOff,
    PowerRange,
    Presets,
    ProtocolError,
    Unreachable,
)
from hashflex.sim.families.luxos import LuxosDevice
from hashflex.sim.physics import PhysicsParams
from tests.closedloop.inprocess import InProcessDriver, InProcessSite, VirtualTime

PARAMS = PhysicsParams(wake_s=60.0, reboot_s=30.0)


def _site(
    mix: str = "luxos:1,whatsminer:1,antminer:1", n: int = 3
) -> tuple[VirtualTime, InProcessSite, InProcessDriver]:
    vt = VirtualTime()
    site = InProcessSite(miners=n, mix=mix, seed=5, vt=vt, params=PARAMS)
    return vt, site, InProcessDriver(site, DriverSettings(read_timeout_s=4.0, command_timeout_s=8.0))


async def _advance(vt: VirtualTime, site: InProcessSite, seconds: float) -> None:
    end = vt.t + seconds
    while True:
        await asyncio.sleep(0)
        due = vt.next_timer()
        step = end if due is None else min(due, end)
        vt.t = max(vt.t, step)
        await site.advance()
        vt.fire_due()
        await asyncio.sleep(0)
        if vt.t >= end:
            return


async def test_identities_and_readings_follow_each_firmware() -> None:
    _vt, site, driver = _site()
    by_family = {}
    for ip in [d.ip for d in site.devices]:
        ident = await driver.identify(ip)
        assert ident is not None
        by_family[ident.family] = (ident, await driver.attach(ident).read())
    lux, wm, am = by_family[Family.LUXOS], by_family[Family.WHATSMINER], by_family[Family.ANTMINER]
    assert isinstance(lux[0].capability, Presets)
    assert isinstance(wm[0].capability, PowerRange)
    assert isinstance(am[0].capability, OnOff)
    assert not am[0].reports_power
    assert am[1].power_w is None  # stock firmware reports no watts
    assert lux[1].power_w is not None
    assert lux[1].power_w > 0.9 * lux[0].nominal_w
    assert all(r.mining for _i, r in by_family.values())


async def test_sleep_wake_and_limits_act_on_the_physics() -> None:
    vt, site, driver = _site("luxos:1", 1)
    ident = await driver.identify(site.devices[0].ip)
    assert ident is not None
    assert isinstance(ident.capability, Presets)
    handle = driver.attach(ident)
    low = ident.capability.watts[2]
    assert isinstance(await handle.set_power(low + 1), Ok)  # the highest profile not above it
    await _advance(vt, site, 10)
    reading = await handle.read()
    assert reading.power_limit_w == low
    dev = site.devices[0]
    assert isinstance(dev, LuxosDevice)
    assert dev.atm_enabled  # switched off around profileset and on again, as pyasic does
    assert isinstance(await handle.sleep(), Ok)
    await _advance(vt, site, 10)
    assert (await handle.read()).mining is False
    assert isinstance(await handle.wake(), Ok)
    await _advance(vt, site, PARAMS.wake_s + 1)
    assert (await handle.read()).mining is True


async def test_faults_reach_the_driver_as_they_would_over_the_wire() -> None:
    vt, site, driver = _site("luxos:1,whatsminer:1", 2)
    handles = {}
    for d in site.devices:
        ident = await driver.identify(d.ip)
        assert ident is not None
        handles[d.family] = driver.attach(ident)
    lux_ip, wm_ip = site.devices[0].ip, site.devices[1].ip
    site.set_faults({"mode": "refuse", "ips": [lux_ip]})
    with pytest.raises(Unreachable):
        await handles["luxos"].read()
    assert isinstance(await handles["luxos"].sleep(), Failed)
    site.set_faults({"mode": "clear"})
    site.set_faults({"mode": "blackhole", "ips": [wm_ip]})
    pending = asyncio.ensure_future(handles["whatsminer"].read())
    await _advance(vt, site, 3.9)
    assert not pending.done()  # no answer: the read deadline (4 s of site time) decides
    await _advance(vt, site, 0.2)
    with pytest.raises(Unreachable):
        await pending
    site.set_faults({"mode": "clear"})
    site.set_faults({"mode": "error", "ips": [wm_ip]})
    with pytest.raises(ProtocolError):
        await handles["whatsminer"].read()
    site.set_faults({"mode": "clear"})
    site.set_faults({"mode": "ignore", "ips": [wm_ip]})
    assert isinstance(await handles["whatsminer"].sleep(), Ok)  # acknowledged, not applied
    await _advance(vt, site, 10)
    assert (await handles["whatsminer"].read()).mining is True
    site.set_faults({"mode": "clear"})
    site.set_faults({"mode": "session_held", "ips": [lux_ip]})
    assert isinstance(await handles["luxos"].sleep(), Failed)
    site.set_faults({"mode": "clear"})
    site.set_faults({"mode": "reboot", "ips": [lux_ip]})
    with pytest.raises(Unreachable):
        await handles["luxos"].read()
    await _advance(vt, site, PARAMS.reboot_s + 1)
    assert (await handles["luxos"].read()).power_w is not None  # back, booting at the firmware defaults
