"""Step 3 of the planner (after `worst_case` and `sleep_only`): the hashrate-optimal assignment, by marginal
efficiency, greedily, over groups of identical miners.

Each miner's choices are "asleep" or one of its run levels (efficiency.run_levels). Because the efficiency curve
is concave with hashrate(0) = 0, going from asleep to the lowest level and then up level by level buys ever fewer
TH per W. So we cut every miner's path into segments (asleep→L0, L0→L1, …), each with a ratio gain/cost, and
grant segments in order of ratio (higher priority groups first, strictly) while every node on the miner's path
still has room. That is what makes many under-clocked miners beat a few at full power when the curve says so, and
the least efficient models sleep first. Identical miners (model, priority, circuit path, state) form one group,
so a segment is granted to n miners at once: the work is per group, not per miner. A final top-up spends what is
left on one miner per continuous-range group at a finer step.

Speed at 10,000 miners: when no binding circuit is tighter than the site, a circuit-blind pass (groups across
circuits, levels handed out round-robin over circuits) is tried first and kept if every circuit holds; otherwise
the circuit-aware pass checks every grant up the miner's path, leaving out nodes that cannot bind.

Min-on miners start at their lowest level (they stay on), waking ones at full power (they cannot be throttled
yet), sleeping ones can only be woken whole, at full power, and at most `wake_budget` of them this tick — except
those whose firmware takes a limit while asleep (`OFF_L`): they are woken at any run level, climbing it like a
running miner (a wake counts against the budget once, at its first level).

A wake-up is a sunk cost (minutes without hashrate): every wake is granted after every miner that is on now
(running or waking) has had its chance to stay on, and a plan that sleeps one of those wakes nothing. So no plan
sleeps a running or waking miner to wake a more efficient sleeping one; a more efficient model only replaces a
less efficient one when a lower limit has slept it first (and power limits still move between them by ratio).

Two corrections to the greedy, neither of which sleeps a miner that is on: a wake the ratio order reached only
after raises of running miners had taken its room is tried first (`_wakes_before_raises`: running miners are
lowered, never slept, and the variant is kept only above WAKE_GAIN_SHARE more hashrate); and room smaller than any
run level is used at a level under the curve's floor, one miner per group (`_below_floor`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from hashflex.agent.core.efficiency import below_floor_w
from hashflex.agent.core.planning.assignment import Assignment
from hashflex.agent.core.planning.sleep_only import present_level
from hashflex.agent.core.planning.worst_case import (
    OFF,
    OFF_L,
    OFF_LOCKED,
    ON,
    ON_P,
    UNCONTROLLED,
    WAKE,
    WAKE_P,
    ModelInfo,
    Prep,
)

_EPS = 1e-6
# model, priority, path id, kind, full W, level W, wake extra W (Prep.wake_extra_w)
GroupKey = tuple[int, int, int, int, float, float, float]
_ON_KINDS = (ON, ON_P, WAKE, WAKE_P)  # on now: running or waking
_WAKE_KINDS = (OFF, OFF_L)  # asleep, may be woken
_LADDER_KINDS = (ON, ON_P, OFF_L)  # run level by level
# the wake-first variant (`_wakes_before_raises`) replaces the ratio order's allocation only above this gain
WAKE_GAIN_SHARE = 0.02
MAX_WAKE_VARIANTS = 8  # skipped wake groups tried one at a time (each a pass of the grant; the rest: all together)


def optimal_assignment(prep: Prep, floor: list[float], wake_budget: int, ramp_allowance_kw: float | None) -> Assignment:
    """Circuit-blind first (few, large groups; levels spread round-robin over circuits), kept when every circuit
    holds; otherwise circuit-aware (groups per circuit path, every grant checked up the path)."""
    ceiling = None if ramp_allowance_kw is None else max(prep.present_w() + ramp_allowance_kw * 1e3, floor[0])
    soft = prep.soft_caps(ceiling)
    present = [w + x for w, x in zip(prep.node_sums(prep.cur_w), prep.excess_nodes, strict=True)]
    # the site as it runs fits its limits: the hard ones (target, circuit caps), not the soft ones the plan aims
    # under. The headroom is the planner's margin for noise, and noise is what fills it: a plan that filled the room
    # to the watt is counted a few watts over it at the next tick (a woken miner's reading, a settled excess), and
    # judged against the soft cap that was a cut, re-ranked by ratio alone: soak 20261210 (seed 3865) slept four
    # running miners (7.2 kW) to raise seven others, over 14 W, and again each time the refilled plan wobbled over.
    # A node no plan can meet (`Prep.force_off`: its floor, what nothing can cut there, above its cap) fits as well
    # as it can at that floor: judged against its cap alone, one silent miner over its PDU made every plan a cut for
    # as long as it stayed so, and the ratio order then slept a stock Antminer to raise two Whatsminers, less
    # hashrate than no change, so nothing was ever raised: 1.3 kW of a 13.4 kW cap left unused (soak 20261213, seed 2)
    settled = all(present[nd] <= max(prep.hard[nd], floor[nd]) + _EPS for nd in range(len(soft)))
    # room the ramp holds back is there in a tick or two: no level under the floor for it (`_below_floor`)
    ramped = ceiling is not None and ceiling < prep.soft_caps(None)[0] - _EPS
    if len(soft) == 1:
        return _allocate(prep, floor, soft, wake_budget, blind=True, settled=settled, ramped=ramped)
    peak = _peaks(prep)
    binds = [nd == 0 or peak[nd] > soft[nd] + _EPS for nd in range(len(soft))]
    site_share = soft[0] / peak[0] if peak[0] > 0 else 1.0
    # circuit-blind spreads the site's share evenly; worth a try only if no binding circuit is tighter than that
    if all(not binds[nd] or soft[nd] >= site_share * peak[nd] for nd in range(1, len(soft))):
        a = _allocate(prep, floor, soft, wake_budget, blind=True, settled=settled, ramped=ramped)
        loads = a.node_loads(prep)
        if all(loads[nd] <= max(soft[nd], floor[nd]) + _EPS for nd in range(1, len(soft))):
            return a
    # a node whose subtree, every miner at the most it may be planned to draw, stays under its cap (a PDU sized
    # for its miners) needs no check: it is left out of the paths, so its miners group wider
    pruned = [tuple(nd for nd in path if binds[nd]) for path in prep.paths]
    return _allocate(prep, floor, soft, wake_budget, blind=False, pruned_paths=pruned, settled=settled, ramped=ramped)


def _peaks(prep: Prep) -> list[float]:
    """Per node: its subtree's load with every miner at the most the optimiser may plan it to draw."""
    most = [
        w if k == UNCONTROLLED else max(w, full + x, prep.rules.sleep_w)
        for k, w, full, x in zip(prep.kind, prep.cur_w, prep.full_w, prep.wake_extra_w, strict=True)
    ]
    return [w + x for w, x in zip(prep.node_sums(most), prep.excess_nodes, strict=True)]


def _allocate(
    prep: Prep,
    floor: list[float],
    soft: list[float],
    wake_budget: int,
    *,
    blind: bool,
    pruned_paths: list[tuple[int, ...]] | None = None,
    settled: bool = False,
    ramped: bool = False,
) -> Assignment:
    """One greedy pass. blind: only the site cap is checked; pruned_paths: the nodes to check per prep path id;
    settled: the site as it runs now fits every hard limit (see _keep_running_first); ramped: the ramp-up
    allowance, not a limit, bounds the site's room."""
    a = Assignment(prep, "optimal")
    a.overridden = list(prep.overridden)
    s = prep.rules.sleep_w
    room = [max(0.0, cap - fl) for cap, fl in zip(soft, floor, strict=True)]
    # group by the path that matters: none (blind), or the binding nodes (miners under one non-binding PDU merge)
    pruned: dict[tuple[int, ...], int] = {}
    group_path = [0] * len(prep.paths)
    for pid, path in enumerate(pruned_paths or prep.paths):
        group_path[pid] = -1 if blind else pruned.setdefault(path, len(pruned))
    path_of: list[tuple[int, ...]] = [(0,)] * max(1, len(pruned))
    for path, gid in pruned.items():
        path_of[gid] = path
    groups, models, fixed_ths = _group(prep, a, group_path)
    keys = list(groups)
    start: list[list[int]] = []  # per group, how many of its miners reach each level before any grant
    segs: list[tuple[int, float, int, int, float]] = []  # (-priority, -ratio, level index, group, cost)
    # (model, kind, wake extra) → (-ratio, j, cost)
    templates: dict[tuple[int, int, float], list[tuple[float, int, float]]] = {}
    for g, key in enumerate(keys):
        _, prio, _, kind, full, level, extra_w = key
        m = models[g]
        if kind in _LADDER_KINDS:
            tpl = templates.get((key[0], kind, extra_w))
            if tpl is None:
                tpl = templates[(key[0], kind, extra_w)] = _ladder(m, kind, s, extra_w)
            t = [0] * len(m.levels)
            if kind == ON_P:
                t[0] = len(groups[key])
            segs.extend((-prio, neg_ratio, j, g, cost) for neg_ratio, j, cost in tpl)
        else:  # OFF (wake) or WAKE (keep on): the whole miner at full power
            t = [0]
            gain = m.stock_ths if kind == OFF else prep.rules.curve.ths_at(level, m.nominal_w, m.nominal_ths)
            cost = max(_EPS, full + extra_w - s)
            segs.append((-prio, -gain / cost, 0, g, cost))
        start.append(t)
    is_wake = [key[3] in _WAKE_KINDS for key in keys]
    segs = sorted(segs)
    if settled:
        segs = _keep_running_first(segs, keys)
    segs = _keep_on_before_wakes(segs, keys)
    node_paths: list[tuple[int, ...]] = [(0,) if blind else path_of[key[2]] for key in keys]
    sizes = [len(groups[key]) for key in keys]
    # a miner on (running or still waking) that this plan sleeps means the limit wants less: wake nothing now
    # (else a smaller sleeping miner would take the room it leaves, a swap that throws a wake-up away)
    slept_on = any(f and prep.kind[i] in _ON_KINDS for i, f in enumerate(prep.forced))
    # while the site as it runs fits its hard limits, what is on stays on within them: the headroom under them is a
    # margin for noise, not a reason to sleep a miner (soak 20261204, site 10000: a miner read 4 W above its limit
    # put the site 3 W into the headroom, the waking miner was slept for it, three running ones raised into its room,
    # and the next plan woke another: a wake-up thrown away every 20 s and the site at 80 % of its limit)
    headroom_caps = prep.soft_caps(None)
    keep_slack = [max(0.0, h - c) if settled else 0.0 for h, c in zip(prep.hard, headroom_caps, strict=True)]
    grant = _Granting(
        keys,
        sizes=sizes,
        is_wake=is_wake,
        paths=node_paths,
        room=room,
        start=start,
        wake_budget=max(0, wake_budget),
        slept_on=slept_on,
        keep_slack=keep_slack,
    )
    got = grant.run(segs)
    best: tuple[_Granted, list[tuple[int, float, int, int, float]]] | None = None
    if got.skipped and got.kept_on:
        # a wake the ratio order reached too late (raises of running miners had taken the room it needed), in a
        # plan that sleeps no miner that is on: the wake-first variant, if it sleeps none either and gains enough.
        # All the skipped wakes first, and each alone: together, the one with the most TH per W took the room and
        # the one worth more did not fit (soak 20261204, site 1943: an M50S woken into a full PDU by lowering its
        # neighbours left no site room for a stock Antminer on the other PDU, the variant gained under 2 % and was
        # dropped; the Antminer alone gains 4.7 %)
        best_ths = _ths_of(prep, keys, models=models, taken=got.taken) * (1.0 + WAKE_GAIN_SHARE) + _EPS
        skipped = sorted(got.skipped)
        tries = [set(skipped)] + ([{g} for g in skipped[:MAX_WAKE_VARIANTS]] if len(skipped) > 1 else [])
        for wakes in tries:
            segs_w = _wakes_before_raises(segs, keys, wakes)
            got_w = grant.run(segs_w)
            ths_w = _ths_of(prep, keys, models=models, taken=got_w.taken)
            if got_w.kept_on and ths_w > best_ths:
                best_ths, best = ths_w, (got_w, segs_w)
        if best is not None:
            got, segs = best
    below = _below_floor(keys, models, got, sizes=sizes, paths=node_paths, sleep_w=s, ramped=ramped)
    extra = _top_up(segs, keys, models=models, taken=got.taken, paths=node_paths, room=got.room)
    a.ths = fixed_ths + _materialise(
        prep, a, groups, keys=keys, models=models, taken=got.taken, extra=extra, below=below, blind=blind
    )
    return a


class _Granted(NamedTuple):
    taken: list[list[int]]  # per group, how many of its miners reach each level
    room: list[float]  # left per node
    skipped: set[int]  # groups whose wake the room (not the budget) held back when its turn came
    kept_on: bool  # every miner that is on stays on
    wakes_left: int


class _Granting:
    """Grant segments in a given order while every node on a group's path has room, within the wake budget.
    Runs from the same start for each order it is given (the allocation and its wake-first variant)."""

    def __init__(
        self,
        keys: list[GroupKey],
        *,
        sizes: list[int],
        is_wake: list[bool],
        paths: list[tuple[int, ...]],
        room: list[float],
        start: list[list[int]],
        wake_budget: int,
        slept_on: bool,
        keep_slack: list[float],
    ) -> None:
        self.keys, self.sizes, self.is_wake, self.paths = keys, sizes, is_wake, paths
        self.room, self.start, self.wake_budget, self.slept_on = room, start, wake_budget, slept_on
        self.keep_slack = keep_slack  # per node, more room for a miner that is on to stay on (its first level)

    def run(self, segs: list[tuple[int, float, int, int, float]]) -> _Granted:
        keys, sizes, is_wake, paths, slack = self.keys, self.sizes, self.is_wake, self.paths, self.keep_slack
        room = list(self.room)
        taken = [list(t) for t in self.start]
        skipped: set[int] = set()
        slept_on = self.slept_on
        wakes_left = self.wake_budget
        min_cost = min((seg[4] for seg in segs), default=0.0)
        for _, _, j, g, cost in segs:
            if room[0] + _EPS < min_cost:
                break  # the site is full: nothing left can be granted anywhere
            t = taken[g]
            n = t[j - 1] if j else sizes[g]
            waking = is_wake[g] and j == 0  # a wake (its next levels are not: they raise a miner this plan woke)
            if waking:
                n = 0 if slept_on else min(n, wakes_left)
            if n <= 0:
                continue
            wanted = n
            keeping = j == 0 and keys[g][3] in _ON_KINDS
            for p in paths[g]:
                fit = int((room[p] + (slack[p] if keeping else 0.0) + _EPS) / cost)
                n = min(n, fit)
            if keeping and n < sizes[g]:
                slept_on = True  # not all of this group stay on (every keep-on segment comes before the wakes)
            if waking and n < wanted:
                skipped.add(g)
            if n <= 0:
                continue
            spent = n * cost
            for p in paths[g]:
                room[p] -= spent
            t[j] = n
            if waking:
                wakes_left -= n
        return _Granted(taken, room, skipped, not slept_on, wakes_left)


def _wakes_before_raises(
    segs: list[tuple[int, float, int, int, float]], keys: list[GroupKey], wakes: set[int]
) -> list[tuple[int, float, int, int, float]]:
    """The wake-first variant: every keep-on segment (a miner that is on keeps its first level), then the first
    level of the wakes of `wakes`, then the rest in the order given. Running miners give up raises (never their
    first level: granted before any wake, and a variant that sleeps one is not taken) so that a sleeping miner
    wakes at its lowest level: two miners at part power where the ratio order had raised one to full and left the
    room for the other short (soak 20261210: a Whatsminer M60S at full power and an M50S asleep in 4.2 kW, where
    both fit at part power with 14 % more hashrate). Taken only when it beats the ratio order by WAKE_GAIN_SHARE:
    a wake-up is minutes without hashrate, and a re-plan from a half-done change (the runner lowered, the wake on
    its way) must not find a close call the other way. It brings back no swap chain: it sleeps nothing, so the
    miners that are on only grow in number while the limit holds."""
    keep = [seg for seg in segs if seg[2] == 0 and keys[seg[3]][3] in _ON_KINDS]
    first = [seg for seg in segs if seg[2] == 0 and seg[3] in wakes]
    rest = [seg for seg in segs if seg[2] != 0 or (keys[seg[3]][3] not in _ON_KINDS and seg[3] not in wakes)]
    return keep + first + rest


def _below_floor(
    keys: list[GroupKey],
    models: list[ModelInfo],
    got: _Granted,
    *,
    sizes: list[int],
    paths: list[tuple[int, ...]],
    sleep_w: float,
    ramped: bool,
) -> dict[int, int]:
    """The last resort for room no run level fits: per group, one more miner kept on (a running one this plan
    sleeps) or woken (a sleeping one whose firmware takes a limit while asleep, within the wake budget, when the
    plan sleeps no miner that is on) at the highest level under its lowest run level that fits. → group → level.

    The run levels start at the curve's floor, where efficiency stops improving: below it more miners at lower
    levels buy nothing over fewer at the floor. But where the room is smaller than any miner at the floor, such a
    level is the only hashrate there is (soak 20261210: a Whatsminer M30S++ takes 1,800 W, its floor is 1,910 W,
    and a 1.87 kW cap kept the site asleep for good). Spends `got.room`.

    `ramped`: the ramp-up allowance bounds the site's room, which is there at a run level in a tick or two: a miner
    whose room the site's bounds is left for then. One whose room a circuit bounds tighter is not (no ramp widens
    a PDU: soak 20261204, site 544, 1.77 kW left on a PDU under an M50S's 1.8 kW floor, empty for as long as the
    site ramped)."""
    room = got.room
    wakes_left = got.wakes_left
    out: dict[int, int] = {}
    cands = [
        g
        for g, key in enumerate(keys)
        if (key[3] == ON or (key[3] == OFF_L and got.kept_on)) and got.taken[g][0] < sizes[g]
    ]
    # higher priority first; a running miner before a wake (no wake-up to pay); then the most TH per W
    cands.sort(key=lambda g: (-keys[g][1], keys[g][3] != ON, -models[g].ths[0] / models[g].levels[0]))
    for g in cands:
        if room[0] < 1.0:
            break
        waking = keys[g][3] == OFF_L
        if waking and wakes_left <= 0:
            continue
        m = models[g]
        extra_w = keys[g][6]
        spare = min(room[p] for p in paths[g])
        if ramped and spare >= room[0] - _EPS:
            continue
        level = below_floor_w(m.capability, m.nominal_w, m.levels[0], spare + sleep_w - extra_w)
        if level is None:
            continue
        out[g] = level
        for p in paths[g]:
            room[p] -= level + extra_w - sleep_w
        if waking:
            wakes_left -= 1
    return out


def _ths_of(
    prep: Prep,
    keys: list[GroupKey],
    *,
    models: list[ModelInfo],
    taken: list[list[int]],
) -> float:
    """The hashrate of the groups' level counts (what `_materialise` hands out before the top-up and the levels
    under the floor), without handing them out."""
    curve = prep.rules.curve
    ths = 0.0
    for g, key in enumerate(keys):
        m, t, kind = models[g], taken[g], key[3]
        if kind in _LADDER_KINDS:
            for j, n in enumerate(t):
                ths += (n - (t[j + 1] if j + 1 < len(t) else 0)) * m.ths[j]
        elif t[0] > 0:
            gain = m.stock_ths if kind in _WAKE_KINDS else curve.ths_at(key[5], m.nominal_w, m.nominal_ths)
            ths += t[0] * gain
    return ths


def _keep_running_first(
    segs: list[tuple[int, float, int, int, float]], keys: list[GroupKey]
) -> list[tuple[int, float, int, int, float]]:
    """While the site fits its limits as it runs, every miner that is on keeps its first level before any miner
    of its priority is raised: no plan sleeps a running miner only to give its power to another. Such a swap is
    worth a little hashrate on paper, but it is carried out sleep first (the raises wait until the sleep shows,
    `Controller._hold_rises`), so the site dips by the slept miners for seconds, and each re-plan from the half-done
    swap chose another one (soak: three miners slept in 6 s under a cap the site already met, one of them woken
    again 11 s later). A limit that cuts still sleeps the least efficient first: then the site does not fit (its
    target or a circuit cap; within the headroom it fits, and the cut comes off the raises), and the segments
    compete by ratio alone."""
    return sorted(segs, key=lambda seg: (seg[0], not (seg[2] == 0 and keys[seg[3]][3] in _ON_KINDS)))


def _keep_on_before_wakes(
    segs: list[tuple[int, float, int, int, float]], keys: list[GroupKey]
) -> list[tuple[int, float, int, int, float]]:
    """Move every wake after the last keep-on segment (a running miner's first level, a waking miner kept on),
    the rest in ratio order: a wake is granted only from the room left once every miner that is on has had its
    chance to stay on, so no plan sleeps a running or still-waking miner to wake a more efficient one (its
    wake-up would be thrown away, and the new one's started: minutes without hashrate, N4)."""
    last = -1
    for pos, seg in enumerate(segs):
        if seg[2] == 0 and keys[seg[3]][3] in _ON_KINDS:
            last = pos
    if last < 0:
        return segs
    head = segs[: last + 1]
    held = [seg for seg in head if keys[seg[3]][3] in _WAKE_KINDS]  # every level of a wake, in order
    if not held:
        return segs
    return [seg for seg in head if keys[seg[3]][3] not in _WAKE_KINDS] + held + segs[last + 1 :]


def _ladder(m: ModelInfo, kind: int, sleep_w: float, wake_extra_w: float = 0.0) -> list[tuple[float, int, float]]:
    """The segments of one miner of model m: (-ratio, level index, cost), ratios kept non-increasing. A sleeping
    miner's first segment also costs its wake extra (`Prep.wake_extra_w`)."""
    out: list[tuple[float, int, float]] = []
    start, prev_w, prev_h = 0, sleep_w - wake_extra_w, 0.0
    if kind == ON_P:  # already on at its lowest level (counted in the floor)
        start, prev_w, prev_h = 1, float(m.levels[0]), m.ths[0]
    ratio_prev = math.inf
    for j in range(start, len(m.levels)):
        cost = max(_EPS, m.levels[j] - prev_w)
        ratio_prev = min(ratio_prev, (m.ths[j] - prev_h) / cost)  # keep per-miner order monotone
        out.append((-ratio_prev, j, cost))
        prev_w, prev_h = float(m.levels[j]), m.ths[j]
    return out


def _group(
    prep: Prep, a: Assignment, group_path: list[int]
) -> tuple[dict[GroupKey, list[int]], list[ModelInfo], float]:
    """Group the miners the optimiser may move; fix the ones it may not (locked, forced, min-on waking)."""
    groups: dict[GroupKey, list[int]] = {}
    curve, kinds, forced, full_w = prep.rules.curve, prep.kind, prep.forced, prep.full_w
    prio = prep.prio
    path_id = [group_path[pid] for pid in prep.path_id]
    fixed_ths = 0.0
    for i, k in enumerate(kinds):
        if k in (UNCONTROLLED, OFF_LOCKED) or forced[i]:
            continue  # uncontrolled keep their worst case; locked and forced sleep (the Assignment default)
        m = prep.model[i]
        assert m is not None
        if k == WAKE_P:
            lv = present_level(prep, i)
            a.level[i], a.wc[i] = lv, full_w[i]
            fixed_ths += curve.ths_at(lv, m.nominal_w, m.nominal_ths)
            continue
        if k in (ON, ON_P):
            key: GroupKey = (id(m), prio[i], path_id[i], k, 0.0, 0.0, 0.0)
        elif k in _WAKE_KINDS:
            key = (id(m), prio[i], path_id[i], k, full_w[i], 0.0, prep.wake_extra_w[i])
        else:  # WAKE
            key = (id(m), prio[i], path_id[i], k, full_w[i], present_level(prep, i), 0.0)
        members = groups.get(key)
        if members is None:
            groups[key] = [i]
        else:
            members.append(i)
    models = []
    for members in groups.values():
        m = prep.model[members[0]]
        assert m is not None
        models.append(m)
    return groups, models, fixed_ths


def _top_up(
    segs: list[tuple[int, float, int, int, float]],
    keys: list[GroupKey],
    *,
    models: list[ModelInfo],
    taken: list[list[int]],
    paths: list[tuple[int, ...]],
    room: list[float],
) -> dict[int, tuple[int, int]]:
    """Spend what is left: raise one miner per continuous-range group part of the way to its next level."""
    extra: dict[int, tuple[int, int]] = {}
    for _, _, j, g, cost in segs:
        if room[0] < 1.0:
            break  # less than a watt left at the site
        m = models[g]
        if m.step is None or j == 0 or g in extra or keys[g][3] not in _LADDER_KINDS:
            continue
        t = taken[g]
        if t[j] >= t[j - 1]:
            continue
        spare = min(*(room[p] for p in paths[g]), cost)
        add = int((spare + _EPS) // m.step) * m.step
        if add <= 0 or add >= cost:
            continue
        extra[g] = (j - 1, m.levels[j - 1] + add)
        for p in paths[g]:
            room[p] -= add
    return extra


def _materialise(
    prep: Prep,
    a: Assignment,
    groups: dict[GroupKey, list[int]],
    *,
    keys: list[GroupKey],
    models: list[ModelInfo],
    taken: list[list[int]],
    extra: dict[int, tuple[int, int]],
    below: dict[int, int],
    blind: bool,
) -> float:
    """Hand each group's level counts to its members (stably: who runs highest now gets the highest level;
    circuit-blind, ties go round-robin over circuits so no circuit collects the high levels)."""
    curve, views = prep.rules.curve, prep.views
    neg_cur = [-w for w in prep.cur_w]  # highest present level first; ties keep input order
    if blind:
        seen = [0] * len(prep.paths)
        rank = [0] * len(neg_cur)
        for i, pid in enumerate(prep.path_id):
            rank[i] = seen[pid]
            seen[pid] += 1
        neg_cur = [w + r * 1e-9 for w, r in zip(neg_cur, rank, strict=True)]
    ths = 0.0
    for g, key in enumerate(keys):
        members, m, t, kind, extra_w = groups[key], models[g], taken[g], key[3], key[6]
        if kind in _LADDER_KINDS:
            # OFF_L: those asleep the longest are woken (and the highest level goes to the first of them)
            by = (lambda i: views[i].last_transition) if kind == OFF_L else neg_cur.__getitem__
            order = sorted(members, key=by) if len(members) > 1 else members
            pos, above = 0, 0
            ex = extra.get(g)
            used = len(t)
            while used and t[used - 1] == 0:
                used -= 1
            for j in range(used - 1, -1, -1):
                cnt = t[j] - above
                above = t[j]
                w = float(m.levels[j])
                for i in order[pos : pos + cnt]:
                    a.level[i], a.wc[i] = w, w + extra_w
                if ex is not None and ex[0] == j and cnt > 0:
                    first = order[pos]
                    a.level[first], a.wc[first] = float(ex[1]), float(ex[1]) + extra_w
                    ths += curve.ths_at(ex[1], m.nominal_w, m.nominal_ths) - m.ths[j]
                pos += cnt
                ths += cnt * m.ths[j]
            low = below.get(g)
            if low is not None and pos < len(order):  # the next in line, under the run levels (_below_floor)
                a.level[order[pos]], a.wc[order[pos]] = float(low), float(low) + extra_w
                ths += curve.ths_at(low, m.nominal_w, m.nominal_ths)
            continue
        n = t[0]
        if n <= 0:
            continue
        if kind == OFF:  # wake those asleep the longest
            chosen = sorted(members, key=lambda i: views[i].last_transition)[:n]
            level, gain = float(m.stock), m.stock_ths
        else:  # WAKE: keep on at their present limit
            chosen = members[:n]
            level = key[5]
            gain = curve.ths_at(level, m.nominal_w, m.nominal_ths)
        for i in chosen:
            a.level[i], a.wc[i] = level, key[4] + extra_w
        ths += n * gain
    return ths
