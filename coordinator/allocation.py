"""Program allocation: one program target (W) split into per-site targets that keep the most hashrate.

A pure function (no I/O, no clock, no logging): the coordinator calls `allocate` with the sites' latest
flexibility and the program target, and sends, records and explains what comes back.

The model
- A site may be asked for any target in [lo, hi]: lo is the least it can reach within the dispatch's horizon
  (its published reach, never below what it can do in that time) raised to the share of its cap that config says
  it must keep; hi is its cap (the most it may draw). A site whose reachable floor is still above its cap within
  the horizon is held at that floor (it cannot do better in time).
- What shedding costs a site is its hashrate lost as a function of the shed depth d = cap − target (W below its
  cap), piecewise-linear through its published points from (0 W, 0 TH/s), continued past the last point at the
  last segment's slope (a site publishes a few depths; its floor may lie deeper than the deepest).
- Excluded sites are not dispatched: they are counted at their present power (at most their cap) or, if config
  says so, at their cap, and the others share what is left of the target.

The method (water-filling on marginal hashrate cost)
Every site's cost curve is replaced by its lower convex envelope over [0, cap − lo], whose segments have rising
marginal cost (TH/s lost per W shed). All sites' segments are sorted by marginal cost and taken cheapest first
until Σ targets ≤ program target; segments of equal cost (identical sites) share the last step pro rata, so
the water level is the same for all of them. That is optimal for convex curves; for a non-convex curve the
envelope's straight bridge may put one site's target in a dent where its true loss is higher than the envelope
says (the loss reported is always the true curve's). O(n log n) over the curve segments.

Σ is kept ≤ the target exactly in floating point (math.fsum of the returned targets): the last rounding crumbs
are taken from a site with room above its floor. When the floors alone sum above the target, every site is held
at its floor and the result says by how many W the program is unmet.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise

# ------------------------------------------------------------------------------------------------- inputs


class Hold(StrEnum):
    """What an excluded site is counted at."""

    PRESENT = "present"  # its present power (at most its cap): what it draws now and will not be asked to change
    CAP = "cap"  # its cap: the most it may draw, the safe count when its present reading may rise


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """At `shed_w` below its cap the site loses `lost_ths` TH/s of hashrate."""

    shed_w: float
    lost_ths: float


@dataclass(frozen=True, slots=True)
class Reach:
    """Within `within_s` seconds the site can be down to `floor_w` (min-on/off, stagger and its fleet allowing)."""

    within_s: float
    floor_w: float


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Per-site limits from the program config."""

    excluded: bool = False
    excluded_hold: Hold = Hold.PRESENT
    # the share of its cap the site must keep drawing whatever the program asks (e.g. a hosting contract)
    min_keep_share: float = 0.0


@dataclass(frozen=True, slots=True)
class SiteFlex:
    """One site's flexibility as the allocation needs it (built from the site's published flexibility)."""

    site_id: str
    present_w: float
    cap_w: float
    reach: tuple[Reach, ...]
    curve: tuple[CurvePoint, ...]
    limits: SiteLimits = field(default_factory=SiteLimits)


# ------------------------------------------------------------------------------------------------ outputs


class Reason(StrEnum):
    EXCLUDED = "excluded"  # not dispatched (config); counted at its present power or its cap
    AT_CAP = "at_cap"  # nothing to shed here: the program leaves room, or its cheapest MW costs more than the level
    SHED = "shed"  # shed to the clearing level of marginal hashrate cost
    AT_FLOOR = "at_floor"  # shed as low as it can reach within the horizon
    AT_MIN_SHARE = "at_min_share"  # shed down to the share of its cap it must keep


@dataclass(frozen=True, slots=True)
class SiteTarget:
    site_id: str
    target_w: float
    floor_w: float  # the lowest it could be asked for (reachable floor or kept share)
    cap_w: float  # the highest (its cap, or its floor when that is above the cap)
    shed_w: float  # below its cap (0 when at or above it)
    lost_ths: float  # hashrate lost at this target against its cap, by its own curve
    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class Allocation:
    program_target_w: float
    horizon_s: float
    sites: tuple[SiteTarget, ...]  # in input order
    total_w: float  # math.fsum of the targets
    unmet_w: float  # by how much Σ targets exceeds the program target (0 when met)
    lost_ths: float  # Σ hashrate lost against every site at its cap
    clearing_ths_per_mw: float | None  # marginal cost of the last MW shed (None when nothing was shed)

    @property
    def met(self) -> bool:
        return self.unmet_w == 0.0

    def target(self, site_id: str) -> SiteTarget:
        for site in self.sites:
            if site.site_id == site_id:
                return site
        raise KeyError(site_id)


# --------------------------------------------------------------------------------------------- validation


_FLOAT_MAX = sys.float_info.max


def _number(value: object, where: str, *, positive: bool = False) -> float:
    """A finite number ≥ 0 (> 0 with `positive`), or ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{where} must be finite, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if number < 0 or (positive and number == 0):
        raise ValueError(f"{where} must be {'> 0' if positive else '≥ 0'}, got {value!r}")
    return number


def _field(value: object, where: str, name: str, index: int = 0) -> float:
    """`_number` for one field of a site, without building the field's name unless it is wrong (1,000 sites).
    `name` may hold "{}" for the `index` of a list item."""
    if type(value) is float or type(value) is int:  # not bool: type() is exact
        number = float(value)
        if 0.0 <= number <= _FLOAT_MAX:
            return number
    return _number(value, f"{where}.{name.format(index)}")


@dataclass(slots=True)
class _Site:
    """A validated site with its bounds for this horizon."""

    flex: SiteFlex
    cap: float
    xs: list[float]  # curve depths from 0, strictly increasing
    ys: list[float]  # hashrate lost at each depth, non-decreasing
    tail_slope: float  # TH/s per W past the last point
    lo: float
    hi: float
    share_bound: bool  # lo comes from the kept share (not the reachable floor)
    reach_floor: float
    fixed: float | None  # the count of an excluded site


def _prepare(index: int, flex: SiteFlex, horizon_s: float) -> _Site:
    where = f"sites[{index}]"
    if not isinstance(flex.site_id, str) or not flex.site_id:
        raise ValueError(f"{where}.site_id must be a non-empty string, got {flex.site_id!r}")
    where = f"sites[{index}] ({flex.site_id})"
    present = _field(flex.present_w, where, "present_w")
    cap = _field(flex.cap_w, where, "cap_w")
    limits = flex.limits
    share = _field(limits.min_keep_share, where, "limits.min_keep_share")
    if share > 1:
        raise ValueError(f"{where}.limits.min_keep_share must be ≤ 1, got {limits.min_keep_share!r}")
    if not isinstance(limits.excluded_hold, Hold):
        raise ValueError(f"{where}.limits.excluded_hold must be a Hold, got {limits.excluded_hold!r}")

    # staying where it is is always reachable; each published reach counts when it fits in the horizon
    reach_floor = present
    for j, reach in enumerate(flex.reach):
        within = _field(reach.within_s, where, "reach[{}].within_s", j)
        floor = _field(reach.floor_w, where, "reach[{}].floor_w", j)
        if within <= horizon_s:
            reach_floor = min(reach_floor, floor)

    if not flex.curve:
        raise ValueError(f"{where}.curve must have at least one point")
    xs, ys = [0.0], [0.0]
    for j, point in enumerate(flex.curve):
        x = _field(point.shed_w, where, "curve[{}].shed_w", j)
        y = _field(point.lost_ths, where, "curve[{}].lost_ths", j)
        if x == 0.0 and j == 0:
            if y != 0.0:
                raise ValueError(f"{where}.curve[0].lost_ths must be 0 at shed 0 W, got {point.lost_ths!r}")
            continue
        if x <= xs[-1]:
            raise ValueError(f"{where}.curve[{j}].shed_w must increase along the curve, got {point.shed_w!r}")
        if y < ys[-1]:
            raise ValueError(f"{where}.curve[{j}].lost_ths must not decrease along the curve, got {point.lost_ths!r}")
        xs.append(x)
        ys.append(y)
    if len(xs) < 2:
        raise ValueError(f"{where}.curve must have a point with shed_w > 0")
    tail_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])

    fixed: float | None = None
    if limits.excluded:
        fixed = cap if limits.excluded_hold is Hold.CAP else min(present, cap)
    kept = share * cap
    lo = max(reach_floor, kept)
    hi = max(cap, lo)
    return _Site(flex, cap, xs, ys, tail_slope, lo, hi, kept > reach_floor, reach_floor, fixed)


def _prepare_all(sites: Sequence[SiteFlex], target_w: float, horizon_s: float) -> tuple[list[_Site], float, float]:
    target = _number(target_w, "target_w")
    horizon = _number(horizon_s, "horizon_s")
    prepared = [_prepare(i, flex, horizon) for i, flex in enumerate(sites)]
    seen: set[str] = set()
    for site in prepared:
        if site.flex.site_id in seen:
            raise ValueError(f"sites: site_id {site.flex.site_id!r} appears twice")
        seen.add(site.flex.site_id)
    return prepared, target, horizon


# ------------------------------------------------------------------------------------------------- curves


def _lost(site: _Site, depth: float) -> float:
    """Hashrate lost at `depth` W below the cap, on the site's true (not convexified) curve."""
    if depth <= 0.0:
        return 0.0
    xs, ys = site.xs, site.ys
    if depth >= xs[-1]:
        return ys[-1] + site.tail_slope * (depth - xs[-1])
    k = bisect_right(xs, depth)  # xs[k-1] ≤ depth < xs[k]
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return y0 + (y1 - y0) * (depth - x0) / (x1 - x0)


def _envelope(site: _Site, depth_max: float) -> list[tuple[float, float]]:
    """(slope TH/s per W, length W) of the lower convex envelope of the curve over [0, depth_max], cheapest first."""
    points = [(x, y) for x, y in zip(site.xs, site.ys, strict=True) if x < depth_max]
    points.append((depth_max, _lost(site, depth_max)))
    hull: list[tuple[float, float]] = []
    for px, py in points:
        while len(hull) >= 2:
            (ox, oy), (ax, ay) = hull[-2], hull[-1]
            # drop the middle point unless the path turns upward (strictly convex) there
            if (ax - ox) * (py - oy) - (ay - oy) * (px - ox) <= 0.0:
                hull.pop()
            else:
                break
        hull.append((px, py))
    return [((y1 - y0) / (x1 - x0), x1 - x0) for (x0, y0), (x1, y1) in pairwise(hull) if x1 > x0]


# ---------------------------------------------------------------------------------------------- allocation


def allocate(sites: Sequence[SiteFlex], target_w: float, *, horizon_s: float) -> Allocation:
    """Per-site targets whose sum is at most `target_w`, keeping the most hashrate (see the module docstring).

    `horizon_s` is the time the dispatch gives the sites: a site is never asked below the least it can reach in
    it. Raises ValueError (naming the field) on a non-finite, negative or inconsistent input; nothing is returned
    then.
    """
    prepared, target, horizon = _prepare_all(sites, target_w, horizon_s)
    n = len(prepared)
    targets = [0.0] * n
    movable = [i for i, s in enumerate(prepared) if s.fixed is None]
    for i, site in enumerate(prepared):
        if site.fixed is not None:
            targets[i] = site.fixed

    # one fsum over every term, as the returned total is summed, so "met" and "unmet" agree with it exactly
    floors_total = math.fsum(s.lo if s.fixed is None else s.fixed for s in prepared)
    caps_total = math.fsum(s.hi if s.fixed is None else s.fixed for s in prepared)
    clearing: float | None = None
    mode: str
    if floors_total >= target:
        # the floors alone reach the target: hold everyone at the floor (and say by how much it is unmet)
        mode = "floors"
        for i in movable:
            targets[i] = prepared[i].lo
    elif caps_total <= target:
        mode = "room"
        for i in movable:
            targets[i] = prepared[i].hi
    else:
        mode = "shed"
        clearing = _water_fill(prepared, movable, targets, caps_total - target)
        _trim_to(prepared, movable, targets, target)

    total = math.fsum(targets)
    unmet = total - target if total > target else 0.0
    out: list[SiteTarget] = []
    for i, site in enumerate(prepared):
        t = targets[i]
        cap = site.cap
        shed = max(0.0, cap - t)
        lost = _lost(site, cap - t)
        reason, detail = _explain(site, t, mode, clearing)
        out.append(SiteTarget(site.flex.site_id, t, site.lo, site.hi, shed, lost, reason, detail))
    return Allocation(
        program_target_w=target,
        horizon_s=horizon,
        sites=tuple(out),
        total_w=total,
        unmet_w=unmet,
        lost_ths=math.fsum(s.lost_ths for s in out),
        clearing_ths_per_mw=None if clearing is None else clearing * 1e6,
    )


def _water_fill(prepared: list[_Site], movable: list[int], targets: list[float], need: float) -> float | None:
    """Shed `need` W from the movable sites' caps, cheapest marginal hashrate first; returns the clearing cost."""
    segments: list[tuple[float, int, float]] = []  # (slope, site index, length); a site's own slopes rise
    for i in movable:
        site = prepared[i]
        targets[i] = site.hi
        depth_max = site.cap - site.lo
        if depth_max > 0.0 and site.hi == site.cap:
            segments.extend((slope, i, length) for slope, length in _envelope(site, depth_max))
    # stable on equal slopes: a site's segments keep their order, ties across sites are filled together below
    segments.sort(key=lambda seg: seg[0])
    shed = dict.fromkeys(movable, 0.0)
    clearing: float | None = None
    k, count = 0, len(segments)
    while need > 0.0 and k < count:
        slope = segments[k][0]
        end = k
        while end < count and segments[end][0] == slope:
            end += 1
        group = segments[k:end]
        length = math.fsum(seg[2] for seg in group)
        clearing = slope
        if length <= need:
            for _, i, seg_len in group:
                shed[i] += seg_len
            need -= length
        else:
            fraction = need / length  # the water level: every tied segment filled to the same fraction
            for _, i, seg_len in group:
                shed[i] += seg_len * fraction
            need = 0.0
        k = end
    for i, amount in shed.items():
        site = prepared[i]
        targets[i] = min(site.hi, max(site.lo, site.hi - amount))
    return clearing


def _trim_to(prepared: list[_Site], movable: list[int], targets: list[float], target: float) -> None:
    """Take the floating-point crumbs of Σ above `target` from sites with room above their floor.

    Called only when the floors sum below the target, so there is always room; each pass removes the excess
    measured by math.fsum, the last resort steps one site down by one ulp at a time."""
    for _ in range(4 * len(movable) + 8):
        excess = math.fsum(targets) - target
        if excess <= 0.0:
            return
        # the site with the most room absorbs it: the crumbs are far smaller than any meaningful share
        i = max(movable, key=lambda j: targets[j] - prepared[j].lo)
        room = targets[i] - prepared[i].lo
        if room <= 0.0:
            break
        stepped = max(prepared[i].lo, targets[i] - min(room, excess))
        if stepped == targets[i]:
            stepped = max(prepared[i].lo, math.nextafter(targets[i], -math.inf))
        targets[i] = stepped
    if math.fsum(targets) > target:  # pragma: no cover - floors < target guarantees room; kept as a hard stop
        raise ArithmeticError("allocation could not bring Σ targets under the program target")


def _mw(watts: float) -> str:
    return f"{watts / 1e6:.3f} MW"


def _explain(site: _Site, t: float, mode: str, clearing: float | None) -> tuple[Reason, str]:
    cap = site.cap
    unmet = "; the program is unmet" if mode == "floors" else ""
    if site.fixed is not None:
        held = "its cap" if site.flex.limits.excluded_hold is Hold.CAP else "its present power"
        return Reason.EXCLUDED, f"excluded by config; counted at {held}, {_mw(t)}"
    if site.lo >= site.hi:  # no range to move in
        if site.lo > cap:
            return Reason.AT_FLOOR, f"cannot reach its cap {_mw(cap)} in time: held at {_mw(t)}{unmet}"
        if site.share_bound:
            return Reason.AT_MIN_SHARE, f"must keep all of its cap, {_mw(t)}{unmet}"
        return Reason.AT_FLOOR, f"cannot go below its cap {_mw(t)} in time{unmet}"
    if t <= site.lo:
        if site.share_bound:
            share = site.flex.limits.min_keep_share
            return Reason.AT_MIN_SHARE, f"at the share it must keep, {share:.0%} of its cap = {_mw(t)}{unmet}"
        return Reason.AT_FLOOR, f"at the least it can reach in time, {_mw(t)}{unmet}"
    if t >= site.hi:
        if mode == "room":
            return Reason.AT_CAP, f"the program leaves room: may draw its cap, {_mw(t)}"
        return Reason.AT_CAP, f"its cheapest MW costs more hashrate than the clearing level: kept at cap {_mw(t)}"
    level = "" if clearing is None else f" at {clearing * 1e6:.4g} TH/s per MW"
    return Reason.SHED, f"shed {_mw(cap - t)} to {_mw(t)}{level}"


# ----------------------------------------------------------------------------------------------- baselines


def hashrate_lost(site: SiteFlex, target_w: float, *, horizon_s: float = 0.0) -> float:
    """TH/s `site` loses at `target_w` against its cap, by its own curve (validated as `allocate` does)."""
    prepared = _prepare(0, site, _number(horizon_s, "horizon_s"))
    return _lost(prepared, prepared.cap - _number(target_w, "target_w"))


@dataclass(frozen=True, slots=True)
class Baseline:
    """A proportional split: what keeping the most hashrate is measured against."""

    targets: tuple[float, ...]  # in input order
    lost_ths: float
    feasible: bool  # every target within its site's [floor, cap] for the horizon


def proportional_split(sites: Sequence[SiteFlex], target_w: float, *, horizon_s: float) -> Baseline:
    """Every dispatched site gets the same fraction of its cap (excluded ones counted as `allocate` counts them)."""
    prepared, target, _ = _prepare_all(sites, target_w, horizon_s)
    fixed_sum = math.fsum(s.fixed for s in prepared if s.fixed is not None)
    caps = math.fsum(s.cap for s in prepared if s.fixed is None)
    fraction = 1.0 if caps == 0.0 else min(1.0, max(0.0, target - fixed_sum) / caps)
    targets = tuple(s.fixed if s.fixed is not None else s.cap * fraction for s in prepared)
    feasible = all(s.fixed is not None or s.lo <= t <= s.hi for s, t in zip(prepared, targets, strict=True))
    lost = math.fsum(_lost(s, s.cap - t) for s, t in zip(prepared, targets, strict=True))
    return Baseline(targets, lost, feasible)
