"""A miner that took limits and kept drawing above them (`MinerMemory.overdraws_limit`: on/off, counted at its draw)
is limited again once its readings show it keeps to its limit, and not before (agent.core.closed_loop._watch_setting).
Soak 20261204, sites 246 and 1976: a drift of 5 s, or LuxOS ATM stepping a profile up, left miners on/off for good
and the site far under its cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.observe import ObserveRules, observe
from hashflex.agent.core.snapshot import FleetSnapshot, MinerSnapshot, reading_hint
from hashflex.agent.runtime.memory import control_of, memory_from
from hashflex.drivers.base import Family, Identity, OnOff, Presets, Reading

T0 = 1_800_000_000.0
IP = "10.0.0.2"
S19K = Presets(watts=(1397, 1554, 1715, 1881, 2050, 2222, 2398, 2578, 2760))
IDENT = Identity(IP, Family.LUXOS, "Bitmain", "S19k Pro", "luxos", "X", S19K, 2760.0, 120.0)
RULES = ObserveRules(stale_after_s=30.0, confirm_after_s=20.0, steady_gap_s=4.5)


def snap(at: float, power_w: float, *, hashing: bool = True) -> FleetSnapshot:
    reading = Reading(ts=at, power_w=power_w, hashrate_ths=60.0 if hashing else 0.0, mining=hashing, power_limit_w=1554)
    ms = MinerSnapshot(IDENT, reading, 0.5, True, 0, power_w, True, reading_hint(IDENT, reading, power_w))
    return FleetSnapshot(at + 0.5, {IP: ms}, power_w, 0.0, 0.0, 0.0)


def overdrawn(woken_at: float) -> MinerMemory:
    """On/off for drawing 30 % above its 1,554 W profile, woken again at `woken_at` (its excess kept from then)."""
    return MinerMemory(
        commanded_w=1554.0,
        last_transition=woken_at,
        changed_at=woken_at,
        overdraws_limit=True,
        excess_w=466.0,
        excess_setting_w=1554.0,
        excess_at=woken_at - 300.0,
        excess_read_at=woken_at - 300.0,
    )


def run(mem: MinerMemory, readings: list[tuple[float, float]]) -> MinerMemory:
    for at, power_w in readings:
        mem = observe(snap(at, power_w), {IP: mem}, {}, at + 0.5, RULES).memory[IP]
    return mem


def test_two_readings_at_its_limit_make_it_limited_again() -> None:
    mem = run(overdrawn(T0), [(T0 + 60.0, 1530.0), (T0 + 65.0, 1532.0), (T0 + 70.0, 1531.0)])
    assert not mem.overdraws_limit
    view = observe(snap(T0 + 75.0, 1531.0), {IP: mem}, {}, T0 + 75.5, RULES).views[0]
    assert view.capability == S19K  # the planner may set its profile again


@given(power=st.floats(min_value=50.0, max_value=1600.0), after=st.floats(min_value=21.0, max_value=90.0))
def test_a_miner_still_coming_up_after_its_wake_stays_on_off(power: float, after: float) -> None:
    """One reading under its limit, while it climbs from a wake, proves nothing (it may climb to its drift)."""
    mem = run(overdrawn(T0), [(T0 + after, power)])
    assert mem.overdraws_limit
    view = observe(snap(T0 + after + 1.0, power), {IP: mem}, {}, T0 + after + 1.5, RULES).views[0]
    assert view.capability == OnOff()


def test_still_drawing_above_its_limit_it_stays_on_off_and_is_not_told_again() -> None:
    mem = run(overdrawn(T0), [(T0 + 60.0, 2020.0), (T0 + 65.0, 2021.0), (T0 + 70.0, 2020.0)])
    assert mem.overdraws_limit
    assert mem.pending_op is None  # counted at its draw, slept and woken: no limit re-sent


def test_the_mark_survives_a_restart() -> None:
    assert memory_from(control_of(overdrawn(T0))).overdraws_limit
