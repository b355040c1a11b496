"""TEST ONLY: kill the agent at a named moment, so a test can check what a restart finds.

With `HASHFLEX_TEST_CRASH_AT=<point>[:<n>][@<after>]` in the agent's environment, the n-th arrival (default: the
first) at `crash_point("<point>")` — counting only arrivals after the first arrival at `<after>`, when given —
writes one line to stderr and kills the process with SIGKILL: no clean-up, no flush, no
`agent_stop` record, exactly what a `kill -9` or a power cut of the gateway leaves behind. The points are placed
where a crash is hardest to come back from (see POINTS). tests/integration/test_crash_restart.py uses them.
`planned@accepted` is the plan made for the command just sent, not a plan the agent made for itself at start-up
before the command arrived (a restored site whose telemetry moved re-plans at once).

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


def parse(spec: str | None) -> tuple[str, int, str | None] | None:
    """`point[:n][@after]` → (point, n, after); None for an unset or empty value; ValueError for anything else."""
    if spec is None or not spec.strip():
        return None
    head, _, after = spec.strip().partition("@")
    name, _, count = head.partition(":")
    for point in (name, after) if after else (name,):
        if point not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: unknown crash point {point!r} (known: {', '.join(POINTS)})")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be a whole number") from None
    if n < 1:
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be at least 1")
    return name, n, after or None


_armed = parse(os.environ.get(ENV))
_arrivals = [0]  # arrivals at the armed point so far (once its `after` point was passed)
_passed: set[str] = set()  # points arrived at so far


def armed() -> str | None:
    """The armed point as `point:n` (for a warning in the start-up log), or None."""
    if _armed is None:
        return None
    name, n, after = _armed
    return f"{name}:{n}" + (f"@{after}" if after else "")


def crash_point(name: str) -> None:
    """Die here if this is the armed point's n-th arrival; otherwise (and always when unarmed) do nothing."""
    if _armed is None:
        return
    point, _, after = _armed
    gate_open = after is None or after in _passed
    _passed.add(name)
    if name != point or not gate_open:
        return
    _arrivals[0] += 1
    if _arrivals[0] < _armed[1]:
        return
    os.write(2, f"{ENV}: SIGKILL at {name} (arrival {_arrivals[0]})\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
