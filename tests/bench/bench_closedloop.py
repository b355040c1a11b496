"""Soak: the randomized closed-loop scenarios (tests/closedloop), many of them, counting violations instead of
stopping at the first.

    python -m tests.bench.bench_closedloop --scenarios 10000             # or scripts/soak.sh 10000
    python -m tests.bench.bench_closedloop --scenarios 500 --seed 7 --jobs 2

Each scenario is one Hypothesis-generated site and sequence of events (the same `ClosedLoopMachine` the CI test
runs), generation only (no shrinking: a violation ends that scenario, is counted by kind and its story kept). At
the end: scenarios run, steps (controller ticks), site time simulated, wall time, violations by kind with the first
story of each, and the worst margins seen: safety (kW and share of the limit the site stayed under it by, after
settling; negative = over) and service (healthy draw / the 90 % floor - 1; negative = under).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.closedloop.harness import Margins
from tests.closedloop.machine import ClosedLoopMachine


class _Tally:
    def __init__(self) -> None:
        self.scenarios = 0
        self.steps = 0
        self.site_s = 0.0
        self.margins = Margins()
        self.violations: dict[str, int] = {}
        self.first_story: dict[str, str] = {}

    def doc(self) -> dict[str, Any]:
        m = self.margins
        return {
            "scenarios": self.scenarios,
            "steps": self.steps,
            "site_hours": round(self.site_s / 3600, 1),
            "violations": self.violations,
            "first_story": self.first_story,
            "worst_safety_kw": m.safety_kw,
            "worst_safety_share": m.safety_share,
            "worst_service_share": m.service_share,
            "safety_checks": m.checks_safety,
            "service_checks": m.checks_service,
        }


TALLY = _Tally()


class SoakMachine(ClosedLoopMachine):
    """A violation ends the checks of its scenario (counted, its story kept) instead of failing the run."""

    soak = True

    def teardown(self) -> None:
        w = self.world
        if w is not None:
            TALLY.scenarios += 1
            TALLY.steps += w.steps
            TALLY.site_s += w.vt.t
            TALLY.margins.merge(w.margins)
            if w.violation is not None:
                kind = str(w.violation).split(" at t=", 1)[0]
                TALLY.violations[kind] = TALLY.violations.get(kind, 0) + 1
                TALLY.first_story.setdefault(kind, str(w.violation))
        super().teardown()


def run(scenarios: int, seed: int) -> dict[str, Any]:
    seeded = type("SeededSoakMachine", (SoakMachine,), {"_hypothesis_internal_use_seed": seed})
    run_state_machine_as_test(
        seeded,
        settings=settings(
            max_examples=scenarios,
            stateful_step_count=12,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    return TALLY.doc()


def _job(args: tuple[int, int]) -> dict[str, Any]:
    return run(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenarios", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--jobs", type=int, default=1, help="processes, each with its own seed (seed, seed+1, ...)")
    parser.add_argument("--json", action="store_true", help="print the tally as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    per = [args.scenarios // args.jobs + (1 if i < args.scenarios % args.jobs else 0) for i in range(args.jobs)]
    jobs = [(n, args.seed + i) for i, n in enumerate(per) if n > 0]
    if len(jobs) == 1:
        docs = [_job(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            docs = pool.map(_job, jobs)
    total: dict[str, Any] = {
        "seed": args.seed,
        "jobs": len(jobs),
        "scenarios": 0,
        "steps": 0,
        "site_hours": 0.0,
        "violations": {},
        "first_story": {},
        "worst_safety_kw": float("inf"),
        "worst_safety_share": float("inf"),
        "worst_service_share": float("inf"),
        "safety_checks": 0,
        "service_checks": 0,
    }
    for d in docs:
        for k in ("scenarios", "steps", "site_hours", "safety_checks", "service_checks"):
            total[k] += d[k]
        for k in ("worst_safety_kw", "worst_safety_share", "worst_service_share"):
            total[k] = min(total[k], d[k])
        for kind, n in d["violations"].items():
            total["violations"][kind] = total["violations"].get(kind, 0) + n
            total["first_story"].setdefault(kind, d["first_story"][kind])
    total["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        json.dump(total, sys.stdout, indent=1, default=str)
        print()
        return
    print(f"closed-loop soak: seed {total['seed']} ({total['jobs']} job(s))")
    print(
        f"  scenarios {total['scenarios']}, steps (controller ticks) {total['steps']}, "
        f"site time {total['site_hours']:.1f} h, wall {total['wall_s']} s"
    )
    print(f"  checks: safety {total['safety_checks']}, service {total['service_checks']}")
    print(
        f"  worst safety margin: {total['worst_safety_kw']:.3f} kW ({100 * total['worst_safety_share']:.2f} % of "
        f"the limit); worst service margin: {100 * total['worst_service_share']:.2f} % over the 90 % floor"
    )
    if not total["violations"]:
        print("  violations: none")
    for kind, n in sorted(total["violations"].items(), key=lambda kv: -kv[1]):
        print(f"  violations [{kind}]: {n}")
        print("    " + total["first_story"][kind].replace("\n", "\n    "))


if __name__ == "__main__":
    main()
