"""A time-of-use window across a wall-clock step and a restart (soak 2026-12-03, seed 20261208).

The window is in the site's wall time, which the agent reads on its own clock: through a step it keeps its time, and a
restart adopts the stepped wall. After a +30 s step and a restart the agent's window opened 30 s before true time
said so, and the oracle called its cut to the window's 0 kW "too deep" against the cap. The oracle now holds the agent
to a window only where it is open on both clocks (safety) and lets it follow one open on either (decreases,
service). Fails before the oracle fix, passes after; every other invariant is still checked."""

from __future__ import annotations

from tests.closedloop.harness import SiteSpec, World


def test_a_window_opened_on_the_agents_stepped_wall_after_a_restart_is_not_a_cut_too_deep() -> None:
    spec = SiteSpec(
        miners=21,
        mix="antminer:1",
        seed=1140,
        cap_share=1.3,
        circuits=((17, 1.2),),
        tick_s=2.0,
        poll_s=2.0,
        min_on_s=0.0,
        wake_per_interval=50,
        failsafe_share=1.0,
        tou=((14, 55, 0.0),),
        asleep_share=1.0,
        refused_share=0.3,
        atm_share=0.5,
    )
    w = World(spec)
    w.prepare_start_states()
    w.start()
    try:
        cap = w.cap_kw
        w.run_for(15)
        w.dispatch(target_share=52.023 / cap, duration=1767225735.0 - w.now)
        w.run_for(5)
        w.dispatch(target_share=36.333 / cap, duration=1767225740.0 - w.now, ramp_share_per_min=0.826 / cap)
        w.run_for(5)
        w.step_clock(30)
        w.run_for(305)
        w.resume()
        w.run_for(5)
        w.restart()
        w.run_for(1200)  # was: decrease too deep at t=815 s (the window opens at 840 s true time, 810 s agent time)
        assert w.margins.checks_safety > 100
    finally:
        w.close()
