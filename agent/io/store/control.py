"""Control state: kv state, command replies (idempotency), dispatches and their progress, the identity cache and
what the agent did to each miner.

The functions that take a connection run inside the Store's lock or transaction; `state_text`, `reply_text`,
`dispatch_row`, `dispatch_fields`, `identity_rows` and `control_rows` build (and check) what is written first, so a
bad value is refused before the write lock is taken.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hashflex.agent.core.model import Dispatch
from hashflex.agent.io.records import (
    PROGRESS_FIELDS,
    DispatchRecord,
    MinerControl,
    check_progress,
    dispatch_from_values,
    dispatch_values,
    identity_from_dict,
    identity_to_dict,
)
from hashflex.drivers.base import Identity

_DISPATCH_COLUMNS = (
    "id",
    "source",
    "issued_at",
    "start_ts",
    "end_ts",
    "target_kw",
    "curtail_kw",
    "ramp_kw_per_min",
    "rev",
    "baseline_kw",
    "status",
    *PROGRESS_FIELDS,
)
_SELECT_DISPATCHES = f"SELECT {', '.join(_DISPATCH_COLUMNS)} FROM dispatches"


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not plain JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------- kv state
def get_state(db: sqlite3.Connection, key: str, default: Any) -> Any:
    row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return default if row is None else json.loads(row[0])


def state_text(key: str, value: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("state key must be a non-empty string")
    return _dumps(value, f"state {key!r}")


def set_state(db: sqlite3.Connection, key: str, text: str, ts: float) -> None:
    db.execute(
        "INSERT INTO kv VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
        "updated_at = excluded.updated_at",
        (key, text, float(ts)),
    )


def delete_state(db: sqlite3.Connection, key: str) -> None:
    db.execute("DELETE FROM kv WHERE key = ?", (key,))


# ---------------------------------------------------------------------------------------------- command replies
def get_reply(db: sqlite3.Connection, cmd_id: str) -> dict[str, Any] | None:
    row = db.execute("SELECT reply FROM replies WHERE cmd_id = ?", (cmd_id,)).fetchone()
    return None if row is None else dict(json.loads(row[0]))


def reply_text(cmd_id: str, reply: Mapping[str, Any]) -> str:
    if not isinstance(cmd_id, str) or not cmd_id:
        raise ValueError("a command id must be a non-empty string")
    return _dumps(dict(reply), f"reply to {cmd_id!r}")


def put_reply(db: sqlite3.Connection, cmd_id: str, verb: str, text: str, ts: float) -> dict[str, Any]:
    """The first reply stored wins; returns the reply now stored."""
    db.execute("INSERT INTO replies VALUES (?, ?, ?, ?) ON CONFLICT(cmd_id) DO NOTHING", (cmd_id, verb, text, ts))
    row = db.execute("SELECT reply FROM replies WHERE cmd_id = ?", (cmd_id,)).fetchone()
    return dict(json.loads(row[0]))


# ---------------------------------------------------------------------------------------------- dispatches
def dispatch_row(dispatch: Dispatch, status: str, progress: dict[str, Any]) -> dict[str, Any]:
    values = dispatch_values(dispatch)
    fields = check_progress(progress)
    if not status:
        raise ValueError("a dispatch needs a status")
    return {**values, "status": status, **fields}


def save_dispatch(db: sqlite3.Connection, row: Mapping[str, Any]) -> None:
    """Insert, or replace the columns given of the same id (progress fields not given keep their values)."""
    cols = list(row)
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
    db.execute(
        f"INSERT INTO dispatches ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
        f"ON CONFLICT(id) DO UPDATE SET {updates}",
        [row[c] for c in cols],
    )


def dispatch_fields(status: str | None, progress: dict[str, Any]) -> dict[str, Any]:
    fields = check_progress(progress)
    if status is not None:
        fields["status"] = status
    return fields


def update_dispatch(db: sqlite3.Connection, dispatch_id: str, fields: Mapping[str, Any]) -> None:
    cur = db.execute(
        f"UPDATE dispatches SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
        [*fields.values(), dispatch_id],
    )
    if cur.rowcount == 0:
        raise KeyError(f"no stored dispatch {dispatch_id!r}")


def load_dispatches(db: sqlite3.Connection) -> list[DispatchRecord]:
    """Every stored dispatch, in the order they were first saved."""
    return [_dispatch_record(r) for r in db.execute(f"{_SELECT_DISPATCHES} ORDER BY rowid").fetchall()]


def get_dispatch(db: sqlite3.Connection, dispatch_id: str) -> DispatchRecord | None:
    row = db.execute(f"{_SELECT_DISPATCHES} WHERE id = ?", (dispatch_id,)).fetchone()
    return None if row is None else _dispatch_record(row)


def dispatches_overlapping(db: sqlite3.Connection, start: float, end: float) -> list[DispatchRecord]:
    """Dispatches that started before `end` and had not ended (or closed) before `start`, in saved order."""
    rows = db.execute(
        f"{_SELECT_DISPATCHES} WHERE start_ts < ? "
        "AND (COALESCE(end_ts, closed_at) IS NULL OR COALESCE(end_ts, closed_at) >= ?) ORDER BY rowid",
        (end, start),
    ).fetchall()
    return [_dispatch_record(r) for r in rows]


def _dispatch_record(row: Sequence[Any]) -> DispatchRecord:
    values = dict(zip(_DISPATCH_COLUMNS, row, strict=True))
    progress = {k: values[k] for k in PROGRESS_FIELDS}
    return DispatchRecord.from_stored(dispatch_from_values(values), str(values["status"]), progress)


# ---------------------------------------------------------------------------------------------- identities
def identity_rows(identities: Iterable[Identity]) -> list[tuple[str, str]]:
    return [(i.ip, json.dumps(identity_to_dict(i), separators=(",", ":"))) for i in identities]


def save_identities(db: sqlite3.Connection, rows: list[tuple[str, str]]) -> None:
    db.executemany("INSERT INTO identities VALUES (?, ?) ON CONFLICT(ip) DO UPDATE SET doc = excluded.doc", rows)


def load_identities(db: sqlite3.Connection) -> list[Identity]:
    rows = db.execute("SELECT doc FROM identities ORDER BY ip").fetchall()
    return [identity_from_dict(json.loads(r[0])) for r in rows]


def forget_identities(db: sqlite3.Connection, ips: Iterable[str]) -> None:
    db.executemany("DELETE FROM identities WHERE ip = ?", [(ip,) for ip in ips])


# ---------------------------------------------------------------------------------------------- miner control memory
def control_rows(controls: Mapping[str, MinerControl]) -> list[tuple[str, str]]:
    return [(ip, json.dumps(c.to_dict(), separators=(",", ":"))) for ip, c in controls.items()]


def save_controls(db: sqlite3.Connection, rows: list[tuple[str, str]], *, replace: bool) -> None:
    if replace:
        db.execute("DELETE FROM controls")
    db.executemany("INSERT INTO controls VALUES (?, ?) ON CONFLICT(ip) DO UPDATE SET doc = excluded.doc", rows)


def clear_controls(db: sqlite3.Connection, ips: Iterable[str]) -> None:
    db.executemany("DELETE FROM controls WHERE ip = ?", [(ip,) for ip in ips])


def load_controls(db: sqlite3.Connection) -> dict[str, MinerControl]:
    rows = db.execute("SELECT ip, doc FROM controls").fetchall()
    return {ip: MinerControl.from_dict(json.loads(doc)) for ip, doc in rows}
