"""The SQLite file itself: its errors, its header, connections, and the schema and its migrations."""

from __future__ import annotations

import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SCHEMA_VERSION = 2
DEFAULT_BUSY_TIMEOUT_MS = 10_000  # the CLI and start-up: wait out another writer's transaction


class StoreError(Exception):
    """The state database cannot be used (disk full, locked, from a newer hashflex, ...)."""


class StoreCorrupt(StoreError):
    """The state database is damaged (torn, truncated, overwritten). Start safe; keep the file for inspection."""


class StoreUnavailable(StoreError):
    """The state database is sound but cannot be used now: the disk is full, another process holds its lock, the
    file system is read-only or fails I/O. Retry later and alarm; never treat the file as damaged."""


# SQLite's primary result codes (the low byte of the extended code the sqlite3 module attaches to every error)
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
# SQLITE_PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL
_UNAVAILABLE_CODES = frozenset({3, 5, 6, 7, 8, 10, 13, 14, 15})
SQLITE_READONLY = 8


def classify(path: Path, exc: BaseException, what: str = "") -> StoreError:
    """The StoreError for a SQLite (or OS) error: corruption only when SQLite says the file is damaged."""
    prefix = f"{path}: {what}{': ' if what else ''}"
    if isinstance(exc, OSError):
        return StoreUnavailable(f"{prefix}{exc.strerror or exc}")
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code is None:  # not from the SQLite library itself (misuse, a closed connection): no verdict on the file
        return StoreError(f"{prefix}{text}")
    if code & 0xFF in _CORRUPT_CODES:
        return StoreCorrupt(f"{prefix}damaged database: {text}")
    if code & 0xFF in _UNAVAILABLE_CODES:
        return StoreUnavailable(f"{prefix}{text} ({getattr(exc, 'sqlite_errorname', code)})")
    return StoreError(f"{prefix}{text}")


# ---------------------------------------------------------------------------------------------- schema
_MIGRATIONS: tuple[str, ...] = (
    # 1: everything
    """
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE replies (cmd_id TEXT PRIMARY KEY, verb TEXT NOT NULL, reply TEXT NOT NULL, ts REAL NOT NULL);
    CREATE TABLE dispatches (
        id TEXT PRIMARY KEY, source TEXT NOT NULL, issued_at REAL NOT NULL, start_ts REAL NOT NULL, end_ts REAL,
        target_kw REAL, curtail_kw REAL, ramp_kw_per_min REAL, priority INTEGER NOT NULL, rev INTEGER NOT NULL,
        baseline_kw REAL, status TEXT NOT NULL, received_at REAL, accepted_at REAL, commands_sent_at REAL,
        target_met_at REAL, max_overshoot_kw REAL, closed_at REAL, close_reason TEXT, channel TEXT);
    CREATE INDEX dispatches_open ON dispatches (closed_at);
    CREATE TABLE identities (ip TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE controls (ip TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE audit (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
    CREATE INDEX audit_ts ON audit (ts);
    CREATE TABLE audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL,
        anchor_seq INTEGER NOT NULL, anchor_hash TEXT NOT NULL);
    INSERT INTO audit_head VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000',
        0, '0000000000000000000000000000000000000000000000000000000000000000');
    CREATE TABLE audit_days (day TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, head_hash TEXT NOT NULL,
        doc TEXT NOT NULL, signed_at REAL NOT NULL);
    CREATE TABLE energy_minute (minute_ts INTEGER PRIMARY KEY, kwh REAL NOT NULL, measured_kwh REAL NOT NULL,
        estimated_kwh REAL NOT NULL, covered_s REAL NOT NULL, curtailed_s REAL NOT NULL,
        baseline_kwh REAL NOT NULL, not_drawn_kwh REAL NOT NULL, peak_kw REAL NOT NULL, samples INTEGER NOT NULL);
    CREATE TABLE miner_index (idx INTEGER PRIMARY KEY, ip TEXT NOT NULL UNIQUE);
    -- one row per minute for the whole fleet: kWh as little-endian float32 by miner_index (NaN = no data),
    -- and a bitmap of the miners whose figure was estimated. 10k miners = 41 kB a minute, not 10k rows.
    CREATE TABLE energy_miner_minute (minute_ts INTEGER PRIMARY KEY, n INTEGER NOT NULL, kwh BLOB NOT NULL,
        estimated BLOB NOT NULL);
    CREATE TABLE exports (id INTEGER PRIMARY KEY, from_ts REAL NOT NULL, to_ts REAL NOT NULL, fmt TEXT NOT NULL,
        digest TEXT NOT NULL, exported_at REAL NOT NULL);
    """,
    # 2: energy from the site meter. source: 0 metered, 1 miners, 2 fallback (agent.core.energy.SOURCES; a minute
    # stored twice keeps the higher: the least direct source in it). Rows from before are the miners' sum.
    """
    ALTER TABLE energy_minute ADD COLUMN source INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE energy_minute ADD COLUMN metered_kwh REAL NOT NULL DEFAULT 0;
    ALTER TABLE energy_minute ADD COLUMN carried_kwh REAL NOT NULL DEFAULT 0;
    """,
)
# the bulky table quick_check skips at open (verify_audit checks the whole file)
_BULK_TABLES = frozenset({"energy_miner_minute"})


# ---------------------------------------------------------------------------------------------- file checks
@dataclass(frozen=True, slots=True)
class FileCheck:
    problem: str | None  # what is wrong with the file as a SQLite database; None when it looks whole
    full_size: int | None  # the size its header says it has (None when it cannot say: WAL frames pending, stale)


def inspect_file(path: Path) -> FileCheck:
    """The file's SQLite header and size, read once.

    The header records the page size and, when valid, the number of pages: a file shorter than that, or not a
    whole number of pages, was cut. While a WAL file holds frames the main file may legitimately lag (a
    checkpoint in progress), so the size rule then applies only to whole pages.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        return FileCheck(f"{path}: cannot read: {exc.strerror}", None)
    wal = Path(f"{path}-wal")
    wal_active = wal.exists() and wal.stat().st_size > 0
    full_size = _claimed_size(header, wal_active)
    return FileCheck(_file_problem(path, size, header, full_size), full_size)


def check_file(path: Path) -> str | None:
    """What is wrong with the file as a SQLite database, read from its header and size; None when it looks whole."""
    return inspect_file(path).problem


def _page_size(raw_page: int) -> int:
    return 65536 if raw_page == 1 else raw_page


def _claimed_size(header: bytes, wal_active: bool) -> int | None:
    """Pages × page size from the header, when the header is whole, current (its page count is valid for the
    latest change) and no WAL frames are pending."""
    if len(header) < 100 or wal_active:
        return None
    (raw_page,) = struct.unpack(">H", header[16:18])
    (change, pages) = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if change != valid_for or raw_page not in {1} | {1 << k for k in range(9, 16)}:
        return None
    return int(pages) * _page_size(raw_page)


def _file_problem(path: Path, size: int, header: bytes, full_size: int | None) -> str | None:
    if size == 0:
        return f"{path}: the file is empty (cut to zero length?); move it away to start with a fresh database"
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return f"{path}: not a SQLite database (header overwritten or the file is cut)"
    (raw_page,) = struct.unpack(">H", header[16:18])
    page = _page_size(raw_page)
    if page < 512 or page & (page - 1):
        return f"{path}: damaged header (page size {raw_page})"
    if size % page:
        return f"{path}: the file is cut mid-page ({size} bytes is not a whole number of {page}-byte pages)"
    if full_size and size < full_size:
        return (
            f"{path}: the file is truncated: {size} bytes, but its header says {full_size // page} pages of "
            f"{page} bytes"
        )
    return None


# ---------------------------------------------------------------------------------------------- connections
def connect(path: Path, *, readonly: bool, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(
            f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return db


def connect_existing(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """A read-write connection to a file that must exist: it never creates one that is gone (the caller sets
    the busy timeout)."""
    uri = f"file:{quote(str(path.resolve()))}?mode=rw"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)


def writer_pragmas(db: sqlite3.Connection) -> None:
    """Per-connection settings of the store's writing connection."""
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA journal_size_limit = 67108864")


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_fresh(path: Path) -> None:
    """Build a new database under a temporary name, then rename it into place (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    db = connect(tmp, readonly=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        migrate(db)
    finally:
        db.close()  # the last connection checkpoints and removes the WAL
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _schema_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if row is None:
        return 0
    ver = db.execute("SELECT version FROM schema_version").fetchone()
    return int(ver[0]) if ver else 0


def migrate(db: sqlite3.Connection) -> None:
    version = _schema_version(db)
    if version > len(_MIGRATIONS):
        raise StoreError(
            f"the state database has schema version {version}, newer than this hashflex knows "
            f"({len(_MIGRATIONS)}); upgrade hashflex or restore a matching backup"
        )
    if version == len(_MIGRATIONS):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            db.execute("INSERT INTO schema_version VALUES (0)")
        for number in range(version + 1, len(_MIGRATIONS) + 1):
            for statement in _split_sql(_MIGRATIONS[number - 1]):
                db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (number,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _split_sql(script: str) -> list[str]:
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def quick_check(db: sqlite3.Connection, *, include_bulk: bool) -> list[str]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    problems: list[str] = []
    if include_bulk:
        problems = [r[0] for r in db.execute("PRAGMA quick_check(20)") if r[0] != "ok"]
    else:
        for table in tables:
            if table not in _BULK_TABLES:
                problems += [r[0] for r in db.execute(f"PRAGMA quick_check('{table}')") if r[0] != "ok"]
    return problems
