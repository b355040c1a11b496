"""Energy on disk: minutes from the integrator into SQLite, compact per-miner rows, rollups, and `hashflex energy`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hashflex.agent.core.energy import DAY_S, QUARTER_S, EnergyIntegrator, EnergyMinute, MinerMinute, SiteSample
from hashflex.agent.io.store import Store
from tests.store_support import hashflex, write_config

DAY0 = 1_700_006_400  # UTC midnight


def minute(ts: int, kwh: float, **kw: float) -> EnergyMinute:
    fields = {
        "measured_kwh": kwh,
        "estimated_kwh": 0.0,
        "covered_s": 60.0,
        "curtailed_s": 0.0,
        "baseline_kwh": 0.0,
        "not_drawn_kwh": 0.0,
        "peak_kw": kwh * 60,
        "samples": 12,
    }
    fields.update(kw)
    return EnergyMinute(ts, kwh, **fields)  # type: ignore[arg-type]


def test_a_day_from_the_integrator_matches_the_analytic_integral(tmp_path: Path) -> None:
    """Site power p(t) = 600 kW + 200 kW·sin(2πt/6h), sampled every 5 s with 3 miners sharing it; 24 h."""
    integ = EnergyIntegrator()
    with Store.open(tmp_path / "h.db") as store:
        for i in range(DAY_S // 5 + 1):
            t = DAY0 + 5 * i
            p = 600_000 + 200_000 * math.sin(2 * math.pi * (t - DAY0) / 21_600)
            miners = {"127.6.0.1": (p * 0.5, True), "127.6.0.2": (p * 0.3, True), "127.6.0.3": (p * 0.2, False)}
            sample = SiteSample(t, measured_w=p * 0.8, estimated_w=p * 0.2, curtailed=i < 720, baseline_w=900_000)
            with store.transaction():
                for site_minute, miner_minutes in integ.add(sample, miners):
                    store.record_energy_minute(site_minute, miner_minutes)
        day = store.energy_rollup(DAY0, DAY0 + DAY_S, DAY_S)
        quarters = store.energy_rollup(DAY0, DAY0 + DAY_S, QUARTER_S)
        per_miner = store.energy_per_miner(DAY0, DAY0 + DAY_S)[DAY0]
    assert len(day) == 1
    assert len(quarters) == 96
    expected_kwh = 600.0 * 24  # the sine integrates to zero over whole periods
    assert day[0].kwh == pytest.approx(expected_kwh, rel=1e-5)
    assert day[0].estimated_kwh == pytest.approx(0.2 * expected_kwh, rel=1e-5)
    assert day[0].coverage == pytest.approx(1.0)
    assert day[0].curtailed_s == pytest.approx(3600.0)  # the first 720 samples = the first hour
    assert sum(q.kwh for q in quarters) == pytest.approx(day[0].kwh)
    assert sum(t.kwh for t in per_miner.values()) == pytest.approx(day[0].kwh, rel=1e-5)  # float32 per miner
    assert per_miner["127.6.0.3"].estimated_kwh == pytest.approx(per_miner["127.6.0.3"].kwh)
    assert per_miner["127.6.0.1"].estimated_kwh == 0.0
    assert per_miner["127.6.0.1"].minutes == 1440


def test_a_minute_stored_twice_is_added_up(tmp_path: Path) -> None:
    """A restart inside a minute: the part before the stop and the part after are both counted."""
    with Store.open(tmp_path / "h.db") as store:
        store.record_energy_minute(
            minute(DAY0, 0.4, covered_s=24.0, peak_kw=30.0), {"a": MinerMinute(0.3, True), "b": MinerMinute(0.1, True)}
        )
        store.record_energy_minute(
            minute(DAY0, 0.6, covered_s=36.0, peak_kw=40.0), {"a": MinerMinute(0.5, False), "c": MinerMinute(0.1, True)}
        )
        (m,) = store.energy_minutes(DAY0, DAY0 + 60)
        assert m.kwh == pytest.approx(1.0)
        assert (m.covered_s, m.peak_kw, m.samples) == (60.0, 40.0, 24)
        miners = store.energy_per_miner(DAY0, DAY0 + 60)[DAY0]
    assert miners["a"].kwh == pytest.approx(0.8)
    assert miners["a"].estimated_kwh == pytest.approx(0.8)  # one part was estimated: the minute is marked so
    assert miners["b"].kwh == pytest.approx(0.1)
    assert miners["c"].kwh == pytest.approx(0.1)


def test_miners_added_later_widen_the_rows_and_absent_ones_count_no_minutes(tmp_path: Path) -> None:
    with Store.open(tmp_path / "h.db") as store:
        store.record_energy_minute(minute(DAY0, 0.2), {"a": MinerMinute(0.1, True), "b": MinerMinute(0.1, True)})
        store.record_energy_minute(minute(DAY0 + 60, 0.2), {"b": MinerMinute(0.1, True), "z": MinerMinute(0.1, True)})
        store.record_energy_minute(minute(DAY0 + 120, 0.1), {"z": MinerMinute(0.1, True)})
    with Store.open(tmp_path / "h.db") as store:  # the miner index survives a restart
        store.record_energy_minute(minute(DAY0 + 180, 0.1), {"a": MinerMinute(0.1, True)})
        totals = store.energy_per_miner(DAY0, DAY0 + 240)[DAY0]
        by_minute = store.energy_per_miner(DAY0, DAY0 + 240, 60)
    assert {ip: t.minutes for ip, t in totals.items()} == {"a": 2, "b": 2, "z": 2}
    assert sorted(by_minute) == [DAY0, DAY0 + 60, DAY0 + 120, DAY0 + 180]
    assert set(by_minute[DAY0 + 120]) == {"z"}


def test_a_minute_must_start_on_a_minute(tmp_path: Path) -> None:
    with Store.open(tmp_path / "h.db") as store:
        with pytest.raises(ValueError, match="start of a minute"):
            store.record_energy_minute(minute(DAY0 + 7, 1.0))
        assert store.energy_minutes(0, 10**12) == []


def test_energy_command_prints_a_table_and_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with Store.open(tmp_path / "state" / "hashflex.db") as store:
        for i in range(60):
            curtailed = 60.0 if i < 15 else 0.0
            store.record_energy_minute(
                minute(
                    DAY0 + 60 * i,
                    1.0,
                    estimated_kwh=0.25,
                    measured_kwh=0.75,
                    curtailed_s=curtailed,
                    not_drawn_kwh=0.5 if curtailed else 0.0,
                ),
                {"127.6.0.1": MinerMinute(0.75, True), "127.6.0.2": MinerMinute(0.25, False)},
            )
    table = hashflex("energy", "--config", str(config), "--from", str(DAY0), "--to", str(DAY0 + 3600))
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split("\t")[:3] == ["start (UTC)", "kWh", "measured"]
    assert len(lines) == 1 + 4 + 1  # header, four quarter hours, total
    assert lines[1].split("\t")[1] == "15.000"
    assert lines[1].split("\t")[5] == "100%"
    assert lines[-1].split("\t")[:2] == ["total", "60.000"]
    doc = json.loads(
        hashflex("energy", "--config", str(config), "--from", str(DAY0), "--to", str(DAY0 + 3600), "--json").stdout
    )
    assert doc["total"]["kwh"] == pytest.approx(60.0)
    assert doc["total"]["not_drawn_kwh"] == pytest.approx(7.5)
    assert doc["total"]["curtailed_share"] == pytest.approx(0.25)
    miners = hashflex(
        "energy", "--config", str(config), "--from", str(DAY0), "--to", str(DAY0 + 3600), "--per", "miner", "--json"
    )
    assert json.loads(miners.stdout)["miners"]["127.6.0.2"] == {
        "kwh": pytest.approx(15.0),
        "estimated_kwh": pytest.approx(15.0),
        "minutes": 60,
    }


def test_energy_command_needs_a_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = hashflex("energy", "--config", str(config))
    assert result.exit_code == 2
    assert "no state database" in result.stderr
