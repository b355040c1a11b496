"""What a restart knows of a miner the dead run was commanding (agent.runtime.memory: control_of writes a rise ahead
of the command, memory_from reads it back), judged by what the restarted run's observe counts the miner at."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, MinerState, Op
from hashflex.agent.core.observe import ObserveRules, observe
from hashflex.agent.core.snapshot import FleetSnapshot, MinerSnapshot, reading_hint
from hashflex.agent.runtime.memory import control_of, memory_from
from hashflex.drivers.base import Family, Identity, PowerRange, Reading

NOW = 1_800_000_000.0
IP = "10.0.0.6"
IDENT = Identity(IP, Family.WHATSMINER, "MicroBT", "M50", "btminer", "X", PowerRange(1910, 3472), 3472.0, 120.0)
RULES = ObserveRules(stale_after_s=30.0, confirm_after_s=20.0, steady_gap_s=4.5)


def booting(power_w: float, limit_w: float) -> FleetSnapshot:
    reading = Reading(ts=NOW, power_w=power_w, hashrate_ths=0.0, mining=False, power_limit_w=limit_w)
    ms = MinerSnapshot(IDENT, reading, 1.0, True, 0, power_w, True, reading_hint(IDENT, reading, power_w))
    return FleetSnapshot(NOW, {IP: ms}, power_w, 0.0, 0.0, 0.0)


def counted_after_restart(before: MinerMemory, wake: Change, power_w: float, limit_w: float) -> float:
    restored = memory_from(control_of(before, wake))
    view = observe(booting(power_w, limit_w), {IP: restored}, {}, NOW + 2.0, RULES).views[0]
    assert view.state is MinerState.WAKING
    return view.measured_w if view.measured_w is not None else float(view.commanded_w or IDENT.nominal_w)


def test_a_wake_with_a_higher_limit_written_ahead_counts_the_miner_at_that_limit_after_a_kill() -> None:
    """Chaos kill -9 (cycle 62): a whatsminer stored at 1,910 W was woken with 3,472 W and the agent killed before
    the reply was stored. The restart counted the booting miner at 1,910 W, lowered two others and woke a third into
    the room it thought it had: 15.83 kW running or waking against a 14.4 kW dispatch."""
    slept = MinerMemory(commanded_w=1910.0, asleep_by_us=True, last_transition=NOW - 600)
    counted = counted_after_restart(slept, Change(IP, Op.WAKE, 3472), power_w=513.0, limit_w=3472.0)
    assert counted >= 3472.0


@given(stored=st.floats(1910.0, 3472.0), wake_at=st.integers(1910, 3472))
def test_a_restart_never_counts_a_miner_woken_by_the_dead_run_below_what_it_may_come_up_at(
    stored: float, wake_at: int
) -> None:
    slept = MinerMemory(commanded_w=stored, asleep_by_us=True, last_transition=NOW - 600)
    counted = counted_after_restart(slept, Change(IP, Op.WAKE, wake_at), power_w=300.0, limit_w=float(wake_at))
    assert counted >= max(stored, wake_at) - 1e-6
