"""The planner's public face: target + fleet picture + circuits → Plan (who runs at what limit, who sleeps).

- `plan()`: the hashrate-optimal plan (optimiser.py), guarded by the sleep-only baseline (baseline.py): both are
  computed from the same accounting and the better one is returned, so hashrate is never below the baseline.
  "Better" = fewer min-on overrides first (breaking min-on is a last resort), then more expected hashrate, and on
  a tie the sleep-only plan (fewer power-limit commands on the wire).
- `plan_sleep_only()`: sleep and wake only — the fast first response to a lower target, and the baseline.
- Where either cuts by sleeping running miners, `exchange.keep_best_units` re-chooses which of them stay on (the
  ratio greedy can leave most of an on/off miner's power unused).
Both are pure and deterministic; the same inputs give the same plan. Guarantees (property-tested):
worst case ≤ target and ≤ every circuit cap unless an alarm "cannot_meet:<node>" says it cannot be (then every
controllable miner under that node sleeps); min-off is never broken; min-on is broken only where a cap cannot be
met otherwise (listed in Plan.min_on_overridden); wakes ≤ wake_budget; increases ≤ ramp_allowance_kw over what
the fleet may draw now. Accounting rules: accounting.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from hashflex.agent.core.accounting import PlannerRules, Prep
from hashflex.agent.core.baseline import sleep_only
from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.exchange import keep_best_units
from hashflex.agent.core.model import MinerView, Plan
from hashflex.agent.core.optimiser import optimise
from hashflex.agent.core.plan_build import Assignment, build_plan

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
    base = sleep_only(prep, floor, wake_budget, ramp_allowance_kw)
    keep_best_units(prep, base, caps)
    if not rules.use_power_limits:
        return build_plan(prep, base, target_kw, baseline_ths=None)
    best = optimise(prep, floor, wake_budget, ramp_allowance_kw)
    keep_best_units(prep, best, caps)
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
    base = sleep_only(prep, floor, wake_budget, ramp_allowance_kw)
    keep_best_units(prep, base, _caps(prep, floor, ramp_allowance_kw))
    return build_plan(prep, base, target_kw)


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
