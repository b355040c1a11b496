"""Step 4 of the planner, on the `sleep_only` and the `optimal` assignment alike: which running miners a cut keeps
on, the ratio greedy's choice improved by an exact search where it matters.

Both planners cut by ratio (the least TH per W sleeps first) until every node fits. For miners that can only be on
or asleep (a stock Antminer, or any running miner in the sleep-only plan) that is a 0/1 knapsack, and the greedy can
leave most of a miner's power unused: under a circuit with 18.5 kW of room for fourteen S19-class miners it kept
two S21 and three S19 XP (16.0 kW, 823 TH) where two S21, one XP and three S19k Pro fit (18.3 kW, 901 TH), and the
room it left was never used (no plan sleeps a running miner to wake another). Closed-loop soak 2026-12-07.

`keep_best_units` re-chooses, within the priority class the cut reached, which of the running miners kept at their
present level stay on: a branch and bound over groups of identical miners (model, level, circuit path), seeded by
the greedy's choice and bounded in work, kept only when it gives more hashrate and no less power than the greedy
(so a cut never gets deeper). It sleeps and keeps running miners only: it wakes nothing and changes no limit.
"""

from __future__ import annotations

from hashflex.agent.core.planning.assignment import Assignment
from hashflex.agent.core.planning.worst_case import ON, Prep

_EPS = 1e-6
MAX_SEARCH_NODES = 2_000  # the search's work bound (nodes visited); the greedy's choice stands when it runs out
# more groups than this in the class the cut reached: the greedy's choice stands. Its loss is at most about one
# miner per binding node, a small share of a site with that many kinds of miner, and the search would cost ticks
MAX_GROUPS = 64


class _Group:
    __slots__ = ("cost", "members", "nodes", "on", "ths")

    def __init__(self, cost: float, ths: float, nodes: tuple[int, ...]) -> None:
        self.cost, self.ths, self.nodes = cost, ths, nodes
        self.members: list[int] = []
        self.on = 0  # how many of them the greedy keeps on


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
            g = groups[key] = _Group(cur_w[i] - s, curve.ths_at(cur_w[i], m.nominal_w, m.nominal_ths), prep.path[i])
        g.members.append(i)
        if level[i] != 0.0:
            g.on += 1
    if len(groups) > MAX_GROUPS:
        return
    order = sorted(groups.values(), key=lambda g: -g.ths / g.cost)
    loads = a.node_loads(prep)
    room = list(caps)
    for nd, load in enumerate(loads):
        room[nd] -= load
    # a node over its cap that a candidate sits under: the cut could not meet it, and it already sleeps all it can
    # there. A node none of them sits under is no concern of this search (it changes no load there): a silent miner
    # over its own PDU, which no plan can bring under its cap (its controllable miners are curtailed, none of them a
    # candidate), turned the search off for the whole site, and a cut elsewhere kept the greedy's choice
    touched = {nd for g in groups.values() for nd in g.nodes}
    if any(room[nd] < -_EPS for nd in touched):
        return
    for g in order:  # the room with every candidate asleep
        for nd in g.nodes:
            room[nd] += g.on * g.cost
    counts = _search(order, room)
    if counts is None:
        return
    for g, n in zip(order, counts, strict=True):
        if n == g.on:
            continue
        # the greedy's choice first (fewest commands), then input order
        ranked = sorted(g.members, key=lambda i: level[i] == 0.0)
        for pos, i in enumerate(ranked):
            on = pos < n
            if on == (level[i] != 0.0):
                continue
            level[i], a.wc[i] = (cur_w[i], cur_w[i]) if on else (0.0, s)
            a.ths += g.ths if on else -g.ths


def _search(groups: list[_Group], room: list[float]) -> list[int] | None:
    """Counts per group (ratio order) with more hashrate and no less power than the greedy's, or None."""
    greedy_ths = sum(g.on * g.ths for g in groups)
    greedy_w = sum(g.on * g.cost for g in groups)
    best: list[float] = [greedy_ths + _EPS * max(1.0, greedy_ths)]
    found: list[list[int] | None] = [None]
    counts = [0] * len(groups)
    visits = [0]

    def bound(gi: int, site_room: float) -> float:
        """Fractional fill of the site's room by the groups from gi on (circuits relaxed): an upper bound."""
        out = 0.0
        for g in groups[gi:]:
            if site_room <= 0.0:
                break
            take = min(len(g.members) * g.cost, site_room)
            out += take * g.ths / g.cost
            site_room -= take
        return out

    def dfs(gi: int, ths: float, watts: float) -> None:
        visits[0] += 1
        if visits[0] > MAX_SEARCH_NODES:
            return
        if gi == len(groups):
            if ths > best[0] and watts >= greedy_w - _EPS:
                best[0] = ths
                found[0] = list(counts)
            return
        if ths + bound(gi, room[0]) <= best[0]:
            return
        g = groups[gi]
        most = len(g.members)
        for nd in g.nodes:
            most = min(most, int((room[nd] + _EPS) / g.cost))
        for n in range(most, -1, -1):
            counts[gi] = n
            for nd in g.nodes:
                room[nd] -= n * g.cost
            dfs(gi + 1, ths + n * g.ths, watts + n * g.cost)
            for nd in g.nodes:
                room[nd] += n * g.cost
            if visits[0] > MAX_SEARCH_NODES:
                break
        counts[gi] = 0

    dfs(0, 0.0, 0.0)
    return found[0]
