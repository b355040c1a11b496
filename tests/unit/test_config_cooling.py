"""A circuit's cooling (site.circuits[].cooling): validated strictly, each error naming the file, the field and the
value; absent, circuits are as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hashflex.agent.config import ConfigError, load_config

DRIVE = {
    "kind": "drive",
    "host": "10.0.0.60",
    "setpoint_register": 1,
    "full_kw": 3,
    "min_pct": 30,
    "curve": [[0, 30], [100, 100]],
    "down_after_s": "5m",
    "up_lead_s": "1m",
}


def write(tmp_path: Path, cooling: object) -> Path:
    circuit: dict[str, object] = {"id": "pdu-a", "cap_kw": 50, "miners": ["127.0.0.1-127.0.0.4"]}
    if cooling is not None:
        circuit["cooling"] = cooling
    doc = {
        "site": {"id": "m", "cap_kw": 100, "circuits": [circuit]},
        "miners": {"addresses": ["127.0.0.1-4"]},
        "state_dir": str(tmp_path / "state"),
        "metrics": {"enabled": False},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_no_cooling_is_the_circuit_as_before(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, None)).site.circuits[0].cooling is None


def test_a_drive_loads_with_its_delays_in_seconds(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, DRIVE)).site.circuits[0].cooling
    assert c is not None
    assert (c.port, c.unit, c.full_scale, c.down_after_s, c.up_lead_s) == (502, 1, 10000, 300.0, 60.0)
    assert c.curve_shares() == ((0.0, 30.0), (1.0, 100.0))
    assert c.minimum_pct == 30.0


def test_a_relay_is_on_or_off(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, {"kind": "relay", "host": "h", "setpoint_register": 0, "full_kw": 1})).site
    cooling = c.circuits[0].cooling
    assert cooling is not None
    assert cooling.minimum_pct == 100.0
    assert cooling.curve_shares() == ((0.0, 100.0),)
    msg = refused(write(tmp_path, {"kind": "relay", "host": "h", "setpoint_register": 0, "full_kw": 1, "min_pct": 40}))
    assert "site.circuits[0].cooling" in msg
    assert "min_pct = 40" in msg
    assert "a relay is on or off" in msg


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"full_kw": ".nan"}, "site.circuits[0].cooling.full_kw", "finite"),
        ({"full_kw": 0}, "site.circuits[0].cooling.full_kw = 0", "greater than 0"),
        ({"min_pct": 120}, "site.circuits[0].cooling.min_pct = 120", "less than or equal to 100"),
        ({"down_after_s": "-5s"}, "site.circuits[0].cooling.down_after_s", ""),
        ({"curve": [[50, 60], [20, 80]]}, "site.circuits[0].cooling", "strictly ascending"),
        ({"curve": [[0, 80], [100, 60]]}, "site.circuits[0].cooling", "must not fall"),
        ({"curve": [[0, 30], [100, 140]]}, "site.circuits[0].cooling", "0..100"),
        ({"idle_pct": 50}, "site.circuits[0].cooling", "above min_pct"),
        ({"kind": "damper"}, "site.circuits[0].cooling.kind = 'damper'", "'drive' or 'relay'"),
        ({"speed": 3}, "site.circuits[0].cooling.speed: unknown key", ""),
    ],
)
def test_bad_cooling_is_refused_naming_field_and_value(
    tmp_path: Path, change: dict[str, object], field: str, words: str
) -> None:
    path = write(tmp_path, {**DRIVE, **change})
    if change.get("full_kw") == ".nan":  # YAML's NaN, written as YAML (safe_dump would quote the string)
        path.write_text(path.read_text().replace("'.nan'", ".nan"))
    msg = refused(path)
    assert str(path) in msg, msg
    assert field in msg, msg
    assert words in msg, msg
