"""The planner: target + fleet picture + circuits → Plan (who runs at what limit, who sleeps).

The steps, in the order `plan()` runs them, one module each:
1. `worst_case`: every miner's worst case and choices (`Prep`: its kind, run levels, what it counts at now and at
   full power), and the floors: the min-on miners a cap forces asleep, the nodes that cannot be met at all.
2. `sleep_only`: the sleep-only assignment (no power-limit changes), the baseline the optimal one must beat.
3. `optimal`: the hashrate-optimal assignment (marginal TH per W over groups of identical miners).
4. `keep_on`: on each of the two as soon as it is made, where it cuts by sleeping running miners,
   `keep_best_units` re-chooses which of them stay on, and where it wakes sleeping on/off miners, `wake_best_units`
   re-chooses which of them wake (the ratio greedy can leave most of an on/off miner's power unused).
5. `make_room`: on the optimal one, a sleeper that fits nowhere, not even with the running miners at their floor,
   let in by lowering running miners under it, where that buys hashrate (room smaller than any wake, left empty).
6. `ramp_hold`: on each of the two, under a ramp-up limit, what it raises (wakes, higher limits) is held to the
   allowance, whatever it lowers elsewhere (a lower limit lands in seconds, a wake over a minute: the site would
   dip, then climb back faster than the ramp).
7. the better of the two (`_rank`): fewer min-on overrides first (breaking min-on is a last resort), then more
   expected hashrate, and on a tie the sleep-only one (fewer power-limit commands on the wire), so hashrate is never
   below the baseline.
8. `assignment`: the chosen assignment (a level per miner) materialised as the Plan, with its worst case per node.

- `plan()`: steps 1-8. `plan_sleep_only()`: steps 1, 2, 4, 6 and 8 — the fast first response to a lower target.
Both are pure and deterministic; the same inputs give the same plan. Guarantees (property-tested):
worst case ≤ target and ≤ every circuit cap unless an alarm "cannot_meet:<node>" says it cannot be (then every
controllable miner under that node sleeps); min-off is never broken; min-on is broken only where a cap cannot be
met otherwise (listed in Plan.min_on_overridden); wakes ≤ wake_budget; increases ≤ ramp_allowance_kw over what
the fleet may draw now, net and gross (the rises summed over miners: `Plan.raised_kw`). Worst-case rules: worst_case.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.model import MinerView, Plan
from hashflex.agent.core.planning.assignment import Assignment, build_plan
from hashflex.agent.core.planning.keep_on import keep_best_units, wake_best_units
from hashflex.agent.core.planning.make_room import lower_to_wake
from hashflex.agent.core.planning.optimal import optimal_assignment
from hashflex.agent.core.planning.ramp_hold import hold_to_ramp
from hashflex.agent.core.planning.sleep_only import sleep_only_assignment
from hashflex.agent.core.planning.worst_case import PlannerRules, Prep

__all__ = ["PlannerRules", "plan", "plan_sleep_only"]


def plan(
    target_kw: float,
    miners: Sequence[MinerView],
    tree: CircuitTree,
    rules: PlannerRules,
    now: float,
    *,
    wake_budget: int,
    ramp_allowance_kw: float | None = None,
) -> Plan:
    """The hashrate-optimal plan under `target_kw` (already ≤ the cap) and every circuit cap of `tree`."""
    prep, floor = _prepare(
        target_kw, miners, tree, rules, now=now, wake_budget=wake_budget, ramp_allowance_kw=ramp_allowance_kw
    )
    caps = _caps(prep, floor, ramp_allowance_kw)
    base = sleep_only_assignment(prep, floor, wake_budget, ramp_allowance_kw)
    _best_units(prep, base, caps, wake_budget)
    hold_to_ramp(prep, base, ramp_allowance_kw, caps)
    if not rules.use_power_limits:
        return build_plan(prep, base, target_kw, baseline_ths=None)
    best = optimal_assignment(prep, floor, wake_budget, ramp_allowance_kw)
    _best_units(prep, best, caps, wake_budget)
    lower_to_wake(prep, best, caps, wake_budget)
    hold_to_ramp(prep, best, ramp_allowance_kw, caps)
    chosen = best if _rank(best) < _rank(base) else base
    return build_plan(prep, chosen, target_kw, baseline_ths=base.ths)


def plan_sleep_only(
    target_kw: float,
    miners: Sequence[MinerView],
    tree: CircuitTree,
    rules: PlannerRules,
    now: float,
    *,
    wake_budget: int,
    ramp_allowance_kw: float | None = None,
) -> Plan:
    """Meet the target with sleep and wake only (no power-limit changes): least efficient sleep first."""
    prep, floor = _prepare(
        target_kw, miners, tree, rules, now=now, wake_budget=wake_budget, ramp_allowance_kw=ramp_allowance_kw
    )
    base = sleep_only_assignment(prep, floor, wake_budget, ramp_allowance_kw)
    caps = _caps(prep, floor, ramp_allowance_kw)
    _best_units(prep, base, caps, wake_budget)
    hold_to_ramp(prep, base, ramp_allowance_kw, caps)
    return build_plan(prep, base, target_kw)


def _best_units(prep: Prep, a: Assignment, caps: list[float], wake_budget: int) -> None:
    """Step 4: which on/off miners a cut keeps on, which a plan with room wakes (`keep_on`)."""
    keep_best_units(prep, a, caps)
    wake_best_units(prep, a, caps, wake_budget)


def _prepare(
    target_kw: float,
    miners: Sequence[MinerView],
    tree: CircuitTree,
    rules: PlannerRules,
    *,
    now: float,
    wake_budget: int,
    ramp_allowance_kw: float | None,
) -> tuple[Prep, list[float]]:
    if not target_kw >= 0.0:  # also refuses NaN
        raise ValueError(f"target_kw must be a non-negative number, got {target_kw!r}")
    if wake_budget < 0:
        raise ValueError(f"wake_budget must not be negative, got {wake_budget}")
    if ramp_allowance_kw is not None and not ramp_allowance_kw >= 0.0:
        raise ValueError(f"ramp_allowance_kw must be ≥ 0 or None, got {ramp_allowance_kw!r}")
    views = miners if isinstance(miners, list) else list(miners)
    if len({v.id for v in views}) != len(views):
        raise ValueError("miner ids must be unique")
    prep = Prep(views, tree, rules, now, target_kw)
    return prep, prep.force_off()


def _caps(prep: Prep, floor: list[float], ramp_allowance_kw: float | None) -> list[float]:
    """The soft caps both planners plan under (the optimiser's: headroom, and the ramp's ceiling above the present)."""
    ceiling = None if ramp_allowance_kw is None else max(prep.present_w() + ramp_allowance_kw * 1e3, floor[0])
    return prep.soft_caps(ceiling)


def _rank(a: Assignment) -> tuple[int, float]:
    return (len(set(a.overridden)), -round(a.ths, 9))
