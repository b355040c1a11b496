"""Arbitration: every input that limits the site → one effective Target, and which input binds.

Inputs: the licensed cap, run-time caps from the grid and from the operator (each may only lower the licensed
one; the lowest binds), grid dispatches and operator overrides (`Dispatch`), time-of-use windows (`ScheduleRule`)
and the fail-safe level. The lowest level wins; ties go to the input listed first in `_RANK` so the reason shown
is stable.

Ramps (`ramped_level`): a dispatch may ask to be approached at `ramp_kw_per_min`. That slows its own input only:
each input ramps on its own path (an input without a ramp binds at once), and the planning level is the minimum
of the ramped inputs, so a slow grid ramp never holds the site above an operator curtail, a time-of-use window,
the fail-safe or a cap. The path of each ramped input is explicit state, handed in and returned each tick.

Event rules (all pure functions of the dispatches and `now`):
- A reduction is never delayed: a dispatch binds from its start (only a grid cool-down may defer a start).
- min_hold_s: a dispatch (grid or operator) holds at least this long from its effective start, even if it is
  cancelled or scheduled to end sooner (protects hardware from short cycles).
- max_event_s: a GRID dispatch binds at most this long from its effective start.
- cooldown_s: a GRID dispatch that starts less than cooldown_s after the previous grid event ended (no overlap) is
  deferred to end + cooldown_s — the site's declared recovery time, as in demand-response programmes.
  Overlapping grid dispatches are one event and are never deferred. The cap, operator overrides, schedules and
  the fail-safe are never deferred.
- debounce_s: the target rises only after the input that held it down has been gone for debounce_s, so a resume
  right after a curtail (or a flapping dispatch) does not cycle the fleet.
A cancelled dispatch is passed as a copy whose `end` is the cancel time (`cancelled()`). The runtime keeps ended
dispatches in the inputs for `retention_s(rules)` so holds, debounce and cool-down can be computed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hashflex.agent.core.model import Dispatch, Source, Target
from hashflex.agent.core.ramp import ramp_step
from hashflex.agent.core.schedule import ScheduleRule

_RANK = {
    Source.FREQUENCY: -1,
    Source.FAILSAFE: 0,
    Source.GRID: 1,
    Source.OPERATOR: 2,
    Source.SCHEDULE: 3,
    Source.CAP: 4,
}


@dataclass(frozen=True, slots=True)
class ArbitrationRules:
    debounce_s: float = 5.0
    min_hold_s: float = 0.0
    cooldown_s: float = 0.0
    max_event_s: float | None = None


def retention_s(rules: ArbitrationRules) -> float:
    """How long after its end an ended dispatch still matters to arbitration."""
    return rules.min_hold_s + rules.debounce_s + rules.cooldown_s


def cancelled(dispatch: Dispatch, now: float) -> Dispatch:
    """The dispatch as it stands after a cancel at `now` (its end moved forward, never back)."""
    end = now if dispatch.end is None else min(dispatch.end, now)
    return dataclasses.replace(dispatch, end=end)


@dataclass(frozen=True, slots=True)
class EventWindow:
    """When a dispatch actually binds, after the event rules."""

    dispatch_id: str
    start: float  # effective start (a grid cool-down may defer it)
    end: float | None  # effective end: scheduled end, extended by min hold, cut by max length; None = open
    release: float | None  # end + debounce: the moment it stops holding the target down
    deferred: bool = False  # started later than asked because of the cool-down
    never: bool = False  # cancelled or cut before it could start

    def binds_at(self, now: float) -> bool:
        return not self.never and self.start <= now and (self.release is None or now < self.release)

    def phase(self, now: float) -> str:
        """pending | deferred | active | holding (past end, inside the debounce) | ended."""
        if self.never or (self.release is not None and now >= self.release):
            return "ended"
        if now < self.start:
            return "deferred" if self.deferred else "pending"
        if self.end is not None and now >= self.end:
            return "holding"
        return "active"


def latest_revisions(dispatches: Iterable[Dispatch]) -> list[Dispatch]:
    """One dispatch per id: the highest revision (OpenADR modification number)."""
    best: dict[str, Dispatch] = {}
    for d in dispatches:
        if d.id not in best or d.rev > best[d.id].rev:
            best[d.id] = d
    return list(best.values())


def event_windows(dispatches: Iterable[Dispatch], rules: ArbitrationRules) -> dict[str, EventWindow]:
    """The effective window of every dispatch (latest revision per id)."""
    windows: dict[str, EventWindow] = {}
    grid_end: float | None = None  # effective end of the current (or last) grid event; inf = open-ended
    for d in sorted(latest_revisions(dispatches), key=lambda d: (d.start, d.id)):
        start, deferred = d.start, False
        is_grid = d.source is Source.GRID
        if is_grid and grid_end is not None and grid_end <= start < grid_end + rules.cooldown_s:
            start, deferred = grid_end + rules.cooldown_s, True
        end = d.end
        never = end is not None and end <= start
        if end is not None and not never:
            end = max(end, start + rules.min_hold_s)
        if is_grid and rules.max_event_s is not None and not never:
            end = start + rules.max_event_s if end is None else min(end, start + rules.max_event_s)
        release = None if end is None else end + rules.debounce_s
        windows[d.id] = EventWindow(d.id, start, end, release, deferred, never)
        if is_grid and not never:
            stop = math.inf if end is None else end
            grid_end = stop if grid_end is None else max(grid_end, stop)
    return windows


def _level_kw(d: Dispatch) -> float:
    if d.target_kw is None and (d.curtail_kw is None or d.baseline_kw is None):
        raise ValueError(f"dispatch {d.id!r}: curtail_kw needs the baseline_kw measured at acceptance")
    return max(0.0, d.level_kw())


@dataclass(frozen=True, slots=True)
class ArbitrationInputs:
    licensed_cap_kw: float
    # run-time caps, one per source, each may only lower the licensed cap and the lowest binds: a `cap` command
    # from the grid (signed, MQTT) and one from the site's operator (local socket) are separate inputs, so neither
    # lifts the other (lifting a grid cap locally is an explicit, audited act of the runtime, not a cap)
    grid_cap_kw: float | None = None
    operator_cap_kw: float | None = None
    dispatches: Sequence[Dispatch] = ()  # grid and operator, incl. recently ended ones (see retention_s)
    schedule: Sequence[ScheduleRule] = ()
    failsafe_kw: float | None = None  # the fail-safe limit while it is active (failsafe.limit_kw), else None
    # the level an under-frequency event holds the site at until it is restored (agent.runtime.frequency), else None
    frequency_kw: float | None = None
    rules: ArbitrationRules = ArbitrationRules()


def effective_cap_kw(licensed_cap_kw: float, *runtime_caps_kw: float | None) -> float:
    """The lowest of the licensed cap and the run-time caps: a run-time cap may only lower the licensed one."""
    return min([licensed_cap_kw, *(max(0.0, c) for c in runtime_caps_kw if c is not None)])


def _cap_binding(inputs: ArbitrationInputs, cap: float) -> str:
    """Which cap binds: "" for the licensed one, else the source of the run-time cap (the grid's on a tie)."""
    if cap >= inputs.licensed_cap_kw:
        return ""
    if inputs.grid_cap_kw is not None and max(0.0, inputs.grid_cap_kw) <= cap:
        return Source.GRID.value
    return Source.OPERATOR.value


# (kw, rank, id, source, ramp, detail, since): one input that binds now, at its own (unramped) level, and since
# when it binds (a dispatch's effective start; the others: -inf)
_Limit = tuple[float, int, str, Source, float | None, str, float]


def _key(limit: _Limit) -> tuple[float, int, str]:
    return limit[0], limit[1], limit[2]


def _limits(inputs: ArbitrationInputs, now: float) -> tuple[float, list[_Limit]]:
    """The effective cap and every input that binds at `now` (the cap first)."""
    cap = effective_cap_kw(inputs.licensed_cap_kw, inputs.grid_cap_kw, inputs.operator_cap_kw)
    out: list[_Limit] = [(cap, _RANK[Source.CAP], _cap_binding(inputs, cap), Source.CAP, None, "", -math.inf)]
    windows = event_windows(inputs.dispatches, inputs.rules)
    for d in latest_revisions(inputs.dispatches):
        window = windows[d.id]
        if not window.binds_at(now):
            continue
        phase = window.phase(now)
        detail = {"holding": "release_debounce"}.get(phase, "")
        if phase == "active" and d.end is not None and now >= d.end:
            detail = "min_hold"
        out.append((_level_kw(d), _RANK[d.source], d.id, d.source, d.ramp_kw_per_min, detail, window.start))
    for w in inputs.schedule:
        if w.active_at(now):
            out.append((w.target_kw, _RANK[Source.SCHEDULE], w.name, Source.SCHEDULE, None, "", -math.inf))
    if inputs.failsafe_kw is not None:
        out.append((max(0.0, inputs.failsafe_kw), _RANK[Source.FAILSAFE], "", Source.FAILSAFE, None, "", -math.inf))
    if inputs.frequency_kw is not None:
        out.append((max(0.0, inputs.frequency_kw), _RANK[Source.FREQUENCY], "", Source.FREQUENCY, None, "", -math.inf))
    return cap, out


def arbitrate(inputs: ArbitrationInputs, now: float) -> Target:
    """The one effective target at `now`: the most restrictive of all inputs, with the one that binds.

    This is where the site is headed; how fast it may get there, input by input, is `ramped_level`.
    """
    cap, limits = _limits(inputs, now)
    kw, _, binding_id, source, ramp, detail, _since = min(limits, key=_key)
    return Target(
        kw=min(kw, cap),
        source=source,
        binding_id=binding_id or None,
        cap_kw=cap,
        ramp_kw_per_min=ramp,
        failsafe=inputs.failsafe_kw is not None,
        detail=detail,
    )


# ---------------------------------------------------------------------------------------------- ramps
RampState = Mapping[str, float]  # ramped input (`ramp_key`) -> where its own ramp path is now, in kW


def ramp_key(source: Source, input_id: str) -> str:
    return f"{source.value}:{input_id}"


@dataclass(frozen=True, slots=True)
class RampedLevel:
    """The planning level for this tick: the lowest of all inputs, each one ramped on its own."""

    kw: float
    ramps: dict[str, float]  # the state to hand to the next call (only inputs that still bind and ramp)
    binding: str  # the input that holds the level ("grid:d1"; "cap" for the cap)
    ramping: bool  # the binding input is on its way down its ramp (not yet at its level)


def ramped_level(
    inputs: ArbitrationInputs, now: float, dt_s: float, ramps: RampState, *, from_kw: float
) -> RampedLevel:
    """Each input's contribution, and the level: the minimum of them, never above the cap.

    An input without a ramp binds at once at its level. An input that asks for a ramp (a dispatch's
    `ramp_kw_per_min`) goes down its own path: from where it was (`ramps`, the state returned by the last call) or,
    the first time it binds, from `from_kw` (the level planned last tick: where the site is headed from) or where
    a path already on its way is now, if lower, at most its rate times the time since (`dt_s`, or since
    it began to bind), to its level; a rise of its level applies at once (increases are limited by the planner's
    ramp allowance). So a ramp slows only its own input: any other input binds as if it were alone.
    """
    cap, limits = _limits(inputs, now)
    out: dict[str, float] = {}
    best: tuple[float, int, str] | None = None  # (contribution, rank, id): ties reported as in `arbitrate`
    binding, ramping = Source.CAP.value, False
    # a path that starts now starts where the level is now: what last tick planned, or lower where a path already
    # on its way has gone lower since. From last tick's level alone, a second ramped dispatch that came in while a
    # fast one ramped the site down started 3.7 kW above where the fast one had got to, and once the fast one ended
    # the level rose by that much (soak of 2026-12-04 night, site 78: 8.10 kW against the grid's 7.21 kW). An
    # unramped input does not move it: a ramp runs from where the site was headed, whatever binds below it meanwhile
    start_kw = min(
        [from_kw]
        + [
            ramp_step(ramps[key], kw, dt_s, down_kw_per_min=ramp)
            for kw, _rank, input_id, source, ramp, _detail, _since in limits
            if ramp is not None and (key := ramp_key(source, input_id)) in ramps
        ]
    )
    for kw, rank, input_id, source, ramp, _detail, since in limits:
        contribution = kw
        if ramp is not None:
            key = ramp_key(source, input_id)
            # a path that starts now has run only since the input began to bind, not the whole tick
            prev, run_s = (ramps[key], dt_s) if key in ramps else (start_kw, min(dt_s, now - since))
            contribution = out[key] = ramp_step(prev, kw, run_s, down_kw_per_min=ramp)
        if best is None or (contribution, rank, input_id) < best:
            best = (contribution, rank, input_id)
            binding = f"{source.value}:{input_id}" if input_id else source.value
            ramping = contribution > kw + 1e-9
    assert best is not None  # the cap is always among the limits
    return RampedLevel(kw=min(best[0], cap), ramps=out, binding=binding, ramping=ramping)
