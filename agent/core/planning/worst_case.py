"""Step 1 of the planner: every miner's worst case and choices, the fleet picture both assignments (`sleep_only`,
`optimal`) start from, and the floors they plan above (`Prep.force_off`).

Worst-case rules (the planner keeps the sum of these under the target and every circuit cap):
- running, obeying miner planned at RunAction(w): w (its limit).
- sleeping miner: `PlannerRules.sleep_w` (control board and fans).
- waking miner, and a miner this plan wakes: its full power, `full_w` = max(nominal, stock level, last commanded
  limit) — a miner comes back from sleep at its stored or stock profile before any new limit can take hold —
  except a waking miner that accepted a limit with its wake command (`MinerView.woken_to_w`): it comes up at
  that limit and counts at it (else a fast cut's re-plan would leave ~10-15 % of the target unused for minutes).
- a miner this plan wakes whose firmware takes a limit while asleep (`drivers.base.wakes_at_limit`: LuxOS,
  Whatsminer): its planned limit, `OFF_L`. The actuator sets that limit before the wake and wakes it only if it
  took, so it comes up at it; the optimiser may wake it at any run level, so the room under a limit smaller than
  one miner's stock power is used by a throttled wake (issue 11 finding 8). The sleep-only plan wakes at stock.
- measured above that: a controllable miner whose own settled report (`MinerView.measured_w`) is above what the
  rules above count for its present state keeps the difference (`excess_w`) counted, whatever the plan does with
  it, on its circuit and the site: every miner counts at no less than max(planned, measured), and a miner that
  drifts above its limit costs room on its own circuit, not only at the site. A waking miner's `measured_w` is
  what it comes up at plus the excess it showed when it last ran (the controller keeps that excess while it
  sleeps and while its readings ramp back up): a drifting PSU drifts after a wake too. So a plan that wakes a
  sleeping miner counts that excess on top of the level it wakes it to (`MinerView.wake_excess_w`): planned
  without it, the wake filled a circuit to the watt, the waking miner counted over it on the next tick and was
  slept, and the next plan woke its neighbour the same way (soak 20261210: two Whatsminers woken and slept in
  turn every 0.2 s for minutes, each showing 56 W above its setting, a unit's spread, when it last ran).
- unreachable miner: max(last known draw, full_w, its self-step ceiling). Conservative on purpose: we cannot tell
  whether it kept our limit, rebooted into stock settings or is about to; unknown is never zero (evcc: a stale
  meter is an overload). The self-step ceiling (`efficiency.self_step_ceiling_w`) is the most its own firmware may
  move it to unasked: a Presets miner's highest preset (LuxOS ATM, on by default, steps the profile up by itself,
  and nobody sees it while the miner cannot be read), else its stock level.
- miner that ignores commands: what it actually draws (its measured power), or max(full_w, self-step ceiling)
  when that is unknown.
Minimum on/off times: a sleeping miner inside min_off is never woken (absolute). A running or waking miner inside
min_on is kept on by the optimiser's own choices; it is slept only when a cap or the target cannot be met
otherwise, and then it is listed in `Plan.min_on_overridden` with an alarm. `force_off` makes those choices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.efficiency import (
    DEFAULT_CURVE,
    EfficiencyCurve,
    range_step,
    run_levels,
    self_step_ceiling_w,
    stock_w,
)
from hashflex.agent.core.model import MinerState, MinerView
from hashflex.drivers.base import Capability, wakes_at_limit

# miner kinds
UNCONTROLLED, OFF_LOCKED, OFF, ON, ON_P, WAKE, WAKE_P, OFF_L = range(8)  # OFF_L: asleep, wakes at a planned limit
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class PlannerRules:
    min_on_s: float = 120.0
    min_off_s: float = 120.0
    sleep_w: float = 20.0  # what a sleeping miner draws
    # plan this share below the site target (meter noise, drift). Not applied to circuit caps: those bound the
    # worst case, which already counts every miner at the most it may draw, and a PDU sized for exactly its
    # miners must not cost hashrate in normal operation.
    headroom_pct: float = 0.0
    use_power_limits: bool = True  # False: plan() is plan_sleep_only()
    levels_per_range: int = 8  # run levels the optimiser considers for a continuous range
    curve: EfficiencyCurve = DEFAULT_CURVE


class ModelInfo:
    """Everything the planners need about one (capability, nominal) pair, computed once per plan."""

    __slots__ = ("capability", "ceiling", "levels", "nominal_ths", "nominal_w", "step", "stock", "stock_ths", "ths")

    def __init__(self, cap: Capability, nominal_w: float, nominal_ths: float, rules: PlannerRules) -> None:
        self.capability = cap
        self.nominal_w, self.nominal_ths = nominal_w, nominal_ths
        self.levels = run_levels(cap, nominal_w, rules.curve, rules.levels_per_range)
        self.ths = tuple(rules.curve.ths_at(w, nominal_w, nominal_ths) for w in self.levels)
        self.stock = stock_w(cap, nominal_w)
        self.ceiling = self_step_ceiling_w(cap, nominal_w)  # where its firmware may take it unasked
        self.stock_ths = rules.curve.ths_at(self.stock, nominal_w, nominal_ths)
        self.step = range_step(cap)


class Prep:
    """Per-miner arrays (index i = position in the views) and per-node floors, shared by both planners."""

    def __init__(
        self, views: list[MinerView], tree: CircuitTree, rules: PlannerRules, now: float, target_kw: float
    ) -> None:
        self.views, self.tree, self.rules = views, tree, rules
        self.alarms: list[str] = []
        n = len(views)
        self.kind = [0] * n
        self.model: list[ModelInfo | None] = [None] * n
        self.path: list[tuple[int, ...]] = [(0,)] * n  # node indices from the miner's circuit up to the site
        self.path_id = [0] * n  # index into self.paths (miners share few distinct paths)
        self.prio = [v.priority for v in views]
        self.paths: list[tuple[int, ...]] = []
        self.cur_w = [0.0] * n  # present level: what the miner is told / draws now (worst-case rules)
        self.full_w = [0.0] * n
        self.fixed_w = [0.0] * n  # worst case of uncontrolled miners
        self.excess_w = [0.0] * n  # measured above what the rules count for its present state (fixed load)
        self.wake_extra_w = [0.0] * n  # a sleeping miner's excess, counted on top of the level a plan wakes it to
        self.hard = [target_kw * 1000.0, *(c * 1000.0 for c in tree.caps_kw()[1:])]
        self.hard[0] = min(self.hard[0], tree.caps_kw()[0] * 1000.0)
        self._classify(now)
        # the measured excess is a fixed load on every node up the miner's path (floors, loads, present)
        self.excess_nodes = self.node_sums(self.excess_w) if any(self.excess_w) else [0.0] * len(self.hard)
        self.forced = [False] * n  # min-on miners this plan must sleep, and everything in an infeasible subtree
        self.curtailed = [False] * n  # inside a node that cannot be met even with everything asleep
        self.overridden: list[int] = []  # min-on miners the optimiser's floors require asleep

    def _classify(self, now: float) -> None:
        rules, tree = self.rules, self.tree
        by_value: dict[Capability, Capability] = {}  # value-equal capabilities share one model
        models: dict[tuple[int, float, float], ModelInfo] = {}
        fast: dict[tuple[int, float, float], ModelInfo] = {}  # by object id: no dataclass hashing per miner
        path_ids: dict[str | None, int] = {}
        unknown: set[str] = set()
        kind, model, path, path_id = self.kind, self.model, self.path, self.path_id
        cur_w, full_w, fixed_w = self.cur_w, self.full_w, self.fixed_w
        unreachable, sleeping, waking = MinerState.UNREACHABLE, MinerState.SLEEPING, MinerState.WAKING
        min_on, min_off, sleep_w = rules.min_on_s, rules.min_off_s, rules.sleep_w
        limits = rules.use_power_limits
        for i, v in enumerate(self.views):
            fast_key = (id(v.capability), v.nominal_w, v.nominal_ths)
            m = fast.get(fast_key)
            if m is None:  # first time this capability object is seen: share models between equal values
                cap = by_value.setdefault(v.capability, v.capability)
                key = (id(cap), v.nominal_w, v.nominal_ths)
                m = models.get(key)
                if m is None:
                    m = models[key] = ModelInfo(cap, v.nominal_w, v.nominal_ths, rules)
                fast[fast_key] = m
            model[i] = m
            pid = path_ids.get(v.circuit)
            if pid is None:
                if not tree.knows(v.circuit):
                    unknown.add(str(v.circuit))
                pid = path_ids[v.circuit] = len(self.paths)
                self.paths.append(tree.path(v.circuit) if tree.knows(v.circuit) else (0,))
            path_id[i] = pid
            path[i] = self.paths[pid]
            cmd = v.commanded_w
            full = v.nominal_w if v.nominal_w > m.stock else float(m.stock)
            if cmd is not None and cmd > full:
                full = float(cmd)
            full_w[i] = full
            st = v.state
            if st is unreachable or v.ignores_commands:
                kind[i] = UNCONTROLLED
                pw = v.power_w
                unread = full if full >= m.ceiling else float(m.ceiling)  # nobody sees where its firmware took it
                fixed_w[i] = cur_w[i] = max(unread, pw or 0.0) if st is unreachable else (unread if pw is None else pw)
            elif st is sleeping:
                kind[i] = OFF if now - v.last_transition >= min_off else OFF_LOCKED
                cur_w[i] = sleep_w
                if v.wake_excess_w > 0.0:
                    self.wake_extra_w[i] = v.wake_excess_w
                if kind[i] == OFF and limits and wakes_at_limit(v.family, v.capability):
                    kind[i] = OFF_L  # told its limit before the wake: it comes up at it, whatever it had stored
                    full_w[i] = float(m.stock)  # the most it is woken to (the sleep-only plan's level)
            elif st is waking:
                kind[i] = WAKE if now - v.last_transition >= min_on else WAKE_P
                if v.woken_to_w is not None and v.woken_to_w > 0:
                    full_w[i] = full = float(v.woken_to_w)  # it comes up at the limit it accepted
                cur_w[i] = full
            else:
                kind[i] = ON if now - v.last_transition >= min_on else ON_P
                cur_w[i] = float(cmd) if cmd is not None else float(m.stock)
            if v.measured_w is not None and kind[i] != UNCONTROLLED and v.measured_w > cur_w[i]:
                self.excess_w[i] = v.measured_w - cur_w[i]
        for c in sorted(unknown):
            self.alarms.append(f"unknown_circuit:{c}: its miners are checked against the site cap only")

    def node_sums(self, per_miner: list[float]) -> list[float]:
        """Per-node totals of a per-miner quantity (a node's total covers its whole subtree)."""
        by_path = [0.0] * len(self.paths)
        for w, pid in zip(per_miner, self.path_id, strict=True):
            by_path[pid] += w
        totals = [0.0] * len(self.hard)
        for pth, w in zip(self.paths, by_path, strict=True):
            for nd in pth:
                totals[nd] += w
        return totals

    # ------------------------------------------------------------------------------------------------ floors
    def min_w(self, i: int) -> float:
        """The least miner i can draw without breaking min on/off (the optimiser may throttle)."""
        k = self.kind[i]
        if k == UNCONTROLLED:
            return self.fixed_w[i]
        if self.forced[i]:
            return self.rules.sleep_w
        if k == ON_P:
            m = self.model[i]
            assert m is not None
            return float(m.levels[0])
        if k == WAKE_P:
            return self.full_w[i]
        return self.rules.sleep_w

    def soft_caps(self, ramp_ceiling_w: float | None) -> list[float]:
        soft = list(self.hard)
        soft[0] *= 1.0 - self.rules.headroom_pct / 100.0
        if ramp_ceiling_w is not None:
            soft[0] = min(soft[0], ramp_ceiling_w)
        return soft

    def present_w(self) -> float:
        return sum(self.cur_w) + self.excess_nodes[0]

    def force_off(self) -> list[float]:
        """Sleep min-on miners only where a node cannot be met otherwise; curtail infeasible subtrees. → floors."""
        tree, hard, rules = self.tree, self.hard, self.rules
        protected = [i for i, k in enumerate(self.kind) if k in (ON_P, WAKE_P)]
        mins = [rules.sleep_w] * len(self.views)
        for i, k in enumerate(self.kind):
            if k == UNCONTROLLED:
                mins[i] = self.fixed_w[i]
        for i in protected:
            mins[i] = self.min_w(i)
        floor = [f + x for f, x in zip(self.node_sums(mins), self.excess_nodes, strict=True)]
        order = sorted(range(len(hard)), key=lambda nd: -tree.depth(nd))  # children before parents
        forced: list[int] = []
        infeasible: list[int] = []
        for nd in order:
            if floor[nd] <= hard[nd] + _EPS:
                continue
            cands = sorted((i for i in protected if not self.forced[i] and nd in self.path[i]), key=self._force_order)
            for i in cands:
                if floor[nd] <= hard[nd] + _EPS:
                    break
                saved = self.min_w(i) - rules.sleep_w
                self.forced[i] = True
                forced.append(i)
                for p in self.path[i]:
                    floor[p] -= saved
            if floor[nd] > hard[nd] + _EPS:
                infeasible.append(nd)
                self.alarms.append(
                    f"cannot_meet:{tree.ids[nd]}: least possible worst case {floor[nd] / 1000:.3f} kW"
                    f" > {hard[nd] / 1000:.3f} kW; every controllable miner there is curtailed"
                )
        for i in reversed(forced):  # un-force any that turned out unnecessary (greedy over-shoot)
            if any(nd in self.path[i] for nd in infeasible):
                continue
            self.forced[i] = False
            back = self.min_w(i) - rules.sleep_w
            if all(floor[p] + back <= hard[p] + _EPS for p in self.path[i]):
                for p in self.path[i]:
                    floor[p] += back
            else:
                self.forced[i] = True
        for nd in infeasible:  # everything controllable in an infeasible subtree sleeps
            for i in range(len(self.views)):
                if self.kind[i] != UNCONTROLLED and nd in self.path[i]:
                    self.curtailed[i] = True
                    if not self.forced[i]:
                        freed = self.min_w(i) - rules.sleep_w
                        self.forced[i] = True
                        for p in self.path[i]:
                            floor[p] -= freed
        self.overridden = [i for i in protected if self.forced[i]]
        return floor

    def _force_order(self, i: int) -> tuple[float, float, float]:
        """Lowest priority first, then the least hashrate lost per watt freed, then the longest on."""
        m = self.model[i]
        assert m is not None
        ths = m.ths[0] if self.kind[i] == ON_P else m.stock_ths
        saved = max(_EPS, self.min_w(i) - self.rules.sleep_w)
        return (self.views[i].priority, ths / saved, self.views[i].last_transition)


def excess_w(v: MinerView, sleep_w: float) -> float:
    """What a controllable miner measurably draws above what the accounting counts for its present state (the
    site-level correction leaves this to the plan, which counts it per miner)."""
    if v.measured_w is None or v.ignores_commands or v.state is MinerState.UNREACHABLE:
        return 0.0
    if v.state is MinerState.SLEEPING:
        counted = sleep_w
    elif v.state is MinerState.WAKING:
        return 0.0  # counted at full power (or the limit it woke to) while it comes up
    elif v.commanded_w is not None:
        counted = v.commanded_w
    else:
        counted = stock_w(v.capability, v.nominal_w)
    return max(0.0, v.measured_w - counted)


def largest_full_w(views: Iterable[MinerView]) -> float:
    """The most one wake adds to the worst case: the largest `full_w` (max of nominal, stock level and last commanded
    limit) in the fleet, with the excess a sleeping miner is woken with (`MinerView.wake_excess_w`). The controller's
    ramp credit must be able to hold this much, or that miner never wakes."""
    stock: dict[tuple[int, float], int] = {}  # by capability object: miners share few of them
    top = 0.0
    for v in views:
        key = (id(v.capability), v.nominal_w)
        s = stock.get(key)
        if s is None:
            s = stock[key] = stock_w(v.capability, v.nominal_w)
        top = max(top, max(v.nominal_w, float(s), v.commanded_w or 0.0) + v.wake_excess_w)
    return top
