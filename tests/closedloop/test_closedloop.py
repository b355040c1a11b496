"""The randomized closed-loop suite in CI: a fixed seed (the same scenarios every run) and a rotating one (new
scenarios every day, or CLOSEDLOOP_SEED=N to replay one), a few hundred scenarios in all. The seed is printed
(`pytest -s`, and in the failure report). The long run is tests/bench/bench_closedloop.py / scripts/soak.sh.

A failure prints the shrunk steps (paste them after `state = ClosedLoopMachine()` into a regression test) and the
scenario story the world kept. Findings so far: tests/closedloop/test_found.py and the README.
"""

from __future__ import annotations

import os
import time

import hypothesis.internal.conjecture.engine as hypothesis_engine
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.closedloop.machine import ClosedLoopMachine

# A failing scenario is replayed a few hundred times while Hypothesis shrinks it (a second or so each): bound that
# at two minutes (Hypothesis' own bound is five), so a failure reports within the test's timeout.
hypothesis_engine.MAX_SHRINKING_SECONDS = 120

FIXED_SEED = 11_2026
EXAMPLES = int(os.environ.get("CLOSEDLOOP_EXAMPLES", "100"))  # per seed; two seeds per run
STEPS = 12


def rotating_seed() -> int:
    env = os.environ.get("CLOSEDLOOP_SEED")
    return int(env) if env else int(time.time() // 86400)  # a new one every day: reproducible for that day


def _run(seed: int) -> None:
    print(f"closed-loop seed {seed} (replay: CLOSEDLOOP_SEED={seed})")

    # what @seed sets on a test; run_state_machine_as_test reads it from the machine class
    seeded = type("ClosedLoopMachine", (ClosedLoopMachine,), {"_hypothesis_internal_use_seed": seed})
    run_state_machine_as_test(
        seeded,
        settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            print_blob=True,
        ),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_closed_loop_fixed_seed() -> None:
    _run(FIXED_SEED)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not os.environ.get("CLOSEDLOOP_SEED") and not os.environ.get("CLOSEDLOOP_ROTATE"),
    reason="opt-in until the soak is at zero (README: closed-loop suite): CLOSEDLOOP_ROTATE=1 or CLOSEDLOOP_SEED=N",
)
def test_closed_loop_rotating_seed() -> None:
    _run(rotating_seed())
