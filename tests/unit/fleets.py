"""Hypothesis strategies for random fleets, circuit trees and planner rules, and the settings the planner property
tests run them with (shared by the planner tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.model import MinerState, MinerView, Plan
from hashflex.agent.core.planning import PlannerRules, plan
from hashflex.drivers.base import Capability, Family, OnOff, PowerRange, Presets
from tests.unit.plan_checks import check_plan

NOW = 1_000_000.0

# the explain phase traces every line (slow on Python 3.11); shrinking alone gives a small counter-example
PROPS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


@st.composite
def capabilities(draw: st.DrawFn, nominal_w: float) -> Capability:
    kind = draw(st.sampled_from(["range", "presets", "onoff"]))
    if kind == "range":
        low = int(nominal_w * draw(st.floats(0.3, 0.9)))
        high = max(low + 1, int(nominal_w * draw(st.floats(0.8, 1.2))))
        return PowerRange(low, high, draw(st.sampled_from([1, 5, 50])))
    if kind == "presets":
        fractions = draw(st.lists(st.floats(0.4, 1.1), min_size=1, max_size=4))
        return Presets(tuple(sorted({max(1, int(nominal_w * f)) for f in fractions})))
    return OnOff()


def _some_level(draw: st.DrawFn, cap: Capability, nominal_w: float) -> int:
    if isinstance(cap, PowerRange):
        return cap.min_w + draw(st.integers(0, (cap.max_w - cap.min_w) // cap.step_w)) * cap.step_w
    if isinstance(cap, Presets):
        return draw(st.sampled_from(cap.watts))
    return round(nominal_w)


@st.composite
def miners(draw: st.DrawFn, idx: int, circuits: list[str], faults: bool = True) -> MinerView:
    nominal_w = float(draw(st.integers(1000, 4000)))
    nominal_ths = draw(st.floats(20.0, 200.0))
    cap = draw(capabilities(nominal_w))
    healthy = [MinerState.HASHING] * 3 + [MinerState.THROTTLED] * 2 + [MinerState.SLEEPING] * 3
    states = [*healthy, MinerState.WAKING, MinerState.UNREACHABLE] if faults else healthy
    state = draw(st.sampled_from(states))
    commanded = draw(st.none() | st.just(_some_level(draw, cap, nominal_w)))
    running = state in (MinerState.HASHING, MinerState.THROTTLED)
    power = draw(st.none() | st.floats(5.0, nominal_w * 1.3)) if not running else float(commanded or nominal_w)
    return MinerView(
        id=f"m{idx}",
        family=Family.LUXOS,
        capability=cap,
        nominal_w=nominal_w,
        nominal_ths=nominal_ths,
        state=state,
        power_w=power,
        commanded_w=commanded,
        last_transition=NOW - draw(st.sampled_from([0.0, 30.0, 100.0, 200.0, 1000.0])),
        circuit=draw(st.sampled_from([None, *circuits])),
        priority=draw(st.integers(0, 2)),
        ignores_commands=faults and draw(st.integers(0, 19)) == 0,
        # what a sleeping miner drew above its setting when it last ran: a wake counts it on top of its level
        wake_excess_w=draw(st.sampled_from([0.0, 0.0, 0.0, 56.0, 400.0])) if state is MinerState.SLEEPING else 0.0,
    )


@dataclass(frozen=True)
class Case:
    views: list[MinerView]
    tree: CircuitTree
    rules: PlannerRules
    target_kw: float
    wake_budget: int
    ramp_allowance_kw: float | None

    def planned(self, planner: Callable[..., Plan] = plan) -> Plan:
        """The plan `planner` (plan or plan_sleep_only) makes for this case at NOW."""
        return planner(
            self.target_kw,
            self.views,
            self.tree,
            self.rules,
            NOW,
            wake_budget=self.wake_budget,
            ramp_allowance_kw=self.ramp_allowance_kw,
        )

    def check(self, planned: Plan) -> None:
        """Every invariant of a plan made for this case (plan_checks.check_plan)."""
        check_plan(
            planned,
            self.views,
            self.tree,
            self.rules,
            now=NOW,
            target_kw=self.target_kw,
            wake_budget=self.wake_budget,
            ramp_allowance_kw=self.ramp_allowance_kw,
        )


CIRCUIT_POOL = ["c0", "c1", "c2", "c3"]


@st.composite
def trees(draw: st.DrawFn, site_cap_kw: float, fleet_kw: float) -> CircuitTree:
    """Up to four circuits, nested at random, with caps from a sliver of the fleet to all of it."""
    count = draw(st.integers(0, len(CIRCUIT_POOL)))
    circuits: list[Circuit] = []
    for k in range(count):
        parent = draw(st.sampled_from([None, *(c.id for c in circuits)]))
        cap = max(0.1, fleet_kw * draw(st.floats(0.02, 1.0)))
        circuits.append(Circuit(CIRCUIT_POOL[k], parent, cap))
    return CircuitTree(site_cap_kw, circuits)


@st.composite
def cases(draw: st.DrawFn, faults: bool = True, max_miners: int = 30) -> Case:
    """A fleet (miners may name circuits the tree lacks: they count against the site), a tree, rules, a target."""
    n = draw(st.integers(0, max_miners))
    views = [draw(miners(i, CIRCUIT_POOL, faults)) for i in range(n)]
    fleet_kw = sum(v.nominal_w for v in views) / 1000.0
    target = fleet_kw * draw(st.floats(0.0, 1.2))
    site_cap = max(target, fleet_kw * draw(st.floats(0.0, 1.2)), 0.1)
    tree = draw(trees(site_cap, fleet_kw))
    rules = PlannerRules(
        min_on_s=draw(st.sampled_from([0.0, 120.0, 300.0])),
        min_off_s=draw(st.sampled_from([0.0, 120.0, 300.0])),
        sleep_w=draw(st.sampled_from([0.0, 20.0])),
        headroom_pct=draw(st.sampled_from([0.0, 2.0])),
        levels_per_range=draw(st.sampled_from([2, 4, 8])),
    )
    ramp = draw(st.none() | st.floats(0.0, 10.0))
    return Case(views, tree, rules, target, draw(st.integers(0, 5)), ramp)
