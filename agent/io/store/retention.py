"""Retention: what is both older than the retention and already exported is deleted, in bounded chunks."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from hashflex.agent.core.energy import DAY_S

PRUNE_CHUNK = 5000  # rows deleted per transaction, so the writer never waits long behind a prune
PRUNE_CHUNK_BULK = 60  # per-miner minutes (~41 kB each at 10k miners): an hour of them per transaction


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: float  # records before this were deleted (the older of retention and the export watermark)
    audit_records: int
    energy_minutes: int
    miner_minutes: int
    dispatches: int


def prune_cutoff(now: float, retention_days: int, watermark: float | None) -> float:
    """Delete before this: the older of the retention and the export watermark (-inf: nothing exported yet)."""
    return min(now - retention_days * DAY_S, watermark if watermark is not None else float("-inf"))


def delete_chunk(db: sqlite3.Connection, table: str, key: str, where: str, *, cutoff: float, chunk: int) -> int:
    """Delete up to `chunk` rows of `table` matching `where` (one `?`: the cutoff); returns how many."""
    return int(
        db.execute(
            f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where} LIMIT ?)", (cutoff, chunk)
        ).rowcount
    )
