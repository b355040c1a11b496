"""What an export gathers from the database (agent/io/export.py renders it), and the bookkeeping of what has
been exported: the watermark that retention waits for."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from hashflex.agent.core.audit import VerifyResult
from hashflex.agent.core.energy import DAY_S, QUARTER_S, MinerTotal, rollup, total
from hashflex.agent.core.timefmt import iso
from hashflex.agent.io.export import ExportFormat, render
from hashflex.agent.io.store import audit, control, energy


def export_data(db: sqlite3.Connection, start: float, end: float, *, per_miner: bool) -> dict[str, Any]:
    """Everything a regulator asks for over [start, end), as plain data. Heavy."""
    records = [r.to_dict() for r in audit.records(db, start, end, None)]
    dispatches = control.dispatches_overlapping(db, start, end)
    minutes = energy.minutes(db, start, end)
    heads = [dict(json.loads(r[0])) for r in db.execute("SELECT doc FROM audit_days ORDER BY day")]
    data: dict[str, Any] = {
        "audit": records,
        "dispatches": [r.to_dict() for r in dispatches],
        "energy_quarter_hours": [p.to_dict() for p in rollup(minutes, QUARTER_S)],
        "energy_days": [p.to_dict() for p in rollup(minutes, DAY_S)],
        "energy_total": total(minutes, int(start), int(end - start)).to_dict(),
        "signed_heads": heads,
    }
    if per_miner:
        data["energy_miner_days"] = _miner_days(energy.per_miner(db, start, end, DAY_S))
    return data


def _miner_days(by_day: Mapping[int, Mapping[str, MinerTotal]]) -> list[dict[str, Any]]:
    return [
        {"day": day, "ip": ip, "kwh": t.kwh, "estimated_kwh": t.estimated_kwh, "minutes": t.minutes}
        for day, miners in by_day.items()
        for ip, t in sorted(miners.items())
    ]


def files(
    data: Mapping[str, Any],
    chain: VerifyResult,
    fmt: ExportFormat,
    *,
    start: float,
    end: float,
    now: float,
    site_id: str,
) -> dict[str, bytes]:
    """The export's files (name -> bytes): the data with a header naming the range, the site and the state of
    the chain when it was made."""
    meta = {
        "site_id": site_id,
        "from": start,
        "from_utc": iso(start),
        "to": end,
        "to_utc": iso(end),
        "generated_at": now,
        "generated_utc": iso(now),
        "chain": chain.to_dict(),
    }
    return render(data, meta, fmt)


# ---------------------------------------------------------------------------------------------- the watermark
def watermark(db: sqlite3.Connection) -> float | None:
    """Everything older than this has been exported (None: nothing yet)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'export_watermark'").fetchone()
    return None if row is None else float(row[0])


def mark_exported(db: sqlite3.Connection, start: float, end: float, *, fmt: str, digest: str, now: float) -> float:
    """Record an export of [start, end) and advance the watermark over contiguous exports from the oldest data
    kept; returns the new watermark."""
    db.execute(
        "INSERT INTO exports (from_ts, to_ts, fmt, digest, exported_at) VALUES (?, ?, ?, ?, ?)",
        (start, end, fmt, digest, now),
    )
    mark = watermark(db)
    if mark is None:
        mark = _oldest_data_ts(db)
    if mark is None:
        mark = start
    for lo, hi in db.execute("SELECT from_ts, to_ts FROM exports ORDER BY from_ts"):
        if lo <= mark < hi:
            mark = hi
    db.execute("INSERT OR REPLACE INTO meta VALUES ('export_watermark', ?)", (repr(float(mark)),))
    return mark


def _oldest_data_ts(db: sqlite3.Connection) -> float | None:
    a = db.execute("SELECT MIN(ts) FROM audit").fetchone()[0]
    e = db.execute("SELECT MIN(minute_ts) FROM energy_minute").fetchone()[0]
    found = [float(v) for v in (a, e) if v is not None]
    return min(found) if found else None
