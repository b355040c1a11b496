"""Property tests of the cooling rule (agent.core.facility): random miners, wakes, sleeps and device delays.

Each run drives the pure rule the way the runtime does (step every tick; a device that takes a write after a delay;
the wakes the plan wants go out only when `ready_for_wake` says so) and checks, from an independent record of the
device's speed and the demand:
- the device never runs below its minimum while a miner of the circuit is on;
- a step down comes only after the demand was below the old setpoint for `down_after_s`, and to no less than the
  highest demand since;
- every wake goes out with the device at the speed it needs, running for `up_lead_s` already.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from hashflex.agent.core import facility as core

PROPS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
EPS = 1e-9


@st.composite
def rules(draw: st.DrawFn) -> core.CoolingRule:
    kind = draw(st.sampled_from(["drive", "relay"]))
    down = draw(st.floats(0, 600))
    lead = draw(st.floats(0, 300))
    if kind == "relay":
        return core.CoolingRule("c", "relay", 100.0, 0.0, ((0.0, 100.0),), down, lead)
    min_pct = draw(st.floats(0, 100))
    idle = draw(st.floats(0, min_pct))
    shares = sorted(set(draw(st.lists(st.floats(0, 1), min_size=1, max_size=4))))
    speeds = sorted(draw(st.lists(st.floats(0, 100), min_size=len(shares), max_size=len(shares))))
    return core.CoolingRule("c", "drive", min_pct, idle, tuple(zip(shares, speeds, strict=True)), down, lead)


@dataclass(frozen=True)
class Tick:
    dt: float  # seconds since the last tick
    sleep: int  # miners the plan sleeps now (of those on)
    want: int  # wakes the plan wants now (of those asleep)


Scenario = tuple[core.CoolingRule, int, int, float, float, list[Tick]]  # rule, miners, on, latency, start, ticks


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    rule = draw(rules())
    total = draw(st.integers(1, 12))
    on = draw(st.integers(0, total))
    latency = draw(st.floats(0, 20))  # the device takes a write this long after it was sent
    start = draw(st.sampled_from([0.0, 100.0]) | st.floats(0, 100))  # what the device runs at when the agent starts
    ticks = draw(st.lists(st.builds(Tick, st.floats(0.5, 60), st.integers(0, 12), st.integers(0, 12)), max_size=80))
    return rule, total, on, latency, start, ticks


def _run(scenario: Scenario) -> None:
    rule, total, on, latency, start, ticks = scenario
    now = 0.0
    device = start
    running_since: float | None = 0.0 if device >= rule.min_pct and device > 0 else None
    state = core.acknowledged(rule, core.CoolingState(setpoint_pct=device), device, now)
    pending: tuple[float, float] | None = None  # (lands at, pct)
    demands: list[tuple[float, float]] = []  # (t, demand) as ticked
    # miners found running with the device below its minimum (the agent just started): raised at once, and from
    # then on never below it
    started_low = on > 0 and device < rule.min_pct
    for tick in ticks:
        now += tick.dt
        if pending is not None and pending[0] <= now:  # the device took the write: its speed and the ack
            lands, pct = pending
            if pct >= rule.min_pct and pct > 0:
                running_since = running_since if device >= rule.min_pct and device > 0 else lands
            else:
                running_since = None
            device, pending = pct, None
            state = core.acknowledged(rule, state, pct, lands)
        on -= min(on, tick.sleep)  # sleeps always go out
        want = min(tick.want, total - on)
        miners = core.CircuitMiners(total=total, on=on, wanted=want)
        before = state.setpoint_pct
        state = core.step(rule, state, miners, now)
        demand = core.demand_pct(rule, miners)
        demands.append((now, demand))
        if state.setpoint_pct < before - EPS:
            # a step down: the demand was below `before` at every tick of the last down_after_s, and the new
            # setpoint is no lower than any of those demands
            last_high = max((t for t, d in demands if d >= before - EPS), default=None)
            first_low = min(t for t, d in demands if last_high is None or t > last_high)
            assert now - first_low >= rule.down_after_s - EPS, (now, first_low, rule.down_after_s)
            assert all(state.setpoint_pct >= d - EPS for t, d in demands if t >= first_low)
        if on > 0 or want > 0:
            assert state.setpoint_pct >= rule.min_pct - EPS
        if pending is None and state.acked_pct != state.setpoint_pct:
            if latency == 0:
                device_was_running = device >= rule.min_pct and device > 0
                device = state.setpoint_pct
                running_since = (
                    (running_since if device_was_running else now) if device >= rule.min_pct and device > 0 else None
                )
                state = core.acknowledged(rule, state, device, now)
            else:
                pending = (now + latency, state.setpoint_pct)
        if want and core.ready_for_wake(rule, state, miners, now):
            # the wake goes out: the device runs at the speed the miners need, and has run for up_lead_s
            assert device >= demand - EPS
            assert running_since is not None
            assert now - running_since >= rule.up_lead_s - EPS
            on += want
        if on > 0 and not started_low:
            assert device >= rule.min_pct - EPS, "the device below its minimum while miners run"
        started_low = started_low and (device < rule.min_pct or on > 0)


# a circuit half on, its fans at the speed for that; a wake wanted: it waits for the raise to be acknowledged
HALF_ON = (
    core.CoolingRule("c", "drive", 30.0, 0.0, ((0.0, 30.0), (1.0, 100.0)), 60.0, 30.0),
    2,
    1,
    5.0,
    65.0,
    [Tick(100.0, 0, 1), Tick(1.0, 0, 1), Tick(10.0, 0, 1)],
)


@PROPS
@given(scenarios())
@example(HALF_ON)
def test_cooling_follows_its_miners(scenario: Scenario) -> None:
    _run(scenario)


def test_steps_down_after_the_delay_and_up_before_a_wake() -> None:
    """The story operators tell, with numbers: 4 miners, fans at 100 %, all slept at 0 s, woken from 1000 s."""
    rule = core.CoolingRule("c", "drive", 30.0, 0.0, ((0.0, 30.0), (1.0, 100.0)), down_after_s=300, up_lead_s=60)
    s = core.acknowledged(rule, core.CoolingState(setpoint_pct=100.0), 100.0, 0.0)
    asleep = core.CircuitMiners(total=4, on=0)
    s = core.step(rule, s, asleep, 0.0)
    assert s.setpoint_pct == 100.0
    assert s.below_since == 0.0
    assert core.step(rule, s, asleep, 299.0).setpoint_pct == 100.0
    s = core.step(rule, s, asleep, 300.0)
    assert s.setpoint_pct == 0.0
    s = core.acknowledged(rule, s, 0.0, 301.0)
    wanted = core.CircuitMiners(total=4, on=0, wanted=2)
    s = core.step(rule, s, wanted, 1000.0)
    assert s.setpoint_pct == 65.0  # half the miners: 30 + (100 − 30) / 2
    assert not core.ready_for_wake(rule, s, wanted, 1000.0)  # not acknowledged yet
    s = core.acknowledged(rule, s, 65.0, 1001.0)
    assert not core.ready_for_wake(rule, s, wanted, 1060.0)  # running 59 s
    assert core.ready_for_wake(rule, s, wanted, 1061.0)
    # running already: a further wake waits only for the raise to be acknowledged, not another lead
    more = core.CircuitMiners(total=4, on=2, wanted=2)
    s = core.step(rule, s, more, 1100.0)
    assert s.setpoint_pct == 100.0
    assert not core.ready_for_wake(rule, s, more, 1100.0)
    s = core.acknowledged(rule, s, 100.0, 1101.0)
    assert core.ready_for_wake(rule, s, more, 1101.0)


def test_a_lost_device_holds_wakes() -> None:
    rule = core.CoolingRule("c", "relay", 100.0, 0.0, ((0.0, 100.0),), down_after_s=0, up_lead_s=0)
    s = core.acknowledged(rule, core.CoolingState(setpoint_pct=100.0), 100.0, 0.0)
    wanted = core.CircuitMiners(total=1, on=0, wanted=1)
    assert core.ready_for_wake(rule, s, wanted, 0.0)
    assert not core.ready_for_wake(rule, core.lost(s), wanted, 0.0)
