"""The state store on a real SQLite file: what survives a restart, transactions, idempotency, damage on open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hashflex.agent.core.model import Dispatch, Source
from hashflex.agent.io.records import MinerControl
from hashflex.agent.io.store import SCHEMA_VERSION, Store, StoreCorrupt, StoreError
from hashflex.drivers.base import Family, Identity, OnOff, PowerRange, Presets

T = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "hashflex.db"


def grid_dispatch(did: str = "d1", **kw: object) -> Dispatch:
    fields: dict[str, object] = {"source": Source.GRID, "issued_at": T, "start": T, "end": T + 3600, "target_kw": 500.0}
    fields.update(kw)
    return Dispatch(id=did, **fields)  # type: ignore[arg-type]


def test_a_missing_file_creates_a_fresh_database_in_wal_mode(db_path: Path) -> None:
    with Store.open(db_path) as store:
        assert store.get_state("anything") is None
        assert store.audit_head() == (0, "0" * 64)
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()
    leftovers = [p.name for p in db_path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary build file was renamed into place


def test_open_without_create_refuses_a_missing_file(db_path: Path) -> None:
    with pytest.raises(StoreError, match="no state database"):
        Store.open(db_path, create=False)
    assert not db_path.exists()


def test_state_survives_a_restart(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.set_state("runtime_cap_kw", 1234.5, T)
        store.set_state("failsafe", {"active": True, "since": T, "reason": "heartbeat lost"}, T)
        store.set_state("counters", {"ticks": 10}, T)
        store.set_state("counters", {"ticks": 11}, T + 1)
    with Store.open(db_path) as store:
        assert store.get_state("runtime_cap_kw") == 1234.5
        assert store.get_state("failsafe") == {"active": True, "since": T, "reason": "heartbeat lost"}
        assert store.get_state("counters") == {"ticks": 11}
        assert store.get_state("missing", "default") == "default"


def test_bad_state_is_refused_and_changes_nothing(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.set_state("cap", 10.0)
        with pytest.raises(ValueError, match="not plain JSON"):
            store.set_state("cap", {"x": float("nan")})
        with pytest.raises(ValueError, match="non-empty"):
            store.set_state("", 1)
        assert store.get_state("cap") == 10.0


def test_a_repeated_command_id_gets_the_first_reply_forever(db_path: Path) -> None:
    with Store.open(db_path) as store:
        first = {"id": "c1", "status": "ok", "data": {"dispatch": "d1"}}
        assert store.put_reply("c1", "dispatch", first, T) == first
        assert store.put_reply("c1", "dispatch", {"id": "c1", "status": "error"}, T + 5) == first
        store.save_dispatch(grid_dispatch(), "active", received_at=T)
        store.update_dispatch("d1", status="cancelled", closed_at=T + 60, close_reason="cancel c2")
        store.prune(T + 10 * 365 * 86400, retention_days=1)  # even a prune never forgets a reply
    with Store.open(db_path) as store:
        assert store.get_reply("c1") == first
        assert store.get_reply("c2") is None


def test_dispatches_and_their_progress_survive_a_restart(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.save_dispatch(grid_dispatch("d1"), "active", received_at=T, accepted_at=T + 0.1, channel="mqtt")
        store.update_dispatch("d1", commands_sent_at=T + 0.5, target_met_at=T + 40, max_overshoot_kw=12.5)
        store.save_dispatch(grid_dispatch("d2", target_kw=None, curtail_kw=200.0, baseline_kw=900.0), "pending")
        store.save_dispatch(
            grid_dispatch("op-1", source=Source.OPERATOR, end=None, target_kw=100.0), "active", received_at=T
        )
        store.update_dispatch("d2", status="expired", closed_at=T + 3600, close_reason="expired while down")
    with Store.open(db_path) as store:
        open_ones = store.load_dispatches()
        assert [r.dispatch.id for r in open_ones] == ["d1", "op-1"]
        d1, status, progress = open_ones[0].dispatch, open_ones[0].status, open_ones[0].progress()
        assert d1 == grid_dispatch("d1")
        assert status == "active"
        assert progress["commands_sent_at"] == T + 0.5
        assert progress["target_met_at"] == T + 40
        assert progress["max_overshoot_kw"] == 12.5
        assert progress["channel"] == "mqtt"
        assert open_ones[1].dispatch.source is Source.OPERATOR
        every = store.load_dispatches(active_only=False)
        assert [r.dispatch.id for r in every] == ["d1", "d2", "op-1"]
        d2 = store.get_dispatch("d2")
        assert d2 is not None
        assert d2.dispatch.level_kw() == 700.0
        assert d2.progress()["close_reason"] == "expired while down"
        assert d2.to_dict()["time_to_target_s"] is None
        assert every[0].to_dict()["time_to_target_s"] == pytest.approx(39.9)


def test_a_new_revision_replaces_the_dispatch_and_keeps_its_progress(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.save_dispatch(grid_dispatch("d1"), "active", received_at=T, commands_sent_at=T + 1)
        store.save_dispatch(grid_dispatch("d1", rev=1, target_kw=300.0), "active")
        (record,) = store.load_dispatches()
        assert (record.dispatch.rev, record.dispatch.target_kw) == (1, 300.0)
        assert record.progress()["commands_sent_at"] == T + 1


def test_bad_dispatch_writes_are_refused(db_path: Path) -> None:
    with Store.open(db_path) as store:
        with pytest.raises(KeyError, match="no stored dispatch"):
            store.update_dispatch("nope", status="active")
        store.save_dispatch(grid_dispatch(), "active")
        with pytest.raises(ValueError, match="unknown dispatch progress field"):
            store.update_dispatch("d1", target_met=T)
        with pytest.raises(ValueError, match="must be a number"):
            store.update_dispatch("d1", closed_at="soon")
        with pytest.raises(ValueError, match="exactly one of"):
            store.save_dispatch(grid_dispatch("d3", curtail_kw=5.0), "active")
        assert [r.dispatch.id for r in store.load_dispatches()] == ["d1"]
        assert store.get_dispatch("d1") is not None
        assert store.get_dispatch("d1").progress()["closed_at"] is None  # type: ignore[union-attr]


def test_identities_round_trip_with_their_capability(db_path: Path) -> None:
    idents = [
        Identity(
            "127.6.0.1",
            Family.LUXOS,
            "Bitmain",
            "S19j Pro",
            "2024.1",
            "LUXMinerS19jPro",
            Presets((2500, 3000, 3250)),
            3250.0,
            104.0,
            mac="aa:bb",
            serial="X1",
        ),
        Identity(
            "127.6.0.2",
            Family.WHATSMINER,
            "MicroBT",
            "M30S+",
            "v3",
            "BTMinerM30SPlus",
            PowerRange(1000, 3400, 10),
            3400.0,
            100.0,
        ),
        Identity(
            "127.6.0.3",
            Family.ANTMINER,
            "Bitmain",
            "S19",
            "stock",
            "BMMinerS19",
            OnOff(),
            3250.0,
            95.0,
            reports_power=False,
        ),
    ]
    with Store.open(db_path) as store:
        store.save_identities(idents)
        store.save_identities([idents[0]])  # idempotent upsert
    with Store.open(db_path) as store:
        assert store.load_identities() == idents
        store.forget_identities(["127.6.0.2"])
        assert [i.ip for i in store.load_identities()] == ["127.6.0.1", "127.6.0.3"]


def test_miner_control_memory_survives_a_restart(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.save_controls(
            {
                "127.6.0.1": MinerControl(asleep_by_us=True, since=T),
                "127.6.0.2": MinerControl(commanded_w=2500.0, since=T + 1),
                "127.6.0.3": MinerControl(asleep_by_us=True, since=T + 2, ignores_commands=True),
            }
        )
        store.clear_controls(["127.6.0.3"])
    with Store.open(db_path) as store:
        assert store.load_controls() == {
            "127.6.0.1": MinerControl(asleep_by_us=True, since=T),
            "127.6.0.2": MinerControl(commanded_w=2500.0, since=T + 1),
        }
        store.save_controls({"127.6.0.9": MinerControl(commanded_w=1000.0)}, replace=True)
        assert list(store.load_controls()) == ["127.6.0.9"]


def test_a_transaction_commits_everything_or_nothing(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.append_audit("agent_start", {"version": "t"}, T)
        head = store.audit_head()

        def interrupted() -> None:
            with store.transaction():
                store.save_dispatch(grid_dispatch(), "active", received_at=T)
                store.put_reply("c1", "dispatch", {"status": "ok"}, T)
                store.append_audit("command", {"id": "c1", "verdict": "ok"}, T)
                raise RuntimeError("crash between writes")

        with pytest.raises(RuntimeError, match="crash between writes"):
            interrupted()
        assert store.audit_head() == head
        assert store.load_dispatches() == []
        assert store.get_reply("c1") is None
        with store.transaction():
            store.save_dispatch(grid_dispatch(), "active", received_at=T)
            store.append_audit("command", {"id": "c1", "verdict": "ok"}, T)
        assert store.audit_head()[0] == 2
    with Store.open(db_path) as store:
        assert store.audit_head()[0] == 2
        assert store.verify_audit().ok


def test_a_failed_nested_block_rolls_back_only_itself(db_path: Path) -> None:
    with Store.open(db_path) as store, store.transaction():
        store.set_state("outer", 1)
        store.append_audit("alarm", {"n": 1}, T)

        def inner() -> None:
            with store.transaction():
                store.set_state("inner", 2)
                store.append_audit("not_a_kind", {}, T)

        with pytest.raises(ValueError, match="unknown audit kind"):
            inner()
        store.append_audit("alarm", {"n": 2}, T)
    with Store.open(db_path) as store:
        assert store.get_state("outer") == 1
        assert store.get_state("inner") is None
        assert [r.data["n"] for r in store.audit_records()] == [1, 2]
        assert store.verify_audit().ok


# ---------------------------------------------------------------------------------------------- damage on open
def _filled(db_path: Path, records: int = 300) -> None:
    with Store.open(db_path) as store:
        for i in range(records):
            store.append_audit("command", {"id": f"c{i}", "verdict": "ok", "pad": "x" * 200}, T + i)


def test_a_truncated_file_is_corrupt_on_open(db_path: Path) -> None:
    _filled(db_path)
    size = db_path.stat().st_size
    with db_path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreCorrupt, match="truncated"):
        Store.open(db_path)


def test_a_file_cut_mid_page_is_corrupt_on_open(db_path: Path) -> None:
    _filled(db_path)
    with db_path.open("r+b") as f:
        f.truncate(db_path.stat().st_size - 100)
    with pytest.raises(StoreCorrupt, match="mid-page"):
        Store.open(db_path)


def test_an_overwritten_page_is_corrupt_on_open(db_path: Path) -> None:
    _filled(db_path)
    with db_path.open("r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xde\xad\xbe\xef" * 1024)  # a torn write of garbage over one page
    with pytest.raises(StoreCorrupt):
        Store.open(db_path)


@pytest.mark.parametrize(("content", "message"), [(b"", "empty"), (b"hello, not a database" * 10, "not a SQLite")])
def test_an_empty_or_foreign_file_is_corrupt_not_a_fresh_start(db_path: Path, content: bytes, message: str) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    with pytest.raises(StoreCorrupt, match=message):
        Store.open(db_path)
    assert db_path.read_bytes() == content  # left as found, for inspection


def test_a_database_from_a_newer_hashflex_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer than this hashflex"):
        Store.open(db_path)


def test_writes_after_close_are_refused(db_path: Path) -> None:
    store = Store.open(db_path)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.set_state("x", 1)
