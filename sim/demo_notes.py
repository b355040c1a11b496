"""What the demo's plot says besides the curves: what the agent did (from its audit trail, in a few numbered notes)
and the sleep-only baseline its hashrate is held against (from the simulator's truth). Pure: no I/O, no plotting.

The notes read the audit export the demo already writes (`hashflex audit export`): one `actions` record per batch
of miner commands, `failsafe_enter`/`failsafe_exit`, `alarm` and `cap_change`. Batches that belong together (same
target, same plan method, each within `gap_s` of the last) become one note, so a ramp of a dozen batches is one
line. Where ground truth fell below a binding target (one under the cap) by more than the tolerance, the stretch is
put to the note of the last batch sent before it began, with how far, until when, and a cause the record shows: the
woken miners were still booting, the agent planned from a read that lagged the site, or its plan counted every miner
at its worst case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hashflex.sim.demo_support import Sample

NOTE_GAP_S = 60.0  # site seconds: batches closer than this, for the same target and method, are one note


@dataclass(frozen=True, slots=True)
class Shortfall:
    """The site stayed below a binding target (by more than the tolerance) after a note's batches."""

    worst_kw: float  # the most it was below the target
    until: float  # the last look at which it was
    cause: str


@dataclass(frozen=True, slots=True)
class Note:
    site_ts: float  # when the agent did it (the first batch of a run of batches)
    text: str
    shortfall: Shortfall | None = None
    ops: dict[str, int] = field(default_factory=dict)  # miner commands that took, by op (a run of batches)
    planned_kw: float | None = None  # the plan's worst-case draw after the run's last batch


@dataclass(frozen=True, slots=True)
class _Batch:
    ts: float
    target_kw: float
    method: str
    fast: bool
    ops: dict[str, int]  # op → commands that took (ok)
    failed: int
    planned_kw: float | None


def agent_notes(
    audit: Sequence[Mapping[str, Any]],
    samples: Sequence[Sample],
    *,
    cap_kw: float,
    tolerance_kw: float,
    gap_s: float = NOTE_GAP_S,
) -> list[Note]:
    """The agent's doings over the recorded stretch, in time order."""
    if not samples:
        return []
    first, last = samples[0].site_ts, samples[-1].site_ts
    records = sorted(
        (r for r in audit if isinstance(r.get("ts"), int | float) and first <= r["ts"] <= last),
        key=lambda r: float(r["ts"]),
    )
    notes: list[Note] = []
    run: list[_Batch] = []
    for r in records:
        kind, data = str(r.get("kind")), r.get("data") or {}
        if kind == "actions":
            batch = _batch(float(r["ts"]), data)
            if run and not _same_run(run[-1], batch, gap_s):
                notes.append(_actions_note(run, cap_kw))
                run = []
            run.append(batch)
            continue
        text = _other_text(kind, data)
        if text is not None:
            notes.append(Note(float(r["ts"]), text))
    if run:
        notes.append(_actions_note(run, cap_kw))
    notes.sort(key=lambda n: n.site_ts)
    return _with_shortfalls(notes, samples, cap_kw, tolerance_kw)


def _batch(ts: float, data: Mapping[str, Any]) -> _Batch:
    ops: dict[str, int] = {}
    for op, outcomes in (data.get("by_op") or {}).items():
        ok = (outcomes or {}).get("ok", 0) if isinstance(outcomes, Mapping) else 0
        if isinstance(ok, int) and ok > 0:
            ops[str(op)] = ok
    target, planned = data.get("target_kw"), data.get("worst_case_kw")
    return _Batch(
        ts,
        float(target) if isinstance(target, int | float) else float("nan"),
        str(data.get("method")),
        bool(data.get("fast")),
        ops,
        int(data.get("failed_total") or 0),
        float(planned) if isinstance(planned, int | float) else None,
    )


def _same_run(prev: _Batch, nxt: _Batch, gap_s: float) -> bool:
    return (
        nxt.ts - prev.ts <= gap_s
        and abs(nxt.target_kw - prev.target_kw) < 0.05
        and nxt.method == prev.method
        and nxt.fast == prev.fast
    )


def _actions_note(run: Sequence[_Batch], cap_kw: float) -> Note:
    ops: dict[str, int] = {}
    for b in run:
        for op, n in b.ops.items():
            ops[op] = ops.get(op, 0) + n
    failed = sum(b.failed for b in run)
    head = run[0]
    woke, slept, limits = ops.get("wake", 0), ops.get("sleep", 0), ops.get("set_power", 0)
    parts = (
        f"woke {woke}" if woke else "",
        f"slept {slept}" if slept else "",
        f"{limits} limit change{'s' * (limits != 1)}" if limits else "",
    )
    done = ", ".join(part for part in parts if part)
    batches = f"{len(run)} batches" if len(run) > 1 else "one batch"
    if head.method == "frequency":  # the pre-armed shed list, sent the moment a stage tripped
        text = f"under-frequency stage: slept {slept} miners at once (pre-armed) to hold {head.target_kw:,.0f} kW"
    elif head.target_kw >= cap_kw - 0.5:  # nothing binds but the cap: the way back up
        text = f"back up toward the cap in {batches}, paced by the ramp limit: {done or 'no commands took'}"
    elif slept and not woke and not limits:
        text = (
            f"fast cut: slept {slept} miners at once to get under {head.target_kw:,.0f} kW quickly"
            if head.fast
            else f"slept {slept} miners to stay under {head.target_kw:,.0f} kW"
        )
    elif woke and limits:
        text = f"swapped sleep for throttling under {head.target_kw:,.0f} kW ({done}), to keep more hashrate per kW"
    else:
        text = f"held under {head.target_kw:,.0f} kW: {done or 'no commands took'}"
    if failed:
        text += f"; {failed} command{'s' * (failed != 1)} failed"
    return Note(head.ts, text, ops=ops, planned_kw=run[-1].planned_kw)


def _other_text(kind: str, data: Mapping[str, Any]) -> str | None:
    level = data.get("level_kw")
    level_text = f" at {level:,.0f} kW" if isinstance(level, int | float) else ""
    match kind:
        case "failsafe_enter":
            return f"FAIL-SAFE: site held{level_text} ({data.get('reason') or 'no reason given'})"
        case "failsafe_exit":
            return f"fail-safe released ({data.get('reason') or 'no reason given'})"
        case "alarm":
            return f"alarm {data.get('key')}: {data.get('message')}"
        case "frequency" if data.get("step") == "restored":
            return "under-frequency event over (the frequency back up long enough): the slept miners come back"
        case "cap_change":
            cap = data.get("cap_kw")
            return f"cap changed to {cap:,.0f} kW" if isinstance(cap, int | float) else "cap changed"
    return None


def _with_shortfalls(notes: list[Note], samples: Sequence[Sample], cap_kw: float, tolerance_kw: float) -> list[Note]:
    """Each stretch below a binding target, put to the batch note it began after (none: it stays unexplained)."""
    stretches: list[list[Sample]] = []
    previous_below = False
    for s in samples:
        below = s.target_kw is not None and s.target_kw < cap_kw - 0.5 and s.truth_kw < s.target_kw - tolerance_kw
        if below:
            if not previous_below:
                stretches.append([])
            stretches[-1].append(s)
        previous_below = below
    found: dict[int, Shortfall] = {}
    for stretch in stretches:
        owner = next(
            (i for i in range(len(notes) - 1, -1, -1) if notes[i].ops and notes[i].site_ts <= stretch[0].site_ts), None
        )
        if owner is None:
            continue
        worst = max((s.target_kw or 0.0) - s.truth_kw for s in stretch)
        known = found.get(owner)
        if known is not None:  # a second stretch after the same batches: one shortfall, the worst, to the end
            found[owner] = Shortfall(max(worst, known.worst_kw), stretch[-1].site_ts, known.cause)
        else:
            found[owner] = Shortfall(worst, stretch[-1].site_ts, _cause(notes[owner], stretch, samples, tolerance_kw))
    return [replace(n, shortfall=found[i]) if i in found else n for i, n in enumerate(notes)]


def _cause(note: Note, stretch: Sequence[Sample], samples: Sequence[Sample], tolerance_kw: float) -> str:
    """Why the site fell below its target after these batches, from what the record shows."""
    if note.ops.get("wake") and any(s.states.get("waking", 0) for s in stretch):
        return "the new limits act at once while the woken miners draw little until they hash"
    seen = [s for s in samples if s.site_ts <= note.site_ts]
    at = seen[-1] if seen else None
    if at is not None and at.agent_kw is not None and abs(at.agent_kw - at.truth_kw) > tolerance_kw:
        return (
            f"the agent planned from a read of {at.agent_kw:,.0f} kW while the site already drew {at.truth_kw:,.0f} kW"
        )
    if note.planned_kw is not None:
        return f"the plan counts each miner at its worst case ({note.planned_kw:,.0f} kW) and they drew less"
    return "the miners drew less than the plan counted on"


# ---------------------------------------------------------------------------------------------- the baseline
@dataclass(frozen=True, slots=True)
class SleepOnlyBaseline:
    """What the site would hash if a power cut were met by sleeping whole miners only.

    Each miner at stock is what the simulator's truth showed for it at the start, with the site at full power (its
    nominal rating if it was not hashing then). For a power P the miners with the most TH/s per kW keep hashing at
    stock while they fit under P and the rest sleep. A sleeping miner's standby draw is not counted, which flatters
    the baseline a little: the comparison is never in the agent's favour by construction.
    """

    miners: tuple[tuple[float, float], ...]  # (kW, TH/s) at stock, best TH/s per kW first

    @classmethod
    def from_truth(cls, truth: Mapping[str, Any]) -> SleepOnlyBaseline:
        stock: list[tuple[float, float]] = []
        for m in truth["miners"]:
            hashing = m.get("state") == "hashing" and float(m.get("power_w") or 0.0) > 0.0
            watts = float(m["power_w"] if hashing else m.get("nominal_w") or 0.0)
            ths = float(m["hashrate_ths"] if hashing else m.get("nominal_ths") or 0.0)
            if watts > 0.0:
                stock.append((watts / 1000.0, ths))
        return cls(tuple(sorted(stock, key=lambda kt: kt[1] / kt[0], reverse=True)))

    @property
    def full_kw(self) -> float:
        return sum(kw for kw, _ in self.miners)

    def ths_at(self, kw: float) -> float:
        """Hashrate at `kw` (the truth rounds each miner's power to 0.1 W: 0.05 kW of slack absorbs the sums)."""
        budget = kw + 0.05
        used = ths = 0.0
        for m_kw, m_ths in self.miners:
            if used + m_kw <= budget:
                used += m_kw
                ths += m_ths
        return ths
