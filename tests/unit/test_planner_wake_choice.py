"""Which on/off miners a plan wakes (issue #11): the most hashrate the room holds, not the ratio greedy's choice.

Both planners wake sleeping stock Antminers (sleep/wake only, each woken at its stock power) in order of TH per W.
That is a 0/1 knapsack, and the greedy can leave most of the room unused: seven sleeping Antminers under 6.2 kW, it
woke one S21 (200 TH in 3.5 kW) and the 2.6 kW left held none of the others, where two S19 XP (282 TH in 6.0 kW)
fit. No plan sleeps a running miner to wake another, so the S21 then stayed the only one on for as long as the
limit held. `keep_on.wake_best_units` re-chooses the wakes, exactly over groups of identical miners, within every
limit the greedy's wakes kept (site and circuits at worst case, headroom, wake budget, ramp, min off).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from unittest import mock

import pytest
from hypothesis import given

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.model import MinerState, MinerView, Plan, RunAction
from hashflex.agent.core.planning import PlannerRules, plan, plan_sleep_only
from hashflex.drivers.base import Family, OnOff
from tests.unit.fleets import NOW, PROPS, Case, cases

MODELS = {"S21": (3500.0, 200.0), "XP": (3010.0, 141.0), "k": (2760.0, 120.0), "j": (3068.0, 104.0)}
PLANNERS = [plan, plan_sleep_only]


def _asleep(idx: int, model: str, circuit: str | None = None) -> MinerView:
    w, ths = MODELS[model]
    return MinerView(
        id=f"{model}-{idx}",
        family=Family.ANTMINER,
        capability=OnOff(),
        nominal_w=w,
        nominal_ths=ths,
        state=MinerState.SLEEPING,
        power_w=20.0,
        commanded_w=None,
        last_transition=NOW - 10_000.0 + idx,
        circuit=circuit,
    )


def _woken(p: Plan) -> Counter[str]:
    return Counter(mid.split("-")[0] for mid, a in p.actions.items() if isinstance(a, RunAction))


def _seven(circuit: str | None = None) -> list[MinerView]:
    return [_asleep(i, m, circuit) for m, n in (("S21", 1), ("XP", 2), ("k", 2), ("j", 2)) for i in range(n)]


@pytest.mark.parametrize("fn", PLANNERS)
def test_seven_sleeping_antminers_under_6_2_kw_wake_the_pair_with_the_most_hashrate(fn: object) -> None:
    p = fn(6.2, _seven(), CircuitTree(100.0, []), PlannerRules(sleep_w=20.0), NOW, wake_budget=10)  # type: ignore[operator]
    assert _woken(p) == {"XP": 2}, p.actions  # 282 TH in 6.02 kW (the greedy: one S21, 200 TH)
    assert p.expected_ths == pytest.approx(282.0)
    assert p.worst_case_kw <= 6.2 + 1e-9


@pytest.mark.parametrize("fn", PLANNERS)
def test_the_wake_choice_holds_a_circuit_the_budget_and_the_ramp(fn: object) -> None:
    rules = PlannerRules(sleep_w=20.0)
    circuit = CircuitTree(100.0, [Circuit("c0", None, 6.2)])  # the room is the circuit's, not the site's
    p = fn(100.0, _seven("c0"), circuit, rules, NOW, wake_budget=10)  # type: ignore[operator]
    assert _woken(p) == {"XP": 2}, p.actions
    assert p.circuit_worst_case_kw["c0"] <= 6.2 + 1e-9
    one = fn(6.2, _seven(), CircuitTree(100.0, []), rules, NOW, wake_budget=1)  # type: ignore[operator]
    assert _woken(one) == {"S21": 1}, one.actions  # one wake: the best single miner
    ramp = fn(100.0, _seven(), CircuitTree(100.0, []), rules, NOW, wake_budget=10, ramp_allowance_kw=6.06)  # type: ignore[operator]
    assert _woken(ramp) == {"XP": 2}, ramp.actions  # the ramp is the room: 7 × 20 W + 6.06 kW
    locked = [dataclasses.replace(v, last_transition=NOW - 10.0) if v.id == "XP-1" else v for v in _seven()]
    p = fn(6.2, locked, CircuitTree(100.0, []), rules, NOW, wake_budget=10)  # type: ignore[operator]
    assert _woken(p) == {"XP": 1, "k": 1}, p.actions  # XP-1 inside min off: the next best pair (261 TH)


@PROPS
@given(cases())
def test_the_wake_choice_is_never_worse_than_the_greedy_and_keeps_every_limit(case: Case) -> None:
    for fn in PLANNERS:
        p = case.planned(fn)
        with mock.patch("hashflex.agent.core.planning.wake_best_units", return_value=None):
            greedy = case.planned(fn)
        assert p.expected_ths >= greedy.expected_ths - 1e-9 * max(1.0, greedy.expected_ths), (p, greedy)
        case.check(p)
