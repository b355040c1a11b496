"""The hashrate-optimal allocation: marginal efficiency, greedily, over groups of identical miners.

Each miner's choices are "asleep" or one of its run levels (efficiency.run_levels). Because the efficiency curve
is concave with hashrate(0) = 0, going from asleep to the lowest level and then up level by level buys ever fewer
TH per W. So we cut every miner's path into segments (asleep→L0, L0→L1, …), each with a ratio gain/cost, and
grant segments in order of ratio (higher priority groups first, strictly) while every node on the miner's path
still has room. That is what makes many under-clocked miners beat a few at full power when the curve says so, and
the least efficient models sleep first. Identical miners (model, priority, circuit, state) form one group, so a
segment is granted to n miners at once: the work is per group, not per miner. A final top-up spends what is
left on one miner per continuous-range group at a finer step.

Min-on miners start at their lowest level (they stay on), waking ones at full power (they cannot be throttled
yet), sleeping ones can only be woken whole, at full power, and at most `wake_budget` of them this tick.
"""

from __future__ import annotations

import math

from agent.core.accounting import OFF, OFF_LOCKED, ON, ON_P, UNCONTROLLED, WAKE, WAKE_P, ModelInfo, Prep
from agent.core.baseline import present_level
from agent.core.plan_build import Assignment

_EPS = 1e-6
GroupKey = tuple[int, int, int, int, float, float]  # model, priority, path id, kind, full W, level W


def optimise(prep: Prep, floor: list[float], wake_budget: int, ramp_allowance_kw: float | None) -> Assignment:
    a = Assignment(prep, "optimal")
    a.overridden = list(prep.overridden)
    s = prep.rules.sleep_w
    ceiling = None if ramp_allowance_kw is None else max(prep.present_w() + ramp_allowance_kw * 1e3, floor[0])
    room = [max(0.0, cap - fl) for cap, fl in zip(prep.soft_caps(ceiling), floor, strict=True)]
    groups, models, fixed_ths = _group(prep, a)
    keys = list(groups)
    taken: list[list[int]] = []
    segs: list[tuple[int, float, int, int, float]] = []  # (-priority, -ratio, level index, group, cost)
    for g, key in enumerate(keys):
        _, prio, _, kind, full, level = key
        m = models[g]
        if kind in (ON, ON_P):
            t = [0] * len(m.levels)
            start, prev_w, prev_h = 0, s, 0.0
            if kind == ON_P:
                t[0], start, prev_w, prev_h = len(groups[key]), 1, float(m.levels[0]), m.ths[0]
            ratio_prev = math.inf
            for j in range(start, len(m.levels)):
                cost = max(_EPS, m.levels[j] - prev_w)
                ratio_prev = min(ratio_prev, (m.ths[j] - prev_h) / cost)  # keep per-miner order monotone
                segs.append((-prio, -ratio_prev, j, g, cost))
                prev_w, prev_h = float(m.levels[j]), m.ths[j]
        else:  # OFF (wake) or WAKE (keep on): the whole miner at full power
            t = [0]
            gain = m.stock_ths if kind == OFF else prep.rules.curve.ths_at(level, m.nominal_w, m.nominal_ths)
            cost = max(_EPS, full - s)
            segs.append((-prio, -gain / cost, 0, g, cost))
        taken.append(t)
    segs.sort()
    paths = [prep.paths[key[2]] for key in keys]
    is_wake = [key[3] == OFF for key in keys]
    sizes = [len(groups[key]) for key in keys]
    wakes_left = max(0, wake_budget)
    for _, _, j, g, cost in segs:
        t = taken[g]
        n = t[j - 1] if j else sizes[g]
        if is_wake[g] and wakes_left < n:
            n = wakes_left
        if n <= 0:
            continue
        for p in paths[g]:
            fit = int((room[p] + _EPS) / cost)
            if fit < n:
                n = fit
        if n <= 0:
            continue
        spent = n * cost
        for p in paths[g]:
            room[p] -= spent
        t[j] = n
        if is_wake[g]:
            wakes_left -= n
    extra = _top_up(segs, keys, models, taken, paths, room)
    a.ths = fixed_ths + _materialise(prep, a, groups, keys, models, taken, extra)
    return a


def _group(prep: Prep, a: Assignment) -> tuple[dict[GroupKey, list[int]], list[ModelInfo], float]:
    """Group the miners the optimiser may move; fix the ones it may not (locked, forced, min-on waking)."""
    groups: dict[GroupKey, list[int]] = {}
    curve, kinds, forced, full_w = prep.rules.curve, prep.kind, prep.forced, prep.full_w
    prio, path_id = prep.prio, prep.path_id
    fixed_ths = 0.0
    for i, k in enumerate(kinds):
        if k == UNCONTROLLED or k == OFF_LOCKED or forced[i]:
            continue  # uncontrolled keep their worst case; locked and forced sleep (the Assignment default)
        m = prep.model[i]
        assert m is not None
        if k == WAKE_P:
            lv = present_level(prep, i)
            a.level[i], a.wc[i] = lv, full_w[i]
            fixed_ths += curve.ths_at(lv, m.nominal_w, m.nominal_ths)
            continue
        if k == ON or k == ON_P:
            key: GroupKey = (id(m), prio[i], path_id[i], k, 0.0, 0.0)
        elif k == OFF:
            key = (id(m), prio[i], path_id[i], k, full_w[i], 0.0)
        else:  # WAKE
            key = (id(m), prio[i], path_id[i], k, full_w[i], present_level(prep, i))
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
    models: list[ModelInfo],
    taken: list[list[int]],
    paths: list[tuple[int, ...]],
    room: list[float],
) -> dict[int, tuple[int, int]]:
    """Spend what is left: raise one miner per continuous-range group part of the way to its next level."""
    extra: dict[int, tuple[int, int]] = {}
    for _, _, j, g, cost in segs:
        m = models[g]
        if m.step is None or j == 0 or g in extra or keys[g][3] not in (ON, ON_P):
            continue
        t = taken[g]
        if t[j] >= t[j - 1]:
            continue
        spare = min(min(room[p] for p in paths[g]), cost)
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
    keys: list[GroupKey],
    models: list[ModelInfo],
    taken: list[list[int]],
    extra: dict[int, tuple[int, int]],
) -> float:
    """Hand each group's level counts to its members (stably: who runs highest now gets the highest level)."""
    curve, views = prep.rules.curve, prep.views
    neg_cur = [-w for w in prep.cur_w]  # highest present level first; ties keep input order
    ths = 0.0
    for g, key in enumerate(keys):
        members, m, t, kind = groups[key], models[g], taken[g], key[3]
        if kind in (ON, ON_P):
            order = sorted(members, key=neg_cur.__getitem__) if len(members) > 1 else members
            pos, above = 0, 0
            ex = extra.get(g)
            for j in range(len(m.levels) - 1, -1, -1):
                cnt = t[j] - above
                above = t[j]
                w = float(m.levels[j])
                for i in order[pos : pos + cnt]:
                    a.level[i] = a.wc[i] = w
                if ex is not None and ex[0] == j and cnt > 0:
                    first = order[pos]
                    a.level[first] = a.wc[first] = float(ex[1])
                    ths += curve.ths_at(ex[1], m.nominal_w, m.nominal_ths) - m.ths[j]
                pos += cnt
                ths += cnt * m.ths[j]
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
            a.level[i], a.wc[i] = level, key[4]
        ths += n * gain
    return ths
