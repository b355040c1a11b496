"""Frequency response: staged load shedding on under-frequency, as pure functions of the readings and their times.

A stage trips when the frequency has stayed below its `below_hz` for its `for_s` (a shorter dip is ridden
through: nothing happens); the event then holds the deepest stage tripped until the frequency has been above
`restore_above_hz` for `restore_after_s`, and ends (restore). A stage may have its own restore rule, which holds
while it is the deepest tripped (`FrequencyRules.restore_rule`). Stages are cumulative: each one's shed is the
total shed while it holds, from the same base (the miners' draw when the event's first stage tripped). An event
the last run held is carried over a restart (`resumed`): held, never tripped again, restored by the same rule on
this run's readings.

    rules = FrequencyRules((Stage(49.4, 0.2, shed_pct=25.0),), restore_above_hz=49.9, restore_after_s=30.0)
    state = FrequencyState.initial(rules)
    state, decision = observe(state, rules, hz=49.3, at=t)          # every reading, as it arrives
    if decision.tripped: fire(shed_list(candidates, rules.stages[decision.depth - 1].kw(base_kw)))
    state = unknown(state, at=t)                                    # the meter is stale: no reading to trust

Only readings that follow each other within `max_gap_s` count as continuous: after a gap (a stale meter, a poll
that stalled) the time below a stage and the time above the restore threshold both start again, so an event is
never restored on readings that were not there (a stale meter wakes nothing).

`shed_list` ranks the miners that can shed now (running, reachable, answering commands, nothing in flight) so a
stage's kW is shed fastest: the most kW per ms of command cost first (a LuxOS or Whatsminer sleep is one RPC
exchange, a stock Antminer's three HTTP calls: ten times the client CPU, and client CPU is what bounds a batch at
10,000 miners), the larger draw first among equal rates, so among miners whose commands cost the same the fewest
commands reach the kW; a miner the rest reach it without is left out.

Pure: no I/O, no clock of its own (times are passed in, seconds on one clock).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

MAX_STAGES = 8


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: must be a finite number")
    return float(value)


@dataclass(frozen=True, slots=True)
class Stage:
    """Shed `shed_pct` % of the miners' draw (or `shed_kw`) once the frequency is below `below_hz` for `for_s`."""

    below_hz: float
    for_s: float
    shed_pct: float | None = None
    shed_kw: float | None = None
    # this stage's own restore rule, over the programme's while it is the deepest the event holds (None: the
    # programme's)
    restore_above_hz: float | None = None
    restore_after_s: float | None = None

    def __post_init__(self) -> None:
        _finite("below_hz", self.below_hz)
        if self.restore_above_hz is not None and _finite("restore_above_hz", self.restore_above_hz) <= self.below_hz:
            raise ValueError(f"restore_above_hz = {self.restore_above_hz!r}: must be above below_hz ({self.below_hz})")
        if self.restore_after_s is not None and _finite("restore_after_s", self.restore_after_s) < 0:
            raise ValueError(f"restore_after_s = {self.restore_after_s!r}: must be at least 0")
        if _finite("for_s", self.for_s) < 0:
            raise ValueError(f"for_s = {self.for_s!r}: must be at least 0")
        if (self.shed_pct is None) == (self.shed_kw is None):
            raise ValueError("a stage sheds either a share (shed_pct) or a power (shed_kw)")
        if self.shed_pct is not None and not 0 < _finite("shed_pct", self.shed_pct) <= 100:
            raise ValueError(f"shed_pct = {self.shed_pct!r}: must be in (0, 100]")
        if self.shed_kw is not None and _finite("shed_kw", self.shed_kw) <= 0:
            raise ValueError(f"shed_kw = {self.shed_kw!r}: must be above 0")

    def kw(self, base_kw: float) -> float:
        """What this stage sheds in total, from the miners' draw `base_kw` when the event began."""
        if self.shed_kw is not None:
            return self.shed_kw
        assert self.shed_pct is not None
        return max(0.0, _finite("base_kw", base_kw)) * self.shed_pct / 100.0


@dataclass(frozen=True, slots=True)
class FrequencyRules:
    stages: tuple[Stage, ...]  # below_hz falling, shed not falling
    restore_above_hz: float
    restore_after_s: float
    max_gap_s: float = 1.0  # readings further apart than this are not continuous

    def __post_init__(self) -> None:
        if not 1 <= len(self.stages) <= MAX_STAGES:
            raise ValueError(f"1 to {MAX_STAGES} stages")
        for a, b in itertools.pairwise(self.stages):
            if b.below_hz >= a.below_hz:
                raise ValueError(f"stages are ordered by below_hz, falling: {b.below_hz} after {a.below_hz}")
            if (a.shed_pct is None) != (b.shed_pct is None):
                raise ValueError("every stage sheds in the same unit (all % or all kW)")
            if (b.shed_pct or b.shed_kw or 0.0) < (a.shed_pct or a.shed_kw or 0.0):
                raise ValueError("a deeper stage sheds at least as much as the one above it (stages are totals)")
        if _finite("restore_above_hz", self.restore_above_hz) < self.stages[0].below_hz:
            raise ValueError(f"restore_above_hz = {self.restore_above_hz}: below the first stage's below_hz")
        for i, stage in enumerate(self.stages):
            # the event ends as a whole: a threshold under the first stage's would end it where that stage trips
            # again at once (an event, a wake, an event ...)
            if stage.restore_above_hz is not None and stage.restore_above_hz < self.stages[0].below_hz:
                raise ValueError(
                    f"stages[{i}].restore_above_hz = {stage.restore_above_hz}: below the first stage's "
                    f"below_hz ({self.stages[0].below_hz})"
                )
        if _finite("restore_after_s", self.restore_after_s) < 0 or _finite("max_gap_s", self.max_gap_s) <= 0:
            raise ValueError("restore_after_s must be at least 0 and max_gap_s above 0")

    def restore_rule(self, depth: int) -> tuple[float, float]:
        """(restore_above_hz, restore_after_s) for an event holding `depth` stages: the deepest held stage's own,
        where it has one, else the programme's. The event ends as a whole on it (every stage's shed restored)."""
        if depth <= 0:
            return self.restore_above_hz, self.restore_after_s
        stage = self.stages[min(depth, len(self.stages)) - 1]
        above = self.restore_above_hz if stage.restore_above_hz is None else stage.restore_above_hz
        after = self.restore_after_s if stage.restore_after_s is None else stage.restore_after_s
        return above, after


@dataclass(frozen=True, slots=True)
class FrequencyState:
    """Where the detector is. `depth`: stages held (0: no event; n: stages[n-1] is the deepest tripped)."""

    below_since: tuple[float | None, ...]  # per stage: since when the readings have been below it (continuously)
    depth: int = 0
    last_at: float | None = None  # the last trusted reading's time
    # the event, while depth > 0
    first_below_at: float | None = None  # the first reading below the first stage that tripped
    tripped_at: float | None = None
    min_hz: float | None = None  # the largest deviation: the lowest reading of the event
    min_hz_at: float | None = None
    restore_since: float | None = None  # above restore_above_hz continuously since

    @staticmethod
    def initial(rules: FrequencyRules) -> FrequencyState:
        return FrequencyState(below_since=(None,) * len(rules.stages))

    @property
    def active(self) -> bool:
        return self.depth > 0


@dataclass(frozen=True, slots=True)
class Decision:
    tripped: tuple[int, ...] = ()  # stage indices this reading tripped (deepest last)
    restore: bool = False  # this reading ended the event
    ended: FrequencyState | None = None  # the event as it stood when it ended (restore only)

    @property
    def depth(self) -> int:
        return self.tripped[-1] + 1 if self.tripped else 0


def resumed(
    rules: FrequencyRules,
    depth: int,
    *,
    first_below_at: float | None,
    tripped_at: float | None,
    min_hz: float | None,
    min_hz_at: float | None,
) -> FrequencyState:
    """An event the last run held, carried over a restart: held at `depth` (at most the stages there are), with
    no reading since. Nothing was read while the agent was down, so the time below a deeper stage and the time
    above the restore threshold both start at this run's first reading (a stage held never trips again)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth = {depth!r}: an event holds at least one stage")
    times = {"first_below_at": first_below_at, "tripped_at": tripped_at, "min_hz": min_hz, "min_hz_at": min_hz_at}
    for name, value in times.items():
        if value is not None:
            _finite(name, value)
    return FrequencyState(
        below_since=(None,) * len(rules.stages),
        depth=min(depth, len(rules.stages)),
        first_below_at=first_below_at,
        tripped_at=tripped_at,
        min_hz=min_hz,
        min_hz_at=min_hz_at,
    )


def unknown(state: FrequencyState, at: float) -> FrequencyState:
    """No trusted reading at `at` (a stale meter): the time below and above thresholds starts again later."""
    _finite("at", at)
    return replace(state, below_since=(None,) * len(state.below_since), restore_since=None, last_at=None)


def observe(state: FrequencyState, rules: FrequencyRules, hz: float, at: float) -> tuple[FrequencyState, Decision]:
    """One trusted reading: the detector's next state, and what it decided (trip stages, restore, nothing)."""
    hz, at = _finite("hz", hz), _finite("at", at)
    if state.last_at is not None and at < state.last_at:
        at = state.last_at  # a reading never goes back in time
    gap = state.last_at is None or at - state.last_at > rules.max_gap_s
    if gap:  # nothing known between: continuous time starts at this reading
        state = replace(state, below_since=(None,) * len(rules.stages), restore_since=None)
    below = tuple(
        (since if since is not None else at) if hz < stage.below_hz else None
        for stage, since in zip(rules.stages, state.below_since, strict=True)
    )
    tripped = tuple(
        i
        for i, (stage, since) in enumerate(zip(rules.stages, below, strict=True))
        if i >= state.depth and since is not None and at - since >= stage.for_s - 1e-9
    )
    state = replace(state, below_since=below, last_at=at)
    if tripped:
        if state.depth == 0:
            first = next(s for s in below if s is not None)  # the first stage's run began first
            state = replace(state, first_below_at=first, tripped_at=at)
        state = replace(state, depth=tripped[-1] + 1, restore_since=None)
    if state.depth == 0:
        return state, Decision()
    if state.min_hz is None or hz < state.min_hz:
        state = replace(state, min_hz=hz, min_hz_at=at)
    if tripped:
        return state, Decision(tripped=tripped)
    above_hz, after_s = rules.restore_rule(state.depth)
    if hz <= above_hz:
        return replace(state, restore_since=None), Decision()
    since = state.restore_since if state.restore_since is not None else at
    if at - since < after_s - 1e-9:
        return replace(state, restore_since=since), Decision()
    ended = replace(state, restore_since=since)
    return FrequencyState(below_since=below, last_at=at), Decision(restore=True, ended=ended)


# ------------------------------------------------------------------------------------------------ shed list
class Candidate(NamedTuple):
    """A miner that can shed now: what it draws and what its command costs (ms of client CPU: what bounds how
    fast a batch goes out, drivers.base.CONTROL_COST_MS). A tuple: 10,000 of them are built every tick."""

    id: str
    kw: float
    cost_ms: float = 1.0

    @property
    def rate(self) -> float:
        """kW shed per ms of command cost."""
        return self.kw / max(self.cost_ms, 1e-6)


@dataclass(frozen=True, slots=True)
class ShedList:
    """The candidates in the order to take them: the most kW per ms of command cost first (the site's draw falls
    fastest), the larger draw first at an equal rate (fewer commands), then by id (stable from tick to tick)."""

    ranked: tuple[Candidate, ...]

    @property
    def total_kw(self) -> float:
        return sum(c.kw for c in self.ranked)

    def take(self, kw: float, skip: Iterable[str] = ()) -> list[Candidate]:
        """The miners to sleep for `kw`, leaving out `skip` (slept in this event already, or busy now): the ranked
        prefix that reaches it (all of them when they cannot), less any miner the rest reach it without (a cheap
        small one taken before a large one that alone covers it), smallest first."""
        if kw <= 1e-9:
            return []
        skipped = set(skip)
        out: list[Candidate] = []
        got = 0.0
        for c in self.ranked:
            if got >= kw - 1e-9:
                break
            if c.id not in skipped:
                out.append(c)
                got += c.kw
        if got < kw - 1e-9:
            return out  # everything there is: not enough
        keep = sorted(out, key=lambda c: (c.kw, -c.cost_ms, c.id))
        dropped: set[str] = set()
        for c in keep:  # smallest first: each one dropped is the least kW
            if got - c.kw >= kw - 1e-9:
                got -= c.kw
                dropped.add(c.id)
        return [c for c in out if c.id not in dropped]

    def count_for(self, kw: float) -> int:
        """How many commands `kw` takes from the list as it stands."""
        return len(self.take(kw))


def shed_list(candidates: Iterable[Candidate]) -> ShedList:
    """Rank the miners that can shed (see ShedList); miners drawing nothing (or with no command cost) are left out."""
    usable = (c for c in candidates if c.kw > 0 and math.isfinite(c.kw) and c.cost_ms > 0)
    return ShedList(tuple(sorted(usable, key=lambda c: (-c.kw / c.cost_ms, -c.kw, c.id))))


def send_order(chosen: Sequence[Candidate]) -> list[Candidate]:
    """The order that sheds fastest: the most kW per ms of command cost first."""
    return sorted(chosen, key=lambda c: (-c.rate, -c.kw, c.id))
