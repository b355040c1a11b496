"""The coordinator's own audit chain: what it was asked, what it decided and why, how each program dispatch went.
Pure: no I/O, no clock; the service records, `coordinator.store.JetStreamAuditLog` keeps the chain.

The chain is the agent's (`agent.core.audit`): the same record hash (sha256 over the previous hash and the
canonical JSON of seq, ts, kind, data) and the same verifier, so one tool and one argument cover both. Only the
record kinds are the coordinator's own:

- `program_command`: every program command received, with its verdict (accepted, repeat, refused with code and
  reason); an accepted one with the signed document as received, so a regulator can check the grid's signature.
- `allocation`: a program dispatch's shares changed: every site's share, revision, what it is counted at and
  why (the allocation's reason, or the failure that has it counted at its worst case), Σ, short and hashrate lost.
- `redispatch`: a site failed (offline, stale, no flexibility, share not met) or came back, so its share moved.
- `compliance`: a program dispatch ended (expired, cancelled, or revised: a new revision starts a new record):
  when every site had its share, when Σ metered power first met the level, the largest excess after that, the
  largest shortfall said.
- `leading`: an instance took the lease and acts from here (a failover is visible in the chain).

Where it lives, and why there: the coordinator's durable state is already in JetStream, replicated on three nodes,
and exactly one instance (the lease holder) writes. An append-only stream (deletes and purges denied) holding one
program's chain, each record published with the stream sequence it must follow (`Nats-Expected-Last-Sequence`),
makes the stream sequence the chain's seq and every append a compare-and-set: a deposed leader that still
believes it leads appends on a head that has moved and is refused, so the chain can be cut short by no one and
forked by no one. A local file per instance would give two chains after a failover; the state's key-value entry
holds one value (history 1), not a history.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from hashflex.agent.core import timefmt
from hashflex.agent.core.audit import (
    GENESIS_HASH,
    Anchor,
    AuditRecord,
    ChainVerifier,
    VerifyResult,
    canonical_json,
    check_tail,
    record_hash,
)
from hashflex.coordinator.program import DispatchReport, ProgramState, StepResult

__all__ = ["GENESIS_HASH", "ChainConflict", "CoordinatorKind", "Tracker", "next_record"]


class CoordinatorKind(StrEnum):
    PROGRAM_COMMAND = "program_command"
    ALLOCATION = "allocation"
    REDISPATCH = "redispatch"
    COMPLIANCE = "compliance"
    LEADING = "leading"


class ChainConflict(RuntimeError):
    """The chain's head moved since this writer read it (another instance appended): nothing was written."""


def next_record(prev_seq: int, prev_hash: str, ts: float, kind: str, data: Mapping[str, Any]) -> AuditRecord:
    """The record after (prev_seq, prev_hash), hashed as the agent's chain is. ValueError on what cannot be kept."""
    try:
        kind = CoordinatorKind(kind).value
    except ValueError:
        raise ValueError(
            f"unknown coordinator audit kind {kind!r} (one of: {', '.join(k.value for k in CoordinatorKind)})"
        ) from None
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"audit ts must be finite epoch seconds, got {ts!r}")
    try:
        plain = json.loads(canonical_json(dict(data)))  # the stored form is the hashed form (tuples → lists, ...)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit data is not plain JSON: {exc}") from None
    seq, ts = prev_seq + 1, float(ts)
    return AuditRecord(seq, ts, kind, plain, prev_hash, record_hash(prev_hash, seq, ts, kind, plain))


def record_from_dict(raw: Mapping[str, Any]) -> AuditRecord:
    """A stored record back (ValueError when it is not one: the verifier then names its place)."""
    try:
        return AuditRecord(
            int(raw["seq"]),
            float(raw["ts"]),
            str(raw["kind"]),
            dict(raw["data"]),
            str(raw["prev_hash"]),
            str(raw["hash"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an audit record: {exc!r}") from None


# ------------------------------------------------------------------------------------------ what is recorded
def command_data(
    verb: str,
    outcome: str,
    *,
    id: str | None,
    code: str | None = None,
    message: str | None = None,
    document: Any = None,
    revision: int | None = None,
) -> dict[str, Any]:
    """A program command and its verdict: outcome accepted | repeat | refused."""
    data: dict[str, Any] = {"verb": verb[:32], "outcome": outcome, "id": id}
    if code is not None:
        data.update(code=code, reason=message)
    if isinstance(document, Mapping):
        data["document"] = dict(document)
    if revision is not None:
        data["revision"] = revision
    return data


@dataclass(frozen=True, slots=True)
class Compliance:
    """How one program dispatch is going, as this instance has seen it (from `since`: its term's first step)."""

    dispatch_id: str
    kind: str
    rev: int
    level_w: float
    accepted_at: float
    since: float
    end: float | None  # its window's end (None: until cancelled)
    all_ok_at: float | None = None  # every dispatched site acknowledged its share
    met_at: float | None = None  # Σ metered power at or under the level
    max_over_after_met_w: float = 0.0
    max_unmet_w: float = 0.0
    steps: int = 0


@dataclass(frozen=True, slots=True)
class Tracker:
    """What the service remembers between steps to tell what changed: the failing sites and the compliance of every
    program dispatch seen in this term. Replaced, never mutated."""

    failing: Mapping[str, frozenset[str]] = field(default_factory=dict)
    compliance: Mapping[str, Compliance] = field(default_factory=dict)


def _shares_key(state: ProgramState, dispatch_id: str) -> dict[str, tuple[float, int, bool]]:
    return {s: (a.target_w, a.rev, a.cancelled) for s, a in state.assignments.get(dispatch_id, {}).items()}


def _present_sum(report: DispatchReport) -> float:
    return math.fsum(s.present_w if s.present_w is not None else s.counted_w for s in report.sites)


def step_events(
    before: ProgramState, result: StepResult, tracker: Tracker, *, now: float
) -> tuple[list[tuple[str, dict[str, Any]]], Tracker]:
    """The records one program step makes (allocation, redispatch, compliance) and the tracker for the next step.

    A site that starts or stops failing in a dispatch seen before is a re-dispatch; a dispatch first seen in this
    term (new, or a new leader's first step) or whose shares changed (a new level, a site's share revised) is an
    allocation; a dispatch seen before and not in force
    any more is a compliance record (cancelled when its sites were sent a cancel, else expired)."""
    events: list[tuple[str, dict[str, Any]]] = []
    after = result.state
    failing: dict[str, frozenset[str]] = {}
    compliance: dict[str, Compliance] = {}
    for report in result.reports:
        did = report.dispatch_id
        d = after.dispatches.get(did)
        now_failing = frozenset(s.site_id for s in report.sites if s.failure is not None)
        failing[did] = now_failing
        seen = tracker.failing.get(did)
        held = tracker.compliance.get(did)
        if d is not None and held is not None and held.rev != d.rev:  # revised: the old revision's record first
            events.append((CoordinatorKind.COMPLIANCE.value, compliance_data(held, end="revised", now=now)))
        if seen is not None and seen != now_failing:
            by_site = {s.site_id: s for s in report.sites}
            events.append(
                (
                    CoordinatorKind.REDISPATCH.value,
                    {
                        "dispatch": did,
                        "failed": [
                            {
                                "site": sid,
                                "failure": by_site[sid].failure,
                                "reason": by_site[sid].reason,
                                "counted_w": by_site[sid].counted_w,
                            }
                            for sid in sorted(now_failing - seen)
                        ],
                        "recovered": sorted(seen - now_failing),
                        "unmet_w": report.unmet_w,
                    },
                )
            )
        if seen is None or _shares_key(before, did) != _shares_key(after, did):  # first seen in this term, or moved
            shares = after.assignments.get(did, {})
            events.append(
                (
                    CoordinatorKind.ALLOCATION.value,
                    {
                        "dispatch": did,
                        "kind": report.kind,
                        "program_rev": None if d is None else d.rev,
                        "level_w": report.level_w,
                        "allocated_w": report.allocated_w,
                        "unmet_w": report.unmet_w,
                        "lost_ths": report.lost_ths,
                        "sites": [
                            {
                                "site": s.site_id,
                                "share_w": s.target_w,
                                "rev": s.rev,
                                "counted_w": s.counted_w,
                                "present_w": s.present_w,
                                "failure": s.failure,
                                "reason": s.reason,
                                "changed": _shares_key(before, did).get(s.site_id)
                                != _shares_key(after, did).get(s.site_id),
                            }
                            for s in report.sites
                            if s.site_id in shares or s.failure is not None
                        ],
                    },
                )
            )
        if d is not None:
            compliance[did] = _track(tracker.compliance.get(did), report, after, now=now)
    for did, c in tracker.compliance.items():
        if did not in compliance:
            end = "expired" if c.end is not None and now >= c.end else "cancelled"
            events.append((CoordinatorKind.COMPLIANCE.value, compliance_data(c, end=end, now=now)))
    return events, Tracker(failing, compliance)


def _track(c: Compliance | None, report: DispatchReport, state: ProgramState, *, now: float) -> Compliance:
    d = state.dispatches[report.dispatch_id]
    if c is None or c.rev != d.rev:
        c = Compliance(d.id, d.kind, d.rev, d.target_w, d.accepted_at, now, d.end)
    shares = state.assignments.get(d.id, {})
    dispatched = [s for s in report.sites if s.site_id in shares]
    all_ok = bool(dispatched) and all(shares[s.site_id].acked for s in dispatched)
    level = report.level_now_w
    over = None if level is None else _present_sum(report) - level
    met_at = c.met_at
    if met_at is None and over is not None and over <= 0 and not report.unmet_w:
        met_at = now
    return replace(
        c,
        level_w=report.level_w,
        steps=c.steps + 1,
        all_ok_at=c.all_ok_at if c.all_ok_at is not None or not all_ok else now,
        met_at=met_at,
        max_over_after_met_w=max(c.max_over_after_met_w, over or 0.0) if c.met_at is not None else 0.0,
        max_unmet_w=max(c.max_unmet_w, report.unmet_w),
    )


def compliance_data(c: Compliance, *, end: str, now: float) -> dict[str, Any]:
    def after(ts: float | None) -> float | None:
        return None if ts is None else round(ts - c.accepted_at, 3)

    return {
        "dispatch": c.dispatch_id,
        "kind": c.kind,
        "rev": c.rev,
        "end": end,
        "level_w": c.level_w,
        "accepted_at": c.accepted_at,
        "ended_at": now,
        "tracked_since": c.since,
        "time_to_all_ok_s": after(c.all_ok_at),
        "time_to_level_s": after(c.met_at),
        "max_over_after_met_w": c.max_over_after_met_w,
        "max_unmet_w": c.max_unmet_w,
    }


def counts(events: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, int]:
    """How many records of each kind `events` holds (what the metrics count)."""
    out: dict[str, int] = {}
    for kind, _ in events:
        out[kind] = out.get(kind, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ verify, export
def verify_stored(
    stored: Iterable[tuple[int, Mapping[str, Any] | None]], *, expected_last_seq: int | None
) -> VerifyResult:
    """The chain as the stream holds it: (stream sequence, stored document), oldest first, checked with the agent's
    verifier, plus what only a stream can get wrong: a message that is not a record, or a record stored at another
    place than its seq. `expected_last_seq`: the stream's last sequence (a cut tail is named)."""
    verifier = ChainVerifier(Anchor())
    for position, doc in stored:
        try:
            if doc is None:
                raise ValueError("not JSON")
            record = record_from_dict(doc)
        except ValueError:
            verifier.fail_at(position, f"message {position} of the stream is not an audit record")
            break
        if record.seq != position:
            verifier.fail_at(position, f"message {position} of the stream holds record {record.seq}")
            break
        if not verifier.feed(
            record.seq,
            record.ts,
            record.kind,
            canonical_json(record.data),
            prev_hash=record.prev_hash,
            stored_hash=record.hash,
        ):
            break
    check_tail(verifier, expected_last_seq)
    return verifier.result()


EXPORT_FORMAT = "hashflex-program-export/1"
_AUDIT_COLUMNS = ("seq", "ts", "time_utc", "kind", "data", "prev_hash", "hash")
_COMPLIANCE_COLUMNS = (
    "dispatch",
    "kind",
    "rev",
    "end",
    "level_w",
    "accepted_at",
    "ended_at",
    "tracked_since",
    "time_to_all_ok_s",
    "time_to_level_s",
    "max_over_after_met_w",
    "max_unmet_w",
)


def export_files(records: Sequence[AuditRecord], meta: Mapping[str, Any], fmt: str) -> dict[str, bytes]:
    """File name → content: JSON, one document (`meta`, the records, the compliance records' data); CSV, audit.csv
    (the agent's columns), compliance.csv and manifest.json with every file's SHA-256."""
    compliance = [r.data for r in records if r.kind == CoordinatorKind.COMPLIANCE]
    if fmt == "json":
        doc = {"format": EXPORT_FORMAT, **meta, "records": [r.to_dict() for r in records], "compliance": compliance}
        return {"hashflex-program-export.json": (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()}
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r} (json or csv)")
    rows = [{**r.to_dict(), "time_utc": timefmt.iso(r.ts), "data": canonical_json(r.data)} for r in records]
    files = {"audit.csv": _csv(_AUDIT_COLUMNS, rows), "compliance.csv": _csv(_COMPLIANCE_COLUMNS, compliance)}
    manifest = {
        "format": EXPORT_FORMAT,
        **meta,
        "files": {name: hashlib.sha256(body).hexdigest() for name, body in files.items()},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
    return files


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue().encode()
