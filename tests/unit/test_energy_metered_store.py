"""Metered energy on disk (real SQLite): the schema migration from version 1, the source kept per minute and merged
on a minute stored twice, the export saying which source each interval used, and `audit verify` recomputing the
pinned metered figures (an edited source or counter figure is found)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from hashflex.agent.core.energy import FALLBACK, METERED, MINERS, EnergyMinute
from hashflex.agent.io.store import SCHEMA_VERSION, Store
from hashflex.agent.io.store import database as store_db

Q0 = 1_700_006_400  # a quarter-hour boundary


def minute(ts: int, kwh: float, source: str, miners_kwh: float, carried: float = 0.0) -> EnergyMinute:
    metered = kwh - carried if source == METERED else 0.0
    return EnergyMinute(ts, kwh, miners_kwh, 0.0, 60.0, 0.0, 0.0, 0.0, kwh * 60, 6, source, metered, carried)


def test_a_version_1_database_is_migrated_and_its_old_pins_still_verify(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    for statement in store_db._split_sql(store_db._MIGRATIONS[0]):
        db.execute(statement)
    db.close()
    # version 1 wrote rows with ten columns and pinned three figures: write them as it did
    with Store.open(path) as s:
        assert s._db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 2
    db = sqlite3.connect(path, isolation_level=None)
    for i in range(15):
        db.execute(
            "INSERT INTO energy_minute (minute_ts, kwh, measured_kwh, estimated_kwh, covered_s, curtailed_s, "
            "baseline_kwh, not_drawn_kwh, peak_kw, samples) VALUES (?, 1.0, 1.0, 0.0, 60, 0, 0, 0, 60, 6)",
            (Q0 + 60 * i,),
        )
    db.close()
    with Store.open(path) as s:
        old = s.energy_minutes(Q0, Q0 + 900)
        assert {m.source for m in old} == {MINERS}
        assert all(m.metered_kwh == 0 and m.carried_kwh == 0 for m in old)
        s.append_audit("energy", {"from": Q0, "to": Q0 + 900, "kwh": 15.0, "not_drawn_kwh": 0.0, "minutes": 15}, Q0)
        assert s.verify_audit().ok


def test_sources_are_kept_merged_exported_and_pinned_and_an_edit_is_found(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with Store.open(path) as s:
        rows = [minute(Q0 + 60 * i, 1.1, METERED, 1.0) for i in range(10)]
        rows += [minute(Q0 + 60 * i, 1.0, FALLBACK, 1.0) for i in range(10, 14)]
        rows += [minute(Q0 + 60 * 14, 1.5, METERED, 1.0, carried=0.4)]
        for m in rows:
            s.record_energy_minute(m)
        # a restart inside a metered minute: the second part fell back; the minute says the least direct source
        s.record_energy_minute(minute(Q0 + 900, 0.6, METERED, 0.5))
        s.record_energy_minute(minute(Q0 + 900, 0.5, FALLBACK, 0.5))
        (merged,) = s.energy_minutes(Q0 + 900, Q0 + 960)
        assert merged.source == FALLBACK
        assert merged.kwh == 1.1
        assert merged.metered_kwh == 0.6
        assert s.pin_energy_until(Q0 + 1800, Q0 + 1800)
        (q1, _q2) = s.energy_rollup(Q0, Q0 + 1800)
        assert (q1.source, q1.metered_minutes, q1.fallback_minutes) == (FALLBACK, 11, 4)
        assert abs(q1.metered_kwh - (10 * 1.1 + 1.1)) < 1e-9  # the counter over the metered minutes' own time
        assert abs(q1.carried_kwh - 0.4) < 1e-9
        assert abs(q1.gap_kwh - (10 * 0.1 + 0.1)) < 1e-9  # the meter beyond the miners over the metered minutes
        data = s.export_data(Q0, Q0 + 1800)
        files = s.export(Q0, Q0 + 1800, "csv", now=Q0 + 3600)
        assert s.verify_audit().ok
    quarter = data["energy_quarter_hours"][0]
    assert quarter["source"] == FALLBACK
    assert quarter["fallback_minutes"] == 4
    assert abs(quarter["kwh"] - (quarter["metered_kwh"] + quarter["carried_kwh"] + 4.0)) < 1e-9
    header, first = files["energy_15min.csv"].decode().splitlines()[:2]
    assert "source" in header.split(",")
    assert "carried_kwh" in header.split(",")
    assert ",fallback," in first
    pinned = [json.loads(r[0]) for r in sqlite3.connect(path).execute("SELECT data FROM audit WHERE kind='energy'")]
    assert pinned[0]["source"] == FALLBACK
    assert pinned[0]["fallback_minutes"] == 4
    # an edit of the source (a fallback minute passed off as metered) or of the counter figures is found
    for edit in (
        "UPDATE energy_minute SET source = 0 WHERE minute_ts = ?",
        "UPDATE energy_minute SET carried_kwh = 0 WHERE minute_ts = ?",
    ):
        copy = tmp_path / "edited.db"
        copy.write_bytes(path.read_bytes())
        db = sqlite3.connect(copy)
        db.execute(edit, (Q0 + 60 * (12 if "source" in edit else 14),))
        db.commit()
        db.close()
        with Store.open(copy) as s:
            verdict = s.verify_audit()
        assert not verdict.ok, edit
        assert "were changed after record" in " ".join([verdict.reason or "", *verdict.problems]), verdict
