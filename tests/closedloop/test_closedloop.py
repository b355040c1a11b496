"""The randomized closed-loop suite in CI: a fixed seed (the same scenarios every run; CLOSEDLOOP_SEED=N replays
another). The seed is printed (`pytest -s`, and in the failure report). New scenarios come from the long run,
tests/bench/bench_closedloop.py / scripts/soak.sh, with a new seed each run; a rotating seed joins CI once the soak
is at zero (README: closed-loop suite).

A failure prints the shrunk steps (paste them after `state = ClosedLoopMachine()` into a regression test) and the
scenario story the world kept. Findings so far: tests/closedloop/test_found.py and the README.
"""

from __future__ import annotations

import os

import hypothesis.internal.conjecture.engine as hypothesis_engine
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.closedloop.machine import ClosedLoopMachine

# A failing scenario is replayed a few hundred times while Hypothesis shrinks it (a second or so each): bound that
# at two minutes (Hypothesis' own bound is five), so a failure reports within the test's timeout.
hypothesis_engine.MAX_SHRINKING_SECONDS = 120

FIXED_SEED = 11_2026
EXAMPLES = int(os.environ.get("CLOSEDLOOP_EXAMPLES", "100"))
STEPS = 12


def _run(seed: int) -> None:
    print(f"closed-loop seed {seed} (replay: CLOSEDLOOP_SEED={seed})")

    # what @seed sets on a test; run_state_machine_as_test reads it from the machine class
    seeded = type("ClosedLoopMachine", (ClosedLoopMachine,), {"_hypothesis_internal_use_seed": seed})
    run_state_machine_as_test(
        seeded,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            print_blob=True,
        ),
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_closed_loop() -> None:
    """A fixed seed (the same scenarios every run), or CLOSEDLOOP_SEED=N to replay one the soak printed. New
    scenarios come from the soak (scripts/soak.sh: a new seed each run), not from CI: a randomized test that fails
    on some days and not others is not a gate."""
    env = os.environ.get("CLOSEDLOOP_SEED")
    _run(int(env) if env else FIXED_SEED)
