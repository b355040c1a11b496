"""Times one run of the agent stored, as the run after it reads them (issue 11, item 4, across a restart).

While it runs, the agent's time (runtime/clock.py SteadyClock) does not step with the wall clock; a restart adopts
the wall again. Every time a run stores on its own time is therefore on a timeline the next run does not share when
the wall stepped while the last run was up: a dispatch's window, an override's end (`for 300 s` is accepted as its
now + 300), when a miner last slept or woke. An hour forward, and an override given a minute before the restart has
ended by the next run's clock the moment it starts: it would be closed as expired and every miner it slept woken.
An hour back, and it would bind an hour longer than it was given for.

So a run records how far the wall is from its time whenever that changes by more than the step threshold
(`timeline_doc`), and the next run moves every time it loads by that much (`shift_s`): a restart then ends, starts
and allows nothing the last run would not have. The time the agent was down is the wall's account, as before; a wall
that went back while the agent was down is caught when it restores (stored starts and switch times ahead of now).

What the grid sends next is on the grid's clock, which a restart after a step leaves the agent's time apart from
(freshness admits a command issued up to `dispatch.max_age_s` ago, so an agent 30 s ahead accepts it): the signed
issue times of the grid's messages say by how much (`SenderClock`), and a grid window is kept whole on both clocks
(`sender_window`). Soak 2026-12-03, site seed 1454: a curtailment ended 30 s early by true time, the site 1.06 kW
over the limit the grid still held it to.
"""

from __future__ import annotations

import math

TIMELINE_STATE_KEY = "timeline"  # the store's key/value state: how far the wall was from the last run's time
STEP_THRESHOLD_S = 2.0  # two clocks further apart than this disagree (a step, a wrong clock), not drift or transit


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


SENDER_MEMORY_S = 600.0  # how long one signed message's view of the grid's clock counts


class SenderClock:
    """How far the agent's time is ahead of the grid's clock (negative: behind), from the grid's signed messages.

    Each authentic message says `received_at - issued_at`: the two clocks' difference plus its transit. Transit only
    adds (a message queued in the broker through an outage arrives minutes late), so the smallest difference seen
    lately is the estimate (NTP's minimum-delay filter): a late message does not pass for a clock that is ahead.
    The agent's time never steps within a run (runtime/clock.py), so the difference moves only when the grid's clock
    does; `memory_s` lets the estimate follow that. Pure: times handed in.
    """

    def __init__(self, memory_s: float = SENDER_MEMORY_S) -> None:
        self.memory_s = memory_s
        self._seen: list[tuple[float, float]] = []  # (received_at, difference), oldest first

    def observe(self, received_at: float, issued_at: float) -> None:
        if math.isfinite(received_at) and math.isfinite(issued_at):
            self._seen.append((received_at, received_at - issued_at))
            self._forget(received_at)

    def offset_s(self, now: float, *, issued_at: float | None = None) -> float | None:
        """The estimate at `now`, counting a message issued at `issued_at` received now (not yet observed); None
        when nothing was seen."""
        self._forget(now)
        seen = [d for _, d in self._seen]
        if issued_at is not None and math.isfinite(issued_at):
            seen.append(now - issued_at)
        return min(seen) if seen else None

    def _forget(self, now: float) -> None:
        while self._seen and (now - self._seen[0][0] > self.memory_s or len(self._seen) > 4096):
            self._seen.pop(0)


def sender_window(
    start: float | None, end: float | None, *, offset_s: float | None, threshold_s: float = STEP_THRESHOLD_S
) -> tuple[float | None, float | None]:
    """A grid window (`start`, `end` epoch seconds on the grid's clock) on the agent's time, where it binds.

    The grid's clock is not the agent's: a restart after a wall-clock step leaves the agent's time off by the step
    (a restart adopts the wall). `offset_s` is how far the agent's time is ahead of the grid's clock
    (`SenderClock`). Beyond `threshold_s` the window is read on both clocks and kept whole on either, so no clock
    disagreement ends it earlier or starts it later than the grid meant: an agent 30 s ahead ends it 30 s later by
    its own time (its true end), one 30 s behind starts it 30 s earlier (its true start). The cost is binding longer
    by at most the difference: the safe side. Within the threshold the clocks agree and the window stays as sent.
    """
    if offset_s is None or abs(offset_s) <= threshold_s:
        return start, end
    return (
        None if start is None else start + min(0.0, offset_s),
        None if end is None else end + max(0.0, offset_s),
    )
