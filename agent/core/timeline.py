"""Times one run of the agent stored, as the run after it reads them (issue 11, item 4, across a restart).

While it runs, the agent's time (runtime/clock.py SteadyClock) does not step with the wall clock; a restart adopts
the wall again. Every time a run stores on its own time is therefore on a timeline the next run does not share when
the wall stepped while the last run was up: a dispatch's window, an override's end (`for 300 s` is accepted as its
now + 300), when a miner last slept or woke. An hour forward, and an override given a minute before the restart has
ended by the next run's clock the moment it starts: it would be closed as expired and every miner it slept woken.
An hour back, and it would bind an hour longer than it was given for.

So a run records how far the wall is from its time whenever that changes by more than the step threshold
(`timeline_doc`), and the next run moves every time it loads by that much (`shift_s`): a restart then ends, starts
and allows nothing the last run would not have. That is right for what the grid sent too: a grid command is
accepted only when its issue time agrees with the agent's time (dispatch.max_skew_s), so its window meant the same
on it. The time the agent was down is the wall's account, as before; a wall that went back while the agent was down
is caught when it restores (stored starts and switch times ahead of now).
"""

from __future__ import annotations

import math

TIMELINE_STATE_KEY = "timeline"  # the store's key/value state: how far the wall was from the last run's time


def timeline_doc(wall_offset_s: float) -> dict[str, float]:
    """The record for the next run: the wall clock minus this run's time (positive: the wall is ahead)."""
    return {"wall_offset_s": wall_offset_s}


def shift_s(doc: object, *, wall_offset_s: float = 0.0, threshold_s: float) -> float:
    """How far this run's time is ahead of the time the last run stored its times on: add it to each of them.
    `doc` is the last run's record, `wall_offset_s` how far the wall is from this run's time now (about 0: it starts
    at the wall). 0 when the two agree within `threshold_s` (the slew, not a step) or there is no readable record
    (a first start, a store written before the record was kept)."""
    if not isinstance(doc, dict):
        return 0.0
    offset = doc.get("wall_offset_s")
    if not isinstance(offset, int | float) or isinstance(offset, bool) or not math.isfinite(offset):
        return 0.0
    shift = float(offset) - wall_offset_s
    return shift if abs(shift) > threshold_s else 0.0
