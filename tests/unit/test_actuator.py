"""The actuator: only the diff goes out, in the safe order, bounded, with retries inside a budget.

The handles (tests/unit/handles.py) are in-memory MinerHandles (the driver contract), not pyasic: these tests are
about order, concurrency and retries. The same code runs against the simulator through pyasic in tests/integration.
"""

from __future__ import annotations

import itertools
import time

import pytest

from hashflex.agent.core.model import Change, MinerState, MinerView, Op, RunAction, SleepAction
from hashflex.agent.runtime.actuator import Actuator, diff, order
from hashflex.agent.runtime.clock import ScaledClock
from hashflex.drivers.base import (
    Failed,
    Family,
    OnOff,
    PowerRange,
    Result,
    Unreachable,
    Unsupported,
)
from tests.unit.handles import RANGE, RecordingHandle


def view(
    ip: str, state: MinerState = MinerState.HASHING, *, commanded: float | None = None, cap: PowerRange | OnOff = RANGE
) -> MinerView:
    return MinerView(
        id=ip,
        family=Family.LUXOS,
        capability=cap,
        nominal_w=3250.0,
        nominal_ths=100.0,
        state=state,
        power_w=3250.0,
        commanded_w=commanded,
    )


def test_diff_sends_only_changes() -> None:
    views = {
        "a": view("a"),  # running at stock, planned at stock: nothing
        "b": view("b", MinerState.SLEEPING),  # asleep, planned asleep: nothing
        "c": view("c"),  # running, planned asleep: sleep
        "d": view("d", MinerState.SLEEPING),  # asleep, planned at stock: its limit (LuxOS takes it asleep), wake
        "e": view("e", commanded=3000),  # limited at 3000, planned 2500: decrease
        "f": view("f", MinerState.THROTTLED, commanded=2000),  # planned 3000: increase
        "g": view("g", MinerState.UNREACHABLE),  # unreachable: left alone
        "h": view("h", MinerState.SLEEPING, commanded=2000),  # asleep at 2000, planned 3000: wake + limit
        "i": view("i", cap=OnOff()),  # on/off only, planned at a limit: nothing to do while it runs
    }
    actions = {
        "a": RunAction(3250),
        "b": SleepAction(),
        "c": SleepAction(),
        "d": RunAction(3250),
        "e": RunAction(2500),
        "f": RunAction(3000),
        "g": SleepAction(),
        "h": RunAction(3000),
        "i": RunAction(2000),
    }
    changes = {c.ip: c for c in diff(actions, views)}
    assert set(changes) == {"c", "d", "e", "f", "h"}
    assert changes["c"].op is Op.SLEEP
    assert changes["d"] == Change("d", Op.WAKE, 3250)
    assert (changes["e"].op, changes["e"].decrease) == (Op.SET_POWER, True)
    assert (changes["f"].op, changes["f"].decrease) == (Op.SET_POWER, False)
    assert (changes["h"].op, changes["h"].watts) == (Op.WAKE, 3000)
    # miners with a command in flight are left to the controller
    assert "c" not in {c.ip for c in diff(actions, views, pending={"c": Op.SLEEP})}
    # without power limits only sleep and wake go out
    assert {c.ip for c in diff(actions, views, use_power_limits=False)} == {"c", "d", "h"}


def test_order_puts_decreases_first_and_most_efficient_wakes_first() -> None:
    changes = [
        Change("w1", Op.WAKE, rank=30.0),
        Change("up", Op.SET_POWER, 3000, rank=1.0),
        Change("s", Op.SLEEP, decrease=True),
        Change("w2", Op.WAKE, rank=20.0),
        Change("down", Op.SET_POWER, 2000, decrease=True),
    ]
    decreases, increases, wakes = order(changes)
    assert [c.ip for c in decreases] == ["s", "down"]
    assert [c.ip for c in increases] == ["up"]
    assert [c.ip for c in wakes] == ["w2", "w1"]


def test_decreases_go_out_in_order_of_power_shed_per_command_cost() -> None:
    """Cheap RPC sleeps before a stock Antminer's three HTTP calls, bigger sheds first within a family: the site's
    draw falls fastest when the client CPU is what limits the fan-out."""

    def at(ip: str, family: Family, power_w: float, cap: PowerRange | OnOff = RANGE) -> MinerView:
        return MinerView(
            id=ip,
            family=family,
            capability=cap,
            nominal_w=3250.0,
            nominal_ths=100.0,
            state=MinerState.HASHING,
            power_w=power_w,
            commanded_w=None,
        )

    views = {
        "am": at("am", Family.ANTMINER, 3250.0, OnOff()),
        "lux-small": at("lux-small", Family.LUXOS, 1200.0),
        "lux-big": at("lux-big", Family.LUXOS, 3400.0),
        "wm": at("wm", Family.WHATSMINER, 3300.0),
        "wm-limit": at("wm-limit", Family.WHATSMINER, 3250.0),
    }
    actions = {ip: SleepAction() for ip in views} | {"wm-limit": RunAction(3000)}  # a 250 W cut by a limit
    decreases, _, _ = order(diff(actions, views))
    # per ms: wm 13,200 W, lux-big 8,500, lux-small 3,000, am 1,083, wm-limit 1,000 (a small cut yields)
    assert [c.ip for c in decreases] == ["wm", "lux-big", "lux-small", "am", "wm-limit"]


async def test_apply_sends_sleeps_before_wakes_and_batches_wakes() -> None:
    log: list[tuple[str, str, float]] = []
    handles = {ip: RecordingHandle(ip, log, delay_s=0.01) for ip in ("s1", "s2", "w1", "w2", "w3", "u")}
    act = Actuator(handles.__getitem__, concurrency=10, command_timeout_s=1.0)
    changes = [
        Change("w1", Op.WAKE, rank=1.0),
        Change("w2", Op.WAKE, rank=2.0),
        Change("w3", Op.WAKE, rank=3.0),
        Change("s1", Op.SLEEP, decrease=True),
        Change("u", Op.SET_POWER, 3000),
        Change("s2", Op.SLEEP, decrease=True),
    ]
    report = await act.apply(changes, wake_batch=2)
    assert report.sent == 6
    assert report.failed == 0
    first = {ip: t for ip, _op, t in log}
    assert max(first["s1"], first["s2"]) < first["u"] < min(first["w1"], first["w2"], first["w3"])
    # wakes in batches of 2: the third starts only after the first two are done (>= one call delay later)
    assert first["w3"] >= max(first["w1"], first["w2"]) + 0.009
    assert report.by_op() == {"sleep": {"ok": 2}, "set_power": {"ok": 1}, "wake": {"ok": 3}}


async def test_concurrency_is_bounded() -> None:
    log: list[tuple[str, str, float]] = []
    in_flight = 0
    peak = 0

    class Counting(RecordingHandle):
        async def _call(self, op: str) -> Result:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await super()._call(op)
            finally:
                in_flight -= 1

    handles = {f"m{i}": Counting(f"m{i}", log, delay_s=0.005) for i in range(40)}
    act = Actuator(handles.__getitem__, concurrency=7, command_timeout_s=1.0)
    await act.apply([Change(ip, Op.SLEEP, decrease=True) for ip in handles])
    assert peak == 7
    assert len(log) == 40


async def test_retries_with_backoff_then_success() -> None:
    log: list[tuple[str, str, float]] = []
    h = RecordingHandle("m", log, fail_first=2)
    act = Actuator({"m": h}.__getitem__, concurrency=1, command_timeout_s=1.0, retries_per_command=3, backoff_s=0.02)
    report = await act.apply([Change("m", Op.SLEEP, decrease=True)])
    assert report.results[0].ok
    assert report.results[0].attempts == 3
    assert report.retries == 2
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(log)]
    assert gaps[0] >= 0.019  # 0.02 s
    assert gaps[1] >= 0.039  # then 0.04 s


async def test_retry_budget_bounds_a_dead_batch() -> None:
    log: list[tuple[str, str, float]] = []
    handles = {f"m{i}": RecordingHandle(f"m{i}", log, fail_first=99) for i in range(20)}
    act = Actuator(
        handles.__getitem__,
        concurrency=20,
        command_timeout_s=1.0,
        retries_per_command=3,
        retry_budget_share=0.2,
        backoff_s=0.001,
    )
    report = await act.apply([Change(ip, Op.SLEEP, decrease=True) for ip in handles])
    assert report.failed == 20
    # 20 first attempts plus at most the shared budget (max(3, 20 * 0.2) = 4) of retries
    assert 20 < len(log) <= 24


async def test_outcomes_are_mapped_and_not_retried_when_pointless() -> None:
    log: list[tuple[str, str, float]] = []
    handles = {
        "unsup": RecordingHandle("unsup", log, result=Unsupported("no limits")),
        "final": RecordingHandle("final", log, result=Failed("bad auth", retryable=False)),
        "slow": RecordingHandle("slow", log, delay_s=1.0),
        "down": RecordingHandle("down", log, raises=Unreachable("refused")),
    }
    act = Actuator(handles.__getitem__, concurrency=4, command_timeout_s=0.05, retries_per_command=1, backoff_s=0.001)
    report = await act.apply([Change(ip, Op.SET_POWER, 2000) for ip in handles])
    report.results += (await act.apply([Change("ghost", Op.SLEEP)])).results
    outcome = {r.ip: (r.outcome, r.attempts) for r in report.results}
    assert outcome["unsup"] == ("unsupported", 1)
    assert outcome["final"] == ("failed", 1)
    assert outcome["slow"] == ("timeout", 2)
    assert outcome["down"] == ("unreachable", 2)
    assert outcome["ghost"] == ("skipped", 0)


async def test_a_failed_decrease_holds_the_rises_of_its_batch() -> None:
    """The rises of a plan are paid for by its decreases: one that fails leaves its room in use, and the rises are
    held (not sent) for the next plan to count it (soak of 2026-12-04 night, site 2082)."""
    log: list[tuple[str, str, float]] = []
    handles = {
        "held-session": RecordingHandle("held-session", log, result=Failed("session held", retryable=False)),
        "up": RecordingHandle("up", log),
        "waking": RecordingHandle("waking", log),
    }
    act = Actuator(handles.__getitem__, concurrency=4, command_timeout_s=1.0, retries_per_command=0)
    batch = [
        Change("held-session", Op.SET_POWER, 2363, decrease=True),
        Change("up", Op.SET_POWER, 2500),
        Change("waking", Op.WAKE),
    ]
    report = await act.apply(batch)
    outcome = {r.ip: r.outcome for r in report.results}
    assert outcome == {"held-session": "failed", "up": "held", "waking": "held"}
    assert [ip for ip, _op, _t in log] == ["held-session"]  # nothing else went out
    assert report.sent == 1
    assert report.failed == 1
    # the decrease taken: the rises go out after it
    handles["held-session"] = RecordingHandle("held-session", log)
    report = await act.apply(batch)
    assert {r.ip: r.outcome for r in report.results} == dict.fromkeys(handles, "ok")


async def test_wake_with_a_new_limit_sets_it_after_waking() -> None:
    # firmware not known to take a limit while asleep (LuxOS and Whatsminer do: tests/unit/test_wake_at_limit.py)
    log: list[tuple[str, str, float]] = []
    h = RecordingHandle("m", log)
    h.family = Family.OTHER
    act = Actuator({"m": h}.__getitem__, concurrency=1, command_timeout_s=1.0)
    await act.apply([Change("m", Op.WAKE, 2500)])
    assert [op for _ip, op, _t in log] == ["wake", "set_power:2500"]


async def test_scaled_clock_runs_faster_than_the_wall() -> None:
    clock = ScaledClock(20.0)
    t0, w0 = clock.time(), time.monotonic()
    await clock.sleep(2.0)  # 0.1 s of wall time
    wall = time.monotonic() - w0
    assert 0.09 <= wall < 0.5
    assert clock.time() - t0 == pytest.approx(wall * 20.0, rel=0.05)
    assert clock.to_wall(10.0) == 0.5
    with pytest.raises(ValueError, match="> 0"):
        ScaledClock(0)
