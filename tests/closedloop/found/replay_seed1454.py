"""The safety story of soak seed 20261213 (site seed 1454): `python -m tests.closedloop.found.replay_seed1454`.

Not a test yet (it fails on today's code: the agent, its wall clock stepped +30 s before a curtailment arrived, ends
the curtailment 30 s early by true time, and the next dispatch's ramp does not hold the plan). It prints the agent's
target each second around the early end and the violation; once fixed, it becomes tests/closedloop/test_found_*.py.
"""

from __future__ import annotations

from tests.closedloop.harness import SiteSpec, World


def main() -> None:
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
    w.say(f"site: {spec.describe()}")
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
        assert w.fleet is not None
        site_kw = round(w.fleet.latest().power_w / 1000.0, 3)
        w.dispatch(curtail_share=4.652 / site_kw, duration=300.0)  # as the soak sent it: 4.652 kW off
        w.run_for(5.0)
        w.dispatch(target_share=25.861 / w.cap_kw, ramp_share_per_min=0.601 / w.cap_kw)
        while w.violation is None and w.vt.t < 330.0:
            w.run_for(1.0)
            if w.vt.t > 290.0 and w.ctl is not None:
                print(f"t={w.vt.t:.0f} limit {w.limit_now():.2f} kW, agent target {w.ctl.target}")
    finally:
        print("violation:", w.violation)
        w.close()


if __name__ == "__main__":
    main()
