"""What a site can do for the grid right now: its flexibility, as the program coordinator reads it. Pure, no I/O.

`flexibility()` takes what the controller already holds each tick (the fleet views, the planner rules and the
circuit tree, the cap and the target in force, the ramp and wake-stagger rules, the wake times, the fail-safe state,
the readings' age) and returns a frozen `Flexibility`; `Flexibility.to_dict()` is the retained document on
`hashflex/<site_id>/flex` (schema `FLEX_SCHEMA`), and `parse_flex()` reads one back (the coordinator uses it: one
wire contract, not a copy). `FlexPublishPolicy` says when a new document is worth publishing.

Every power is site-level W: what the meter reads when there is one (the miners plus `other_load_w`, the site's
non-miner load), else the miners' sum.

Reachable floors ("the least it can reach now / within 60 s / within 5 min")
- Counted with the planner's own accounting (`accounting.Prep`, the worst case it plans against), with every miner
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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from hashflex.agent.core.accounting import ON_P, UNCONTROLLED, WAKE_P, PlannerRules, Prep
from hashflex.agent.core.circuits import CircuitTree
from hashflex.agent.core.failsafe import FailsafeState
from hashflex.agent.core.model import MinerState, MinerView
from hashflex.agent.core.planner import plan
from hashflex.agent.core.ramp import WakeStaggerRule

FLEX_SCHEMA = "hashflex.flex/1"
DEPTHS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
REACH_WITHIN_S: tuple[float, ...] = (0.0, 60.0, 300.0)
MAX_DEPTHS = 12  # planner calls are bounded: at most this many depths (plus one at the cap)
REFRESH_S = 30.0  # the document is republished at least this often, changed or not


@dataclass(frozen=True, slots=True)
class Reach:
    """Within `within_s` seconds the site can be down to `floor_w` (worst-case accounting)."""

    within_s: float
    floor_w: float


@dataclass(frozen=True, slots=True)
class LossPoint:
    """`shed_w` below the cap loses `lost_ths` TH/s against the hashrate at the cap."""

    depth: float  # share of the cap shed (0–1)
    shed_w: float
    lost_ths: float

    @property
    def ths_per_mw(self) -> float:
        return self.lost_ths / (self.shed_w / 1e6) if self.shed_w > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Flexibility:
    site_id: str
    at: float  # epoch seconds this was computed
    present_w: float
    metered: bool  # present_w is the site meter's reading (else the miners' sum)
    reach: tuple[Reach, ...]  # ascending within_s; floors non-increasing
    most_w: float  # the most it may draw (cap, healthy fleet); ≥ present_w
    cap_w: float  # the effective cap in force
    fleet_max_w: float  # the healthy fleet at full power plus the non-miner load
    target_w: float  # the target in force (the lowest binding input)
    ramp_up_w_per_s: float | None  # configured limit on rises (None: none)
    ramp_down_w_per_s: float | None  # decreases are immediate (None) unless a dispatch asks for a ramp
    wake_max_per_interval: int
    wake_interval_s: float
    min_on_s: float
    min_off_s: float
    ths_at_cap: float  # the planner's expected hashrate at the cap (steady state)
    ths_now: float  # the planner's expected hashrate at the present target
    loss: tuple[LossPoint, ...]  # ascending depth; lost_ths non-decreasing
    failsafe_active: bool
    failsafe_reason: str
    failsafe_level_w: float | None
    readings_at: float | None  # when the readings this is built from were taken (None: none yet)
    readings_age_s: float | None
    stale: bool  # readings older than the stale limit (or none): count this site at its worst case
    miners: int
    unreachable: int

    def floor_within(self, seconds: float) -> float:
        """The least reachable within `seconds` (the present power when no published reach is that quick)."""
        return min([self.present_w, *(r.floor_w for r in self.reach if r.within_s <= seconds)])

    def to_dict(self) -> dict[str, Any]:
        """The retained document on `hashflex/<site_id>/flex` (times as epoch seconds, powers in W)."""
        return {
            "schema": FLEX_SCHEMA,
            "site": self.site_id,
            "at": self.at,
            "present_w": self.present_w,
            "metered": self.metered,
            "reach": [{"within_s": r.within_s, "floor_w": r.floor_w} for r in self.reach],
            "most_w": self.most_w,
            "cap_w": self.cap_w,
            "fleet_max_w": self.fleet_max_w,
            "target_w": self.target_w,
            "ramp": {
                "up_w_per_s": self.ramp_up_w_per_s,
                "down_w_per_s": self.ramp_down_w_per_s,
                "wake_max_per_interval": self.wake_max_per_interval,
                "wake_interval_s": self.wake_interval_s,
                "min_on_s": self.min_on_s,
                "min_off_s": self.min_off_s,
            },
            "hashrate": {
                "ths_at_cap": self.ths_at_cap,
                "ths_now": self.ths_now,
                "loss": [
                    {"depth": p.depth, "shed_w": p.shed_w, "lost_ths": p.lost_ths, "ths_per_mw": p.ths_per_mw}
                    for p in self.loss
                ],
            },
            "failsafe": {
                "active": self.failsafe_active,
                "reason": self.failsafe_reason,
                "level_w": self.failsafe_level_w,
            },
            "readings": {"at": self.readings_at, "age_s": self.readings_age_s, "stale": self.stale},
            "miners": {"total": self.miners, "unreachable": self.unreachable},
        }


# --------------------------------------------------------------------------------------------- validation


def _finite(value: object, name: str, *, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be ≥ {minimum:g}, got {value!r}")
    return number


def _optional(value: object, name: str) -> float | None:
    return None if value is None else _finite(value, name)


def _check_views(views: Sequence[MinerView]) -> None:
    for v in views:
        where = f"miner {v.id!r}"
        _finite(v.nominal_w, f"{where}.nominal_w")
        _finite(v.nominal_ths, f"{where}.nominal_ths")
        _finite(v.last_transition, f"{where}.last_transition", minimum=None)
        for name in ("power_w", "commanded_w", "measured_w", "woken_to_w"):
            _optional(getattr(v, name), f"{where}.{name}")


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
    now = _finite(now, "now", minimum=None)
    cap = _finite(cap_w, "cap_w")
    target = _finite(target_w, "target_w")
    present = _finite(present_w, "present_w")
    other = _finite(other_load_w, "other_load_w")
    up = _optional(ramp_up_w_per_s, "ramp_up_w_per_s")
    down = _optional(ramp_down_w_per_s, "ramp_down_w_per_s")
    stale_after = _finite(stale_after_s, "stale_after_s")
    read_at = None if readings_at is None else _finite(readings_at, "readings_at", minimum=None)
    if len(depths) > MAX_DEPTHS:
        raise ValueError(f"depths: at most {MAX_DEPTHS} (each is a planner call), got {len(depths)}")
    shares = sorted({_finite(d, "depths[]") for d in depths})
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


# ------------------------------------------------------------------------------------------------ reading


def parse_flex(doc: Mapping[str, Any]) -> Flexibility:
    """A `Flexibility` from its document (`to_dict`), checked: the schema, every number finite, the reach floors
    non-increasing and the loss curve non-decreasing. Raises ValueError naming the field."""
    if not isinstance(doc, Mapping):
        raise ValueError("the flex document must be a JSON object")
    if doc.get("schema") != FLEX_SCHEMA:
        raise ValueError(f"schema must be {FLEX_SCHEMA!r}, got {doc.get('schema')!r}")

    def obj(value: object, name: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be an object")
        return value

    def flag(value: object, name: str) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value

    def items(value: object, name: str) -> list[Mapping[str, Any]]:
        if not isinstance(value, list) or len(value) > 32:
            raise ValueError(f"{name} must be a list of at most 32 objects")
        return [obj(x, f"{name}[{i}]") for i, x in enumerate(value)]

    site = doc.get("site")
    if not isinstance(site, str) or not site or len(site) > 128:
        raise ValueError("site must be the site id")
    ramp, rate = obj(doc.get("ramp"), "ramp"), obj(doc.get("hashrate"), "hashrate")
    fs, readings = obj(doc.get("failsafe"), "failsafe"), obj(doc.get("readings"), "readings")
    miners = obj(doc.get("miners"), "miners")
    reach = tuple(
        Reach(_finite(r.get("within_s"), f"reach[{i}].within_s"), _finite(r.get("floor_w"), f"reach[{i}].floor_w"))
        for i, r in enumerate(items(doc.get("reach"), "reach"))
    )
    for r0, r1 in pairwise(reach):
        if r1.within_s <= r0.within_s or r1.floor_w > r0.floor_w:
            raise ValueError("reach must be in rising within_s with non-increasing floor_w")
    loss = tuple(
        LossPoint(
            _finite(p.get("depth"), f"loss[{i}].depth"),
            _finite(p.get("shed_w"), f"loss[{i}].shed_w"),
            _finite(p.get("lost_ths"), f"loss[{i}].lost_ths"),
        )
        for i, p in enumerate(items(rate.get("loss"), "hashrate.loss"))
    )
    for p0, p1 in pairwise(loss):
        if p1.shed_w <= p0.shed_w or p1.lost_ths < p0.lost_ths:
            raise ValueError("hashrate.loss must be in rising shed_w with non-decreasing lost_ths")
    present = _finite(doc.get("present_w"), "present_w")
    most = _finite(doc.get("most_w"), "most_w")
    if most < present:
        raise ValueError("most_w must not be below present_w")
    wake_n = ramp.get("wake_max_per_interval")
    if isinstance(wake_n, bool) or not isinstance(wake_n, int) or wake_n < 1:
        raise ValueError("ramp.wake_max_per_interval must be an integer ≥ 1")
    counts = [miners.get("total"), miners.get("unreachable")]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError("miners.total and miners.unreachable must be integers ≥ 0")
    reason = fs.get("reason")
    if not isinstance(reason, str):
        raise ValueError("failsafe.reason must be a string")
    read_at = readings.get("at")
    age = readings.get("age_s")
    return Flexibility(
        site_id=site,
        at=_finite(doc.get("at"), "at", minimum=None),
        present_w=present,
        metered=flag(doc.get("metered"), "metered"),
        reach=reach,
        most_w=most,
        cap_w=_finite(doc.get("cap_w"), "cap_w"),
        fleet_max_w=_finite(doc.get("fleet_max_w"), "fleet_max_w"),
        target_w=_finite(doc.get("target_w"), "target_w"),
        ramp_up_w_per_s=_optional(ramp.get("up_w_per_s"), "ramp.up_w_per_s"),
        ramp_down_w_per_s=_optional(ramp.get("down_w_per_s"), "ramp.down_w_per_s"),
        wake_max_per_interval=wake_n,
        wake_interval_s=_finite(ramp.get("wake_interval_s"), "ramp.wake_interval_s"),
        min_on_s=_finite(ramp.get("min_on_s"), "ramp.min_on_s"),
        min_off_s=_finite(ramp.get("min_off_s"), "ramp.min_off_s"),
        ths_at_cap=_finite(rate.get("ths_at_cap"), "hashrate.ths_at_cap"),
        ths_now=_finite(rate.get("ths_now"), "hashrate.ths_now"),
        loss=loss,
        failsafe_active=flag(fs.get("active"), "failsafe.active"),
        failsafe_reason=reason[:64],
        failsafe_level_w=_optional(fs.get("level_w"), "failsafe.level_w"),
        readings_at=None if read_at is None else _finite(read_at, "readings.at", minimum=None),
        readings_age_s=_optional(age, "readings.age_s"),
        stale=flag(readings.get("stale"), "readings.stale"),
        miners=counts[0],  # type: ignore[arg-type]  # checked to be int above
        unreachable=counts[1],  # type: ignore[arg-type]
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
