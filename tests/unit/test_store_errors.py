"""The state store under faults that are not corruption (issue 12, findings 1, 4, 6, 12), on real SQLite on disk.

A full disk, a write lock held by another process, a read-only directory: the store says "cannot use it now"
(StoreUnavailable), never "corrupt", so the agent retries and alarms instead of moving a healthy database aside.
Only SQLite's own CORRUPT / NOTADB and the header and quick_check findings are corruption. Also: two writers on one
file keep one chain; an export watermark never moves past the export's own time; an export never writes through a
planted symlink; logged tracebacks carry no frame locals.

Root only (mount): the tmpfs tests mount a small file system in the test's folder and unmount it after.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hashflex.agent.app import open_store
from hashflex.agent.config import load_config
from hashflex.agent.core.energy import DAY_S, EnergyMinute, MinerMinute
from hashflex.agent.io import store as store_mod
from hashflex.agent.io.store import Store, StoreCorrupt, StoreUnavailable
from hashflex.agent.logging import configure_logging, get_logger
from hashflex.agent.runtime.clock import WallClock
from hashflex.agent.runtime.housekeeping import Housekeeping
from hashflex.agent.runtime.persist import WriteBehind
from tests.fsfaults import fill, locked, tmpfs
from tests.store_support import hashflex, write_config

T0 = 1_700_000_000.0


class FixedClock(WallClock):
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "fs", "2m") as fs:
        yield fs


def _seed(db: Path, records: int = 10) -> None:
    with Store.open(db) as s:
        for i in range(records):
            s.append_audit("actions", {"i": i, "pad": "x" * 500}, T0 + i)


def _config(folder: Path, state: Path) -> Path:
    path = folder / "site.yaml"
    path.write_text(f"site: {{id: faults, cap_kw: 100}}\nmqtt: {{enabled: false}}\nstate_dir: {state}\n")
    return path


# ---------------------------------------------------------------------------------------------- finding 1
def test_a_full_disk_at_open_is_unavailable_not_corrupt_and_the_file_stays(small_fs: Path, tmp_path: Path) -> None:
    db = small_fs / "hashflex.db"
    _seed(db)
    before = db.read_bytes()
    ballast = fill(small_fs)
    cfg = load_config(_config(tmp_path, small_fs))
    with pytest.raises(StoreUnavailable):
        open_store(cfg)
    assert sorted(p.name for p in small_fs.iterdir() if "corrupt" in p.name) == []
    assert db.read_bytes() == before, "a healthy database was touched"
    ballast.unlink()
    store, why = open_store(cfg)  # space is back: the same database, no safe start
    with store:
        assert why is None
        assert store.audit_head()[0] == 10


def test_a_database_locked_by_another_process_is_unavailable_not_corrupt(tmp_path: Path) -> None:
    db = tmp_path / "state" / "hashflex.db"
    _seed(db)
    cfg = load_config(_config(tmp_path, db.parent))
    with locked(db, "exclusive"), pytest.raises(StoreUnavailable):
        open_store(cfg)
    assert [p.name for p in db.parent.iterdir() if "corrupt" in p.name] == []
    store, why = open_store(cfg)
    with store:
        assert why is None
        assert store.audit_head()[0] == 10


def test_a_read_only_state_directory_is_unavailable_not_corrupt(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "2m") as ro:
        _seed(ro / "hashflex.db")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)  # root ignores permission bits
        cfg = load_config(_config(tmp_path, ro))

        def open_and_write() -> None:
            store, _why = open_store(cfg)
            store.append_audit("actions", {}, T0)  # if it opens at all, the first write says so

        with pytest.raises(StoreUnavailable):
            open_and_write()
        assert [p.name for p in ro.iterdir() if "corrupt" in p.name] == []


def test_a_write_that_fills_the_disk_mid_transaction_is_unavailable_and_the_store_carries_on(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _seed(db, 2)
    with Store.open(db) as s:
        pages = s._read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        s._read(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}"))

        def nested_writes() -> None:
            with s.transaction():
                s.set_state("n", 1)
                with s.transaction():
                    for i in range(50):
                        s.append_audit("actions", {"i": i, "pad": "y" * 2000}, T0 + 100 + i)

        with pytest.raises(StoreUnavailable):
            nested_writes()
        assert s.audit_head()[0] == 2
        assert s.get_state("n") is None
        s._read(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        s.append_audit("actions", {"after": True}, T0 + 200)
    assert store_mod.verify_database(db).ok


def test_real_corruption_is_still_corruption(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _seed(db, 50)
    with db.open("r+b") as f:  # a whole page of the audit table overwritten: header and size still fine
        f.seek(4096 * 3)
        f.write(b"\xa5" * 4096)
    with pytest.raises(StoreCorrupt):
        Store.open(db)


def test_a_locked_database_fails_a_write_at_once_instead_of_blocking_for_seconds(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _seed(db, 1)
    with Store.open(db, busy_timeout_ms=5) as s, locked(db):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            s.append_audit("actions", {"blocked": True}, T0 + 5)
        assert time.monotonic() - started < 2.0  # the old 10 s busy timeout on the loop thread is gone
    with Store.open(db) as s:
        s.append_audit("actions", {"after": True}, T0 + 6)


# ---------------------------------------------------------------------------------------------- safe start marker
def test_a_pending_safe_start_survives_the_loss_of_the_new_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = state / "hashflex.db"
    _seed(db)
    with db.open("r+b") as f:
        f.write(b"\0" * 100)
    cfg = load_config(_config(tmp_path, state))
    store, why = open_store(cfg)
    store.close()
    assert why is not None
    assert "corrupt" in why
    db.unlink()  # the fresh database is lost too (or an old backup without the safe start is put back)
    store, why_again = open_store(cfg)
    store.close()
    assert why_again is not None, "the next start must stay safe until resume"
    assert "corrupt" in why_again
    store_mod.clear_safe_start(state)
    store, why_after = open_store(cfg)
    store.close()
    assert why_after is None


# ---------------------------------------------------------------------------------------------- finding 4
def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _seed(db, 1)
    with Store.open(db) as a, Store.open(db) as b:
        for i in range(5):
            a.append_audit("actions", {"by": "a", "i": i}, T0 + 10 + i)
            b.append_audit("actions", {"by": "b", "i": i}, T0 + 10 + i)
    result = store_mod.verify_database(db)
    assert result.ok, result.reason
    assert result.records == 11


# ---------------------------------------------------------------------------------------------- finding 6
def test_an_export_to_the_far_future_moves_the_watermark_only_to_the_export_time(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _seed(db, 3)
    far = 4_102_444_800.0  # 2100-01-01
    with Store.open(db) as s:
        mark = s.mark_exported(T0 - DAY_S, far, "json", "d" * 64, T0 + 50)
        assert mark is not None
        assert mark <= T0 + 50
        s.append_audit("actions", {"written after the export": True}, T0 + 60)
        s.prune(T0 + 400 * DAY_S, retention_days=1)
        kept = [r.data for r in s.audit_records()]
    assert {"written after the export": True} in kept, "a record written after the export was pruned unexported"


# ---------------------------------------------------------------------------------------------- finding 12
@pytest.mark.parametrize(("fmt", "name"), [("json", "export.json"), ("csv", "export.zip")])
def test_export_never_writes_through_a_planted_symlink(tmp_path: Path, fmt: str, name: str) -> None:
    config = write_config(tmp_path)
    with Store.open(tmp_path / "state" / "hashflex.db") as s:
        s.append_audit("actions", {"n": 1}, T0)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{name}.tmp").symlink_to(victim)
    result = hashflex(
        "audit",
        "export",
        "--config",
        str(config),
        "--from",
        str(T0 - 10),
        "--to",
        str(T0 + 10),
        "--format",
        fmt,
        "--out",
        str(out / name),
    )
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious\n"
    assert (out / name).stat().st_size > 0
    assert not (out / name).is_symlink()


def test_logged_tracebacks_carry_no_frame_locals(tmp_path: Path) -> None:
    for as_json in (True, False):
        buf = io.StringIO()
        configure_logging(force_json=as_json, stream=buf)
        try:
            password = "-".join(("hunter2", "secret"))  # built, so the traceback's source lines do not show it
            raise RuntimeError(f"login failed ({len(password)} chars)")
        except RuntimeError:
            get_logger("test").exception("login failed")
        text = buf.getvalue()
        assert "login failed" in text
        assert "hunter2-secret" not in text, text
        if as_json:
            doc = json.loads(text.strip().splitlines()[-1])
            assert doc["exception"], doc
    configure_logging(force_json=True)


async def test_a_prune_the_locked_store_refused_is_retried_at_the_next_round(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _seed(db, 5)
    now = T0 + 10 * DAY_S
    with Store.open(db, retention_days=1, busy_timeout_ms=5) as store:
        store.mark_exported(T0 - 100, T0 + DAY_S, "json", "d" * 64, T0 + DAY_S)
        keeper = Housekeeping(store, FixedClock(now), "faults", None)
        with locked(db):
            await keeper.once()
        assert [r.kind for r in store.audit_records()].count("prune") == 0
        await keeper.once()  # an hour later, not a day: the prune the lock refused goes through now
        assert [r.kind for r in store.audit_records()].count("prune") == 1


def test_the_write_behind_keeps_refused_writes_in_order_and_stores_them_when_the_store_is_back(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    _seed(db, 1)
    with Store.open(db) as store:
        persist = WriteBehind(store, retry_every_s=3600.0)
        pages = store._read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        store._read(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
        for i in range(5):
            persist.audit("actions", {"i": i, "pad": "z" * 9000}, T0 + 10 + i)
        assert persist.backlog == 5
        assert persist.error is not None
        assert not persist.flush()  # not before the retry interval
        assert not persist.flush(force=True)  # still full
        store._read(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        assert persist.flush(force=True)
        assert persist.error is None
        assert persist.backlog == 0
        assert [r.data.get("i") for r in store.audit_records()][1:] == [0, 1, 2, 3, 4]
    assert store_mod.verify_database(db).ok


def test_a_prune_of_many_per_miner_minutes_deletes_them_all_in_small_chunks(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    t0 = int(T0 // 60 * 60)
    with Store.open(db, retention_days=1) as store:
        for m in range(150):  # more than two of the bulky table's chunks
            minute = EnergyMinute(t0 + 60 * m, 1.0, 1.0, 0.0, 60.0, 0.0, 0.0, 0.0, 60.0, 1)
            store.record_energy_minute(minute, {f"127.0.0.{i + 1}": MinerMinute(0.01, True) for i in range(3)})
        store.mark_exported(t0 - 60, t0 + 200 * 60, "json", "d" * 64, t0 + 200 * 60)
        result = store.prune(t0 + 400 * DAY_S)
        assert result.miner_minutes == 150
        assert result.energy_minutes == 150
        assert store.energy_per_miner(t0, t0 + 200 * 60) == {}
    assert store_mod.verify_database(db).ok
