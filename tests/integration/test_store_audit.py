"""The audit trail on disk: `hashflex audit verify` finds a tampered, deleted, reordered or cut record, checks the
energy the chain pins and the signed daily heads, and survives a prune; `audit export` writes what was asked."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import zipfile
from pathlib import Path

import pytest

from hashflex.agent.core.energy import EnergyMinute, MinerMinute
from hashflex.agent.io.store import Store, verify_database
from hashflex.agent.runtime.clock import WallClock
from hashflex.agent.runtime.housekeeping import Housekeeping
from hashflex.contract import signing
from tests.store_support import hashflex, write_config

DAY0 = 1_700_006_400.0  # 2023-11-15T00:00Z, a UTC midnight
KINDS = ["command", "target_change", "actions", "compliance", "failsafe_enter", "failsafe_exit", "cap_change", "alarm"]


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """(config, db) with 60 records over three days and a few energy minutes."""
    config = write_config(tmp_path)
    db = tmp_path / "state" / "hashflex.db"
    with Store.open(db) as store:
        store.append_audit("agent_start", {"version": "test"}, DAY0)
        for i in range(1, 60):
            store.append_audit(KINDS[i % len(KINDS)], {"i": i, "detail": f"record {i}"}, DAY0 + i * 3600)
    return config, db


def raw(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


def verify_cli(config: Path) -> tuple[int, dict[str, object]]:
    result = hashflex("audit", "verify", "--config", str(config), "--json")
    return result.exit_code, json.loads(result.stdout)


def test_an_untouched_chain_verifies(site: tuple[Path, Path]) -> None:
    config, _ = site
    code, doc = verify_cli(config)
    assert code == 0
    assert doc["ok"] is True
    assert doc["records"] == 60
    assert doc["last_seq"] == 60
    human = hashflex("audit", "verify", "--config", str(config))
    assert human.exit_code == 0
    assert "audit chain OK: 60 records" in human.stdout


def test_verify_finds_a_tampered_record(site: tuple[Path, Path]) -> None:
    config, db = site
    raw(db, """UPDATE audit SET data = '{"detail":"record 17","i":17,"verdict":"forged"}' WHERE seq = 18""")
    code, doc = verify_cli(config)
    assert code == 1
    assert doc["broken_seq"] == 18
    assert "altered" in str(doc["reason"])
    human = hashflex("audit", "verify", "--config", str(config))
    assert human.exit_code == 1
    assert "BROKEN" in human.stderr
    assert "record 18" in human.stderr


def test_verify_finds_a_deleted_record(site: tuple[Path, Path]) -> None:
    config, db = site
    raw(db, "DELETE FROM audit WHERE seq = 30")
    code, doc = verify_cli(config)
    assert code == 1
    assert doc["broken_seq"] == 30
    assert "record 30 missing" in str(doc["reason"])


def test_verify_finds_a_deleted_last_record(site: tuple[Path, Path]) -> None:
    config, db = site
    raw(db, "DELETE FROM audit WHERE seq >= 58")
    code, doc = verify_cli(config)
    assert code == 1
    assert doc["broken_seq"] == 58
    assert "58..60 missing" in str(doc["reason"])


def test_verify_finds_two_reordered_records(site: tuple[Path, Path]) -> None:
    config, db = site
    raw(
        db,
        "UPDATE audit SET seq = -1 WHERE seq = 40",
        "UPDATE audit SET seq = 40 WHERE seq = 41",
        "UPDATE audit SET seq = 41 WHERE seq = -1",
    )
    code, doc = verify_cli(config)
    assert code == 1
    assert doc["broken_seq"] == 40


def test_verify_finds_swapped_contents(site: tuple[Path, Path]) -> None:
    config, db = site
    con = sqlite3.connect(db)
    a = con.execute("SELECT ts, kind, data, prev_hash, hash FROM audit WHERE seq = 10").fetchone()
    b = con.execute("SELECT ts, kind, data, prev_hash, hash FROM audit WHERE seq = 11").fetchone()
    con.execute("UPDATE audit SET ts=?, kind=?, data=?, prev_hash=?, hash=? WHERE seq = 10", b)
    con.execute("UPDATE audit SET ts=?, kind=?, data=?, prev_hash=?, hash=? WHERE seq = 11", a)
    con.commit()
    con.close()
    code, doc = verify_cli(config)
    assert code == 1
    assert doc["broken_seq"] == 10


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_verify_reports_a_truncated_file_without_crashing(site: tuple[Path, Path], keep: float) -> None:
    config, db = site
    with Store.open(db) as store:  # grow the file so the audit table spans many pages
        for i in range(2000):
            store.append_audit("alarm", {"i": i, "pad": "y" * 300}, DAY0 + 4 * 86400 + i)
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.truncate(int(size * keep) // 4096 * 4096)
    code, doc = verify_cli(config)
    assert code == 1
    assert doc["ok"] is False
    assert "the file is truncated" in str(doc["reason"])
    # the records before the cut still verify, and the first one lost is named against the recorded head
    assert isinstance(doc["broken_seq"], int)
    assert 60 < doc["broken_seq"] <= 2060
    assert doc["last_seq"] == doc["broken_seq"] - 1
    assert f"records {doc['broken_seq']}..2060" in str(doc["reason"])
    # the agent refuses to start on it too (tested in test_store.py); the energy and export commands say so
    energy = hashflex("energy", "--config", str(config), "--from", "0", "--to", "now")
    assert energy.exit_code == 2
    assert "truncated" in energy.stderr or "damaged" in energy.stderr


def test_verify_reports_a_missing_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, doc = verify_cli(config)
    assert code == 1
    assert "no state database" in str(doc["reason"])


# ---------------------------------------------------------------------------------------------- energy pinned
def _minute(ts: int, kwh: float) -> EnergyMinute:
    return EnergyMinute(ts, kwh, kwh * 0.9, kwh * 0.1, 60.0, 0.0, 0.0, 0.0, kwh * 60, 12)


def test_an_edited_energy_row_is_found_through_the_chain(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    q0 = int(DAY0)
    with Store.open(db) as store:
        for i in range(15):
            store.record_energy_minute(_minute(q0 + 60 * i, 1.0 + i / 100))
        store.close_energy_period(q0, q0 + 900, ts=q0 + 901)
        assert store.verify_audit().ok
    raw(db, f"UPDATE energy_minute SET kwh = kwh * 0.5 WHERE minute_ts = {q0 + 300}")
    result = verify_database(db)
    assert not result.ok
    assert "energy rows" in str(result.reason)
    assert "changed after record 1" in str(result.reason)


def test_quarter_hours_are_pinned_once_in_order_skipping_the_ones_with_no_minutes(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    q0 = int(DAY0)
    with Store.open(db) as store:
        assert store.pin_energy_until(q0 + 3600, ts=q0) == []  # nothing recorded yet: nothing to pin
        for i in list(range(15)) + list(range(15, 23)) + list(range(90, 95)):  # q0 whole, q1 half, q6 a third
            store.record_energy_minute(_minute(q0 + 60 * i, 1.0))
        assert len(store.pin_energy_until(q0 + 900, ts=q0 + 901)) == 1
        assert store.pin_energy_until(q0 + 900, ts=q0 + 902) == []  # idempotent
        assert store.pin_energy_until(q0 + 1700, ts=q0 + 1700) == []  # q1 is not over yet
        assert len(store.pin_energy_until(q0 + 7 * 900, ts=q0 + 7 * 900)) == 2  # q1 and q6; q2..q5 were empty
        pinned = [(r.data["from"] - q0, r.data["kwh"]) for r in store.audit_records() if r.kind == "energy"]
        assert pinned == [(0, pytest.approx(15.0)), (900, pytest.approx(8.0)), (5400, pytest.approx(5.0))]
        assert store.verify_audit().ok
    raw(db, f"UPDATE energy_minute SET kwh = kwh + 1 WHERE minute_ts = {q0 + 5460}")
    assert "energy rows" in str(verify_database(db).reason)


class FixedClock(WallClock):
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


async def test_housekeeping_signs_whole_days_and_prunes_only_what_was_exported(
    site: tuple[Path, Path], tmp_path: Path
) -> None:
    """The agent's hourly upkeep, on a real store in a worker thread: the days before `now` get signed heads, and
    with retention 1 day nothing goes until an export covers it."""
    _, db = site
    key = signing.parse_private_key(signing.generate_keypair()[0])
    clock = FixedClock(DAY0 + 3 * 86400 + 10)
    with Store.open(db, retention_days=1) as store:
        keeper = Housekeeping(store, clock, "audit-site", key)
        await keeper.once()
        assert [h["day"] for h in store.signed_heads()] == ["2023-11-15", "2023-11-16", "2023-11-17"]
        before = len(store.audit_records())
        assert before > 24  # nothing was exported: nothing pruned
        keeper.last_prune = None
        store.mark_exported(DAY0 - 100, DAY0 + 86400, "json", "d1", clock.time())
        await keeper.once()
        after = store.audit_records()
        assert len(after) == before - 24 + 1  # the first day's records, and a `prune` record anchoring the chain
        assert after[-1].kind == "prune"
        await keeper.once()  # not a day since the last prune: nothing more
        assert len(store.audit_records()) == len(after)
        assert store.verify_audit([key.public_key()]).ok


# ---------------------------------------------------------------------------------------------- signed heads
def test_signed_daily_heads_verify_and_catch_a_rewritten_chain(site: tuple[Path, Path], tmp_path: Path) -> None:
    _, db = site
    private_pem, public_pem = signing.generate_keypair()
    key_file = tmp_path / "site.key"
    key_file.write_bytes(private_pem)
    pub_file = tmp_path / "site.pub"
    pub_file.write_bytes(public_pem)
    config = write_config(tmp_path, signing_key=key_file)
    key = signing.parse_private_key(private_pem)
    with Store.open(db) as store:
        days = store.sign_pending_heads(key, "audit-site", now=DAY0 + 3 * 86400 + 10)
        assert days == ["2023-11-15", "2023-11-16", "2023-11-17"]
        assert store.sign_pending_heads(key, "audit-site", now=DAY0 + 3 * 86400 + 20) == []
        assert store.signed_heads()[0]["last_seq"] == 24  # records at DAY0 + 0h..23h
    code, doc = verify_cli(config)  # the public half of the configured site key
    assert code == 0
    assert doc["heads_checked"] == 3
    ok = hashflex("audit", "verify", "--config", str(config), "--public-key", str(pub_file), "--json")
    assert ok.exit_code == 0

    # a wrong key: the signatures do not verify
    _, other_pub = signing.generate_keypair()
    other = tmp_path / "other.pub"
    other.write_bytes(other_pub)
    bad = hashflex("audit", "verify", "--config", str(config), "--public-key", str(other), "--json")
    assert bad.exit_code == 1
    assert "signature does not verify" in bad.stdout

    # an attacker rewrites the whole chain from record 10 on, recomputing every hash: only the signed heads see it
    with Store.open(db) as store:
        records = store.audit_records()
    con = sqlite3.connect(db)
    from hashflex.agent.core.audit import canonical_json, make_record

    prev_seq, prev_hash = records[8].seq, records[8].hash
    for r in records[9:]:
        data = {**r.data, "detail": "rewritten"}
        new = make_record(prev_seq, prev_hash, r.ts, r.kind, data)
        con.execute(
            "UPDATE audit SET data = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (canonical_json(new.data), new.prev_hash, new.hash, r.seq),
        )
        prev_seq, prev_hash = new.seq, new.hash
    con.execute("UPDATE audit_head SET hash = ?", (prev_hash,))
    con.commit()
    con.close()
    code, doc = verify_cli(config)
    assert code == 1
    assert "does not match record 24" in str(doc["reason"])


# ---------------------------------------------------------------------------------------------- prune and export
def test_prune_deletes_only_what_was_exported_and_the_chain_still_verifies(site: tuple[Path, Path]) -> None:
    _, db = site
    q0 = int(DAY0)
    with Store.open(db, retention_days=1) as store:
        for i in range(3 * 1440):
            store.record_energy_minute(_minute(q0 + 60 * i, 0.5))
        store.put_reply("c-old", "dispatch", {"status": "ok"}, DAY0)
        now = DAY0 + 10 * 86400
        nothing = store.prune(now)  # nothing exported yet: nothing goes
        assert (nothing.audit_records, nothing.energy_minutes) == (0, 0)
        store.mark_exported(DAY0 - 100, DAY0 + 86400, "json", "d1", now)
        assert store.export_watermark() == DAY0 + 86400
        store.mark_exported(DAY0 + 2 * 86400, DAY0 + 3 * 86400, "json", "d2", now)  # a gap: watermark stays
        assert store.export_watermark() == DAY0 + 86400
        result = store.prune(now)
        assert result.cutoff == DAY0 + 86400
        assert result.audit_records == 24  # first day's records
        assert result.energy_minutes == 1440
        assert store.energy_minutes(0, DAY0 + 86400) == []
        assert len(store.energy_minutes(DAY0 + 86400, DAY0 + 3 * 86400)) == 2 * 1440
        assert store.get_reply("c-old") == {"status": "ok"}
        check = store.verify_audit()
        assert check.ok, check.reason
        assert check.first_seq == 25
        assert store.audit_records(limit=1)[0].seq == 25
        prune_record = store.audit_records()[-1]
        assert prune_record.kind == "prune"
        assert prune_record.data["deleted_through_seq"] == 24
        store.mark_exported(DAY0 + 86400, DAY0 + 2 * 86400, "json", "d3", now)  # fills the gap
        assert store.export_watermark() == DAY0 + 3 * 86400


def test_export_json_holds_records_dispatches_and_energy(site: tuple[Path, Path], tmp_path: Path) -> None:
    config, db = site
    q0 = int(DAY0)
    with Store.open(db) as store:
        for i in range(120):
            store.record_energy_minute(_minute(q0 + 60 * i, 1.0))
    out = tmp_path / "export.json"
    result = hashflex(
        "audit",
        "export",
        "--config",
        str(config),
        "--from",
        "2023-11-15",
        "--to",
        "2023-11-15T12:00Z",
        "--format",
        "json",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["format"] == "hashflex-export/1"
    assert doc["site_id"] == "audit-site"
    assert [r["seq"] for r in doc["audit"]] == list(range(1, 13))  # one record an hour, 00:00..11:00
    assert doc["chain"]["ok"] is True
    assert len(doc["energy_quarter_hours"]) == 8
    assert doc["energy_total"]["kwh"] == pytest.approx(120.0)
    assert doc["energy_days"][0]["estimated_kwh"] == pytest.approx(12.0)
    with Store.open(db) as store:
        assert store.export_watermark() == DAY0 + 12 * 3600  # written to a file: counts as exported


def test_export_csv_zip_has_a_manifest_with_digests(site: tuple[Path, Path], tmp_path: Path) -> None:
    config, db = site
    with Store.open(db) as store:
        store.record_energy_minute(
            _minute(int(DAY0), 2.0), {"127.6.0.1": MinerMinute(1.5, True), "127.6.0.2": MinerMinute(0.5, False)}
        )
    out = tmp_path / "export.zip"
    result = hashflex(
        "audit",
        "export",
        "--config",
        str(config),
        "--from",
        str(DAY0),
        "--to",
        str(DAY0 + 86400),
        "--format",
        "csv",
        "--out",
        str(out),
        "--per-miner",
    )
    assert result.exit_code == 0, result.stderr
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert {"audit.csv", "dispatches.csv", "energy_15min.csv", "energy_days.csv", "manifest.json"} <= names
        manifest = json.loads(z.read("manifest.json"))
        import hashlib

        for name, digest in manifest["files"].items():
            assert hashlib.sha256(z.read(name)).hexdigest() == digest
        rows = list(csv.DictReader(io.StringIO(z.read("audit.csv").decode())))
        miners = list(csv.DictReader(io.StringIO(z.read("energy_miner_days.csv").decode())))
    assert [(m["ip"], float(m["kwh"]), float(m["estimated_kwh"])) for m in miners] == [
        ("127.6.0.1", 1.5, 0.0),
        ("127.6.0.2", 0.5, 0.5),
    ]
    assert len(rows) == 24
    assert rows[0]["kind"] == "agent_start"
    assert rows[0]["time_utc"] == "2023-11-15T00:00:00Z"


def test_export_to_stdout_does_not_count_as_exported(site: tuple[Path, Path]) -> None:
    config, db = site
    result = hashflex("audit", "export", "--config", str(config), "--from", str(DAY0), "--to", str(DAY0 + 7200))
    assert result.exit_code == 0
    assert [r["seq"] for r in json.loads(result.stdout)["audit"]] == [1, 2]
    with Store.open(db) as store:
        assert store.export_watermark() is None


def test_export_refuses_a_bad_range(site: tuple[Path, Path]) -> None:
    config, _ = site
    bad = hashflex("audit", "export", "--config", str(config), "--from", "tomorrow-ish", "--to", "now")
    assert bad.exit_code == 1
    assert "not a time" in bad.stderr
    backwards = hashflex("audit", "export", "--config", str(config), "--from", "now", "--to", "-1h")
    assert backwards.exit_code == 1
    assert "must be after" in backwards.stderr
