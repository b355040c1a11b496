"""The agent's memory on disk: one SQLite file in the state directory. The only module that imports sqlite3.

What it keeps: kv state (runtime cap, fail-safe state, counters), command replies by id (idempotency, forever),
dispatches and their progress (operator overrides are dispatches too), the identity cache, what the agent did to
each miner, the hash-chained audit trail with optional signed daily heads, and energy per minute.

Durability. WAL mode; `synchronous=FULL` so every commit is on disk when the call returns (a power cut of the
gateway loses nothing acknowledged), except energy minutes, which are committed with NORMAL (they reach the disk
with the next FULL commit or checkpoint; a power cut may lose the last minutes, never corrupt). Writes made inside
one `with store.transaction():` commit together or not at all.

Damage. `Store.open` checks the file before trusting it: the SQLite header against the file size (a cut file),
then `PRAGMA quick_check` of every table except the bulky per-miner energy (checked by `verify_audit`). Any
failure raises StoreCorrupt with what was found; the agent then starts safe at the fail-safe level. A missing
file is created fresh (built under a temporary name and renamed, so a crash during creation never leaves an empty
file that could be mistaken for a fresh start).

Not damage. Only SQLite's own verdict (SQLITE_CORRUPT, SQLITE_NOTADB) and the checks above mean a damaged file. A
full disk, another process's lock, a read-only file system or an I/O error raise StoreUnavailable: the file is
sound and may be used later, so it is never moved aside for that (see `classify`). How long a call waits for
another process's lock is the store's busy timeout (`Store.open(busy_timeout_ms=)`): the CLI waits 10 s, the
agent's control loop a few milliseconds, and retries later. A safe start that is pending is remembered outside
the database, in a marker file next to it (`remember_safe_start`), because the database is what failed.

Threads. Calls on a Store are serialised by a lock. The light calls (everything that writes one thing) take well
under a millisecond plus one fsync. The heavy calls read through their own short-lived read-only connection, so
the runtime can run them with `asyncio.to_thread` while its loop keeps writing: `verify_audit`, `audit_records`,
`energy_minutes`, `energy_rollup`, `energy_per_miner`, `export`, and `prune` (which writes, in bounded chunks).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hashflex.agent.core import audit, signing
from hashflex.agent.core.audit import AuditRecord, ChainVerifier, VerifyResult
from hashflex.agent.core.energy import (
    DAY_S,
    FALLBACK,
    MINUTE_S,
    QUARTER_S,
    SOURCES,
    EnergyMinute,
    EnergyPeriod,
    MinerMinute,
    MinerTotal,
    period_start,
    rollup,
    total,
)
from hashflex.agent.core.model import Dispatch
from hashflex.agent.io.export import ExportFormat, iso, render
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

T = TypeVar("T")

SCHEMA_VERSION = 2
_PRUNE_CHUNK = 5000  # rows deleted per transaction, so the writer never waits long behind a prune
_PRUNE_CHUNK_BULK = 60  # per-miner minutes (~41 kB each at 10k miners): an hour of them per transaction
_ENERGY_TOLERANCE_KWH = 1e-6


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
_SQLITE_READONLY = 8


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
_ENERGY_COLUMNS = (
    "minute_ts, kwh, measured_kwh, estimated_kwh, covered_s, curtailed_s, baseline_kwh, not_drawn_kwh, peak_kw, "
    "samples, source, metered_kwh, carried_kwh"
)
# what an `energy` audit record pins and `verify_audit` recomputes (older records pin fewer: only those are checked)
_PINNED_ENERGY = ("kwh", "not_drawn_kwh", "minutes", "metered_kwh", "carried_kwh", "miners_kwh", "metered_minutes",
                  "fallback_minutes")  # fmt: skip
_DISPATCH_COLUMNS = (
    "id",
    "source",
    "issued_at",
    "start_ts",
    "end_ts",
    "target_kw",
    "curtail_kw",
    "ramp_kw_per_min",
    "priority",
    "rev",
    "baseline_kw",
    "status",
    *PROGRESS_FIELDS,
)


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: float  # records before this were deleted (the older of retention and the export watermark)
    audit_records: int
    energy_minutes: int
    miner_minutes: int
    dispatches: int


# ---------------------------------------------------------------------------------------------- file checks
def check_file(path: Path) -> str | None:
    """What is wrong with the file as a SQLite database, read from its header and size; None when it looks whole.

    The header records the page size and, when valid, the number of pages: a file shorter than that, or not a
    whole number of pages, was cut. While a WAL file holds frames the main file may legitimately lag (a
    checkpoint in progress), so the size rule then applies only to whole pages.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    if size == 0:
        return f"{path}: the file is empty (cut to zero length?); move it away to start with a fresh database"
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return f"{path}: not a SQLite database (header overwritten or the file is cut)"
    (raw_page,) = struct.unpack(">H", header[16:18])
    page = 65536 if raw_page == 1 else raw_page
    if page < 512 or page & (page - 1):
        return f"{path}: damaged header (page size {raw_page})"
    if size % page:
        return f"{path}: the file is cut mid-page ({size} bytes is not a whole number of {page}-byte pages)"
    wal = Path(f"{path}-wal")
    wal_active = wal.exists() and wal.stat().st_size > 0
    (change,) = struct.unpack(">I", header[24:28])
    (pages,) = struct.unpack(">I", header[28:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if not wal_active and change == valid_for and pages and size < pages * page:
        return f"{path}: the file is truncated: {size} bytes, but its header says {pages} pages of {page} bytes"
    return None


# ---------------------------------------------------------------------------------------------- safe start marker
SAFE_START_MARKER = "safe-start.pending"


def remember_safe_start(state_dir: Path, reason: str, ts: float) -> None:
    """Remember, outside the database, that the agent must start safe until an operator resumes: the database
    that would hold it is the thing that failed. Written atomically (a temporary file, fsync, rename, fsync of the
    directory), so a crash leaves the old marker or the new one, never half of one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{SAFE_START_MARKER}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"reason": reason, "ts": ts}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / SAFE_START_MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(state_dir)


def pending_safe_start(state_dir: Path) -> str | None:
    """Why the agent must start safe, if a marker says so (an unreadable marker still means: start safe)."""
    path = state_dir / SAFE_START_MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"a safe start is pending ({path} cannot be read: {exc.strerror})"
    try:
        reason = json.loads(text).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return str(reason) if reason else f"a safe start is pending ({path})"


def clear_safe_start(state_dir: Path) -> None:
    """An operator resumed: the next start is a normal one."""
    (state_dir / SAFE_START_MARKER).unlink(missing_ok=True)
    _fsync_dir(state_dir)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


DEFAULT_BUSY_TIMEOUT_MS = 10_000  # the CLI and start-up: wait out another writer's transaction


def _connect(path: Path, *, readonly: bool, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(
            f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
        )
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return db


def _writer_pragmas(db: sqlite3.Connection) -> None:
    """Per-connection settings of the store's writing connection."""
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA journal_size_limit = 67108864")


def _create_fresh(path: Path) -> None:
    """Build a new database under a temporary name, then rename it into place (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    db = _connect(tmp, readonly=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        _migrate(db)
    finally:
        db.close()  # the last connection checkpoints and removes the WAL
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _schema_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if row is None:
        return 0
    ver = db.execute("SELECT version FROM schema_version").fetchone()
    return int(ver[0]) if ver else 0


def _migrate(db: sqlite3.Connection) -> None:
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


def _quick_check(db: sqlite3.Connection, *, include_bulk: bool) -> list[str]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    problems: list[str] = []
    if include_bulk:
        problems = [r[0] for r in db.execute("PRAGMA quick_check(20)") if r[0] != "ok"]
    else:
        for table in tables:
            if table not in _BULK_TABLES:
                problems += [r[0] for r in db.execute(f"PRAGMA quick_check('{table}')") if r[0] != "ok"]
    return problems


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not plain JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------- the store
class Store:
    """See the module docstring. Build with `Store.open(path)`; every method is synchronous."""

    def __init__(self, path: Path, db: sqlite3.Connection, retention_days: int) -> None:
        self.path = path
        self.retention_days = retention_days
        self._db = db
        self._lock = threading.RLock()
        self._depth = 0
        self._durable = True
        self._closed = False
        self._busy_timeout_ms = DEFAULT_BUSY_TIMEOUT_MS
        # SQLite refused a write as read-only: this connection may be read-only for good (SQLite opens a file it
        # cannot write read-only, and never upgrades that connection), so the next write reopens it (`_reopen`)
        self._stale = False
        self._head: tuple[int, str] = _chain_head(db)
        self._miner_idx: dict[str, int] = {ip: int(i) for i, ip in db.execute("SELECT idx, ip FROM miner_index")}

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        create: bool = True,
        check: bool = True,
        retention_days: int = 730,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> Store:
        """Open (or create) the database. Raises StoreCorrupt when the file is damaged, StoreUnavailable when it
        cannot be used now (full, locked, read-only, I/O error: never a reason to move it), StoreError otherwise.

        `busy_timeout_ms` applies once the store is open: how long a write waits for another process's lock
        before it fails with StoreUnavailable (the agent's control loop gives a few ms, and retries later)."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise StoreError(f"{path}: no state database here (the agent creates it when it first starts)")
            try:
                _create_fresh(path)
            except (sqlite3.Error, OSError) as exc:
                raise classify(path, exc, "cannot create the state database") from exc
        elif check:
            try:  # a file that cannot be read now is not a damaged file
                with path.open("rb") as f:
                    f.read(1)
            except OSError as exc:
                raise classify(path, exc, "cannot read") from exc
            problem = check_file(path)
            if problem:
                raise StoreCorrupt(problem)
        try:
            db = _connect(path, readonly=False)
        except sqlite3.Error as exc:
            raise classify(path, exc, "cannot open") from exc
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL mode (got {mode!r}); is the directory writable?")
            _writer_pragmas(db)
            if check:
                problems = _quick_check(db, include_bulk=False)
                if problems:
                    raise StoreCorrupt(f"{path}: integrity check failed: {'; '.join(problems[:5])}")
            _migrate(db)
            store = cls(path, db, retention_days)
        except StoreError:
            db.close()
            raise
        except sqlite3.Error as exc:  # full, locked, read-only and I/O errors are not damage (classify)
            db.close()
            raise classify(path, exc) from exc
        store.set_busy_timeout(busy_timeout_ms)
        return store

    def set_busy_timeout(self, ms: int) -> None:
        """How long a call waits for another process's write lock before it fails with StoreUnavailable."""
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout = {int(ms)}")
            self._busy_timeout_ms = int(ms)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Several writes that commit together (nested blocks join as savepoints)."""
        with self._lock, self._guard():
            if self._closed:
                raise StoreError("the store is closed")
            head, idx = self._head, dict(self._miner_idx)
            if self._depth == 0:
                if self._stale:
                    self._reopen()
                self._db.execute("BEGIN IMMEDIATE")
                # the chain head as the file has it now, under the write lock: another writer on the same file
                # (a second agent, a CLI) may have appended since we last looked
                self._head = _chain_head(self._db)
                begin, commit, rollback = None, "COMMIT", "ROLLBACK"
            else:
                name = f"sp{self._depth}"
                begin, commit, rollback = f"SAVEPOINT {name}", f"RELEASE {name}", f"ROLLBACK TO {name}"
                self._db.execute(begin)
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                # SQLite may already have rolled the whole transaction back (a full disk, an I/O error): then
                # there is nothing to roll back, and trying would replace the real error with a misleading one
                if self._db.in_transaction:
                    self._db.execute(rollback)
                    if self._depth:
                        self._db.execute(f"RELEASE sp{self._depth}")
                self._head, self._miner_idx = head, idx
                raise
            self._depth -= 1
            try:
                self._db.execute(commit)
            except BaseException:
                if self._depth == 0 and self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._head, self._miner_idx = head, idx
                raise

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite errors become StoreError: StoreCorrupt only when SQLite says the file is damaged,
        StoreUnavailable for full, locked, read-only and I/O errors (see `classify`)."""
        try:
            yield
        except sqlite3.Error as exc:
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_READONLY:
                self._stale = True
            raise classify(self.path, exc) from exc

    def _reopen(self) -> None:
        """A new read-write connection in place of one that refused a write as read-only (the file system was
        read-only when it was opened, or the file was replaced). Raises while the file cannot be written yet (a
        retry tries again), with a connection that still reads in place. Under the lock."""
        # the old connection goes first: SQLite shares a file's WAL index between the connections of a process,
        # and one opened read-only would make the new connection read-only too
        self._db.close()
        try:
            uri = f"file:{quote(str(self.path.resolve()))}?mode=rw"  # never creates a file that is gone
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                 timeout=self._busy_timeout_ms / 1000)  # fmt: skip
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # (if even that fails, the next write tries again)
                self._db = _connect(self.path, readonly=True, busy_timeout_ms=self._busy_timeout_ms)
            raise
        self._db = db
        db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        # SQLite opens a file it cannot write read-only without a word: only a write tells (rolled back). While
        # it fails, this connection stays (it reads) and `_stale` stays set
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM kv WHERE 0")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
        _writer_pragmas(db)
        self._miner_idx = {ip: int(i) for i, ip in db.execute("SELECT idx, ip FROM miner_index")}
        self._stale = False

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock, self._guard():
            if self._closed:
                raise StoreError("the store is closed")
            return fn(self._db)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A private read-only connection for heavy reads: safe in a thread, never blocks the writer."""
        with self._guard():
            db = _connect(self.path, readonly=True)
        try:
            with self._guard():
                yield db
        finally:
            db.close()

    # ------------------------------------------------------------------ kv state
    def get_state(self, key: str, default: Any = None) -> Any:
        row = self._read(lambda db: db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone())
        return default if row is None else json.loads(row[0])

    def set_state(self, key: str, value: Any, ts: float = 0.0) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("state key must be a non-empty string")
        text = _dumps(value, f"state {key!r}")
        with self.transaction():
            self._db.execute(
                "INSERT INTO kv VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (key, text, float(ts)),
            )

    # the newest applied issue time per command order key (agent.commands.Command.order_key): kept durably, so a
    # stale or replayed signed command is refused after a restart too
    def newest_issued(self, order_key: str) -> float | None:
        value = self.get_state(f"issued:{order_key}")
        return float(value) if isinstance(value, int | float) else None

    def set_newest_issued(self, order_key: str, issued_at: float, ts: float) -> None:
        self.set_state(f"issued:{order_key}", float(issued_at), ts)

    def delete_state(self, key: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    # ------------------------------------------------------------------ command replies (idempotency)
    def get_reply(self, cmd_id: str) -> dict[str, Any] | None:
        row = self._read(lambda db: db.execute("SELECT reply FROM replies WHERE cmd_id = ?", (cmd_id,)).fetchone())
        return None if row is None else dict(json.loads(row[0]))

    def put_reply(self, cmd_id: str, verb: str, reply: Mapping[str, Any], ts: float) -> dict[str, Any]:
        """Keep the reply to `cmd_id` forever. The first reply stored wins; returns the reply now stored."""
        if not isinstance(cmd_id, str) or not cmd_id:
            raise ValueError("a command id must be a non-empty string")
        text = _dumps(dict(reply), f"reply to {cmd_id!r}")
        with self.transaction():
            self._db.execute(
                "INSERT INTO replies VALUES (?, ?, ?, ?) ON CONFLICT(cmd_id) DO NOTHING", (cmd_id, verb, text, ts)
            )
            row = self._db.execute("SELECT reply FROM replies WHERE cmd_id = ?", (cmd_id,)).fetchone()
        return dict(json.loads(row[0]))

    # ------------------------------------------------------------------ dispatches (and operator overrides)
    def save_dispatch(self, dispatch: Dispatch, status: str, **progress: Any) -> None:
        """Insert, or replace the dispatch fields and status of the same id; progress fields given are set,
        the others keep their stored values."""
        values = dispatch_values(dispatch)
        fields = check_progress(progress)
        if not status:
            raise ValueError("a dispatch needs a status")
        row = {**values, "status": status, **fields}
        cols = list(row)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "id")
        with self.transaction():
            self._db.execute(
                f"INSERT INTO dispatches ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                f"ON CONFLICT(id) DO UPDATE SET {updates}",
                [row[c] for c in cols],
            )

    def update_dispatch(self, dispatch_id: str, *, status: str | None = None, **progress: Any) -> None:
        """Set the status and/or progress fields of a stored dispatch; KeyError when the id is unknown."""
        fields = check_progress(progress)
        if status is not None:
            fields["status"] = status
        if not fields:
            return
        with self.transaction():
            cur = self._db.execute(
                f"UPDATE dispatches SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                [*fields.values(), dispatch_id],
            )
            if cur.rowcount == 0:
                raise KeyError(f"no stored dispatch {dispatch_id!r}")

    def load_dispatches(self, active_only: bool = True) -> list[DispatchRecord]:
        """Stored dispatches in the order they were first saved; `active_only` = not closed."""
        rows = self._read(
            lambda db: db.execute(f"SELECT {', '.join(_DISPATCH_COLUMNS)} FROM dispatches ORDER BY rowid").fetchall()
        )
        records = [_dispatch_record(r) for r in rows]
        return [r for r in records if r.open] if active_only else records

    def get_dispatch(self, dispatch_id: str) -> DispatchRecord | None:
        row = self._read(
            lambda db: db.execute(
                f"SELECT {', '.join(_DISPATCH_COLUMNS)} FROM dispatches WHERE id = ?", (dispatch_id,)
            ).fetchone()
        )
        return None if row is None else _dispatch_record(row)

    # ------------------------------------------------------------------ identities
    def save_identities(self, identities: Iterable[Identity]) -> None:
        rows = [(i.ip, json.dumps(identity_to_dict(i), separators=(",", ":"))) for i in identities]
        with self.transaction():
            self._db.executemany(
                "INSERT INTO identities VALUES (?, ?) ON CONFLICT(ip) DO UPDATE SET doc = excluded.doc", rows
            )

    def load_identities(self) -> list[Identity]:
        rows = self._read(lambda db: db.execute("SELECT doc FROM identities ORDER BY ip").fetchall())
        return [identity_from_dict(json.loads(r[0])) for r in rows]

    def forget_identities(self, ips: Iterable[str]) -> None:
        with self.transaction():
            self._db.executemany("DELETE FROM identities WHERE ip = ?", [(ip,) for ip in ips])

    # ------------------------------------------------------------------ miner control memory
    def save_controls(self, controls: Mapping[str, MinerControl], *, replace: bool = False) -> None:
        """Upsert what the agent did to these miners; `replace=True` also forgets every miner not given."""
        rows = [(ip, json.dumps(c.to_dict(), separators=(",", ":"))) for ip, c in controls.items()]
        with self.transaction():
            if replace:
                self._db.execute("DELETE FROM controls")
            self._db.executemany(
                "INSERT INTO controls VALUES (?, ?) ON CONFLICT(ip) DO UPDATE SET doc = excluded.doc", rows
            )

    def clear_controls(self, ips: Iterable[str]) -> None:
        """Forget miners the agent no longer holds down (woken, back at full power)."""
        with self.transaction():
            self._db.executemany("DELETE FROM controls WHERE ip = ?", [(ip,) for ip in ips])

    def load_controls(self) -> dict[str, MinerControl]:
        rows = self._read(lambda db: db.execute("SELECT ip, doc FROM controls").fetchall())
        return {ip: MinerControl.from_dict(json.loads(doc)) for ip, doc in rows}

    # ------------------------------------------------------------------ audit
    def append_audit(self, kind: str, data: Mapping[str, Any], ts: float) -> str:
        """Append one record to the chain (durably); returns its hash. ValueError on bad kind/data."""
        with self.transaction():
            seq, prev = self._head
            rec = audit.make_record(seq, prev, ts, kind, data)
            self._db.execute(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)",
                (rec.seq, rec.ts, rec.kind, audit.canonical_json(rec.data), rec.prev_hash, rec.hash),
            )
            self._db.execute("UPDATE audit_head SET seq = ?, hash = ?", (rec.seq, rec.hash))
            self._head = (rec.seq, rec.hash)
        return rec.hash

    def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the last record appended."""
        with self._lock:
            return self._head

    def audit_records(
        self, start: float | None = None, end: float | None = None, *, limit: int | None = None
    ) -> list[AuditRecord]:
        """Records with start <= ts < end, in chain order. Heavy for wide ranges."""
        with self._reader() as db:
            return list(_audit_rows(db, start, end, limit))

    def verify_audit(
        self, public_keys: Sequence[Ed25519PublicKey] | None = None, *, full_check: bool = True
    ) -> VerifyResult:
        """Check the whole chain, the energy it pins and the signed daily heads. Heavy."""
        return verify_database(self.path, public_keys, full_check=full_check)

    def sign_pending_heads(self, key: Ed25519PrivateKey, site_id: str, now: float) -> list[str]:
        """Sign the chain head at the end of every whole UTC day not signed yet; returns the days signed."""
        with self._lock, self._guard():
            signed = {r[0] for r in self._db.execute("SELECT day FROM audit_days")}
            first = self._db.execute("SELECT MIN(ts) FROM audit").fetchone()[0]
            if first is None:
                return []
            done: list[str] = []
            day_start = period_start(first, DAY_S)
            while day_start + DAY_S <= now:
                day = _day_name(day_start)
                if day not in signed:
                    row = self._db.execute(
                        "SELECT seq, hash FROM audit WHERE seq = (SELECT MAX(seq) FROM audit WHERE ts < ?)",
                        (day_start + DAY_S,),
                    ).fetchone()
                    if row is not None:
                        doc = signing.sign(audit.head_document(site_id, day, int(row[0]), str(row[1])), key)
                        with self.transaction():
                            self._db.execute(
                                "INSERT INTO audit_days VALUES (?, ?, ?, ?, ?)",
                                (day, int(row[0]), str(row[1]), json.dumps(doc), now),
                            )
                        done.append(day)
                day_start += DAY_S
            return done

    def signed_heads(self) -> list[dict[str, Any]]:
        rows = self._read(lambda db: db.execute("SELECT doc FROM audit_days ORDER BY day").fetchall())
        return [dict(json.loads(r[0])) for r in rows]

    # ------------------------------------------------------------------ energy
    def record_energy_minute(self, minute: EnergyMinute, per_miner: Mapping[str, MinerMinute] | None = None) -> None:
        """Store a site minute and its per-miner split. A minute stored twice (a restart inside it) is added up, and
        labelled with the least direct source of the two (SOURCES order)."""
        if minute.minute_ts % MINUTE_S:
            raise ValueError(f"minute_ts must be the start of a minute, got {minute.minute_ts}")
        if minute.source not in SOURCES:
            raise ValueError(f"energy source must be one of {', '.join(SOURCES)}, got {minute.source!r}")
        site = (
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
        with self._relaxed(), self.transaction():
            self._db.execute(
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
                site,
            )
            if per_miner:
                self._write_miner_minute(minute.minute_ts, per_miner)

    @contextlib.contextmanager
    def _relaxed(self) -> Iterator[None]:
        """synchronous=NORMAL for one standalone transaction (inside another, the outer one's FULL applies)."""
        with self._lock, self._guard():
            relax = self._depth == 0
            if relax:
                self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                yield
            finally:
                if relax and not self._closed:
                    self._db.execute("PRAGMA synchronous = FULL")

    def _write_miner_minute(self, minute_ts: int, per_miner: Mapping[str, MinerMinute]) -> None:
        new = [ip for ip in per_miner if ip not in self._miner_idx]
        if new:
            start = len(self._miner_idx)
            rows = [(start + i, ip) for i, ip in enumerate(new)]
            self._db.executemany("INSERT INTO miner_index VALUES (?, ?)", rows)
            self._miner_idx.update({ip: i for i, ip in rows})
        n = len(self._miner_idx)
        idx = np.fromiter((self._miner_idx[ip] for ip in per_miner), dtype=np.int64, count=len(per_miner))
        kwh = np.full(n, np.nan, dtype="<f4")
        kwh[idx] = np.fromiter((m.kwh for m in per_miner.values()), dtype=np.float64, count=len(per_miner))
        estimated = np.zeros(n, dtype=bool)
        estimated[idx] = np.fromiter((not m.measured for m in per_miner.values()), dtype=bool, count=len(per_miner))
        old = self._db.execute(
            "SELECT n, kwh, estimated FROM energy_miner_minute WHERE minute_ts = ?", (minute_ts,)
        ).fetchone()
        if old is not None:  # merge: add where both have data, keep whichever has it otherwise
            old_kwh, old_est = _decode_miner_row(int(old[0]), old[1], old[2], n)
            kwh = np.where(np.isnan(kwh), old_kwh, np.where(np.isnan(old_kwh), kwh, kwh + old_kwh)).astype("<f4")
            estimated |= old_est
        self._db.execute(
            "INSERT OR REPLACE INTO energy_miner_minute VALUES (?, ?, ?, ?)",
            (minute_ts, n, kwh.tobytes(), np.packbits(estimated).tobytes()),
        )

    def energy_minutes(self, start: float, end: float) -> list[EnergyMinute]:
        """Site minutes with start <= minute_ts < end."""
        with self._reader() as db:
            return _energy_minutes(db, start, end)

    def energy_rollup(
        self, start: float, end: float, period_s: int = QUARTER_S, offset_s: int = 0
    ) -> list[EnergyPeriod]:
        """Site energy per period (60 = minutes, 900 = quarter hours, 86400 = UTC days) over [start, end)."""
        return rollup(self.energy_minutes(start, end), period_s, offset_s)

    def energy_total(self, start: float, end: float) -> EnergyPeriod:
        return total(self.energy_minutes(start, end), int(start), int(end - start))

    def energy_per_miner(
        self, start: float, end: float, period_s: int | None = None
    ) -> dict[int, dict[str, MinerTotal]]:
        """Per-miner kWh over [start, end): {period start: {ip: MinerTotal}}; one period (keyed by `start`) when
        period_s is None. Heavy: reads every per-miner minute of the range."""
        with self._reader() as db:
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
        for key, (kwh_sum, est_sum, minutes) in sorted(sums.items()):
            out[key] = {
                names[int(i)]: MinerTotal(float(kwh_sum[i]), float(est_sum[i]), int(minutes[i]))
                for i in np.flatnonzero(minutes)
            }
        return out

    def close_energy_period(self, start: int, end: int, ts: float) -> str:
        """Pin the stored site energy of [start, end) into the audit chain (kind `energy`); returns the record
        hash. `verify_audit` later recomputes these totals from the energy table, so editing it is detected."""
        with self.transaction():
            minutes = _energy_minutes(self._db, start, end)
            t = total(minutes, start, end - start)
            data = {
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
            return self.append_audit("energy", data, ts)

    def pin_energy_until(self, upto: float, ts: float) -> list[str]:
        """Pin every quarter hour that ends at or before `upto` and is not pinned yet (close_energy_period), in
        order; quarters with no stored minute (the agent was down) are skipped. The caller guarantees no minute
        before `upto` can still arrive. Returns the record hashes."""
        with self.transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'energy_pinned_to'").fetchone()
            if row is not None:
                start = int(float(row[0]))
            else:
                first = self._db.execute("SELECT MIN(minute_ts) FROM energy_minute").fetchone()[0]
                if first is None:
                    return []
                start = period_start(first, QUARTER_S)
            hashes: list[str] = []
            while start + QUARTER_S <= upto:
                nxt = self._db.execute(
                    "SELECT MIN(minute_ts) FROM energy_minute WHERE minute_ts >= ?", (start,)
                ).fetchone()[0]
                if nxt is None:
                    break
                if nxt >= start + QUARTER_S:  # nothing stored in this quarter: jump to the next that has some
                    start = period_start(nxt, QUARTER_S)
                    continue
                hashes.append(self.close_energy_period(start, start + QUARTER_S, ts))
                start += QUARTER_S
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('energy_pinned_to', ?)", (repr(float(start)),))
            return hashes

    # ------------------------------------------------------------------ export bookkeeping and retention
    def export_watermark(self) -> float | None:
        """Everything older than this has been exported (None: nothing yet)."""
        row = self._read(lambda db: db.execute("SELECT value FROM meta WHERE key = 'export_watermark'").fetchone())
        return None if row is None else float(row[0])

    def mark_exported(self, start: float, end: float, fmt: str, digest: str, now: float) -> float | None:
        """Record a written export of [start, end); advances the watermark over contiguous exports from the
        oldest data kept. Returns the new watermark.

        What an export holds ends at the time it was made (`now`): an export "to 2100" covers nothing written
        after it, so its range is recorded, and moves the watermark, only up to `now`."""
        if not end > start:
            raise ValueError("an export needs start < end")
        end = min(end, now)
        if not end > start:  # all of it after the export was made: nothing exported yet
            return self.export_watermark()
        with self.transaction():
            self._db.execute(
                "INSERT INTO exports (from_ts, to_ts, fmt, digest, exported_at) VALUES (?, ?, ?, ?, ?)",
                (start, end, fmt, digest, now),
            )
            row = self._db.execute("SELECT value FROM meta WHERE key = 'export_watermark'").fetchone()
            mark = float(row[0]) if row else self._oldest_data_ts()
            if mark is None:
                mark = start
            for lo, hi in self._db.execute("SELECT from_ts, to_ts FROM exports ORDER BY from_ts"):
                if lo <= mark < hi:
                    mark = hi
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('export_watermark', ?)", (repr(float(mark)),))
        return mark

    def _oldest_data_ts(self) -> float | None:
        a = self._db.execute("SELECT MIN(ts) FROM audit").fetchone()[0]
        e = self._db.execute("SELECT MIN(minute_ts) FROM energy_minute").fetchone()[0]
        found = [float(v) for v in (a, e) if v is not None]
        return min(found) if found else None

    def prune(self, now: float, *, retention_days: int | None = None) -> PruneResult:
        """Delete what is both older than the retention and already exported. Never touches command replies,
        open dispatches, identities or control memory. Heavy (chunked); safe in a thread."""
        days = self.retention_days if retention_days is None else retention_days
        mark = self.export_watermark()
        cutoff = min(now - days * DAY_S, mark if mark is not None else float("-inf"))
        if cutoff == float("-inf"):
            return PruneResult(cutoff, 0, 0, 0, 0)
        audit_n = self._prune_audit(cutoff, now)
        energy_n = self._delete_chunks("energy_minute", "minute_ts", "minute_ts + 60 <= ?", cutoff)
        miner_n = self._delete_chunks(
            "energy_miner_minute", "minute_ts", "minute_ts + 60 <= ?", cutoff, chunk=_PRUNE_CHUNK_BULK
        )
        disp_n = self._delete_chunks("dispatches", "rowid", "closed_at IS NOT NULL AND closed_at < ?", cutoff)
        return PruneResult(cutoff, audit_n, energy_n, miner_n, disp_n)

    def _prune_audit(self, cutoff: float, now: float) -> int:
        with self.transaction():
            row = self._db.execute("SELECT MIN(seq) FROM audit WHERE ts >= ?", (cutoff,)).fetchone()
            keep_from = row[0] if row[0] is not None else self._head[0] + 1
            last = self._db.execute(
                "SELECT seq, hash FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT 1", (keep_from,)
            ).fetchone()
            if last is None:
                return 0
            count = self._db.execute("DELETE FROM audit WHERE seq <= ?", (last[0],)).rowcount
            self._db.execute("UPDATE audit_head SET anchor_seq = ?, anchor_hash = ?", (last[0], last[1]))
            self.append_audit(
                "prune", {"cutoff": cutoff, "deleted_through_seq": int(last[0]), "anchor_hash": last[1]}, now
            )
        return count

    def _delete_chunks(self, table: str, key: str, where: str, cutoff: float, *, chunk: int = _PRUNE_CHUNK) -> int:
        deleted = 0
        while True:
            with self.transaction():
                n = self._db.execute(
                    f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where} LIMIT ?)",
                    (cutoff, chunk),
                ).rowcount
            deleted += n
            if n < chunk:
                return deleted
            time.sleep(0)  # let the control loop's writes, waiting on our lock, in between chunks

    # ------------------------------------------------------------------ export
    def export(
        self,
        start: float,
        end: float,
        fmt: ExportFormat,
        *,
        now: float,
        site_id: str = "",
        per_miner: bool = False,
        public_keys: Sequence[Ed25519PublicKey] | None = None,
    ) -> dict[str, bytes]:
        """The export of [start, end) as files (name -> bytes); see agent/io/export.py. Read-only and heavy: the
        caller writes the files, then calls `mark_exported(start, end, fmt, export.digest(files), now)`."""
        if not end > start:
            raise ValueError("an export needs --from before --to")
        data = self.export_data(start, end, per_miner=per_miner)
        meta = {
            "site_id": site_id,
            "from": start,
            "from_utc": iso(start),
            "to": end,
            "to_utc": iso(end),
            "generated_at": now,
            "generated_utc": iso(now),
            "chain": self.verify_audit(public_keys, full_check=False).to_dict(),
        }
        return render(data, meta, fmt)

    # ------------------------------------------------------------------ export data
    def export_data(self, start: float, end: float, *, per_miner: bool = False) -> dict[str, Any]:
        """Everything a regulator asks for over [start, end), as plain data (see agent/io/export.py). Heavy."""
        with self._reader() as db:
            records = [r.to_dict() for r in _audit_rows(db, start, end, None)]
            rows = db.execute(
                f"SELECT {', '.join(_DISPATCH_COLUMNS)} FROM dispatches WHERE start_ts < ? "
                "AND (COALESCE(end_ts, closed_at) IS NULL OR COALESCE(end_ts, closed_at) >= ?) ORDER BY rowid",
                (end, start),
            ).fetchall()
            minutes = _energy_minutes(db, start, end)
            heads = [dict(json.loads(r[0])) for r in db.execute("SELECT doc FROM audit_days ORDER BY day")]
        data: dict[str, Any] = {
            "audit": records,
            "dispatches": [_dispatch_record(r).to_dict() for r in rows],
            "energy_quarter_hours": [p.to_dict() for p in rollup(minutes, QUARTER_S)],
            "energy_days": [p.to_dict() for p in rollup(minutes, DAY_S)],
            "energy_total": total(minutes, int(start), int(end - start)).to_dict(),
            "signed_heads": heads,
        }
        if per_miner:
            by_day = self.energy_per_miner(start, end, DAY_S)
            data["energy_miner_days"] = [
                {"day": day, "ip": ip, "kwh": t.kwh, "estimated_kwh": t.estimated_kwh, "minutes": t.minutes}
                for day, miners in by_day.items()
                for ip, t in sorted(miners.items())
            ]
        return data


# ---------------------------------------------------------------------------------------------- helpers
def _chain_head(db: sqlite3.Connection) -> tuple[int, str]:
    """(seq, hash) to append after: the recorded head or the last record, whichever is further on (a mismatch is
    for verify_audit to report, not for the writer to hide)."""
    head = db.execute("SELECT seq, hash FROM audit_head").fetchone()
    top = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if top is not None and int(top[0]) > int(head[0]):
        return int(top[0]), str(top[1])
    return int(head[0]), str(head[1])


def _day_name(day_start: int) -> str:
    return datetime.datetime.fromtimestamp(day_start, datetime.UTC).strftime("%Y-%m-%d")


def _dispatch_record(row: Sequence[Any]) -> DispatchRecord:
    values = dict(zip(_DISPATCH_COLUMNS, row, strict=True))
    progress = {k: values[k] for k in PROGRESS_FIELDS}
    return DispatchRecord(dispatch_from_values(values), str(values["status"]), progress)


def _audit_rows(
    db: sqlite3.Connection, start: float | None, end: float | None, limit: int | None
) -> Iterator[AuditRecord]:
    lo = float("-inf") if start is None else start
    hi = float("inf") if end is None else end
    sql = "SELECT seq, ts, kind, data, prev_hash, hash FROM audit WHERE ts >= ? AND ts < ? ORDER BY seq"
    params: list[Any] = [lo, hi]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    for seq, ts, kind, data, prev, h in db.execute(sql, params):
        yield AuditRecord(int(seq), float(ts), str(kind), dict(json.loads(data)), str(prev), str(h))


def _energy_minutes(db: sqlite3.Connection, start: float, end: float) -> list[EnergyMinute]:
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


def _decode_miner_row(
    count: int, blob: bytes, bits: bytes, n: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The stored arrays widened to the current miner count (miners added later have no data)."""
    kwh = np.full(n, np.nan, dtype=np.float64)
    kwh[:count] = np.frombuffer(blob, dtype="<f4", count=count)
    est = np.zeros(n, dtype=bool)
    est[:count] = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=count).astype(bool)
    return kwh, est


# ---------------------------------------------------------------------------------------------- verification
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
    file_problem = check_file(path)
    full_size = _header_size(path)
    if file_problem and full_size and path.stat().st_size < full_size:
        with tempfile.TemporaryDirectory(prefix="hashflex-verify-") as tmp:
            padded = Path(tmp) / path.name
            shutil.copyfile(path, padded)
            with padded.open("r+b") as f:
                f.truncate(full_size)
            return _verify_file(padded, public_keys, full_check, [file_problem], cause=file_problem)
    return _verify_file(path, public_keys, full_check, [file_problem] if file_problem else [], cause=file_problem)


def _header_size(path: Path) -> int | None:
    """The size the header says the file has (None when it cannot say: WAL frames pending, stale header)."""
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError:
        return None
    wal = Path(f"{path}-wal")
    if len(header) < 100 or (wal.exists() and wal.stat().st_size > 0):
        return None
    (raw_page,) = struct.unpack(">H", header[16:18])
    (change, pages) = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if change != valid_for or raw_page not in {1} | {1 << k for k in range(9, 16)}:
        return None
    return int(pages) * (65536 if raw_page == 1 else int(raw_page))


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
        db = _connect(path, readonly=True)
    except sqlite3.Error as exc:
        verifier.fail_at(1, f"{path}: cannot open: {exc}")
        return verifier.result(problems)
    heads_checked = 0
    try:
        try:
            found = _quick_check(db, include_bulk=full_check)
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
            t = total(_energy_minutes(db, start, end), int(start), int(end - start))
            for name in _PINNED_ENERGY:
                value, pinned = getattr(t, name), data.get(name)
                if isinstance(pinned, int | float) and abs(value - pinned) > _ENERGY_TOLERANCE_KWH:
                    problems.append(
                        f"energy rows {start}..{end} were changed after record {seq} pinned them "
                        f"({name}: stored {value:.6f}, audited {pinned:.6f})"
                    )
                    break
    except sqlite3.DatabaseError as exc:
        problems.append(f"energy rows cannot be read: {exc}")
    return problems
