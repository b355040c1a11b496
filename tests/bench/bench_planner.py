"""Benchmark: the pure planner at 1,000 and 10,000 miners (mixed capabilities, circuits, a few faults).

    python -m tests.bench.bench_planner                      # 1,000 and 10,000 miners
    python -m tests.bench.bench_planner --sizes 10000 --reps 50

The fleet: 40 % LuxOS-like (power presets), 40 % Whatsminer-like (continuous limit from the model's floor to
nominal), 20 % stock Antminer (sleep/wake only), models and figures from drivers/catalogue.py; containers of 200
miners (cap 95 % of their nominal) split into PDUs of 40 (cap 100 %); 1 % unreachable, 0.5 % ignoring commands,
2 % waking, 5 % asleep, 10 % inside min-on, 10 % in a higher priority group. Two planning situations per target
share (100 / 90 / 60 / 30 % of the fleet's nominal power; at 100 % the container caps bind):
- "new target": the fleet as it is, a new, lower target arrives (the first tick after a dispatch);
- "steady": the previous plan applied (slept miners asleep, limits commanded, woken ones waking) and re-planned,
  which is what every later tick does (its baseline starts from the limits the optimiser already set, so the
  gain there is only what the optimiser adds on top of its own previous plan).
Figures per size: plan() and plan_sleep_only() time per tick (median / p95 over --reps runs), and the expected
hashrate of plan() against the sleep-only baseline planner at each target. Measured beside them in the same run:
a bare pass over the views (reading the fields the planner reads, summing nominal power) — the floor any planner
in Python pays to look at every miner once.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Callable

from hashflex.agent.core.circuits import Circuit, CircuitTree
from hashflex.agent.core.model import MinerState, MinerView, Plan, RunAction, SleepAction
from hashflex.agent.core.planning import PlannerRules, plan, plan_sleep_only
from hashflex.drivers.base import Capability, Family, OnOff, PowerRange, Presets
from hashflex.drivers.catalogue import CATALOGUE

NOW = 1_700_000_000.0
SHARES = (1.0, 0.9, 0.6, 0.3)  # 100 %: no dispatch, the containers' caps (95 %) bind
ANTMINERS = ("S19 Pro", "S19j Pro", "S19 XP", "S21")
WHATSMINERS = ("M30S+", "M50", "M50S", "M60S")
RULES = PlannerRules(min_on_s=120.0, min_off_s=120.0, sleep_w=20.0, headroom_pct=1.0)
WAKE_BUDGET = 200


def luxos_presets(nominal_w: float) -> Presets:
    return Presets(tuple(int(nominal_w * f) for f in (0.6, 0.7, 0.8, 0.9, 1.0)))


def build_site(n: int, seed: int = 7) -> tuple[list[MinerView], CircuitTree]:
    rng = random.Random(seed)
    caps: dict[tuple[str, str], Capability] = {}
    views: list[MinerView] = []
    circuits: list[Circuit] = []
    container_w: dict[str, float] = {}
    pdu_w: dict[str, float] = {}
    for i in range(n):
        roll = rng.random()
        if roll < 0.4:
            family, model = Family.LUXOS, rng.choice(ANTMINERS)
        elif roll < 0.8:
            family, model = Family.WHATSMINER, rng.choice(WHATSMINERS)
        else:
            family, model = Family.ANTMINER, rng.choice(ANTMINERS)
        spec = CATALOGUE[model]
        cap = caps.get((family.value, model))
        if cap is None:
            if family is Family.LUXOS:
                cap = luxos_presets(spec.nominal_w)
            elif family is Family.WHATSMINER:
                cap = PowerRange(int(spec.min_limit_w or spec.nominal_w / 2), int(spec.nominal_w), 1)
            else:
                cap = OnOff()
            caps[(family.value, model)] = cap
        container, pdu = f"ct{i // 200}", f"ct{i // 200}-pdu{(i % 200) // 40}"
        container_w[container] = container_w.get(container, 0.0) + spec.nominal_w
        pdu_w[pdu] = pdu_w.get(pdu, 0.0) + spec.nominal_w
        state, since, ignores = MinerState.HASHING, NOW - 3600.0, False
        fault = rng.random()
        if fault < 0.01:
            state = MinerState.UNREACHABLE
        elif fault < 0.015:
            ignores = True
        elif fault < 0.035:
            state, since = MinerState.WAKING, NOW - 30.0
        elif fault < 0.085:
            state = MinerState.SLEEPING
        elif fault < 0.185:
            since = NOW - 60.0  # inside min-on
        views.append(
            MinerView(
                id=f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
                family=family,
                capability=cap,
                nominal_w=spec.nominal_w,
                nominal_ths=spec.nominal_ths,
                state=state,
                power_w=spec.nominal_w if state is not MinerState.SLEEPING else 20.0,
                commanded_w=None,
                last_transition=since,
                circuit=pdu,
                priority=1 if i % 10 == 0 else 0,  # 10 % hosted customers' miners
                ignores_commands=ignores,
            )
        )
    for container, watts in container_w.items():
        circuits.append(Circuit(container, None, watts * 0.95 / 1000.0))
    for pdu, watts in pdu_w.items():
        circuits.append(Circuit(pdu, pdu.split("-")[0], watts / 1000.0))
    site_kw = sum(container_w.values()) / 1000.0
    return views, CircuitTree(site_kw, circuits)


def applied(views: list[MinerView], p: Plan) -> list[MinerView]:
    """The fleet one tick later, had every controllable miner obeyed `p` (woken ones still waking)."""
    out = []
    for v in views:
        a = p.actions.get(v.id)
        after = v
        if isinstance(a, SleepAction) and v.state is not MinerState.SLEEPING:
            after = dataclasses.replace(v, state=MinerState.SLEEPING, power_w=20.0, last_transition=NOW - 300.0)
        elif isinstance(a, RunAction):
            if v.state is MinerState.SLEEPING:
                after = dataclasses.replace(v, state=MinerState.WAKING, commanded_w=a.watts, last_transition=NOW - 5.0)
            elif v.state is not MinerState.WAKING:
                state = MinerState.THROTTLED if a.watts < v.nominal_w else MinerState.HASHING
                after = dataclasses.replace(v, state=state, commanded_w=a.watts, power_w=float(a.watts))
        out.append(after)
    return out


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    fn()  # warm-up (imports, caches)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]


def bare_pass(views: list[MinerView]) -> float:
    total = 0.0
    for v in views:
        if v.state is not MinerState.UNREACHABLE and not v.ignores_commands and v.capability is not None:
            total += v.nominal_w + (v.commanded_w or 0.0) + v.last_transition * 0.0 + v.priority
    return total


def bench_size(n: int, reps: int) -> list[str]:
    views, tree = build_site(n)
    fleet_kw = sum(v.nominal_w for v in views) / 1000.0
    fleet_ths = sum(v.nominal_ths for v in views)
    rows = []
    bare_med, bare_p95 = timed(lambda: bare_pass(views), reps)
    rows.append(f"{n:>6} {'bare pass (floor)':<22} {'':>10} {bare_med:>8.1f} {bare_p95:>8.1f}")
    for share in SHARES:
        target = fleet_kw * share
        for situation in ("new target", "steady"):
            fleet = views
            if situation == "steady":
                first = plan(target, views, tree, RULES, NOW, wake_budget=WAKE_BUDGET)
                fleet = applied(views, first)

            def run_plan(fleet: list[MinerView] = fleet, target: float = target) -> Plan:
                return plan(target, fleet, tree, RULES, NOW, wake_budget=WAKE_BUDGET)

            def run_base(fleet: list[MinerView] = fleet, target: float = target) -> Plan:
                return plan_sleep_only(target, fleet, tree, RULES, NOW, wake_budget=WAKE_BUDGET)

            p_med, p_p95 = timed(run_plan, reps)
            b_med, b_p95 = timed(run_base, reps)
            p, b = run_plan(), run_base()
            assert p.worst_case_kw <= target + 1e-6 or any(a.startswith("cannot_meet") for a in p.alarms)
            kept = 100.0 * p.expected_ths / fleet_ths
            base_kept = 100.0 * b.expected_ths / fleet_ths
            gain = 100.0 * (p.expected_ths / b.expected_ths - 1.0) if b.expected_ths else 0.0
            label = f"{int(share * 100)}% {situation}"
            rows.append(
                f"{n:>6} {label:<22} {p.method:>10} {p_med:>8.1f} {p_p95:>8.1f} {b_med:>8.1f} {b_p95:>8.1f}"
                f" {p.worst_case_kw / fleet_kw * 100:>6.1f} {kept:>7.1f} {base_kept:>7.1f} {gain:>+6.1f}"
                f" {len(p.alarms):>3}"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per figure")
    args = ap.parse_args()
    header = (
        f"{'miners':>6} {'situation':<22} {'method':>10} {'plan_ms':>8} {'p95':>8} {'sleep_ms':>8} {'p95':>8}"
        f" {'wc_%':>6} {'ths_%':>7} {'base_%':>7} {'gain%':>6} {'alm':>3}"
    )
    print(header)
    print("-" * len(header))
    for n in (int(s) for s in args.sizes.split(",")):
        for row in bench_size(n, args.reps):
            print(row, flush=True)
    print(
        "\nplan_ms / sleep_ms: plan() / plan_sleep_only() wall time per tick, median and p95; wc_%: planned worst"
        " case as % of fleet nominal power (target minus 1 % headroom); ths_% / base_%: expected hashrate of plan()"
        " / the sleep-only baseline as % of fleet nominal hashrate; gain%: plan() over the baseline."
    )


if __name__ == "__main__":
    main()
