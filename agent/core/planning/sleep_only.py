"""Step 2 of the planner (after `worst_case`): the sleep-only assignment, fast first, and the baseline the optimal
assignment (`optimal`) must never fall below.

It changes no power limit. Running miners stay at their present level; to come under the target and every
circuit cap it sleeps the least efficient miners first (J/TH at their present level), lowest priority group
first; with room to spare it wakes the most efficient sleeping miners first (highest priority group first, the
optimiser's order), within the wake budget and the ramp allowance, each counted at full power, and only when it
sleeps no miner that is on (running or waking): a wake-up is never thrown away to start another. Min-on miners
are slept only where a cap cannot be met otherwise (then `Plan.min_on_overridden` says so); min-off miners are
never woken.
"""

from __future__ import annotations

from hashflex.agent.core.planning.assignment import Assignment
from hashflex.agent.core.planning.worst_case import OFF, OFF_L, OFF_LOCKED, ON, ON_P, UNCONTROLLED, WAKE, WAKE_P, Prep

_EPS = 1e-6


def present_level(prep: Prep, i: int) -> float:
    """The run level a running or waking miner keeps when nothing changes its limit."""
    cmd = prep.views[i].commanded_w
    m = prep.model[i]
    assert m is not None
    return float(cmd) if cmd is not None else float(m.stock)


def sleep_only_assignment(
    prep: Prep, floor: list[float], wake_budget: int, ramp_allowance_kw: float | None
) -> Assignment:
    a = Assignment(prep, "sleep_only")
    rules, curve = prep.rules, prep.rules.curve
    s = rules.sleep_w
    kind, curtailed, path, cur_w, full_w, model = (
        prep.kind,
        prep.curtailed,
        prep.path,
        prep.cur_w,
        prep.full_w,
        prep.model,
    )
    level, wc = a.level, a.wc
    ths = [0.0] * len(kind)
    eff = [0.0] * len(kind)  # TH per W at the present level: the sleep order
    cache: dict[tuple[int, float], float] = {}
    free: list[int] = []
    protected: list[int] = []
    sleeping: list[int] = []
    for i, k in enumerate(kind):
        # sleep-only cannot throttle, so it makes its own min-on choices; only infeasible nodes are given
        if curtailed[i] or k in (UNCONTROLLED, OFF_LOCKED):
            if curtailed[i] and k in (ON_P, WAKE_P):
                a.overridden.append(i)
            continue
        if k in (OFF, OFF_L):  # woken at stock (no limit changes here): OFF_L counts at its stock level
            sleeping.append(i)
            continue
        m = model[i]
        assert m is not None
        lv = cur_w[i] if k in (ON, ON_P) else present_level(prep, i)
        level[i] = lv
        wc[i] = cost = lv if k in (ON, ON_P) else full_w[i]
        h = cache.get((id(m), lv))
        if h is None:
            h = cache[(id(m), lv)] = curve.ths_at(lv, m.nominal_w, m.nominal_ths)
        ths[i] = h
        eff[i] = h / cost if cost > 0 else 0.0
        (free if k in (ON, WAKE) else protected).append(i)
    loads = a.node_loads(prep)
    present = prep.present_w()
    soft = prep.soft_caps(None)
    # 1) sleep the least efficient free miners while any node on their path is over its (soft) cap
    shed = _shed(a, _sleep_order(free, eff, prep.prio), loads=loads, caps=soft, path=path, sleep_w=s, ths=ths)
    # a miner on now that this plan sleeps (curtailed, or shed) means the limit wants less: wake nothing now (a
    # smaller sleeping miner taking the room it leaves would throw its wake-up away, see optimal.py)
    slept_on = bool(shed) or any(c and k in (ON, ON_P, WAKE, WAKE_P) for c, k in zip(curtailed, kind, strict=True))
    # 2) only if a hard cap still cannot be met: min-on miners too
    if any(loads[nd] > prep.hard[nd] + _EPS for nd in range(len(loads))):
        order = _sleep_order(protected, eff, prep.prio)
        shed = _shed(a, order, loads=loads, caps=prep.hard, path=path, sleep_w=s, ths=ths)
        shed = _restore_unneeded(prep, a, shed, loads=loads, ths=ths, cache=cache)
        a.overridden.extend(shed)
        slept_on = slept_on or bool(shed)
    # 3) wake the most efficient sleeping miners while there is room (stagger, ramp, caps), in the optimiser's
    # order: highest priority first, then the most TH per W the wake costs, then the longest asleep
    ceiling = soft[0] if ramp_allowance_kw is None else min(soft[0], max(present, floor[0]) + ramp_allowance_kw * 1e3)
    soft = [ceiling, *soft[1:]]
    wakes_left = wake_budget
    if wakes_left > 0 and sleeping and not slept_on:
        gain = [0.0] * len(kind)
        views = prep.views
        for i in sleeping:
            m = model[i]
            assert m is not None
            gain[i] = m.stock_ths
            eff[i] = -m.stock_ths / max(_EPS, full_w[i] + prep.wake_extra_w[i] - s)  # most efficient first
        order = sorted(sleeping, key=lambda i: (-prep.prio[i], eff[i], views[i].last_transition))
        for i in order:
            if wakes_left <= 0 or soft[0] - loads[0] < _EPS:
                break
            cost = full_w[i] + prep.wake_extra_w[i] - s  # (and the excess it showed when it last ran)
            pth = path[i]
            if all(loads[p] + cost <= soft[p] + _EPS for p in pth):
                for p in pth:
                    loads[p] += cost
                m = model[i]
                assert m is not None
                level[i], wc[i], ths[i] = float(m.stock), full_w[i] + prep.wake_extra_w[i], gain[i]
                wakes_left -= 1
    a.ths = sum(ths)
    return a


def _sleep_order(miners: list[int], eff: list[float], prio: list[int]) -> list[int]:
    """Lowest priority first, then least efficient first, then input order (two stable C-level sorts)."""
    order = sorted(miners, key=eff.__getitem__)
    order.sort(key=prio.__getitem__)
    return order


def _restore_unneeded(
    prep: Prep,
    a: Assignment,
    shed: list[int],
    *,
    loads: list[float],
    ths: list[float],
    cache: dict[tuple[int, float], float],
) -> list[int]:
    """Keep on any min-on miner whose sleep turned out unnecessary (a later, larger one freed enough)."""
    kept: list[int] = []
    for i in reversed(shed):
        on_w = prep.cur_w[i] if prep.kind[i] == ON_P else prep.full_w[i]
        back = on_w - prep.rules.sleep_w
        if all(loads[p] + back <= prep.hard[p] + _EPS for p in prep.path[i]):
            for p in prep.path[i]:
                loads[p] += back
            m = prep.model[i]
            assert m is not None
            a.level[i] = prep.cur_w[i] if prep.kind[i] == ON_P else present_level(prep, i)
            a.wc[i] = on_w
            ths[i] = cache[(id(m), a.level[i])]
        else:
            kept.append(i)
    return kept[::-1]


def _shed(
    a: Assignment,
    order: list[int],
    *,
    loads: list[float],
    caps: list[float],
    path: list[tuple[int, ...]],
    sleep_w: float,
    ths: list[float],
) -> list[int]:
    over = sum(1 for nd in range(len(loads)) if loads[nd] > caps[nd] + _EPS)
    shed: list[int] = []
    for i in order:
        if over == 0:
            break
        pth = path[i]
        for p in pth:
            if loads[p] > caps[p] + _EPS:
                break
        else:
            continue
        freed = a.wc[i] - sleep_w
        for p in pth:
            was_over = loads[p] > caps[p] + _EPS
            loads[p] -= freed
            if was_over and loads[p] <= caps[p] + _EPS:
                over -= 1
        a.level[i], a.wc[i], ths[i] = 0.0, sleep_w, 0.0
        shed.append(i)
    return shed
