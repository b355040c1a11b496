"""Step 5 of the planner, on the `optimal` assignment only: a wake that fits nowhere, let in by lowering running
miners under their floor.

The optimiser lowers running miners to let a sleeping one in only as far as their lowest run level, the curve's
floor (`optimal._wakes_before_raises`), and wakes a miner under its floor only into room that is already there
(`optimal._below_floor`). Where the room the plan leaves is smaller than the least any sleeper can be woken at, and
the running miners are already at or near their floor, it stays empty for as long as the limit holds. On a small
site that is most of the limit: soak 20261204, site 498: under an operator's 11.4 kW, two unreachable miners
counted at 8 kW and a LuxOS S19 XP at 2,051 W, 1.3 kW were left where a Whatsminer M50S asleep needs 1,700 W at
least; the S19 XP at its lowest profile (1,523 W) lets it in at 1.74 kW, 52 % more hashrate; the site drew 2.1 kW
where 3.3 kW fit (the closed-loop service check: under 90 % of what the healthy fleet can draw).

`lower_to_wake` tries the sleepers one at a time (higher priority first, then the most TH per W at the least they
can be woken at): where the room on its path is short of the least it can be woken at, one running miner that sits
under every node short of room is lowered by the deficit (snapped to what its firmware takes; of those that can, the
one that loses least hashrate), and the sleeper is woken at the most that then fits. Kept only when it gains more
than WAKE_GAIN_SHARE of the plan's hashrate (a wake-up is minutes without hashrate), within the wake budget, and in
a plan that sleeps no miner that is on (the no-swap rule: a plan that cuts wakes nothing). It sleeps nothing; a
ramp's hold (`ramp_hold`, after it) puts back what it lowered if it holds the wake back.
"""

from __future__ import annotations

from hashflex.agent.core.efficiency import lowest_w, snap_down
from hashflex.agent.core.planning.assignment import Assignment
from hashflex.agent.core.planning.optimal import WAKE_GAIN_SHARE
from hashflex.agent.core.planning.worst_case import OFF, OFF_L, ON, ON_P, WAKE, WAKE_P, Prep

_EPS = 1e-6
_ON_KINDS = (ON, ON_P, WAKE, WAKE_P)


def lower_to_wake(prep: Prep, a: Assignment, caps: list[float], wake_budget: int) -> None:
    """Change `a` in place: see the module docstring. `caps`: per node, the soft caps `a` was planned under."""
    kind, level = prep.kind, a.level
    if any(level[i] == 0.0 for i, k in enumerate(kind) if k in _ON_KINDS):
        return  # a plan that sleeps a miner that is on wakes nothing
    left = wake_budget - sum(1 for i, k in enumerate(kind) if k in (OFF, OFF_L) and level[i] > 0.0)
    if left <= 0:
        return
    sleepers = [i for i, k in enumerate(kind) if k in (OFF, OFF_L) and level[i] == 0.0 and not prep.forced[i]]
    # the most any wake could gain is its hashrate at stock power: where that is no real gain (a large fleet on,
    # where room under one miner is a small share of the site) nothing is tried, and the step costs one pass
    if not sleepers or max(_ths(prep, i, prep.full_w[i]) for i in sleepers) <= WAKE_GAIN_SHARE * a.ths + _EPS:
        return
    donors = [j for j, k in enumerate(kind) if k in (ON, ON_P) and not prep.curtailed[j] and level[j] > 0.0]
    if not donors:
        return
    room = [cap - load for cap, load in zip(caps, a.node_loads(prep), strict=True)]
    # identical sleepers fare alike: one that does not get in ends its group's turn
    groups: dict[tuple[int, int, int, int, float], list[int]] = {}
    for i in sorted(sleepers, key=lambda i: prep.views[i].last_transition):  # the longest asleep first
        key = (id(prep.model[i]), kind[i], prep.path_id[i], prep.prio[i], prep.wake_extra_w[i])
        groups.setdefault(key, []).append(i)
    order = sorted(groups.values(), key=lambda g: (-prep.prio[g[0]], -_ths_per_w(prep, g[0])))
    for members in order:
        for i in members:
            if left <= 0:
                return
            if not _let_in(prep, a, i, room, donors):
                break
            left -= 1


def _let_in(prep: Prep, a: Assignment, i: int, room: list[float], donors: list[int]) -> bool:
    """Wake sleeper i by lowering one of `donors` under its path, if that buys hashrate; spends `room`."""
    s, extra = prep.rules.sleep_w, prep.wake_extra_w[i]
    least = _least_wake_w(prep, i)
    path = prep.path[i]
    short = {nd: least + extra - s - room[nd] for nd in path if least + extra - s > room[nd] + _EPS}
    if not short:
        return False  # it fits as it is: the optimiser's choice not to wake it stands
    # one running miner, the one that loses least for the room it gives: lowering many miners for one wake is a batch
    # of commands and a site in motion for little (28 miners under a time-of-use window, 1.4 kW short: twelve
    # lowered by 100-170 W each to wake one, and the re-plans while they settled slept a running miner)
    best: tuple[float, int, float] | None = None  # (hashrate lost, donor, its new level)
    for j in donors:
        # never one of a higher priority class than the sleeper (the optimiser grants by class first)
        if prep.prio[j] > prep.prio[i] or not all(nd in prep.path[j] for nd in short):
            continue
        v, cur = prep.views[j], a.level[j]
        new = snap_down(v.capability, v.nominal_w, cur - max(short.values()))
        if new is None:
            continue  # even at its lowest setting it gives too little
        lost = _loss(prep, j, cur, float(new))
        if best is None or lost < best[0]:
            best = (lost, j, float(new))
    if best is None:
        return False
    loss, donor, donor_w = best
    given = a.level[donor] - donor_w
    spare = min(room[nd] + (given if nd in prep.path[donor] else 0.0) for nd in path)
    wake_w = _wake_level(prep, i, spare + s - extra)
    if wake_w is None:
        return False
    gain = _ths(prep, i, wake_w)
    if gain - loss <= WAKE_GAIN_SHARE * a.ths + _EPS:
        return False  # a wake-up is minutes without hashrate: worth it only for a real gain
    a.level[donor] = a.wc[donor] = donor_w
    wc = (prep.full_w[i] if prep.kind[i] == OFF else wake_w) + extra
    a.level[i], a.wc[i] = wake_w, wc
    a.ths += gain - loss
    for nd in prep.path[donor]:
        room[nd] += given
    for nd in path:
        room[nd] -= wc - s
    return True


def _ths_per_w(prep: Prep, i: int) -> float:
    least = _least_wake_w(prep, i)
    return _ths(prep, i, least) / least if least > 0 else 0.0


def _least_wake_w(prep: Prep, i: int) -> float:
    """The least sleeper i can be woken at: its lowest setting where the firmware takes a limit while asleep,
    else its full power (it comes up at its stored or stock profile)."""
    return _lowest(prep, i) if prep.kind[i] == OFF_L else prep.full_w[i]


def _wake_level(prep: Prep, i: int, watts: float) -> float | None:
    """The level sleeper i is woken at within `watts` (its stock power at most), None if it does not fit."""
    m = prep.model[i]
    assert m is not None
    if prep.kind[i] == OFF:
        return float(m.stock) if prep.full_w[i] <= watts + _EPS else None
    v = prep.views[i]
    level = snap_down(v.capability, v.nominal_w, min(watts, float(m.stock)))
    return None if level is None else float(level)


def _lowest(prep: Prep, j: int) -> float:
    v = prep.views[j]
    return float(lowest_w(v.capability, v.nominal_w))


def _ths(prep: Prep, i: int, watts: float) -> float:
    v = prep.views[i]
    return prep.rules.curve.ths_at(watts, v.nominal_w, v.nominal_ths)


def _loss(prep: Prep, j: int, old_w: float, new_w: float) -> float:
    return _ths(prep, j, old_w) - _ths(prep, j, new_w)
