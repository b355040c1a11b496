"""Step 6 of the planner, on the `sleep_only` and the `optimal` assignment alike, under a ramp-up limit: what the
assignment raises (wakes, higher limits) is at most the ramp allowance, whatever it lowers elsewhere.

Both planners keep the site's worst case under the fleet's present worst case plus the allowance: the net change.
A plan that lowers running miners to make room for wakes (the optimiser's rebalancing: more miners at lower limits)
stays within that, but the site does not move as the worst case does: a lower limit takes effect in seconds, a wake
comes up over a minute or more. The site dips by what was lowered, then climbs back by it on top of the ramp, and
the grid sees a rise faster than the ramp it asked for (soak 20261213, seed 8462: min-off ended for nine sleeping
miners under a 20 kW/min ramp; the plan woke them at part power and lowered eleven running miners by 11 kW to fund
them, and the site went from 46.1 to 82.4 kW in 60 s).

`hold_to_ramp` keeps the rises worth the most hashrate per watt that fit the allowance, puts the rest back where
they are now (a raised miner at its present limit, a woken one asleep), then puts back the decreases the kept rises
no longer need, wherever every node still fits. What is left moves the fleet towards the plan by at most the
allowance; the next plans go on from there as the credit builds up (the controller spends its ramp credit by
`Plan.raised_kw`, the same gross rise).
"""

from __future__ import annotations

from hashflex.agent.core.planning.assignment import Assignment, raised_w
from hashflex.agent.core.planning.sleep_only import present_level
from hashflex.agent.core.planning.worst_case import OFF, OFF_L, OFF_LOCKED, UNCONTROLLED, Prep

_EPS = 1e-6
_ASLEEP = (OFF, OFF_L, OFF_LOCKED)


def hold_to_ramp(prep: Prep, a: Assignment, allowance_kw: float | None, caps: list[float]) -> None:
    """Change `a` in place so that it raises no more than `allowance_kw` (None: no ramp limit). `caps`: per node, the
    soft caps the assignment was planned under."""
    if allowance_kw is None:
        return
    left = allowance_kw * 1000.0
    cur = prep.cur_w
    if raised_w(prep, a) <= left + _EPS:
        return
    rises = [i for i, k in enumerate(prep.kind) if k != UNCONTROLLED and a.wc[i] > cur[i] + _EPS]
    # the most hashrate per watt raised first (the optimiser's order), the rest held where they are now
    for i in sorted(rises, key=lambda i: -_gain(prep, a, i) / (a.wc[i] - cur[i])):
        rise = a.wc[i] - cur[i]
        if rise <= left + _EPS:
            left -= rise
        else:
            _put_back(prep, a, i)
    # the decreases the kept rises do not need go back too: the largest first, where every node on its path fits
    loads = a.node_loads(prep)
    falls = [i for i, k in enumerate(prep.kind) if k != UNCONTROLLED and a.wc[i] < cur[i] - _EPS]
    for i in sorted(falls, key=lambda i: a.wc[i] - cur[i]):
        back = cur[i] - a.wc[i]
        if all(loads[p] + back <= caps[p] + _EPS for p in prep.path[i]):
            _put_back(prep, a, i)
            for p in prep.path[i]:
                loads[p] += back


def _gain(prep: Prep, a: Assignment, i: int) -> float:
    """The hashrate miner i gains in `a` over its present level (TH/s)."""
    return _ths(prep, i, a.level[i]) - _ths(prep, i, _now_level(prep, i))


def _now_level(prep: Prep, i: int) -> float:
    """Its level now: asleep (0), or on (running or waking) at its present limit."""
    return 0.0 if prep.kind[i] in _ASLEEP else present_level(prep, i)


def _ths(prep: Prep, i: int, level: float) -> float:
    v = prep.views[i]
    return prep.rules.curve.ths_at(level, v.nominal_w, v.nominal_ths) if level > 0.0 else 0.0


def _put_back(prep: Prep, a: Assignment, i: int) -> None:
    """Miner i as it is now: its present level (asleep, or on at its present limit) and worst case."""
    level = _now_level(prep, i)
    a.ths += _ths(prep, i, level) - _ths(prep, i, a.level[i])
    a.level[i], a.wc[i] = level, prep.cur_w[i]
    if level > 0.0 and i in a.overridden:
        a.overridden = [j for j in a.overridden if j != i]  # kept on after all: not a min-on miner slept
