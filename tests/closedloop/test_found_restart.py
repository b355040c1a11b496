"""Closed-loop finding `state after restart` (soak 20261207, 6 of 1,631 scenarios), replayed deterministically.

An operator curtails the site for 300 s; the gateway's wall clock steps an hour ahead while the agent runs (it keeps
its own time: the override stays bound), then the agent restarts. The restarted agent's time starts at the wall, an
hour past the override's end as the last run stored it: it closed the override as "expired while the agent was
down" and, once its start-up fail-safe released, woke the miners the override had slept (14 kW against 9.21 kW).
"""

from __future__ import annotations

import pytest

from tests.closedloop.harness import SiteSpec, World

SPEC = SiteSpec(
    miners=16,
    mix="luxos:1,whatsminer:1,antminer:1",
    seed=764,
    cap_share=0.3,
    circuits=((4, 0.8), (12, 0.4)),
    tick_s=2.0,
    poll_s=2.0,
    min_on_s=0.0,
    min_off_s=0.0,
    wake_per_interval=1,
    ramp_up_kw_per_min=200.0,
)


def _override_binds(w: World, override: str) -> bool:
    assert w.ctl is not None
    target = w.ctl.target
    return target is not None and target.binding_id == override


def test_an_override_outlives_a_restart_after_the_wall_clock_stepped_an_hour_ahead() -> None:
    w = World(SPEC)
    try:
        w.say(f"site: {SPEC.describe()}")
        w.prepare_start_states()
        w.start()
        w.run_for(5.0)
        w.curtail(to_share=0.6, for_s=300.0)  # 9.21 kW for 300 s (t=5 .. 305)
        w.run_for(5.0)
        w.restart()
        w.run_for(5.0)
        w.step_clock(3600.0)
        w.run_for(5.0)
        w.restart()
        assert w.ctl is not None
        assert w.ctl.book.records["op:op1"].open
        assert "clock_step" in w.ctl.alarms  # the operator is told the gateway's time is off
        w.run_for(5.0)
        w.dispatch(curtail_share=0.5, duration=300.0)  # refused: the agent's wall is an hour ahead of the grid
        w.run_for(5.0)
        w.step_clock(30.0)
        w.run_for(5.0)
        w.heartbeat(False)
        w.run_for(100.0)  # past the start-up fail-safe's release (was: state after restart at t=95 s)
        assert _override_binds(w, "op:op1")
        w.run_for(155.0)  # to t=300: the heartbeat timeout's fail-safe (7.68 kW) binds below the override
        assert w.ctl.target is not None
        assert w.ctl.target.kw <= 9.21
        assert w.margins.checks_safety > 10
        assert w.margins.safety_kw > 0
    finally:
        w.close()


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_an_override_ends_when_its_time_has_run_on_the_clock_it_was_accepted_on(step_s: float) -> None:
    """Neither earlier (a step ahead) nor an hour later (a step back: before, its end stayed an hour away)."""
    w = World(
        SiteSpec(miners=8, mix="whatsminer:1", seed=5, cap_share=1.0, min_on_s=0.0, min_off_s=0.0, failsafe_share=1.0)
    )
    try:
        w.prepare_start_states()
        w.start()
        w.run_for(10.0)
        w.curtail(to_share=0.5, for_s=300.0)  # t=10 .. 310
        w.run_for(20.0)
        w.step_clock(step_s)
        w.run_for(20.0)
        w.restart()
        w.run_for(250.0)  # t=300
        assert _override_binds(w, "op:op1")
        w.run_for(20.0)  # t=320
        assert w.ctl is not None
        ended = w.ctl.book.records.get("op:op1")  # (a closed one is forgotten once arbitration no longer needs it)
        assert ended is None or not ended.open
        assert not _override_binds(w, "op:op1")
    finally:
        w.close()


def test_min_off_runs_on_across_a_restart_after_the_wall_clock_stepped_an_hour_ahead() -> None:
    """A miner slept a moment before the restart stays off for min_off_s (it was woken at once: by the restarted
    agent's clock it had been asleep for an hour)."""
    w = World(
        SiteSpec(miners=6, mix="whatsminer:1", seed=2, cap_share=1.0, min_on_s=0.0, min_off_s=120.0, failsafe_share=1.0)
    )
    try:
        w.prepare_start_states()
        w.start()
        w.run_for(10.0)
        w.curtail(to_share=0.0)  # every miner slept at ~t=10
        w.run_for(10.0)
        w.step_clock(3600.0)
        w.run_for(5.0)
        w.restart()
        w.resume()
        w.run_for(80.0)  # t=105: inside min-off
        assert all(d.physics.current_state(w.vt.t) == "sleeping" for d in w.site.devices)
        w.run_for(300.0)
        assert all(d.physics.current_state(w.vt.t) != "sleeping" for d in w.site.devices)
    finally:
        w.close()


def test_a_ramped_dispatch_goes_on_down_its_path_across_crashes() -> None:
    """Soak 20261204 `service`, site 429: a grid dispatch to 0 kW over 100 minutes (0.75 kW/min), others above and
    below it, then two crash-restarts 10 s apart. The second found the site asleep (a lower input held it then); the
    ramp started again from the site's power at the restart and held the site at nothing for the rest of the ramp:
    0.34 kW drawn where the dispatch's path and a 44.9 kW dispatch allowed 44.4 kW (t=950 s). The paths are kept
    in the store and a restart goes on down them (`agent.runtime.level.RAMPS_STATE_KEY`)."""
    w = World(
        SiteSpec(
            miners=17,
            mix="whatsminer:3,antminer:1",
            seed=429,
            cap_share=1.3,
            circuits=((6, 1.2),),
            poll_s=2.0,
            min_on_s=120.0,
            min_off_s=120.0,
            wake_interval_s=5.0,
            failsafe_share=0.0,
            tou=((37, 62, 0.0),),
        )
    )
    try:
        w.prepare_start_states()
        w.start()
        w.run_for(305.0)
        w.dispatch(target_share=0.0, duration=1800.0, ramp_share_per_min=0.748 / w.cap_kw)
        w.run_for(5.0)
        w.dispatch(target_share=53.075 / w.cap_kw)
        w.run_for(5.0)
        w.dispatch(target_share=65.035 / w.cap_kw, duration=1800.0)
        w.run_for(5.0)
        w.dispatch(target_share=56.812 / w.cap_kw, ramp_share_per_min=14.951 / w.cap_kw)
        w.run_for(5.0)
        w.dispatch(target_share=44.852 / w.cap_kw)
        w.run_for(5.0)
        w.restart(crash=True)
        w.run_for(5.0)
        w.dispatch(target_share=62.045 / w.cap_kw, start_in=60.0, duration=1800.0)
        w.run_for(5.0)
        w.restart(crash=True)
        w.run_for(700.0)  # every invariant, service first (was: t=950 s)
        assert w.margins.checks_service > 10
    finally:
        w.close()
