"""An assignment (a level per miner, what `sleep_only` and `optimal` produce) and, the planner's last step, the Plan
built from it, with its worst case per node."""

from __future__ import annotations

from hashflex.agent.core.model import Action, MinerState, Plan, RunAction, SleepAction
from hashflex.agent.core.planning.worst_case import UNCONTROLLED, Prep


def raised_w(prep: Prep, a: Assignment) -> float:
    """What `a` raises, summed over miners: each one's planned worst case above what it counts at now (W)."""
    return sum(max(0.0, wc - cur) for k, wc, cur in zip(prep.kind, a.wc, prep.cur_w, strict=True) if k != UNCONTROLLED)


SLEEP = SleepAction()
NO_ACTION = -1.0  # level of a miner we do not control


class Assignment:
    """level[i]: watts to run at, 0.0 = sleep, NO_ACTION = uncontrolled; wc[i]: its worst-case draw (W)."""

    __slots__ = ("extra_alarms", "level", "method", "overridden", "ths", "wc")

    def __init__(self, prep: Prep, method: str) -> None:
        n = len(prep.views)
        self.level = [0.0] * n
        self.wc = [prep.rules.sleep_w] * n
        self.ths = 0.0  # expected hashrate of the miners we control
        self.overridden: list[int] = []  # min-on miners this assignment sleeps
        self.extra_alarms: list[str] = []
        self.method = method
        for i, k in enumerate(prep.kind):
            if k == UNCONTROLLED:
                self.level[i] = NO_ACTION
                self.wc[i] = prep.fixed_w[i]

    def node_loads(self, prep: Prep) -> list[float]:
        loads = prep.node_sums(self.wc)
        return [w + x for w, x in zip(loads, prep.excess_nodes, strict=True)] if prep.excess_nodes[0] else loads


def build_plan(prep: Prep, a: Assignment, target_kw: float, baseline_ths: float | None = None) -> Plan:
    """The Plan for assignment `a`; `baseline_ths` is the baseline assignment's hashrate (controlled miners)."""
    views, curve = prep.views, prep.rules.curve
    actions: dict[str, Action] = {}
    runs: dict[int, RunAction] = {}
    uncontrolled: list[str] = []
    expected_w = 0.0
    uncontrolled_ths = 0.0
    for i, v in enumerate(views):
        lv = a.level[i]
        if lv == NO_ACTION:
            uncontrolled.append(v.id)
            drawn = prep.fixed_w[i] if v.power_w is None else v.power_w
            expected_w += drawn
            if v.state is not MinerState.UNREACHABLE:  # it hashes at what it draws; unknown counts as nothing
                uncontrolled_ths += curve.ths_at(drawn, v.nominal_w, v.nominal_ths)
            continue
        expected_w += a.wc[i] + prep.excess_w[i]
        if lv == 0.0:
            actions[v.id] = SLEEP
        else:
            w = int(lv)
            run = runs.get(w)
            if run is None:
                run = runs[w] = RunAction(w)
            actions[v.id] = run
    loads = a.node_loads(prep)
    ids = prep.tree.ids
    return Plan(
        actions=actions,
        worst_case_kw=loads[0] / 1000.0,
        expected_kw=expected_w / 1000.0,
        expected_ths=a.ths + uncontrolled_ths,
        target_kw=target_kw,
        alarms=(*prep.alarms, *a.extra_alarms, *_min_on_alarm(a)),
        circuit_worst_case_kw={ids[nd]: w / 1000.0 for nd, w in enumerate(loads)},
        min_on_overridden=tuple(views[i].id for i in sorted(set(a.overridden))),
        uncontrolled=tuple(uncontrolled),
        method=a.method,
        baseline_ths=None if baseline_ths is None else baseline_ths + uncontrolled_ths,
        ramp_from_kw=prep.present_w() / 1000.0,
        raised_kw=raised_w(prep, a) / 1000.0,
        # each miner's reading, else what the plan counts it at now (no reading: unreachable, unidentified, stale)
        counted_now_kw=sum(p if (p := v.power_w) is not None else c for v, c in zip(views, prep.cur_w, strict=True))
        / 1000.0,
    )


def _min_on_alarm(a: Assignment) -> tuple[str, ...]:
    count = len(set(a.overridden))
    return (f"min_on_overridden: {count} miners slept inside min_on to meet caps",) if count else ()
