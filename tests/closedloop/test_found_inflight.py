"""A wake still on the wire counted at full power by the next plan (crash-restart integration test, CI flake).

A restart's first plan woke 7 miners that take their limit while asleep (LuxOS, Whatsminer): the actuator sets the
limit first and wakes only if it took, so they come up at it, and the plan counted them so. The next tick, 0.24 s
later with that batch still out, counted the same wakes at full power (`woken_to_w` was learnt from the wake's
result only): the site looked over its cap, and the plan slept 2 running miners and lowered 3 to make room. The
lowered ones ramp down over seconds while the wakes reached full power: the site read 31.78 kW against its 30.5 kW
cap. A wake on the wire now counts at the limit it goes out with, as the plan that sent it counted it.

Replayed with slow replies (2.5-3 s each, so a batch outlives a tick): the agent is killed as a grid dispatch ends,
restarted on its store, and nothing that runs at the restart is slept while the site is under its cap.
"""

from __future__ import annotations

from tests.closedloop.harness import SiteSpec, World


def test_wakes_on_the_wire_do_not_make_the_next_plan_sleep_running_miners() -> None:
    w = World(
        SiteSpec(
            miners=12,
            mix="luxos:1",
            seed=4,
            cap_share=0.8,
            tick_s=2.0,
            poll_s=2.0,
            min_on_s=0.0,
            min_off_s=0.0,
            wake_per_interval=50,
            wake_interval_s=5.0,
            failsafe_share=1.0,
        )
    )
    try:
        w.prepare_start_states()
        w.start()
        w.run_for(120)
        w.dispatch(target_share=0.5, duration=60.0)
        w.run_for(55)
        w.set_fault({"mode": "slow", "min_ms": 2500, "max_ms": 3000, "ips": list(w.ips)})
        w.run_for(4)
        running = {d.ip for d in w.site.devices if d.physics.current_state(w.vt.t) == "hashing"}
        assert running
        w.restart(crash=True)
        slept: set[str] = set()
        end = w.vt.t + 60
        while w.vt.t < end:  # every invariant is checked as well (safety on ground truth)
            w.run_for(0.5)
            slept |= {d.ip for d in w.site.devices if d.ip in running and d.physics.current_state(w.vt.t) == "sleeping"}
        assert not slept, f"running miners slept under a cap the site was under: {sorted(slept)}"
        assert w.margins.checks_safety > 0
    finally:
        w.close()
