"""Every driver call is bounded in time and says plainly what went wrong (real TCP, unmodified pyasic)."""

from __future__ import annotations

import time

import pytest

from hashflex.drivers.asic import PyasicDriver, round_to_capability
from hashflex.drivers.base import DriverSettings, Failed, ProtocolError, Unreachable, Unsupported
from tests.drivers.rawminers import (
    BLACKHOLE_IP,
    GARBAGE_IP,
    NOTHING_IP,
    SILENT_CLOSE_IP,
    antminer_identity,
    luxos_identity,
    raw_miners,
)

FAST = DriverSettings(read_timeout_s=0.5, command_timeout_s=0.7, identify_timeout_s=1.0)

pytestmark = pytest.mark.timeout(60)


async def test_read_of_a_blackholed_miner_is_bounded_by_the_read_timeout() -> None:
    # pyasic alone would wait 100 s here (no connect timeout, 100 s read timeout)
    handle = PyasicDriver(FAST).attach(luxos_identity(BLACKHOLE_IP))
    async with raw_miners() as raw:
        started = time.perf_counter()
        with pytest.raises(Unreachable, match=r"no answer within 0\.5 s"):
            await handle.read()
        assert time.perf_counter() - started < 1.5
        assert raw.connections[BLACKHOLE_IP] >= 1  # it really connected and waited


async def test_control_calls_on_a_blackholed_miner_fail_retryably_within_the_command_timeout() -> None:
    handle = PyasicDriver(FAST).attach(luxos_identity(BLACKHOLE_IP))
    async with raw_miners():
        for call in (handle.sleep(), handle.wake(), handle.set_power(2700)):
            started = time.perf_counter()
            result = await call
            assert isinstance(result, Failed), result
            assert result.retryable
            assert "within 0.7 s" in result.reason
            assert time.perf_counter() - started < 2.0


async def test_identify_of_a_blackholed_address_gives_up_within_its_timeout() -> None:
    async with raw_miners():
        started = time.perf_counter()
        assert await PyasicDriver(FAST).identify(BLACKHOLE_IP) is None
        assert time.perf_counter() - started < 2.5


async def test_refused_connection_is_unreachable_not_a_reading_of_nones() -> None:
    # pyasic turns a refused connection into `{}` and then into a MinerData full of None
    handle = PyasicDriver(FAST).attach(luxos_identity(NOTHING_IP))
    with pytest.raises(Unreachable, match="refused"):
        await handle.read()
    result = await handle.sleep()
    assert isinstance(result, Failed)
    assert result.retryable


async def test_garbage_reply_is_a_protocol_error() -> None:
    handle = PyasicDriver(FAST).attach(luxos_identity(GARBAGE_IP))
    async with raw_miners():
        with pytest.raises(ProtocolError):
            await handle.read()


async def test_connection_closed_without_a_reply_is_a_driver_error() -> None:
    handle = PyasicDriver(FAST).attach(luxos_identity(SILENT_CLOSE_IP))
    async with raw_miners():
        with pytest.raises((ProtocolError, Unreachable)):
            await handle.read()


async def test_identify_finds_nothing_where_nothing_answers() -> None:
    assert await PyasicDriver(FAST).identify(NOTHING_IP) is None


def test_attach_builds_the_miner_without_any_io() -> None:
    # nothing listens at NOTHING_IP: attach must not try (it is synchronous and instant)
    started = time.perf_counter()
    handles = [PyasicDriver(FAST).attach(luxos_identity(f"127.20.251.{i}")) for i in range(1, 201)]
    assert time.perf_counter() - started < 1.0
    assert handles[0].identity.driver_class == "LUXMinerS19Pro"


async def test_stock_antminer_cannot_take_a_power_limit() -> None:
    result = await PyasicDriver(FAST).attach(antminer_identity(NOTHING_IP)).set_power(2500)
    assert isinstance(result, Unsupported)


async def test_below_the_lowest_preset_is_refused_without_touching_the_miner() -> None:
    async with raw_miners() as raw:
        result = await PyasicDriver(FAST).attach(luxos_identity(GARBAGE_IP)).set_power(1000)
        assert isinstance(result, Failed)
        assert not result.retryable
        assert "below the lowest setting (1800 W)" in result.reason
        assert GARBAGE_IP not in raw.connections


def test_power_is_rounded_to_what_the_capability_allows() -> None:
    from hashflex.drivers.base import PowerRange, Presets

    presets = Presets((1800, 2600, 3250))
    assert round_to_capability(presets, 3000) == 2600  # LuxOS: the highest profile not above the target
    assert round_to_capability(presets, 3250) == 3250
    assert round_to_capability(presets, 99999) == 3250
    assert round_to_capability(presets, 1799) is None
    power_range = PowerRange(min_w=1700, max_w=3400, step_w=50)
    assert round_to_capability(power_range, 2533) == 2500
    assert round_to_capability(power_range, 5000) == 3400
    assert round_to_capability(power_range, 1600) is None


def test_importing_the_driver_leaves_the_root_logger_alone() -> None:
    import subprocess
    import sys

    code = (
        "import logging; before = (logging.getLogger().level, len(logging.getLogger().handlers));"
        "import hashflex.drivers.asic;"
        "print(before == (logging.getLogger().level, len(logging.getLogger().handlers)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
