"""Energy in the database: site minutes, the per-miner split (one float32 row per minute for the whole fleet),
rollups over them, and pinning quarter hours into the audit chain."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hashflex.agent.core.energy import (
    FALLBACK,
    MINUTE_S,
    QUARTER_S,
    SOURCES,
    EnergyMinute,
    MinerMinute,
    MinerTotal,
    period_start,
    total,
)

_ENERGY_COLUMNS = (
    "minute_ts, kwh, measured_kwh, estimated_kwh, covered_s, curtailed_s, baseline_kwh, not_drawn_kwh, peak_kw, "
    "samples, source, metered_kwh, carried_kwh"
)
# what an `energy` audit record pins and `verify_audit` recomputes (older records pin fewer: only those are checked)
PINNED_ENERGY = (
    "kwh",
    "not_drawn_kwh",
    "minutes",
    "metered_kwh",
    "carried_kwh",
    "miners_kwh",
    "metered_minutes",
    "fallback_minutes",
)
PINNED_TOLERANCE_KWH = 1e-6


# ---------------------------------------------------------------------------------------------- site minutes
def minute_row(minute: EnergyMinute) -> tuple[Any, ...]:
    """The row of a site minute (ValueError when it is not one)."""
    if minute.minute_ts % MINUTE_S:
        raise ValueError(f"minute_ts must be the start of a minute, got {minute.minute_ts}")
    if minute.source not in SOURCES:
        raise ValueError(f"energy source must be one of {', '.join(SOURCES)}, got {minute.source!r}")
    return (
        minute.minute_ts,
        minute.kwh,
        minute.measured_kwh,
        minute.estimated_kwh,
        minute.covered_s,
        minute.curtailed_s,
        minute.baseline_kwh,
        minute.not_drawn_kwh,
        minute.peak_kw,
        minute.samples,
        SOURCES.index(minute.source),
        minute.metered_kwh,
        minute.carried_kwh,
    )


def add_minute(db: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    """Store a site minute; a minute stored twice (a restart inside it) is added up, and labelled with the least
    direct source of the two (SOURCES order)."""
    db.execute(
        f"INSERT INTO energy_minute ({_ENERGY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(minute_ts) DO UPDATE SET kwh = kwh + excluded.kwh, "
        "measured_kwh = measured_kwh + excluded.measured_kwh, "
        "estimated_kwh = estimated_kwh + excluded.estimated_kwh, covered_s = covered_s + excluded.covered_s, "
        "curtailed_s = curtailed_s + excluded.curtailed_s, "
        "baseline_kwh = baseline_kwh + excluded.baseline_kwh, "
        "not_drawn_kwh = not_drawn_kwh + excluded.not_drawn_kwh, "
        "peak_kw = MAX(peak_kw, excluded.peak_kw), samples = samples + excluded.samples, "
        "source = MAX(source, excluded.source), metered_kwh = metered_kwh + excluded.metered_kwh, "
        "carried_kwh = carried_kwh + excluded.carried_kwh",
        row,
    )


def minutes(db: sqlite3.Connection, start: float, end: float) -> list[EnergyMinute]:
    """Site minutes with start <= minute_ts < end."""
    rows = db.execute(
        f"SELECT {_ENERGY_COLUMNS} FROM energy_minute WHERE minute_ts >= ? AND minute_ts < ? ORDER BY minute_ts",
        (start, end),
    ).fetchall()
    return [
        EnergyMinute(
            minute_ts=int(r[0]),
            kwh=float(r[1]),
            measured_kwh=float(r[2]),
            estimated_kwh=float(r[3]),
            covered_s=float(r[4]),
            curtailed_s=float(r[5]),
            baseline_kwh=float(r[6]),
            not_drawn_kwh=float(r[7]),
            peak_kw=float(r[8]),
            samples=int(r[9]),
            source=SOURCES[int(r[10])] if 0 <= int(r[10]) < len(SOURCES) else FALLBACK,  # unknown: not metered
            metered_kwh=float(r[11]),
            carried_kwh=float(r[12]),
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------- per miner
def miner_index(db: sqlite3.Connection) -> dict[str, int]:
    """Each miner's column in the per-miner rows."""
    return {ip: int(i) for i, ip in db.execute("SELECT idx, ip FROM miner_index")}


def add_miner_minute(
    db: sqlite3.Connection, miner_idx: dict[str, int], minute_ts: int, per_miner: Mapping[str, MinerMinute]
) -> None:
    """Store the per-miner split of a minute (added to one stored before); miners not seen yet get a column, in
    the table and in `miner_idx`."""
    new = [ip for ip in per_miner if ip not in miner_idx]
    if new:
        start = len(miner_idx)
        rows = [(start + i, ip) for i, ip in enumerate(new)]
        db.executemany("INSERT INTO miner_index VALUES (?, ?)", rows)
        miner_idx.update({ip: i for i, ip in rows})
    n = len(miner_idx)
    idx = np.fromiter((miner_idx[ip] for ip in per_miner), dtype=np.int64, count=len(per_miner))
    kwh = np.full(n, np.nan, dtype="<f4")
    kwh[idx] = np.fromiter((m.kwh for m in per_miner.values()), dtype=np.float64, count=len(per_miner))
    estimated = np.zeros(n, dtype=bool)
    estimated[idx] = np.fromiter((not m.measured for m in per_miner.values()), dtype=bool, count=len(per_miner))
    old = db.execute("SELECT n, kwh, estimated FROM energy_miner_minute WHERE minute_ts = ?", (minute_ts,)).fetchone()
    if old is not None:  # merge: add where both have data, keep whichever has it otherwise
        old_kwh, old_est = _decode_miner_row(int(old[0]), old[1], old[2], n)
        kwh = np.where(np.isnan(kwh), old_kwh, np.where(np.isnan(old_kwh), kwh, kwh + old_kwh)).astype("<f4")
        estimated |= old_est
    db.execute(
        "INSERT OR REPLACE INTO energy_miner_minute VALUES (?, ?, ?, ?)",
        (minute_ts, n, kwh.tobytes(), np.packbits(estimated).tobytes()),
    )


def per_miner(
    db: sqlite3.Connection, start: float, end: float, period_s: int | None
) -> dict[int, dict[str, MinerTotal]]:
    """Per-miner kWh over [start, end): {period start: {ip: MinerTotal}}; one period (keyed by `start`) when
    period_s is None. Heavy: reads every per-miner minute of the range."""
    names = {int(i): ip for i, ip in db.execute("SELECT idx, ip FROM miner_index")}
    n = len(names)
    sums: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
    for minute_ts, count, blob, bits in db.execute(
        "SELECT minute_ts, n, kwh, estimated FROM energy_miner_minute WHERE minute_ts >= ? AND minute_ts < ? "
        "ORDER BY minute_ts",
        (start, end),
    ):
        key = int(start) if period_s is None else period_start(minute_ts, period_s)
        kwh, est = _decode_miner_row(int(count), blob, bits, n)
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = (np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64))
        have = ~np.isnan(kwh)
        values = np.where(have, kwh, 0.0)
        np.add(acc[0], values, out=acc[0])
        np.add(acc[1], np.where(est, values, 0.0), out=acc[1])
        np.add(acc[2], have, out=acc[2])
    out: dict[int, dict[str, MinerTotal]] = {}
    for key, (kwh_sum, est_sum, counted) in sorted(sums.items()):
        out[key] = {
            names[int(i)]: MinerTotal(float(kwh_sum[i]), float(est_sum[i]), int(counted[i]))
            for i in np.flatnonzero(counted)
        }
    return out


def _decode_miner_row(
    count: int, blob: bytes, bits: bytes, n: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The stored arrays widened to the current miner count (miners added later have no data)."""
    kwh = np.full(n, np.nan, dtype=np.float64)
    kwh[:count] = np.frombuffer(blob, dtype="<f4", count=count)
    est = np.zeros(n, dtype=bool)
    est[:count] = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=count).astype(bool)
    return kwh, est


# ---------------------------------------------------------------------------------------------- pinning
def pinned_totals(db: sqlite3.Connection, start: int, end: int) -> dict[str, Any]:
    """The `energy` audit record's data for [start, end): the stored totals `verify_audit` later recomputes."""
    t = total(minutes(db, start, end), start, end - start)
    return {
        "from": start,
        "to": end,
        "minutes": t.minutes,
        "kwh": t.kwh,
        "measured_kwh": t.measured_kwh,
        "estimated_kwh": t.estimated_kwh,
        "source": t.source,
        "metered_kwh": t.metered_kwh,
        "carried_kwh": t.carried_kwh,
        "miners_kwh": t.miners_kwh,
        "gap_kwh": t.gap_kwh,
        "metered_minutes": t.metered_minutes,
        "fallback_minutes": t.fallback_minutes,
        "not_drawn_kwh": t.not_drawn_kwh,
        "curtailed_s": t.curtailed_s,
        "covered_s": t.covered_s,
        "peak_kw": t.peak_kw,
    }


def pin_until(db: sqlite3.Connection, upto: float, pin: Callable[[int, int], str]) -> list[str]:
    """Hand every quarter hour that ends at or before `upto` and is not pinned yet to `pin`, in order, skipping
    quarters with no stored minute, and remember how far pinning got. Returns what `pin` returned."""
    row = db.execute("SELECT value FROM meta WHERE key = 'energy_pinned_to'").fetchone()
    if row is not None:
        start = int(float(row[0]))
    else:
        first = db.execute("SELECT MIN(minute_ts) FROM energy_minute").fetchone()[0]
        if first is None:
            return []
        start = period_start(first, QUARTER_S)
    hashes: list[str] = []
    while start + QUARTER_S <= upto:
        nxt = db.execute("SELECT MIN(minute_ts) FROM energy_minute WHERE minute_ts >= ?", (start,)).fetchone()[0]
        if nxt is None:
            break
        if nxt >= start + QUARTER_S:  # nothing stored in this quarter: jump to the next that has some
            start = period_start(nxt, QUARTER_S)
            continue
        hashes.append(pin(start, start + QUARTER_S))
        start += QUARTER_S
    db.execute("INSERT OR REPLACE INTO meta VALUES ('energy_pinned_to', ?)", (repr(float(start)),))
    return hashes
