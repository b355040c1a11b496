"""Property tests of the program allocation (coordinator/allocation.py).

Every property is checked against an independent model written here (bounds per site, the curve's hashrate loss,
the proportional split), not against the module's own helpers.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hashflex.coordinator.allocation import (
    Allocation,
    CurvePoint,
    Hold,
    Reach,
    Reason,
    SiteFlex,
    SiteLimits,
    allocate,
    proportional_split,
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HORIZONS = (0.0, 60.0, 300.0)


# ----------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Bounds:
    reach_floor: float
    lo: float
    hi: float
    fixed: float | None


def bounds(site: SiteFlex, horizon_s: float) -> Bounds:
    reach_floor = min([site.present_w, *(r.floor_w for r in site.reach if r.within_s <= horizon_s)])
    lo = max(reach_floor, site.limits.min_keep_share * site.cap_w)
    fixed = None
    if site.limits.excluded:
        fixed = site.cap_w if site.limits.excluded_hold is Hold.CAP else min(site.present_w, site.cap_w)
    return Bounds(reach_floor, lo, max(site.cap_w, lo), fixed)


def count(site: SiteFlex, horizon_s: float) -> float:
    """What the site adds to Σ at its lowest: its floor, or what an excluded site is counted at."""
    b = bounds(site, horizon_s)
    return b.lo if b.fixed is None else b.fixed


def lost(site: SiteFlex, target_w: float) -> float:
    """Hashrate lost at `target_w`: linear between the points from (0, 0), the last slope beyond."""
    depth = site.cap_w - target_w
    if depth <= 0:
        return 0.0
    pts = [(0.0, 0.0)] + [(p.shed_w, p.lost_ths) for p in site.curve if p.shed_w > 0]
    for (x0, y0), (x1, y1) in pairwise(pts):
        if depth <= x1:
            return y0 + (y1 - y0) * (depth - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return y1 + (y1 - y0) / (x1 - x0) * (depth - x1)


def total_lost(sites: list[SiteFlex], targets: list[float]) -> float:
    return math.fsum(lost(s, t) for s, t in zip(sites, targets, strict=True))


# ------------------------------------------------------------------------------------------ strategies


@st.composite
def curves(draw: st.DrawFn, convex: bool) -> tuple[CurvePoint, ...]:
    """1–5 points; slopes in TH/s per MW (an S21-class fleet loses ~50 TH/s per MW, old ones ~20)."""
    n = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.floats(0.2e6, 20e6), min_size=n, max_size=n))
    slopes = draw(st.lists(st.floats(0.0, 80.0), min_size=n, max_size=n))
    if convex:
        slopes.sort()
    points, x, y = [], 0.0, 0.0
    for length, slope in zip(lengths, slopes, strict=True):
        x, y = x + length, y + slope * length / 1e6
        points.append(CurvePoint(x, y))
    return tuple(points)


@st.composite
def sites(draw: st.DrawFn, idx: int, convex: bool, over_cap: bool) -> SiteFlex:
    cap = 0.0 if draw(st.integers(0, 9)) == 0 else draw(st.floats(0.5e6, 40e6))  # some sites have nothing left
    # above its cap: a cap just lowered, not yet reached (its floor may then be above the cap for a short horizon)
    present = cap * draw(st.sampled_from([0.0, 0.5, 0.9, 1.0, 1.0, *([1.1] if over_cap else [])]))
    reach = tuple(
        Reach(draw(st.sampled_from([0.0, 30.0, 60.0, 300.0, 900.0])), present * draw(st.floats(0.0, 1.0)))
        for _ in range(draw(st.integers(0, 3)))
    )
    site_limits = SiteLimits(
        excluded=draw(st.booleans()) and draw(st.booleans()),
        excluded_hold=draw(st.sampled_from(list(Hold))),
        min_keep_share=draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0])),
    )
    return SiteFlex(f"site-{idx:03d}", present, cap, reach, draw(curves(convex)), site_limits)


@dataclass(frozen=True)
class Case:
    sites: list[SiteFlex]
    target_w: float
    horizon_s: float


def movable_fraction_floor(fleet: list[SiteFlex], horizon_s: float) -> float | None:
    """The least common fraction of cap every dispatched site can reach (None: some site cannot reach its cap)."""
    worst = 0.0
    for site in fleet:
        b = bounds(site, horizon_s)
        if b.fixed is not None:
            continue
        if b.lo > site.cap_w:
            return None
        worst = max(worst, 0.0 if site.cap_w == 0 else b.lo / site.cap_w)
    return worst


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    convex: bool = False,
    regime: str = "any",
    min_sites: int = 1,
    horizons: tuple[float, ...] = HORIZONS,
) -> Case:
    """`regime`: "any" target; "shed" between Σ floors and Σ caps; "proportional" where a proportional split of the
    target is feasible (drawn so, rather than filtered, to keep the test fast)."""
    n = draw(st.integers(min_sites, 16))
    fleet = [draw(sites(i, convex, over_cap=regime != "proportional")) for i in range(n)]
    horizon = draw(st.sampled_from(horizons))
    fixed = math.fsum(b.fixed for s in fleet if (b := bounds(s, horizon)).fixed is not None)
    caps = math.fsum(max(s.cap_w, bounds(s, horizon).lo) for s in fleet if not s.limits.excluded)
    floors = math.fsum(count(s, horizon) for s in fleet)
    if regime == "proportional":
        lowest = movable_fraction_floor(fleet, horizon)
        assert lowest is not None  # no site above its cap: every one can reach it
        fraction = draw(st.floats(lowest, 1.0))
        return Case(fleet, fixed + fraction * math.fsum(s.cap_w for s in fleet if not s.limits.excluded), horizon)
    if regime == "shed":
        return Case(fleet, draw(st.floats(floors, max(floors, fixed + caps))), horizon)
    # targets around the interesting points: below the floors, between floors and caps, above the caps
    target = draw(
        st.one_of(
            st.floats(0.0, max((fixed + caps) * 1.2, 1.0)),
            st.sampled_from([0.0, floors, fixed + caps]),
            st.floats(floors, max(floors, fixed + caps)),
        )
    )
    return Case(fleet, target, horizon)


# -------------------------------------------------------------------------------------- the properties


def run(case: Case) -> Allocation:
    allocation = allocate(case.sites, case.target_w, horizon_s=case.horizon_s)
    assert [t.site_id for t in allocation.sites] == [s.site_id for s in case.sites]
    return allocation


def check_common(case: Case, allocation: Allocation) -> None:
    targets = [t.target_w for t in allocation.sites]
    floors = math.fsum(count(s, case.horizon_s) for s in case.sites)
    assert allocation.total_w == math.fsum(targets)
    for site, out in zip(case.sites, allocation.sites, strict=True):
        b = bounds(site, case.horizon_s)
        assert math.isfinite(out.target_w)
        if b.fixed is not None:
            assert out.target_w == b.fixed
            assert out.reason is Reason.EXCLUDED
            continue
        # every site within its range, never below what it can reach in the dispatch's time
        assert b.lo <= out.target_w <= b.hi, (site, out)
        assert out.target_w >= b.reach_floor
        assert (out.floor_w, out.cap_w) == (b.lo, b.hi)
    if floors <= case.target_w:
        # feasible: Σ ≤ target, exactly, and nothing reported unmet
        assert allocation.total_w <= case.target_w
        assert allocation.unmet_w == 0.0
        assert allocation.met
        # and not needlessly low: the target is used (up to the caps), else hashrate was thrown away
        caps = math.fsum(
            s.cap_w if bounds(s, case.horizon_s).fixed is None else count(s, case.horizon_s) for s in case.sites
        )
        wanted = min(case.target_w, max(caps, floors))
        assert allocation.total_w >= wanted - 1e-6 * max(1.0, wanted)
    else:
        # unmet reported exactly, everyone held at its floor
        assert allocation.unmet_w == allocation.total_w - case.target_w
        assert allocation.unmet_w == floors - case.target_w
        assert not allocation.met
        assert all(t.target_w == count(s, case.horizon_s) for s, t in zip(case.sites, allocation.sites, strict=True))
    assert allocation.lost_ths == pytest.approx(total_lost(case.sites, targets), rel=1e-9, abs=1e-9)


@PROPS
@given(cases())
def test_every_site_in_range_and_the_sum_under_target_or_unmet_exactly(case: Case) -> None:
    check_common(case, run(case))


@PROPS
@given(cases(convex=True, regime="proportional"))
def test_convex_curves_keep_at_least_the_hashrate_of_a_proportional_split(case: Case) -> None:
    allocation = run(case)
    check_common(case, allocation)
    # the proportional split of the same target, computed here: every dispatched site the same fraction of its cap
    fixed = math.fsum(b.fixed for s in case.sites if (b := bounds(s, case.horizon_s)).fixed is not None)
    caps = math.fsum(s.cap_w for s in case.sites if not s.limits.excluded)
    fraction = 1.0 if caps == 0 else min(1.0, max(0.0, case.target_w - fixed) / caps)
    prop = [count(s, case.horizon_s) if s.limits.excluded else s.cap_w * fraction for s in case.sites]
    feasible = all(
        s.limits.excluded or bounds(s, case.horizon_s).lo <= t <= bounds(s, case.horizon_s).hi
        for s, t in zip(case.sites, prop, strict=True)
    )
    baseline = proportional_split(case.sites, case.target_w, horizon_s=case.horizon_s)
    assert baseline.feasible == feasible
    assert baseline.targets == pytest.approx(prop, rel=1e-12, abs=1e-6)
    assume(feasible)
    ours = total_lost(case.sites, [t.target_w for t in allocation.sites])
    theirs = total_lost(case.sites, prop)
    assert ours <= theirs + 1e-9 * max(1.0, theirs), (ours, theirs)


@PROPS
@given(cases(convex=True, regime="shed", min_sites=2, horizons=(60.0, 300.0)), st.data())
def test_convex_curves_no_move_of_power_between_two_sites_keeps_more_hashrate(case: Case, data: st.DataObject) -> None:
    """Optimality: shedding δ more at one site and δ less at another never loses less hashrate."""
    allocation = run(case)
    movable = [
        (s, t.target_w, bounds(s, case.horizon_s))
        for s, t in zip(case.sites, allocation.sites, strict=True)
        if not s.limits.excluded
    ]
    pairs = [
        ((a, ta), (b, tb))
        for a, ta, bounds_a in movable
        if ta - bounds_a.lo > 1.0
        for b, tb, bounds_b in movable
        if b.site_id != a.site_id and min(bounds_b.hi, b.cap_w) - tb > 1.0
    ]
    assume(pairs)
    (a, ta), (b, tb) = data.draw(st.sampled_from(pairs))
    room = min(ta - bounds(a, case.horizon_s).lo, min(bounds(b, case.horizon_s).hi, b.cap_w) - tb)
    delta = room * data.draw(st.floats(0.01, 1.0))
    before = lost(a, ta) + lost(b, tb)
    after = lost(a, ta - delta) + lost(b, tb + delta)
    assert after >= before - 1e-9 * max(1.0, before), (a.site_id, b.site_id, delta, before, after)


def test_cheapest_hashrate_is_shed_first_and_ties_share_the_level() -> None:
    def linear(site_id: str, cap_mw: float, ths_per_mw: float) -> SiteFlex:
        cap = cap_mw * 1e6
        return SiteFlex(site_id, cap, cap, (Reach(60, 0.0),), (CurvePoint(cap, ths_per_mw * cap_mw),))

    fleet = [linear("old", 10, 20.0), linear("new-1", 20, 50.0), linear("new-2", 20, 50.0)]
    allocation = allocate(fleet, 34e6, horizon_s=60)  # shed 16 MW: all 10 of the old site, 3 + 3 of the new ones
    assert [t.target_w for t in allocation.sites] == pytest.approx([0.0, 17e6, 17e6])
    assert [t.reason for t in allocation.sites] == [Reason.AT_FLOOR, Reason.SHED, Reason.SHED]
    assert allocation.clearing_ths_per_mw == pytest.approx(50.0)
    assert allocation.lost_ths == pytest.approx(10 * 20.0 + 6 * 50.0)
    # a horizon too short for any reach: nobody can move, the program is unmet by what is above the target
    short = allocate(fleet, 34e6, horizon_s=30)
    assert short.unmet_w == 50e6 - 34e6
    assert "unmet" in short.sites[0].detail


def test_excluded_and_kept_share_limits_are_respected() -> None:
    def site(site_id: str, limits: SiteLimits) -> SiteFlex:
        return SiteFlex(site_id, 8e6, 10e6, (Reach(60, 0.0),), (CurvePoint(10e6, 100.0),), limits)

    fleet = [
        site("excluded-present", SiteLimits(excluded=True)),
        site("excluded-cap", SiteLimits(excluded=True, excluded_hold=Hold.CAP)),
        site("keeps-half", SiteLimits(min_keep_share=0.5)),
        site("free", SiteLimits()),
    ]
    allocation = allocate(fleet, 20e6, horizon_s=60)
    targets = {t.site_id: t for t in allocation.sites}
    assert targets["excluded-present"].target_w == 8e6
    assert targets["excluded-cap"].target_w == 10e6
    assert targets["keeps-half"].target_w == 5e6
    assert targets["keeps-half"].reason is Reason.AT_MIN_SHARE
    assert targets["free"].target_w == 0.0
    assert allocation.unmet_w == 3e6
    assert not allocation.met


# ----------------------------------------------------------------------------------------- bad input

BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0]


def _good() -> SiteFlex:
    return SiteFlex(
        "site-x", 9e6, 10e6, (Reach(60, 2e6), Reach(300, 0.0)), (CurvePoint(0.0, 0.0), CurvePoint(5e6, 100.0))
    )


def _poison(site: SiteFlex, field: str, value: object) -> SiteFlex:
    # Any: the point is to put a value of the wrong type or range where the dataclass expects a float
    change: dict[str, Any] = {field.rsplit(".", maxsplit=1)[-1]: value}
    if field.startswith("reach"):
        reach = list(site.reach)
        reach[1] = replace(reach[1], **change)
        return replace(site, reach=tuple(reach))
    if field.startswith("curve"):
        curve = list(site.curve)
        curve[1] = replace(curve[1], **change)
        return replace(site, curve=tuple(curve))
    if field.startswith("limits"):
        return replace(site, limits=replace(site.limits, **change))
    return replace(site, **change)


FIELDS = {
    "present_w": "present_w",
    "cap_w": "cap_w",
    "reach.within_s": "reach[1].within_s",
    "reach.floor_w": "reach[1].floor_w",
    "curve.shed_w": "curve[1].shed_w",
    "curve.lost_ths": "curve[1].lost_ths",
    "limits.min_keep_share": "limits.min_keep_share",
}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12),
    st.data(),
    st.sampled_from(sorted(FIELDS)),
    st.sampled_from([*BAD_NUMBERS, "7", None, True]),
)
def test_non_finite_or_negative_input_is_refused_naming_the_field(
    n: int, data: st.DataObject, field: str, bad: object
) -> None:
    fleet = [replace(_good(), site_id=f"site-{i}") for i in range(n)]
    victim = data.draw(st.integers(0, n - 1))
    fleet[victim] = _poison(fleet[victim], field, bad)
    with pytest.raises(ValueError, match=re.escape(f"sites[{victim}] (site-{victim}).{FIELDS[field]}")):
        allocate(fleet, 5e6, horizon_s=60)
    with pytest.raises(ValueError, match=re.escape(FIELDS[field])):
        proportional_split(fleet, 5e6, horizon_s=60)


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_bad_target_or_horizon_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="target_w"):
        allocate([_good()], bad, horizon_s=60)
    with pytest.raises(ValueError, match="horizon_s"):
        allocate([_good()], 5e6, horizon_s=bad)


def test_inconsistent_input_is_refused() -> None:
    good = _good()
    with pytest.raises(ValueError, match=r"curve\[2\]\.shed_w must increase"):
        allocate([replace(good, curve=(*good.curve, CurvePoint(4e6, 200.0)))], 5e6, horizon_s=60)
    with pytest.raises(ValueError, match=r"curve\[2\]\.lost_ths must not decrease"):
        allocate([replace(good, curve=(*good.curve, CurvePoint(6e6, 50.0)))], 5e6, horizon_s=60)
    with pytest.raises(ValueError, match=r"curve\[0\]\.lost_ths must be 0"):
        allocate([replace(good, curve=(CurvePoint(0.0, 1.0), CurvePoint(5e6, 100.0)))], 5e6, horizon_s=60)
    with pytest.raises(ValueError, match=r"curve must have at least one point"):
        allocate([replace(good, curve=())], 5e6, horizon_s=60)
    with pytest.raises(ValueError, match=r"min_keep_share must be ≤ 1"):
        allocate([replace(good, limits=SiteLimits(min_keep_share=1.5))], 5e6, horizon_s=60)
    with pytest.raises(ValueError, match="appears twice"):
        allocate([good, good], 5e6, horizon_s=60)
    with pytest.raises(ValueError, match=r"sites\[0\]\.site_id"):
        allocate([replace(good, site_id="")], 5e6, horizon_s=60)


# ---------------------------------------------------------------------------------------------- speed


def big_fleet(n: int, seed: int = 15) -> list[SiteFlex]:
    """n sites of 10–30 MW, five-point convex curves, reach at 60 s and 5 min (the bench uses the same)."""
    rng = random.Random(seed)
    fleet = []
    for i in range(n):
        cap = rng.uniform(10e6, 30e6)
        slopes = sorted(rng.uniform(10.0, 80.0) for _ in range(5))
        points, x, y = [], 0.0, 0.0
        for slope in slopes:
            x, y = x + cap / 5, y + slope * cap / 5e6
            points.append(CurvePoint(x, y))
        reach = (Reach(60.0, cap * rng.uniform(0.3, 0.8)), Reach(300.0, cap * rng.uniform(0.0, 0.3)))
        fleet.append(SiteFlex(f"site-{i:04d}", cap * rng.uniform(0.8, 1.0), cap, reach, tuple(points)))
    return fleet


def test_a_thousand_sites_in_under_50_ms() -> None:
    fleet = big_fleet(1000)
    target = 0.6 * math.fsum(s.cap_w for s in fleet)
    best = math.inf
    for _ in range(5):  # best of five: the CI machine is shared, the figure is the code's, not the neighbours'
        start = time.perf_counter()
        allocation = allocate(fleet, target, horizon_s=300)
        best = min(best, time.perf_counter() - start)
    assert allocation.met
    assert allocation.total_w <= target
    assert best <= 0.050, f"1,000 sites took {best * 1e3:.1f} ms"
