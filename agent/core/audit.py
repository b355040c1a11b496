"""The audit trail as a hash chain. Pure: records in, hashes and verdicts out.

Each record is (seq, ts, kind, data) plus the hash of the record before it. Its own hash is
sha256(prev_hash + "\\n" + canonical JSON of {seq, ts, kind, data}), hex. Changing any field of any record,
deleting one, swapping two or cutting the tail therefore breaks the chain at a place `verify_chain` names.

A chain whose head is held by the same party that writes it proves order and completeness, not authorship: an
attacker who can rewrite the whole file can recompute every hash. That is what the daily heads signed with the
site's Ed25519 key are for (`head_document`): a head that was signed and sent away pins every record before it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

GENESIS_HASH = "0" * 64


class AuditKind(StrEnum):
    COMMAND = "command"  # a command received, with its verdict
    TARGET_CHANGE = "target_change"  # the effective target moved, with its reason
    ACTIONS = "actions"  # a batch of miner commands with a summary of results
    COMPLIANCE = "compliance"  # a dispatch's time to target and largest overshoot
    FAILSAFE_ENTER = "failsafe_enter"
    FAILSAFE_EXIT = "failsafe_exit"
    AGENT_START = "agent_start"
    AGENT_STOP = "agent_stop"
    CAP_CHANGE = "cap_change"
    ENERGY = "energy"  # minute or quarter-hour energy totals, so the energy table is pinned by the chain
    ALARM = "alarm"
    FREQUENCY = "frequency"  # an under-frequency event's steps: tripped, commands out, shed reached, restored
    PRUNE = "prune"  # exported records older than the retention were deleted; the chain restarts from an anchor


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    ts: float
    kind: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "data": self.data,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept; NaN and infinities refused (they have no JSON form)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(prev_hash: str, seq: int, ts: float, kind: str, data: Mapping[str, Any]) -> str:
    body = canonical_json({"seq": seq, "ts": ts, "kind": kind, "data": data})
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def make_record(prev_seq: int, prev_hash: str, ts: float, kind: str, data: Mapping[str, Any]) -> AuditRecord:
    """The record that follows (prev_seq, prev_hash). Raises ValueError on input that cannot be recorded."""
    try:
        kind = AuditKind(kind).value
    except ValueError:
        known = ", ".join(k.value for k in AuditKind)
        raise ValueError(f"unknown audit kind {kind!r} (one of: {known})") from None
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"audit ts must be finite epoch seconds, got {ts!r}")
    if not isinstance(data, Mapping):
        raise ValueError(f"audit data must be a mapping, got {type(data).__name__}")
    try:
        # a round trip makes the stored form and the hashed form the same value (tuples become lists, ...)
        plain = json.loads(canonical_json(dict(data)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit data is not plain JSON: {exc}") from None
    seq = prev_seq + 1
    ts = float(ts)
    return AuditRecord(seq, ts, kind, plain, prev_hash, record_hash(prev_hash, seq, ts, kind, plain))


# ---------------------------------------------------------------------------------------------- verify
@dataclass(frozen=True, slots=True)
class Anchor:
    """Where a chain starts: genesis, or the last record deleted by a prune (its seq and hash)."""

    seq: int = 0
    hash: str = GENESIS_HASH


@dataclass(frozen=True, slots=True)
class SignedHead:
    """A day's chain head as signed: the last record of the day and its hash."""

    day: str
    last_seq: int
    head_hash: str
    signature_ok: bool | None  # None = no public key given, so not checked


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int  # records checked
    first_seq: int | None  # first record checked
    last_seq: int | None  # last good record
    head_hash: str | None  # hash of the last good record
    broken_seq: int | None = None  # the first record that is wrong or missing
    reason: str | None = None
    heads_checked: int = 0  # signed daily heads compared with the chain
    problems: tuple[str, ...] = field(default=())  # problems beyond the first (file checks, heads)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "head_hash": self.head_hash,
            "broken_seq": self.broken_seq,
            "reason": self.reason,
            "heads_checked": self.heads_checked,
            "problems": list(self.problems),
        }


@dataclass(slots=True)
class ChainVerifier:
    """Checks records one at a time, in the order stored, so a huge chain needs no memory and a read error
    part-way still leaves a precise verdict (`fail_at`)."""

    anchor: Anchor = field(default_factory=Anchor)
    records: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    broken_seq: int | None = None
    reason: str | None = None
    _started: bool = False

    def __post_init__(self) -> None:
        self.last_seq = self.anchor.seq
        self.last_hash = self.anchor.hash

    @property
    def broken(self) -> bool:
        return self.reason is not None

    def fail_at(self, seq: int, reason: str) -> None:
        if not self.broken:
            self.broken_seq, self.reason = seq, reason

    def feed(self, seq: int, ts: float, kind: str, data_text: str, *, prev_hash: str, stored_hash: str) -> bool:
        """Check the next stored record; False once the chain is broken (later records are not checked)."""
        if self.broken:
            return False
        expected = self.last_seq + 1
        if seq != expected:
            if seq > expected:
                missing = f"record {expected}" if seq == expected + 1 else f"records {expected}..{seq - 1}"
                self.fail_at(expected, f"{missing} missing (after record {self.last_seq} comes {seq})")
            else:
                self.fail_at(seq, f"record {seq} is out of order (after record {self.last_seq})")
            return False
        if prev_hash != self.last_hash:
            self.fail_at(
                seq,
                f"record {seq} does not link to record {self.last_seq} (prev_hash differs: one of them was altered, "
                "replaced or moved)",
            )
            return False
        try:
            data = json.loads(data_text)
        except (TypeError, ValueError):
            self.fail_at(seq, f"record {seq} data is not JSON")
            return False
        if not isinstance(data, dict):
            self.fail_at(seq, f"record {seq} data is not a JSON object")
            return False
        try:
            actual = record_hash(prev_hash, seq, ts, kind, data)
        except (TypeError, ValueError):
            self.fail_at(seq, f"record {seq} holds values that cannot be hashed")
            return False
        if actual != stored_hash:
            self.fail_at(seq, f"record {seq} ({kind}) was altered: its content does not match its hash")
            return False
        self.records += 1
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq, self.last_hash = seq, stored_hash
        return True

    def result(self, problems: Iterable[str] = (), heads_checked: int = 0) -> VerifyResult:
        extra = tuple(problems)
        ok = not self.broken and not extra
        reason = self.reason
        if reason is None and extra:
            reason = extra[0]
            extra = extra[1:]
        return VerifyResult(
            ok=ok,
            records=self.records,
            first_seq=self.first_seq,
            last_seq=self.last_seq if self.records or self.anchor.seq else None,
            head_hash=self.last_hash if self.records or self.anchor.seq else None,
            broken_seq=self.broken_seq,
            reason=reason,
            heads_checked=heads_checked,
            problems=extra,
        )


def verify_chain(
    records: Iterable[AuditRecord], anchor: Anchor | None = None, *, expected_last_seq: int | None = None
) -> VerifyResult:
    """Verify records in stored order. `expected_last_seq` (the head the writer recorded) detects a cut tail."""
    verifier = ChainVerifier(anchor or Anchor())
    for r in records:
        if not verifier.feed(r.seq, r.ts, r.kind, canonical_json(r.data), prev_hash=r.prev_hash, stored_hash=r.hash):
            break
    check_tail(verifier, expected_last_seq)
    return verifier.result()


def check_tail(verifier: ChainVerifier, expected_last_seq: int | None) -> None:
    """Mark the chain broken when it ends before the head the writer recorded (a deleted or cut tail)."""
    if verifier.broken or expected_last_seq is None or verifier.last_seq >= expected_last_seq:
        return
    first_missing = verifier.last_seq + 1
    verifier.fail_at(
        first_missing,
        f"records {first_missing}..{expected_last_seq} missing: the chain ends at {verifier.last_seq} "
        f"but its recorded head is {expected_last_seq} (deleted or truncated tail)",
    )


# ---------------------------------------------------------------------------------------------- daily heads
def head_document(site_id: str, day: str, last_seq: int, head_hash: str) -> dict[str, Any]:
    """What is signed for a day: the site, the UTC day, and the chain head at the end of it."""
    return {"type": "hashflex.audit_head", "site": site_id, "day": day, "last_seq": last_seq, "head": head_hash}
