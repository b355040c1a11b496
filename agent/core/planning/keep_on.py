"""Step 4 of the planner, on the `sleep_only` and the `optimal` assignment alike: which running miners a cut keeps
on, and which sleeping on/off miners a plan with room wakes, the ratio greedy's choice improved by an exact search
where it matters.

Both planners cut by ratio (the least TH per W sleeps first) until every node fits. For miners that can only be on
or asleep (a stock Antminer, or any running miner in the sleep-only plan) that is a 0/1 knapsack, and the greedy can
leave most of a miner's power unused: under a circuit with 18.5 kW of room for fourteen S19-class miners it kept
two S21 and three S19 XP (16.0 kW, 823 TH) where two S21, one XP and three S19k Pro fit (18.3 kW, 901 TH), and the
room it left was never used (no plan sleeps a running miner to wake another). Closed-loop soak 2026-12-07.

`keep_best_units` re-chooses, within the priority class the cut reached, which of the running miners kept at their
present level stay on: a branch and bound over groups of identical miners (model, level, circuit path), seeded by
the greedy's choice and bounded in work, kept only when it gives more hashrate and no less power than the greedy
(so a cut never gets deeper). It sleeps and keeps running miners only: it wakes nothing and changes no limit.

`wake_best_units` is the same search on the other side (issue #11): which sleeping on/off miners (woken whole, at
stock power) a plan wakes. The greedy wakes by TH per W, and under 6.2 kW it woke one S21 (200 TH in 3.5 kW) where
two S19 XP fit (282 TH in 6.0 kW); no plan sleeps a running miner to wake another, so the S21 stayed the only one on
for as long as the limit held. It re-chooses, within the priority class where the greedy left one asleep, which of
them wake, in the room the plan leaves (every node, worst case, the caps the plan was made under: headroom and ramp),
within the wake budget the plan's other wakes leave, never a miner inside min off (not a candidate), and only in a
plan that sleeps no miner that is on (a plan that does wakes nothing). It changes no running miner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

from hashflex.agent.core.planning.assignment import Assignment
from hashflex.agent.core.planning.worst_case import OFF, OFF_L, ON, ON_P, WAKE, WAKE_P, Prep

_EPS = 1e-6
MAX_SEARCH_NODES = 2_000  # the search's work bound (nodes visited); the greedy's choice stands when it runs out
# more groups than this in the class the cut reached: the greedy's choice stands. Its loss is at most about one
# miner per binding node, a small share of a site with that many kinds of miner, and the search would cost ticks
MAX_GROUPS = 64
_ON_KINDS = (ON, ON_P, WAKE, WAKE_P)  # on now: running or waking


class _Group:
    """Identical on/off miners: each costs `cost` W over its sleep draw on every node of `nodes` and gives `ths`,
    on at `level` W, counted at `wc` W."""

    __slots__ = ("cost", "level", "members", "nodes", "on", "ths", "wc")

    def __init__(self, cost: float, ths: float, nodes: tuple[int, ...], level: float, wc: float) -> None:
        self.cost, self.ths, self.nodes, self.level, self.wc = cost, ths, nodes, level, wc
        self.members: list[int] = []
        self.on = 0  # how many of them the greedy keeps on (wakes)

    def add(self, i: int, on: bool) -> None:
        self.members.append(i)
        self.on += on


def keep_best_units(prep: Prep, a: Assignment, caps: list[float]) -> None:
    """Improve `a` in place where it sleeps running miners: see the module docstring. `caps`: per node, the soft
    caps the assignment was planned under."""
    level, kind, cur_w = a.level, prep.kind, prep.cur_w
    slept = [i for i, k in enumerate(kind) if k == ON and level[i] == 0.0 and not prep.forced[i]]
    if not slept:
        return
    prio = max(prep.prio[i] for i in slept)  # the class the cut reached: every higher one stays as it is
    s = prep.rules.sleep_w
    curve = prep.rules.curve
    groups: dict[tuple[int, float, int], _Group] = {}
    for i, k in enumerate(kind):
        if k != ON or prep.forced[i] or prep.curtailed[i] or prep.prio[i] != prio:
            continue
        if level[i] not in (0.0, cur_w[i]) or cur_w[i] <= s:
            continue  # throttled by the optimiser: not a whole unit
        m = prep.model[i]
        assert m is not None
        key = (id(m), cur_w[i], prep.path_id[i])
        g = groups.get(key)
        if g is None:
            ths = curve.ths_at(cur_w[i], m.nominal_w, m.nominal_ths)
            g = groups[key] = _Group(cur_w[i] - s, ths, prep.path[i], cur_w[i], cur_w[i])
        g.add(i, level[i] != 0.0)
    ordered = _ordered_room(prep, a, caps, groups.values())
    if ordered is None:
        return
    order, room = ordered
    counts = _search(order, room, min_w=sum(g.on * g.cost for g in order), max_count=len(level))
    if counts is not None:  # the greedy's choice first (fewest commands), then input order
        _apply(prep, a, order, counts, rank=lambda i: (level[i] == 0.0, i))


def wake_best_units(prep: Prep, a: Assignment, caps: list[float], wake_budget: int) -> None:
    """Improve `a` in place where it wakes sleeping on/off miners: see the module docstring. `caps`: per node, the
    soft caps the assignment was planned under; `wake_budget`: the most wakes this plan may start."""
    level, kind, forced = a.level, prep.kind, prep.forced
    if any(level[i] == 0.0 and k in _ON_KINDS for i, k in enumerate(kind)):
        return  # it sleeps a miner that is on: it wakes nothing (no wake-up thrown away for another)
    asleep = [i for i, k in enumerate(kind) if k == OFF and level[i] == 0.0 and not forced[i]]
    if not asleep:
        return
    prio = max(prep.prio[i] for i in asleep)  # the class the wakes stopped in: every higher one woke whole
    s = prep.rules.sleep_w
    groups: dict[tuple[int, float, float, int], _Group] = {}
    for i, k in enumerate(kind):
        if k != OFF or forced[i] or prep.prio[i] != prio:
            continue
        m = prep.model[i]
        assert m is not None
        full, extra = prep.full_w[i], prep.wake_extra_w[i]
        key = (id(m), full, extra, prep.path_id[i])
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(
                max(_EPS, full + extra - s), m.stock_ths, prep.path[i], float(m.stock), full + extra
            )
        g.add(i, level[i] != 0.0)
    ordered = _ordered_room(prep, a, caps, groups.values())
    if ordered is None:
        return
    order, room = ordered
    others = sum(1 for i, k in enumerate(kind) if k in (OFF, OFF_L) and level[i] > 0.0) - sum(g.on for g in order)
    counts = _search(order, room, min_w=-math.inf, max_count=wake_budget - others)
    if counts is not None:  # the greedy's choice first (fewest changes), then the longest asleep
        views = prep.views
        _apply(prep, a, order, counts, rank=lambda i: (level[i] == 0.0, views[i].last_transition))


def _ordered_room(
    prep: Prep, a: Assignment, caps: list[float], groups: Collection[_Group]
) -> tuple[list[_Group], list[float]] | None:
    """The groups in the greedy's order (most TH per W first) and the room with all of them asleep; None where the
    search is not worth its cost (more than MAX_GROUPS groups) or a node it touches cannot be met."""
    if len(groups) > MAX_GROUPS:
        return None
    order = sorted(groups, key=lambda g: -g.ths / g.cost)
    room = _room_without(prep, a, caps, order)
    return None if room is None else (order, room)


def _room_without(prep: Prep, a: Assignment, caps: list[float], groups: list[_Group]) -> list[float] | None:
    """Per node, the room under `caps` with every member of `groups` asleep; None where a node a candidate sits
    under is already over its cap."""
    room = list(caps)
    for nd, load in enumerate(a.node_loads(prep)):
        room[nd] -= load
    # a node over its cap that a candidate sits under: the plan could not meet it, and it already sleeps all it can
    # there. A node none of them sits under is no concern of this search (it changes no load there): a silent miner
    # over its own PDU, which no plan can bring under its cap (its controllable miners are curtailed, none of them a
    # candidate), turned the search off for the whole site, and a cut elsewhere kept the greedy's choice
    touched = {nd for g in groups for nd in g.nodes}
    if any(room[nd] < -_EPS for nd in touched):
        return None
    for g in groups:
        for nd in g.nodes:
            room[nd] += g.on * g.cost
    return room


def _apply(
    prep: Prep, a: Assignment, groups: list[_Group], counts: list[int], rank: Callable[[int], tuple[bool, float]]
) -> None:
    """Turn each group's count into who is on: its members in `rank` order, the first `count` of them."""
    level, s = a.level, prep.rules.sleep_w
    for g, n in zip(groups, counts, strict=True):
        if n == g.on:
            continue
        for pos, i in enumerate(sorted(g.members, key=rank)):
            on = pos < n
            if on == (level[i] != 0.0):
                continue
            level[i], a.wc[i] = (g.level, g.wc) if on else (0.0, s)
            a.ths += g.ths if on else -g.ths


def _search(groups: list[_Group], room: list[float], *, min_w: float, max_count: int) -> list[int] | None:
    """Counts per group (ratio order) with more hashrate than the greedy's, no less power than `min_w` and no more
    miners on than `max_count`, or None."""
    greedy_ths = sum(g.on * g.ths for g in groups)
    best: list[float] = [greedy_ths + _EPS * max(1.0, greedy_ths)]
    found: list[list[int] | None] = [None]
    counts = [0] * len(groups)
    visits = [0]

    by_ths = sorted(range(len(groups)), key=lambda gi: -groups[gi].ths)

    def bound(gi: int, site_room: float, left: int) -> float:
        """An upper bound on what the groups from gi on add: the least of the fractional fill of the site's room
        (circuits relaxed) and the `left` miners with the most hashrate (power relaxed). Without the second, a
        small wake budget in a large room left the search nothing to prune."""
        out = 0.0
        for g in groups[gi:]:
            if site_room <= 0.0:
                break
            take = min(len(g.members) * g.cost, site_room)
            out += take * g.ths / g.cost
            site_room -= take
        most = 0.0
        for j in by_ths:
            if left <= 0 or most >= out:
                break
            if j >= gi:
                n = min(len(groups[j].members), left)
                most += n * groups[j].ths
                left -= n
        return min(out, most)

    def dfs(gi: int, ths: float, watts: float, left: int) -> None:
        visits[0] += 1
        if visits[0] > MAX_SEARCH_NODES:
            return
        if gi == len(groups):
            if ths > best[0] and watts >= min_w - _EPS:
                best[0] = ths
                found[0] = list(counts)
            return
        if ths + bound(gi, room[0], left) <= best[0]:
            return
        g = groups[gi]
        most = min(len(g.members), left)
        for nd in g.nodes:
            most = min(most, int((room[nd] + _EPS) / g.cost))
        for n in range(most, -1, -1):
            counts[gi] = n
            for nd in g.nodes:
                room[nd] -= n * g.cost
            dfs(gi + 1, ths + n * g.ths, watts + n * g.cost, left - n)
            for nd in g.nodes:
                room[nd] += n * g.cost
            if visits[0] > MAX_SEARCH_NODES:
                break
        counts[gi] = 0

    dfs(0, 0.0, 0.0, max_count)
    return found[0]
