"""The Store: one writing connection, its lock and its transactions; each topic's SQL is in its own module
(control, audit, energy, export, retention), called here with the connection."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hashflex.agent.core.audit import AuditRecord, VerifyResult
from hashflex.agent.core.energy import (
    QUARTER_S,
    EnergyMinute,
    EnergyPeriod,
    MinerMinute,
    MinerTotal,
    rollup,
    total,
)
from hashflex.agent.core.model import Dispatch
from hashflex.agent.io.export import ExportFormat
from hashflex.agent.io.records import DispatchRecord, MinerControl
from hashflex.agent.io.store import audit, control, energy, export, retention
from hashflex.agent.io.store.database import (
    DEFAULT_BUSY_TIMEOUT_MS,
    SQLITE_READONLY,
    StoreCorrupt,
    StoreError,
    check_file,
    classify,
    connect,
    connect_existing,
    create_fresh,
    migrate,
    quick_check,
    writer_pragmas,
)
from hashflex.agent.io.store.retention import PRUNE_CHUNK, PRUNE_CHUNK_BULK, PruneResult
from hashflex.agent.io.store.verify import verify_database
from hashflex.drivers.base import Identity

T = TypeVar("T")


class Store:
    """See the package docstring. Build with `Store.open(path)`; every method is synchronous."""

    def __init__(self, path: Path, db: sqlite3.Connection, retention_days: int) -> None:
        self.path = path
        self.retention_days = retention_days
        self._db = db
        self._lock = threading.RLock()
        self._depth = 0
        self._closed = False
        self._busy_timeout_ms = DEFAULT_BUSY_TIMEOUT_MS
        # SQLite refused a write as read-only: this connection may be read-only for good (SQLite opens a file it
        # cannot write read-only, and never upgrades that connection), so the next write reopens it (`_reopen`)
        self._stale = False
        self._head: tuple[int, str] = audit.chain_head(db)
        self._miner_idx: dict[str, int] = energy.miner_index(db)

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
                create_fresh(path)
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
            db = connect(path, readonly=False)
        except sqlite3.Error as exc:
            raise classify(path, exc, "cannot open") from exc
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL mode (got {mode!r}); is the directory writable?")
            writer_pragmas(db)
            if check:
                problems = quick_check(db, include_bulk=False)
                if problems:
                    raise StoreCorrupt(f"{path}: integrity check failed: {'; '.join(problems[:5])}")
            migrate(db)
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
                self._head = audit.chain_head(self._db)
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
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_READONLY:
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
            db = connect_existing(self.path, self._busy_timeout_ms)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # (if even that fails, the next write tries again)
                self._db = connect(self.path, readonly=True, busy_timeout_ms=self._busy_timeout_ms)
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
        writer_pragmas(db)
        self._miner_idx = energy.miner_index(db)
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
            db = connect(self.path, readonly=True)
        try:
            with self._guard():
                yield db
        finally:
            db.close()

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

    # ------------------------------------------------------------------ kv state
    def get_state(self, key: str, default: Any = None) -> Any:
        return self._read(lambda db: control.get_state(db, key, default))

    def set_state(self, key: str, value: Any, ts: float = 0.0) -> None:
        text = control.state_text(key, value)
        with self.transaction():
            control.set_state(self._db, key, text, ts)

    # the newest applied issue time per command order key (agent.commands.Command.order_key): kept durably, so a
    # stale or replayed signed command is refused after a restart too
    def newest_issued(self, order_key: str) -> float | None:
        value = self.get_state(f"issued:{order_key}")
        return float(value) if isinstance(value, int | float) else None

    def set_newest_issued(self, order_key: str, issued_at: float, ts: float) -> None:
        self.set_state(f"issued:{order_key}", float(issued_at), ts)

    def delete_state(self, key: str) -> None:
        with self.transaction():
            control.delete_state(self._db, key)

    # ------------------------------------------------------------------ command replies (idempotency)
    def get_reply(self, cmd_id: str) -> dict[str, Any] | None:
        return self._read(lambda db: control.get_reply(db, cmd_id))

    def put_reply(self, cmd_id: str, verb: str, reply: Mapping[str, Any], ts: float) -> dict[str, Any]:
        """Keep the reply to `cmd_id` forever. The first reply stored wins; returns the reply now stored."""
        text = control.reply_text(cmd_id, reply)
        with self.transaction():
            return control.put_reply(self._db, cmd_id, verb, text, ts)

    # ------------------------------------------------------------------ dispatches (and operator overrides)
    def save_dispatch(self, dispatch: Dispatch, status: str, **progress: Any) -> None:
        """Insert, or replace the dispatch fields and status of the same id; progress fields given are set,
        the others keep their stored values."""
        row = control.dispatch_row(dispatch, status, progress)
        with self.transaction():
            control.save_dispatch(self._db, row)

    def update_dispatch(self, dispatch_id: str, *, status: str | None = None, **progress: Any) -> None:
        """Set the status and/or progress fields of a stored dispatch; KeyError when the id is unknown."""
        fields = control.dispatch_fields(status, progress)
        if not fields:
            return
        with self.transaction():
            control.update_dispatch(self._db, dispatch_id, fields)

    def load_dispatches(self, active_only: bool = True) -> list[DispatchRecord]:
        """Stored dispatches in the order they were first saved; `active_only` = not closed."""
        records = self._read(control.load_dispatches)
        return [r for r in records if r.open] if active_only else records

    def get_dispatch(self, dispatch_id: str) -> DispatchRecord | None:
        return self._read(lambda db: control.get_dispatch(db, dispatch_id))

    # ------------------------------------------------------------------ identities
    def save_identities(self, identities: Iterable[Identity]) -> None:
        rows = control.identity_rows(identities)
        with self.transaction():
            control.save_identities(self._db, rows)

    def load_identities(self) -> list[Identity]:
        return self._read(control.load_identities)

    def forget_identities(self, ips: Iterable[str]) -> None:
        with self.transaction():
            control.forget_identities(self._db, ips)

    # ------------------------------------------------------------------ miner control memory
    def save_controls(self, controls: Mapping[str, MinerControl], *, replace: bool = False) -> None:
        """Upsert what the agent did to these miners; `replace=True` also forgets every miner not given."""
        rows = control.control_rows(controls)
        with self.transaction():
            control.save_controls(self._db, rows, replace=replace)

    def clear_controls(self, ips: Iterable[str]) -> None:
        """Forget miners the agent no longer holds down (woken, back at full power)."""
        with self.transaction():
            control.clear_controls(self._db, ips)

    def load_controls(self) -> dict[str, MinerControl]:
        return self._read(control.load_controls)

    # ------------------------------------------------------------------ audit
    def append_audit(self, kind: str, data: Mapping[str, Any], ts: float) -> str:
        """Append one record to the chain (durably); returns its hash. ValueError on bad kind/data."""
        with self.transaction():
            rec = audit.append(self._db, self._head, kind, data, ts)
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
            return list(audit.records(db, start, end, limit))

    def verify_audit(
        self, public_keys: Sequence[Ed25519PublicKey] | None = None, *, full_check: bool = True
    ) -> VerifyResult:
        """Check the whole chain, the energy it pins and the signed daily heads. Heavy."""
        return verify_database(self.path, public_keys, full_check=full_check)

    def sign_pending_heads(self, key: Ed25519PrivateKey, site_id: str, now: float) -> list[str]:
        """Sign the chain head at the end of every whole UTC day not signed yet; returns the days signed."""

        def save(head: audit.SignedHead) -> None:
            with self.transaction():
                audit.save_head(self._db, head, now)

        with self._lock, self._guard():
            return audit.sign_pending_heads(self._db, key, site_id, now, save)

    def signed_heads(self) -> list[dict[str, Any]]:
        return self._read(audit.signed_heads)

    # ------------------------------------------------------------------ energy
    def record_energy_minute(self, minute: EnergyMinute, per_miner: Mapping[str, MinerMinute] | None = None) -> None:
        """Store a site minute and its per-miner split. A minute stored twice (a restart inside it) is added up, and
        labelled with the least direct source of the two (SOURCES order)."""
        row = energy.minute_row(minute)
        with self._relaxed(), self.transaction():
            energy.add_minute(self._db, row)
            if per_miner:
                energy.add_miner_minute(self._db, self._miner_idx, minute.minute_ts, per_miner)

    def energy_minutes(self, start: float, end: float) -> list[EnergyMinute]:
        """Site minutes with start <= minute_ts < end."""
        with self._reader() as db:
            return energy.minutes(db, start, end)

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
            return energy.per_miner(db, start, end, period_s)

    def close_energy_period(self, start: int, end: int, ts: float) -> str:
        """Pin the stored site energy of [start, end) into the audit chain (kind `energy`); returns the record
        hash. `verify_audit` later recomputes these totals from the energy table, so editing it is detected."""
        with self.transaction():
            return self.append_audit("energy", energy.pinned_totals(self._db, start, end), ts)

    def pin_energy_until(self, upto: float, ts: float) -> list[str]:
        """Pin every quarter hour that ends at or before `upto` and is not pinned yet (close_energy_period), in
        order; quarters with no stored minute (the agent was down) are skipped. The caller guarantees no minute
        before `upto` can still arrive. Returns the record hashes."""
        with self.transaction():
            return energy.pin_until(self._db, upto, lambda start, end: self.close_energy_period(start, end, ts))

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
        chain = self.verify_audit(public_keys, full_check=False)
        return export.files(data, chain, fmt, start=start, end=end, now=now, site_id=site_id)

    def export_data(self, start: float, end: float, *, per_miner: bool = False) -> dict[str, Any]:
        """Everything a regulator asks for over [start, end), as plain data (see agent/io/export.py). Heavy."""
        with self._reader() as db:
            return export.export_data(db, start, end, per_miner=per_miner)

    # ------------------------------------------------------------------ export bookkeeping and retention
    def export_watermark(self) -> float | None:
        """Everything older than this has been exported (None: nothing yet)."""
        return self._read(export.watermark)

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
            return export.mark_exported(self._db, start, end, fmt=fmt, digest=digest, now=now)

    def prune(self, now: float, *, retention_days: int | None = None) -> PruneResult:
        """Delete what is both older than the retention and already exported. Never touches command replies,
        open dispatches, identities or control memory. Heavy (chunked); safe in a thread."""
        days = self.retention_days if retention_days is None else retention_days
        cutoff = retention.prune_cutoff(now, days, self.export_watermark())
        if cutoff == float("-inf"):
            return PruneResult(cutoff, 0, 0, 0, 0)
        audit_n = self._prune_audit(cutoff, now)
        energy_n = self._delete_chunks("energy_minute", "minute_ts", "minute_ts + 60 <= ?", cutoff)
        miner_n = self._delete_chunks(
            "energy_miner_minute", "minute_ts", "minute_ts + 60 <= ?", cutoff, chunk=PRUNE_CHUNK_BULK
        )
        disp_n = self._delete_chunks("dispatches", "rowid", "closed_at IS NOT NULL AND closed_at < ?", cutoff)
        return PruneResult(cutoff, audit_n, energy_n, miner_n, disp_n)

    def _prune_audit(self, cutoff: float, now: float) -> int:
        with self.transaction():
            cut = audit.cut_before(self._db, cutoff, self._head)
            if cut is None:
                return 0
            count, last_seq, anchor_hash = cut
            self.append_audit(
                "prune", {"cutoff": cutoff, "deleted_through_seq": last_seq, "anchor_hash": anchor_hash}, now
            )
        return count

    def _delete_chunks(self, table: str, key: str, where: str, cutoff: float, *, chunk: int = PRUNE_CHUNK) -> int:
        deleted = 0
        while True:
            with self.transaction():
                n = retention.delete_chunk(self._db, table, key, where, cutoff=cutoff, chunk=chunk)
            deleted += n
            if n < chunk:
                return deleted
            time.sleep(0)  # let the control loop's writes, waiting on our lock, in between chunks
