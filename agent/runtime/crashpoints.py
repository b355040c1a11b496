"""TEST ONLY: kill the agent at a named moment, so a test can check what a restart finds.

With `HASHFLEX_TEST_CRASH_AT=<point>[:<n>]` in the agent's environment, the n-th arrival (default: the first) at
`crash_point("<point>")` writes one line to stderr and kills the process with SIGKILL: no clean-up, no flush, no
`agent_stop` record, exactly what a `kill -9` or a power cut of the gateway leaves behind. The points are placed
where a crash is hardest to come back from (see POINTS). tests/integration/test_crash_restart.py uses them.

Inert by default: the variable is read once, at import; unset (always, outside tests) `crash_point` only compares a
module global with None. A value that names no point refuses to start the agent rather than being ignored.
"""

from __future__ import annotations

import os
import signal

ENV = "HASHFLEX_TEST_CRASH_AT"

POINTS: dict[str, str] = {
    "mid_write": "inside the transaction that persists a command: the change, reply and audit written, not committed",
    "accepted": "a command is committed (change, reply, audit) and its reply not yet sent",
    "planned": "a tick has its plan and the commands to send, and has sent none of them",
    "in_flight": "a miner has acknowledged a command of the batch; the rest of the batch is still on the wire",
    "closing": "inside the transaction that closes an expired dispatch: its new status written, not committed",
}


def parse(spec: str | None) -> tuple[str, int] | None:
    """`point[:n]` → (point, n); None for an unset or empty value; ValueError for anything else."""
    if spec is None or not spec.strip():
        return None
    name, _, count = spec.strip().partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown crash point {name!r} (known: {', '.join(POINTS)})")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be a whole number") from None
    if n < 1:
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be at least 1")
    return name, n


_armed = parse(os.environ.get(ENV))
_arrivals = [0]  # arrivals at the armed point so far


def armed() -> str | None:
    """The armed point as `point:n` (for a warning in the start-up log), or None."""
    return None if _armed is None else f"{_armed[0]}:{_armed[1]}"


def crash_point(name: str) -> None:
    """Die here if this is the armed point's n-th arrival; otherwise (and always when unarmed) do nothing."""
    if _armed is None or name != _armed[0]:
        return
    _arrivals[0] += 1
    if _arrivals[0] < _armed[1]:
        return
    os.write(2, f"{ENV}: SIGKILL at {name} (arrival {_arrivals[0]})\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
