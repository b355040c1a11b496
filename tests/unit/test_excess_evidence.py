"""What a miner draws above its setting, before and after it can be read (agent.core.closed_loop.take_excess_reading,
excess_counted; agent.core.observe.peer_excess_shares). Soak 20261204 sites 388 and 146: miners drifting 30 % woken
at their bare limits (never read since the drift), or at half their drift (slept while still climbing)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.core.closed_loop import excess_counted, has_own_excess, take_excess_reading
from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.observe import PEER_EVIDENCE_S, peer_excess_shares
from hashflex.drivers.base import Family

GAP = 5.0  # steady_gap_s
watts = st.floats(min_value=100.0, max_value=6000.0)
shares = st.floats(min_value=0.0, max_value=1.0)


def read_steady(mem: MinerMemory, at: float, power_w: float, setting_w: float) -> None:
    """Two readings a poll apart that agree: the miner draws what it will."""
    take_excess_reading(mem, at, power_w, setting_w, GAP)
    take_excess_reading(mem, at + GAP, power_w, setting_w, GAP)


def test_a_reading_still_climbing_raises_the_excess_without_making_it_the_miners_own() -> None:
    mem = MinerMemory(last_transition=100.0)
    assert take_excess_reading(mem, 110.0, 2300.0, 2000.0, GAP)  # above its setting: counted at once
    assert take_excess_reading(mem, 115.0, 2500.0, 2000.0, GAP)  # and higher: still climbing
    assert mem.excess_w == 500.0 + 200.0  # it may climb as much again before the next reading
    assert not has_own_excess(mem)
    assert mem.excess_read_at == 115.0  # a floor of what it draws: evidence for its peers
    assert take_excess_reading(mem, 120.0, 2600.0, 2000.0, GAP)
    assert take_excess_reading(mem, 125.0, 2600.0, 2000.0, GAP)  # two readings that agree: its own
    assert has_own_excess(mem)
    assert mem.excess_w == 600.0
    assert mem.excess_at == 125.0


def test_a_low_reading_while_coming_up_does_not_lower_the_excess() -> None:
    mem = MinerMemory(last_transition=100.0, excess_w=600.0, excess_setting_w=2000.0)
    assert not take_excess_reading(mem, 110.0, 400.0, 2000.0, GAP)
    assert not take_excess_reading(mem, 115.0, 900.0, 2000.0, GAP)
    assert mem.excess_w == 600.0


@given(excess_share=shares, read_at=watts, setting=watts)
def test_the_excess_is_counted_as_a_share_of_a_higher_setting_and_never_below_the_watts_read(
    excess_share: float, read_at: float, setting: float
) -> None:
    mem = MinerMemory(excess_w=excess_share * read_at, excess_setting_w=read_at, excess_at=10.0, last_transition=5.0)
    counted = excess_counted(mem, setting, peer_excess_share=0.0)
    assert counted >= mem.excess_w - 1e-9
    assert counted >= excess_share * setting - 1e-6


@given(own=shares, peer=shares, setting=watts)
def test_peers_count_only_until_the_miner_has_been_read_steady_since_it_came_on(
    own: float, peer: float, setting: float
) -> None:
    unread = MinerMemory(excess_w=own * setting, excess_setting_w=setting, excess_at=10.0, last_transition=20.0)
    assert excess_counted(unread, setting, peer) >= max(own, peer) * setting - 1e-6
    read = MinerMemory(excess_w=own * setting, excess_setting_w=setting, excess_at=30.0, last_transition=20.0)
    assert abs(excess_counted(read, setting, peer) - own * setting) < 1e-6


def memories(*shares_at: tuple[float, float]) -> dict[str, MinerMemory]:
    return {
        f"10.0.0.{n}": MinerMemory(excess_w=share * 3000.0, excess_setting_w=3000.0, excess_at=at, excess_read_at=at)
        for n, (share, at) in enumerate(shares_at)
    }


def test_the_peers_share_is_the_median_per_family_of_recent_settled_readings() -> None:
    now = 10_000.0
    mem = memories((0.3, now - 10), (0.28, now - 20), (0.31, now - 30), (0.0, now - 40))
    family_of = dict.fromkeys(mem, Family.LUXOS)
    assert abs(peer_excess_shares(mem, family_of, now)[Family.LUXOS] - 0.29) < 1e-9
    # one faulty supply says nothing of the others
    lone = memories((0.3, now - 10), (0.0, now - 20), (0.0, now - 30))
    assert peer_excess_shares(lone, dict.fromkeys(lone, Family.LUXOS), now)[Family.LUXOS] == 0.0
    # old readings (before a change of the site's supply, say) tell nothing; nor do other families' miners (soak
    # site 1422: no-drift readings of sleepers three minutes old outvoted the one drifter running since)
    old = memories((0.3, now - PEER_EVIDENCE_S - 1), (0.3, now - 10))
    families = {"10.0.0.0": Family.LUXOS, "10.0.0.1": Family.WHATSMINER}
    assert peer_excess_shares(old, families, now) == {Family.WHATSMINER: 0.3}


def test_miners_that_ignore_commands_or_were_never_read_are_no_evidence() -> None:
    mem = {
        "a": MinerMemory(excess_w=900.0, excess_setting_w=3000.0, excess_read_at=0.0, ignores_commands=True),
        "b": MinerMemory(),
    }
    assert peer_excess_shares(mem, dict.fromkeys(mem, Family.LUXOS), 10.0) == {}


def test_a_miner_climbing_past_its_setting_is_counted_one_rise_ahead_until_two_readings_agree() -> None:
    """Soak 20261204, site 4930: a lone drifter read at 1,908 W on its way up to 2.2 kW at a 1,695 W setting."""
    mem = MinerMemory(last_transition=100.0)
    take_excess_reading(mem, 110.0, 1600.0, 1695.0, GAP)  # still under its setting: no excess
    assert mem.excess_w == 0.0
    take_excess_reading(mem, 115.0, 1908.0, 1695.0, GAP)  # past it: 213 W above, all of it since the last reading
    assert mem.excess_w == 2 * (1908.0 - 1695.0)
    assert not has_own_excess(mem)
    take_excess_reading(mem, 115.0, 1908.0, 1695.0, GAP)  # the same reading again (a tick without a poll)
    assert mem.excess_w == 2 * (1908.0 - 1695.0)
    take_excess_reading(mem, 120.0, 2083.0, 1695.0, GAP)  # still climbing: 175 W more
    assert mem.excess_w == 2083.0 - 1695.0 + 175.0
    read_steady(mem, 125.0, 2203.0, 1695.0)  # two readings that agree: what it draws is known
    assert mem.excess_w == 2203.0 - 1695.0
    assert has_own_excess(mem)


@given(setting=watts, spread=st.floats(min_value=0.0, max_value=0.029), rise=st.floats(min_value=0.0, max_value=500))
def test_a_miner_coming_up_to_its_setting_gets_no_excess_from_its_ramp(
    setting: float, spread: float, rise: float
) -> None:
    mem = MinerMemory(last_transition=100.0)
    take_excess_reading(mem, 110.0, max(0.0, setting - rise), setting, GAP)
    take_excess_reading(mem, 115.0, setting * (1.0 + spread), setting, GAP)
    assert mem.excess_w <= spread * setting + 1e-6


def test_the_climb_to_a_raised_limit_is_no_excess() -> None:
    """A reading before the limit was raised is no base for a climb past the new one (a raise is no drift)."""
    mem = MinerMemory(last_transition=100.0)
    read_steady(mem, 110.0, 1500.0, 1500.0)
    mem.changed_at = 118.0  # raised to 2000 W
    take_excess_reading(mem, 125.0, 2070.0, 2000.0, GAP)
    assert mem.excess_w == 70.0
