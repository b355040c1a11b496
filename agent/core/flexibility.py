"""What a site can do for the grid right now: its flexibility, as the program coordinator reads it. Pure, no I/O.

`flexibility()` takes what the controller already holds each tick (the fleet views, the planner rules and the
circuit tree, the cap and the target in force, the ramp and wake-stagger rules, the wake times, the fail-safe state,
the readings' age) and returns a frozen `Flexibility`, the document retained on `hashflex/<site_id>/flex` (its shape,
`to_dict()` and `parse_flex()` are the wire contract's: hashflex.contract.flex). `FlexPublishPolicy` says when a new
document is worth publishing.

Every power is site-level W: what the meter reads when there is one (the miners plus `other_load_w`, the site's
non-miner load), else the miners' sum.

Reachable floors ("the least it can reach now / within 60 s / within 5 min")
- Counted with the planner's own worst case (`planning.worst_case.Prep`, what it plans against), with every miner
  at the least it may draw at that moment without breaking minimum on/off times: a miner past its min-on may sleep
  (a sleep is near-instant), one inside it stays on at its lowest run level (its present level when power limits are
  off), a waking one inside min-on stays at its full power, unreachable and command-ignoring miners stay at their
  worst case. "Within T" evaluates the min-on clocks at now + T, so more miners may sleep: now ≥ 60 s ≥ 5 min.
- Staying where it is is always reachable, so a floor is at most the present power (the coordinator's allocation
  counts reach the same way: `coordinator.allocation`, `min(present, floors)`).

The most it may draw: the lower of the effective cap and the healthy fleet's full power (every reachable,
controllable miner at its full level, the rest at their worst case) plus the non-miner load; never below the
present power (a site above its cap is drawing that much, and the coordinator must count it so).

Hashrate lost per MW shed: the planner's expected hashrate at targets `depth × cap` below the cap, for the depths in
`DEPTHS`, against its hashrate at the cap. The depths are taken of the cap, not of the present power: the
coordinator's allocation prices shedding below each site's cap (`allocation.CurvePoint`), and a curve tied to the
present power would move every time the coordinator's own dispatch lowers it. The plans are made at
now + max(min_on, min_off) (no on/off lock binds: the curve is the fleet's steady cost; when it may get there is
what the floors say) with no wake or ramp limit. Any plan made for a lower target also fits a higher one, so the
hashrate kept at a target is the best of the plans at or below it: that makes the loss monotone in depth even where
the greedy planner is not. One planner
call per depth, one at the cap and one at the present target: at most `MAX_DEPTHS + 2` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.failsafe import FailsafeState
from hashflex.agent.core.model import MinerState, MinerView
from hashflex.agent.core.planning import plan
from hashflex.agent.core.planning.worst_case import ON_P, UNCONTROLLED, WAKE_P, PlannerRules, Prep
from hashflex.agent.core.ramp import WakeStaggerRule
from hashflex.contract.flex import Flexibility, LossPoint, Reach, finite, optional_finite

DEPTHS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
REACH_WITHIN_S: tuple[float, ...] = (0.0, 60.0, 300.0)
MAX_DEPTHS = 12  # planner calls are bounded: at most this many depths (plus one at the cap)
REFRESH_S = 30.0  # the document is republished at least this often, changed or not


# --------------------------------------------------------------------------------------------- validation


def _check_views(views: Sequence[MinerView]) -> None:
    for v in views:
        where = f"miner {v.id!r}"
        finite(v.nominal_w, f"{where}.nominal_w")
        finite(v.nominal_ths, f"{where}.nominal_ths")
        finite(v.last_transition, f"{where}.last_transition", minimum=None)
        for name in ("power_w", "commanded_w", "measured_w", "woken_to_w"):
            optional_finite(getattr(v, name), f"{where}.{name}")


# ---------------------------------------------------------------------------------------------- the model


def _floor_w(views: list[MinerView], tree: CircuitTree, rules: PlannerRules, at: float, cap_kw: float) -> float:
    """The least the miners can be counted at, at time `at`, without breaking min on/off (see the module doc)."""
    prep = Prep(views, tree, rules, at, cap_kw)
    total = prep.excess_nodes[0]
    for i, kind in enumerate(prep.kind):
        if kind == UNCONTROLLED:
            total += prep.fixed_w[i]
        elif kind == ON_P and not rules.use_power_limits:
            total += prep.cur_w[i]  # it may neither sleep (min-on) nor be throttled (limits off)
        elif kind in (ON_P, WAKE_P):
            total += prep.min_w(i)
        else:
            total += rules.sleep_w
    return total


def _fleet_max_w(views: list[MinerView], tree: CircuitTree, rules: PlannerRules, now: float, cap_kw: float) -> float:
    """The fleet at the most it may be planned to draw: controllable miners at full power, the rest as counted."""
    prep = Prep(views, tree, rules, now, cap_kw)
    return prep.excess_nodes[0] + sum(
        prep.fixed_w[i] if kind == UNCONTROLLED else max(prep.full_w[i], prep.cur_w[i], rules.sleep_w)
        for i, kind in enumerate(prep.kind)
    )


def flexibility(
    views: Sequence[MinerView],
    *,
    site_id: str,
    tree: CircuitTree,
    rules: PlannerRules,
    now: float,
    cap_w: float,
    target_w: float,
    present_w: float,
    metered: bool,
    other_load_w: float = 0.0,
    ramp_up_w_per_s: float | None = None,
    ramp_down_w_per_s: float | None = None,
    stagger: WakeStaggerRule | None = None,
    failsafe: FailsafeState | None = None,
    readings_at: float | None = None,
    stale_after_s: float = 30.0,
    depths: Sequence[float] = DEPTHS,
) -> Flexibility:
    """The site's flexibility (see the module doc). Raises ValueError, naming the input, on a non-finite or
    negative number, a depth outside (0, 1] or too many depths; nothing is computed then."""
    if not isinstance(site_id, str) or not site_id:
        raise ValueError(f"site_id must be a non-empty string, got {site_id!r}")
    now = finite(now, "now", minimum=None)
    cap = finite(cap_w, "cap_w")
    target = finite(target_w, "target_w")
    present = finite(present_w, "present_w")
    other = finite(other_load_w, "other_load_w")
    up = optional_finite(ramp_up_w_per_s, "ramp_up_w_per_s")
    down = optional_finite(ramp_down_w_per_s, "ramp_down_w_per_s")
    stale_after = finite(stale_after_s, "stale_after_s")
    read_at = None if readings_at is None else finite(readings_at, "readings_at", minimum=None)
    if len(depths) > MAX_DEPTHS:
        raise ValueError(f"depths: at most {MAX_DEPTHS} (each is a planner call), got {len(depths)}")
    shares = sorted({finite(d, "depths[]") for d in depths})
    if any(not 0.0 < d <= 1.0 for d in shares):
        raise ValueError(f"depths must be shares of the cap in (0, 1], got {list(depths)!r}")
    fleet = views if isinstance(views, list) else list(views)
    _check_views(fleet)
    stagger = stagger or WakeStaggerRule()

    cap_kw = cap / 1000.0
    reach: list[Reach] = []
    floor = present
    for within in REACH_WITHIN_S:
        # staying where it is is always reachable; a later floor is never above an earlier one (the min-on clocks
        # only run out) but is taken as the minimum anyway, so rounding cannot make it rise
        floor = min(floor, _floor_w(fleet, tree, rules, now + within, cap_kw) + other)
        reach.append(Reach(within, floor))
    fleet_max = _fleet_max_w(fleet, tree, rules, now, cap_kw) + other
    most = max(present, min(cap, fleet_max))

    # the loss curve: steady-state plans (no on/off lock, no wake or ramp limit) at the cap and below it
    steady = now + max(rules.min_on_s, rules.min_off_s)
    budget = len(fleet)

    def ths_at(site_w: float) -> float:
        miners_kw = max(0.0, site_w - other) / 1000.0
        return plan(miners_kw, fleet, tree, rules, steady, wake_budget=budget).expected_ths

    ths_cap = ths_at(cap)
    kept: list[float] = []
    for share in reversed(shares):  # deepest first: the best plan at or below each target (module doc)
        ths = ths_at(cap * (1.0 - share))
        kept.append(max(ths, kept[-1]) if kept else ths)
    kept.reverse()
    ths_cap = max(ths_cap, *kept) if kept else ths_cap
    loss = tuple(
        LossPoint(share, cap * share, max(0.0, ths_cap - ths)) for share, ths in zip(shares, kept, strict=True)
    )
    # non-decreasing by construction (kept is non-increasing in depth); max() guards the float crumbs
    fixed: list[LossPoint] = []
    for point in loss:
        lost = max(point.lost_ths, fixed[-1].lost_ths) if fixed else point.lost_ths
        fixed.append(LossPoint(point.depth, point.shed_w, lost))
    ths_now = ths_at(min(target, cap)) if fleet else 0.0

    age = None if read_at is None else max(0.0, now - read_at)
    return Flexibility(
        site_id=site_id,
        at=now,
        present_w=present,
        metered=metered,
        reach=tuple(reach),
        most_w=most,
        cap_w=cap,
        fleet_max_w=fleet_max,
        target_w=target,
        ramp_up_w_per_s=up,
        ramp_down_w_per_s=down,
        wake_max_per_interval=stagger.max_per_interval,
        wake_interval_s=stagger.interval_s,
        min_on_s=rules.min_on_s,
        min_off_s=rules.min_off_s,
        ths_at_cap=ths_cap,
        ths_now=min(ths_now, ths_cap),
        loss=tuple(fixed),
        failsafe_active=bool(failsafe and failsafe.active),
        failsafe_reason=failsafe.reason if failsafe and failsafe.active else "",
        failsafe_level_w=(
            None if failsafe is None or not failsafe.active or failsafe.level_kw is None else failsafe.level_kw * 1e3
        ),
        readings_at=read_at,
        readings_age_s=age,
        stale=age is None or age > stale_after,
        miners=len(fleet),
        unreachable=sum(1 for v in fleet if v.state is MinerState.UNREACHABLE),
    )


# ----------------------------------------------------------------------------------------------- publishing


@dataclass(slots=True)
class FlexPublishPolicy:
    """When to publish a new flex document: when it changed enough to matter to the coordinator, and at least every
    `refresh_s` (its age is how the coordinator tells a live site from a stale one). "Enough": any reach floor,
    the most, the present power or the target moved by more than `tolerance_share` of the cap (at least
    `min_tolerance_w`: meter noise must not republish every tick), or the fail-safe or staleness flipped."""

    refresh_s: float = REFRESH_S
    tolerance_share: float = 0.01
    min_tolerance_w: float = 1000.0
    _last: Flexibility | None = None
    _last_at: float | None = None

    def due(self, flex: Flexibility, now: float) -> bool:
        last, last_at = self._last, self._last_at
        if last is None or last_at is None or now - last_at >= self.refresh_s or now < last_at:
            return True
        if (last.failsafe_active, last.stale, last.cap_w) != (flex.failsafe_active, flex.stale, flex.cap_w):
            return True
        tol = max(self.min_tolerance_w, self.tolerance_share * flex.cap_w)
        pairs = [
            (last.present_w, flex.present_w),
            (last.most_w, flex.most_w),
            (last.target_w, flex.target_w),
            *((a.floor_w, b.floor_w) for a, b in zip(last.reach, flex.reach, strict=False)),
        ]
        return len(last.reach) != len(flex.reach) or any(abs(a - b) > tol for a, b in pairs)

    def published(self, flex: Flexibility, now: float) -> None:
        self._last, self._last_at = flex, now
