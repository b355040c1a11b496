"""A grid dispatch read on an agent clock that a restart left 30 s ahead (soak 2026-12-03, seed 20261213, site 1454).

The agent's wall clock stepped +30 s; the agent kept its time through the step, and a crash-restart adopted the
stepped wall. A curtailment then arrived with an absolute end 300 s ahead of its issue time: read on the agent's
clock it ended 30 s early by true time, and the site rose above the limit the grid still held it to (5.43 kW against
4.29 kW). A grid window is on the sender's clock; the agent measures how far that clock is from its own by the signed
issue time at receipt and never lets the difference end a window earlier or start it later than the grid meant.
Fails before that fix, passes after; every other invariant is still checked."""

from __future__ import annotations

from tests.closedloop.harness import SiteSpec, World


def test_a_curtailment_received_on_a_clock_30_s_ahead_holds_until_its_true_end() -> None:
    spec = SiteSpec(
        miners=14,
        mix="whatsminer:3,antminer:1",
        seed=1454,
        cap_share=1.3,
        circuits=((10, 1.2),),
        min_on_s=0.0,
        min_off_s=120.0,
        wake_interval_s=5.0,
        failsafe_share=1.0,
        asleep_share=1.0,
    )
    w = World(spec)
    w.prepare_start_states()
    w.start()
    ips = w.ips
    try:
        w.run_for(5.0)
        w.set_fault({"mode": "refuse", "ips": [ips[1], ips[2], ips[6], ips[10]]})
        w.run_for(5.0)
        w.set_fault({"mode": "clear", "ips": list(ips)})
        w.run_for(5.0)
        w.step_clock(30.0)
        w.run_for(5.0)
        w.restart(crash=True)
        w.run_for(5.0)
        w.dispatch(curtail_share=4.652 / round(w.present_kw(), 3), duration=300.0)  # as the soak sent it: 4.652 kW off
        w.run_for(5.0)
        w.dispatch(target_share=25.861 / w.cap_kw, ramp_share_per_min=0.601 / w.cap_kw)
        w.run_for(400.0)  # was: safety at t=300 s (the curtailment ended at 296 s true time; it runs to 325 s)
        assert w.margins.checks_safety > 40  # the invariants were checked all along (one check per sample)
    finally:
        w.close()
