"""Hypothesis stateful exploration of the closed loop (`World`): a site is chosen, then a sequence of things that
happen to it (grid dispatches, caps, overrides, heartbeat loss, faults, restarts, clock steps) with time passing in
between; every invariant is checked on ground truth as time passes (tests/closedloop/harness.py).

A failing run is shrunk by Hypothesis and printed twice: as the steps Hypothesis ran (`state.dispatch(...)`, which
can be pasted into a test after `state = ClosedLoopMachine()`), and as the scenario story the world kept
(t=..., what happened, what the agent replied), which is what to read first.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.closedloop.harness import SiteSpec, World

MIXES = (
    "luxos:1,whatsminer:1,antminer:1",
    "luxos:1",
    "whatsminer:1",
    "antminer:1",
    "luxos:2,whatsminer:1",
    "whatsminer:3,antminer:1",
)
FAULT_MODES = (
    "refuse",
    "blackhole",
    "slow",
    "error",
    "ignore",
    "reboot",
    "drift_up",
    "drift_down",
    "atm_up",
    "atm_down",
    "session_held",
)

shares = st.floats(min_value=0.0, max_value=1.0, allow_nan=False).map(lambda x: round(x, 2))


@st.composite
def site_specs(draw: Any) -> SiteSpec:
    miners = draw(st.integers(min_value=2, max_value=30))
    circuits: list[tuple[int, float]] = []
    if draw(st.booleans()):
        left = miners
        for _ in range(draw(st.integers(min_value=1, max_value=2))):
            n = draw(st.integers(min_value=1, max_value=max(1, left)))
            circuits.append((n, draw(st.sampled_from((0.4, 0.6, 0.8, 1.2)))))
            left -= n
            if left <= 0:
                break
    tou: list[tuple[int, int, float]] = []
    if draw(st.booleans()):
        a = draw(st.integers(min_value=0, max_value=120))
        tou.append((a, a + draw(st.integers(min_value=5, max_value=60)), draw(st.sampled_from((0.0, 0.3, 0.6)))))
    return SiteSpec(
        miners=miners,
        mix=draw(st.sampled_from(MIXES)),
        seed=draw(st.integers(min_value=0, max_value=10_000)),
        cap_share=draw(st.sampled_from((0.3, 0.5, 0.8, 1.0, 1.3))),  # far above, above, at, below the cap
        circuits=tuple(circuits),
        tick_s=draw(st.sampled_from((2.0, 5.0))),
        poll_s=draw(st.sampled_from((2.0, 5.0))),
        min_on_s=draw(st.sampled_from((0.0, 60.0, 120.0))),
        min_off_s=draw(st.sampled_from((0.0, 60.0, 120.0))),
        wake_per_interval=draw(st.sampled_from((1, 4, 50))),
        wake_interval_s=draw(st.sampled_from((5.0, 10.0))),
        ramp_up_kw_per_min=draw(st.sampled_from((None, None, 20.0, 200.0))),
        failsafe_share=draw(st.sampled_from((0.0, 0.5, 1.0))),
        tou=tuple(tou),
        asleep_share=draw(st.sampled_from((0.0, 0.0, 0.3, 1.0))),
        refused_share=draw(st.sampled_from((0.0, 0.0, 0.0, 0.3))),
        blackhole_share=draw(st.sampled_from((0.0, 0.0, 0.0, 0.2))),
        rebooting_share=draw(st.sampled_from((0.0, 0.0, 0.0, 0.2))),
        atm_share=draw(st.sampled_from((0.0, 0.0, 0.0, 0.5))),
    )


class ClosedLoopMachine(RuleBasedStateMachine):
    """One site, one agent, one scenario. Steps mirror `World`'s methods one to one."""

    world: World | None = None
    soak = False  # tests/bench/bench_closedloop.py: count violations instead of failing

    def __init__(self) -> None:
        super().__init__()
        self.world = None

    # -------------------------------------------------------------------------------------------- start
    @initialize(spec=site_specs())
    def start(self, spec: SiteSpec) -> None:
        self.world = World(spec)
        self.world.soak = self.soak
        self.world.say(f"site: {spec.describe()}")
        self.world.prepare_start_states()
        self.world.start()
        self.world.run_for(5.0)

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    # -------------------------------------------------------------------------------------------- time
    @rule(seconds=st.sampled_from((5.0, 30.0, 120.0)))
    def wait(self, seconds: float) -> None:
        self.w.run_for(seconds)

    @rule(seconds=st.sampled_from((300.0, 900.0, 1800.0)))
    def wait_long(self, seconds: float) -> None:
        """Long enough for the service invariant to be checked (it waits for settle + min-off + stagger)."""
        self.w.run_for(seconds)

    # -------------------------------------------------------------------------------------------- grid
    @rule(
        level=shares,
        start_in=st.sampled_from((0.0, 0.0, 60.0)),
        duration=st.sampled_from((None, 120.0, 600.0, 1800.0)),
        ramp=st.sampled_from((None, None, 0.01, 0.2, 2.0)),
    )
    def dispatch(self, level: float, start_in: float, duration: float | None, ramp: float | None) -> None:
        self.w.dispatch(target_share=level, start_in=start_in, duration=duration, ramp_share_per_min=ramp)
        self.w.run_for(5.0)

    @rule(by=shares, duration=st.sampled_from((None, 300.0)))
    def dispatch_curtail(self, by: float, duration: float | None) -> None:
        self.w.dispatch(curtail_share=by, duration=duration)
        self.w.run_for(5.0)

    @precondition(lambda self: self.world is not None and any(r.source == "grid" for r in self.world.inputs.values()))
    @rule(pick=st.integers(min_value=0, max_value=9), level=shares)
    def revise(self, pick: int, level: float) -> None:
        """Revise one of the grid dispatches sent so far (`pick` modulo how many), to a new level."""
        ids = sorted(i for i, r in self.w.inputs.items() if r.source == "grid")
        did = ids[pick % len(ids)]
        self.w.dispatch(target_share=level, revise=did)
        self.w.run_for(5.0)

    @precondition(lambda self: self.world is not None and any(r.source == "grid" for r in self.world.inputs.values()))
    @rule(pick=st.integers(min_value=0, max_value=9))
    def cancel(self, pick: int) -> None:
        ids = sorted(i for i, r in self.w.inputs.items() if r.source == "grid")
        self.w.cancel(ids[pick % len(ids)])
        self.w.run_for(5.0)

    @rule(share=st.sampled_from((0.0, 0.3, 0.7, 1.0)))
    def cap(self, share: float) -> None:
        self.w.cap(share)
        self.w.run_for(5.0)

    @rule(on=st.booleans())
    def heartbeat(self, on: bool) -> None:
        self.w.heartbeat(on)

    # -------------------------------------------------------------------------------------------- operator
    @rule(to=shares, for_s=st.sampled_from((None, 300.0)))
    def curtail_to(self, to: float, for_s: float | None) -> None:
        self.w.curtail(to_share=to, for_s=for_s)
        self.w.run_for(5.0)

    @rule(by=shares)
    def curtail_by(self, by: float) -> None:
        self.w.curtail(by_share=by)
        self.w.run_for(5.0)

    @rule()
    def resume(self) -> None:
        self.w.resume()
        self.w.run_for(5.0)

    # -------------------------------------------------------------------------------------------- disturbances
    @rule(mode=st.sampled_from(FAULT_MODES), share=st.sampled_from((0.1, 0.3, 1.0)), seed=st.integers(0, 99))
    def fault(self, mode: str, share: float, seed: int) -> None:
        name = mode if mode == "session_held" else mode.split("_", maxsplit=1)[0]
        spec: dict[str, Any] = {"mode": name, "share": share, "seed": seed}
        if mode.startswith("drift"):
            spec["pct"] = 30 if mode == "drift_up" else -30
        if mode.startswith("atm"):
            spec["direction"] = "up" if mode == "atm_up" else "down"
            spec["interval_s"] = 30
        if mode in ("atm_up", "atm_down", "session_held") and not any(d.family == "luxos" for d in self.w.site.devices):
            return
        if mode in ("atm_up", "atm_down", "session_held"):
            spec["family"] = "luxos"
        resolved = self.w.site.parse_faults(spec)
        spec = {k: v for k, v in spec.items() if k not in ("share", "seed")}
        spec["ips"] = resolved[0].ips
        self.w.set_fault(spec)
        self.w.run_for(5.0)

    @rule(modes=st.sampled_from((None, ("refuse",), ("blackhole",), ("drift",), ("atm",), ("ignore",))))
    def clear_faults(self, modes: tuple[str, ...] | None) -> None:
        spec: dict[str, Any] = {"mode": "clear", "ips": list(self.w.ips)}
        if modes is not None:
            spec["modes"] = list(modes)
        self.w.set_fault(spec)
        self.w.run_for(5.0)

    @rule(crash=st.booleans())
    def restart(self, crash: bool) -> None:
        """A stop and start (SIGTERM), or a crash (SIGKILL: the last moments' control state and queued writes
        lost, as the chaos runner's kill -9 does to the real process)."""
        self.w.restart(crash=crash)
        self.w.run_for(5.0)

    @rule(seconds=st.sampled_from((-3600.0, -30.0, 30.0, 3600.0)))
    def clock_step(self, seconds: float) -> None:
        self.w.step_clock(seconds)
        self.w.run_for(5.0)

    # -------------------------------------------------------------------------------------------- end
    @invariant()
    def alive(self) -> None:
        if self.world is not None:
            assert self.world.ctl is not None

    def teardown(self) -> None:
        if self.world is not None:
            self.world.close()
