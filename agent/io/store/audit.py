"""The hash-chained audit trail in the database: appending, reading, signed daily heads, and cutting the chain's
old end (the cut leaves an anchor the verifier starts from)."""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.core import audit
from hashflex.agent.core.audit import AuditRecord
from hashflex.agent.core.energy import DAY_S, period_start
from hashflex.contract import signing


def chain_head(db: sqlite3.Connection) -> tuple[int, str]:
    """(seq, hash) to append after: the recorded head or the last record, whichever is further on (a mismatch is
    for verify_audit to report, not for the writer to hide)."""
    head = db.execute("SELECT seq, hash FROM audit_head").fetchone()
    top = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if top is not None and int(top[0]) > int(head[0]):
        return int(top[0]), str(top[1])
    return int(head[0]), str(head[1])


def append(db: sqlite3.Connection, head: tuple[int, str], kind: str, data: Mapping[str, Any], ts: float) -> AuditRecord:
    """Append one record after `head` and record it as the new head. ValueError on bad kind/data."""
    seq, prev = head
    rec = audit.make_record(seq, prev, ts, kind, data)
    db.execute(
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)",
        (rec.seq, rec.ts, rec.kind, audit.canonical_json(rec.data), rec.prev_hash, rec.hash),
    )
    db.execute("UPDATE audit_head SET seq = ?, hash = ?", (rec.seq, rec.hash))
    return rec


def records(db: sqlite3.Connection, start: float | None, end: float | None, limit: int | None) -> Iterator[AuditRecord]:
    """Records with start <= ts < end (None: unbounded), in chain order."""
    lo = float("-inf") if start is None else start
    hi = float("inf") if end is None else end
    sql = "SELECT seq, ts, kind, data, prev_hash, hash FROM audit WHERE ts >= ? AND ts < ? ORDER BY seq"
    params: list[Any] = [lo, hi]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    for seq, ts, kind, data, prev, h in db.execute(sql, params):
        yield AuditRecord(int(seq), float(ts), str(kind), dict(json.loads(data)), str(prev), str(h))


# ---------------------------------------------------------------------------------------------- signed daily heads
SignedHead = tuple[str, int, str, dict[str, Any]]  # day, last seq, head hash, signed document


def sign_pending_heads(
    db: sqlite3.Connection, key: Ed25519PrivateKey, site_id: str, now: float, save: Callable[[SignedHead], None]
) -> list[str]:
    """Sign the chain head at the end of every whole UTC day not signed yet, handing each to `save` (which
    commits it) before the next day is read; returns the days signed."""
    signed = {r[0] for r in db.execute("SELECT day FROM audit_days")}
    first = db.execute("SELECT MIN(ts) FROM audit").fetchone()[0]
    if first is None:
        return []
    done: list[str] = []
    day_start = period_start(first, DAY_S)
    while day_start + DAY_S <= now:
        day = _day_name(day_start)
        if day not in signed:
            row = db.execute(
                "SELECT seq, hash FROM audit WHERE seq = (SELECT MAX(seq) FROM audit WHERE ts < ?)",
                (day_start + DAY_S,),
            ).fetchone()
            if row is not None:
                doc = signing.sign(audit.head_document(site_id, day, int(row[0]), str(row[1])), key)
                save((day, int(row[0]), str(row[1]), doc))
                done.append(day)
        day_start += DAY_S
    return done


def save_head(db: sqlite3.Connection, head: SignedHead, now: float) -> None:
    day, last_seq, head_hash, doc = head
    db.execute("INSERT INTO audit_days VALUES (?, ?, ?, ?, ?)", (day, last_seq, head_hash, json.dumps(doc), now))


def signed_heads(db: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = db.execute("SELECT doc FROM audit_days ORDER BY day").fetchall()
    return [dict(json.loads(r[0])) for r in rows]


def _day_name(day_start: int) -> str:
    return datetime.datetime.fromtimestamp(day_start, datetime.UTC).strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------------------------- retention
def cut_before(db: sqlite3.Connection, cutoff: float, head: tuple[int, str]) -> tuple[int, int, str] | None:
    """Delete the records before `cutoff` and anchor the chain at the last one deleted: (count, its seq, its
    hash), None when there is none. The caller appends the `prune` record in the same transaction."""
    row = db.execute("SELECT MIN(seq) FROM audit WHERE ts >= ?", (cutoff,)).fetchone()
    keep_from = row[0] if row[0] is not None else head[0] + 1
    last = db.execute("SELECT seq, hash FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT 1", (keep_from,)).fetchone()
    if last is None:
        return None
    count = db.execute("DELETE FROM audit WHERE seq <= ?", (last[0],)).rowcount
    db.execute("UPDATE audit_head SET anchor_seq = ?, anchor_hash = ?", (last[0], last[1]))
    return count, int(last[0]), str(last[1])
