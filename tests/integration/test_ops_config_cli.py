"""`hashflex config check` (ExecStartPre) and `hashflex config dump` on good and bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hashflex.agent.cli.main import app
from hashflex.contract.signing import generate_keypair

runner = CliRunner(env={"COLUMNS": "200"})


def write(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def grid_key(tmp_path: Path) -> Path:
    _private, public = generate_keypair()
    path = tmp_path / "keys" / "grid.pub"
    path.parent.mkdir()
    path.write_bytes(public)
    return path


def good_config(tmp_path: Path, grid_key: Path, extra: str = "") -> Path:
    return write(
        tmp_path,
        "site: {id: demo, cap_kw: 45000}\n"
        "miners: {addresses: [10.0.0.0/30]}\n"
        "mqtt: {host: 127.0.0.1, port: 1883}\n"
        "grid: {public_keys: [keys/grid.pub]}\n"  # relative to the file's folder
        f"state_dir: {tmp_path / 'state'}\n" + extra,
    )


def check(path: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, ["config", "check", "--config", str(path), *extra], env=env)


def test_check_good_config(tmp_path: Path, grid_key: Path) -> None:
    result = check(good_config(tmp_path, grid_key))
    assert result.exit_code == 0, result.output
    assert "config OK" in result.stderr
    assert "site demo" in result.stderr
    assert "2 addresses" in result.stderr
    assert "state_dir" in result.stderr  # a warning: it does not exist yet, the agent creates it


def test_check_json(tmp_path: Path, grid_key: Path) -> None:
    result = check(good_config(tmp_path, grid_key), "--json")
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert doc["errors"] == []
    assert doc["summary"]["site_id"] == "demo"
    assert doc["summary"]["grid_keys"] == 1
    assert any("does not exist yet" in w for w in doc["warnings"])


def test_check_missing_key_file(tmp_path: Path, grid_key: Path) -> None:
    grid_key.unlink()
    result = check(good_config(tmp_path, grid_key))
    assert result.exit_code == 1
    assert "grid.public_keys" in result.stderr
    assert "grid.pub: no such file" in result.stderr


def test_check_key_file_that_is_not_a_key(tmp_path: Path, grid_key: Path) -> None:
    grid_key.write_text("not a key at all")
    result = check(good_config(tmp_path, grid_key), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert any("not an Ed25519 public key" in e for e in doc["errors"])


def test_check_schema_error_names_field_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "site: {id: demo, cap_kw: 45000}\nmqtt: {enabled: false}\npolling: {interval_s: fast}\n")
    result = check(path)
    assert result.exit_code == 1
    assert "polling.interval_s" in result.stderr
    assert "'fast'" in result.stderr


def test_check_unknown_key_and_json(tmp_path: Path) -> None:
    path = write(tmp_path, "site: {id: demo, cap_kw: 45000}\nmqtt: {enabled: false}\nmetricz: {}\n")
    result = check(path, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert any("metricz" in e and "unknown key" in e for e in doc["errors"])


def test_check_missing_file(tmp_path: Path) -> None:
    result = check(tmp_path / "absent.yaml")
    assert result.exit_code == 1
    assert "absent.yaml: no such file" in result.stderr


def test_check_bad_credentials_and_password_file(tmp_path: Path, grid_key: Path) -> None:
    write(tmp_path, "- just\n- a list\n", "miners.yaml")
    path = write(
        tmp_path,
        "site: {id: demo, cap_kw: 45000}\n"
        "miners: {addresses: [10.0.0.0/30], credentials_file: miners.yaml}\n"
        "mqtt: {password_file: nope.txt}\n"
        "grid: {public_keys: [keys/grid.pub]}\n",
    )
    result = check(path, "--json")
    assert result.exit_code == 1
    errors = json.loads(result.stdout)["errors"]
    assert any("credentials must be a mapping" in e for e in errors)
    assert any(e.startswith(f"{path}: mqtt.password_file = ") and "nope.txt: no such file" in e for e in errors)


def test_check_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("oops")
    path = write(
        tmp_path, f"site: {{id: demo, cap_kw: 1}}\nmqtt: {{enabled: false}}\nstate_dir: {tmp_path / 'state'}\n"
    )
    result = check(path)
    assert result.exit_code == 1
    assert "exists and is not a folder" in result.stderr


def test_check_warns_about_an_empty_fleet_and_signing_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "site: {id: demo, cap_kw: 1}\nmqtt: {enabled: false}\naudit: {sign_daily_head: true}\n"
        f"state_dir: {tmp_path}\n",
    )
    doc = json.loads(check(path, "--json").stdout)
    assert any("miners.addresses is empty" in w for w in doc["warnings"])
    unsigned = f"{path}: audit.sign_daily_head is on but audit.signing_key is not set"
    assert any(e.startswith(unsigned) for e in doc["errors"])


def test_dump_shows_defaults_and_derived_paths_and_hides_secrets(
    tmp_path: Path, grid_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("broker-s3cret\n")
    (creds / "miners.yaml").write_text("luxos: miner-pa55\nwhatsminer: admin-pa55\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = good_config(tmp_path, grid_key, "audit: {signing_key: keys/site.key}\n")
    result = runner.invoke(app, ["config", "dump", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.stdout
    assert "pa55" not in result.stdout
    doc = json.loads(result.stdout)
    assert doc["site"] == {"id": "demo", "cap_kw": 45000.0, "timezone": None, "circuits": [], "meter": "none"}
    assert doc["polling"]["interval_s"] == 5.0
    assert doc["metrics"]["port"] == 9708
    assert doc["grid"]["public_keys"] == ["keys/grid.pub"]
    assert doc["audit"]["signing_key"] == "keys/site.key"  # a key *file* is shown, never its contents
    derived = doc["derived"]
    assert derived["mqtt_password"] == "***"
    assert derived["miner_credentials"] == {"luxos": "***", "whatsminer": "***"}
    assert derived["socket_path"] == str(tmp_path / "state" / "control.sock")
    assert derived["db_path"] == str(tmp_path / "state" / "hashflex.db")
    assert derived["mqtt_root"] == "hashflex/demo"
    assert derived["addresses"] == 2
    text = runner.invoke(app, ["config", "dump", "--config", str(path)])
    assert text.exit_code == 0
    assert "s3cret" not in text.stdout
    assert yaml.safe_load(text.stdout) == doc  # the text form is the same document, as YAML


def test_dump_bad_config_exits_2_with_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, "site: {id: 'bad id!', cap_kw: 1}\nmqtt: {enabled: false}\n")
    result = runner.invoke(app, ["config", "dump", "--config", str(path), "--json"])
    assert result.exit_code == 2
    assert "site.id" in json.loads(result.stdout)["error"]
