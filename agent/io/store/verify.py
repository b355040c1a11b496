"""Verifying a state database without trusting it: the file, SQLite's own check, the audit chain from its
anchor to the recorded head, the energy rows the chain pins, and the signed daily heads."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hashflex.agent.core import audit
from hashflex.agent.core.audit import ChainVerifier, VerifyResult
from hashflex.agent.core.energy import total
from hashflex.agent.io.store import energy
from hashflex.agent.io.store.database import connect, inspect_file, quick_check
from hashflex.contract import signing


def verify_database(
    path: str | Path, public_keys: Sequence[Ed25519PublicKey] | None = None, *, full_check: bool = True
) -> VerifyResult:
    """Verify the audit chain in the file at `path` without trusting it: never raises for a damaged file, reports.

    Checks, in order: the file's header and size; SQLite's own quick_check (all tables when `full_check`); the
    chain record by record from its anchor; the chain's end against the head the writer recorded (a cut or deleted
    tail); each `energy` record against the energy rows it pins; and each signed daily head against the chain and,
    with `public_keys`, its signature.

    SQLite reads nothing at all from a file shorter than its header says, so a truncated file is verified through
    a copy padded back to its full length: the records before the cut verify, and the first one lost is named.
    """
    path = Path(path)
    if not path.exists():
        verifier = ChainVerifier()
        verifier.fail_at(1, f"{path}: no state database")
        return verifier.result()
    found = inspect_file(path)
    file_problem, full_size = found.problem, found.full_size
    if file_problem and full_size and path.stat().st_size < full_size:
        with tempfile.TemporaryDirectory(prefix="hashflex-verify-") as tmp:
            padded = Path(tmp) / path.name
            shutil.copyfile(path, padded)
            with padded.open("r+b") as f:
                f.truncate(full_size)
            return _verify_file(padded, public_keys, full_check, [file_problem], cause=file_problem)
    return _verify_file(path, public_keys, full_check, [file_problem] if file_problem else [], cause=file_problem)


def _verify_file(
    path: Path,
    public_keys: Sequence[Ed25519PublicKey] | None,
    full_check: bool,
    problems: list[str],
    *,
    cause: str | None,
) -> VerifyResult:
    verifier = ChainVerifier()
    try:
        db = connect(path, readonly=True)
    except sqlite3.Error as exc:
        verifier.fail_at(1, f"{path}: cannot open: {exc}")
        return verifier.result(problems)
    heads_checked = 0
    try:
        try:
            found = quick_check(db, include_bulk=full_check)
            lines = [ln for p in found for ln in p.splitlines() if not ln.startswith("***")]
            problems += [f"integrity: {ln}" for ln in lines[:3]] + (
                [f"integrity: ... {len(lines) - 3} more"] if len(lines) > 3 else []
            )
        except sqlite3.DatabaseError as exc:
            problems.append(f"integrity check failed: {exc}")
        head_seq: int | None = None
        try:
            row = db.execute("SELECT seq, anchor_seq, anchor_hash FROM audit_head").fetchone()
            head_seq = int(row[0])
            verifier = ChainVerifier(audit.Anchor(int(row[1]), str(row[2])))
        except (sqlite3.DatabaseError, TypeError) as exc:
            problems.append(f"the recorded chain head cannot be read ({exc}); a cut tail would go unnoticed")
        heads = _read_heads(db, problems)
        energy_checks: list[tuple[int, dict[str, Any]]] = []
        try:
            for seq, ts, kind, data, prev, h in db.execute(
                "SELECT seq, ts, kind, data, prev_hash, hash FROM audit ORDER BY seq"
            ):
                if not verifier.feed(
                    int(seq), float(ts), str(kind), str(data), prev_hash=str(prev), stored_hash=str(h)
                ):
                    break
                if kind == "energy":
                    energy_checks.append((int(seq), json.loads(data)))
                if seq in heads:
                    heads_checked += _check_head(heads.pop(seq), str(h), public_keys, problems)
        except sqlite3.DatabaseError as exc:
            first = verifier.last_seq + 1
            lost = f"records {first}..{head_seq}" if head_seq is not None and head_seq > first else f"record {first} on"
            verifier.fail_at(first, f"{lost} cannot be read: {cause or exc}")
        if cause and not verifier.broken and head_seq is not None and verifier.last_seq < head_seq:
            verifier.fail_at(verifier.last_seq + 1, f"records {verifier.last_seq + 1}..{head_seq} lost: {cause}")
        audit.check_tail(verifier, head_seq)
        if not verifier.broken:
            for last_seq, doc in heads.items():
                if last_seq > verifier.anchor.seq:
                    problems.append(f"signed head of {doc.get('day')} names record {last_seq}, which is missing")
            problems += _check_energy(db, energy_checks)
    finally:
        db.close()
    reason = verifier.reason or ""
    return verifier.result([p for p in problems if p not in reason], heads_checked)


def _read_heads(db: sqlite3.Connection, problems: list[str]) -> dict[int, dict[str, Any]]:
    try:
        return {int(r[0]): dict(json.loads(r[1])) for r in db.execute("SELECT last_seq, doc FROM audit_days")}
    except (sqlite3.DatabaseError, ValueError) as exc:
        problems.append(f"signed daily heads cannot be read: {exc}")
        return {}


def _check_head(
    doc: dict[str, Any], chain_hash: str, keys: Sequence[Ed25519PublicKey] | None, problems: list[str]
) -> int:
    day = doc.get("day")
    if doc.get("head") != chain_hash:
        problems.append(f"signed head of {day} does not match record {doc.get('last_seq')} of the chain")
    elif keys is not None and not signing.verify(doc, keys):
        problems.append(f"signed head of {day}: the signature does not verify with the given public key(s)")
    return 1


def _check_energy(db: sqlite3.Connection, checks: list[tuple[int, dict[str, Any]]]) -> list[str]:
    problems: list[str] = []
    try:
        oldest = db.execute("SELECT MIN(minute_ts) FROM energy_minute").fetchone()[0]
        for seq, data in checks:
            start, end = data.get("from"), data.get("to")
            if not isinstance(start, int | float) or not isinstance(end, int | float):
                continue
            if oldest is None or start < oldest:
                continue  # pruned after export: nothing left to compare
            t = total(energy.minutes(db, start, end), int(start), int(end - start))
            for name in energy.PINNED_ENERGY:
                value, pinned = getattr(t, name), data.get(name)
                if isinstance(pinned, int | float) and abs(value - pinned) > energy.PINNED_TOLERANCE_KWH:
                    problems.append(
                        f"energy rows {start}..{end} were changed after record {seq} pinned them "
                        f"({name}: stored {value:.6f}, audited {pinned:.6f})"
                    )
                    break
    except sqlite3.DatabaseError as exc:
        problems.append(f"energy rows cannot be read: {exc}")
    return problems
