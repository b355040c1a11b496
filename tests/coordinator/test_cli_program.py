"""`hashflex coordinator run` as a real process (a one-node NATS with JetStream for its lease and state, the
session's Mosquitto as the fabric) and `hashflex program status` reading the program state it publishes, retained.

No agent runs here: a signed program hold is taken, and with no site heard every site is counted at its cap, so
the status must show the hold, its shares and the shortfall as an alarm. SIGTERM ends the process cleanly (exit 0,
the lease given up)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from hashflex.agent.cli.main import app
from hashflex.contract.signing import generate_keypair, sign_command
from tests.broker import HOST, Mosquitto, free_port
from tests.nats_cluster import nats_server, read_log

pytestmark = pytest.mark.timeout(60)
HASHFLEX = str(Path(sys.executable).parent / "hashflex")
runner = CliRunner(env={"COLUMNS": "200"})


def status(config: Path, *extra: str) -> tuple[int, str]:
    done = runner.invoke(app, ["program", "status", "--config", str(config), *extra])
    return done.exit_code, done.output


def test_run_then_program_status_then_a_clean_stop(tmp_path: Path, mosquitto: Mosquitto) -> None:
    program = f"p{uuid.uuid4().hex[:8]}"
    grid_private, grid_public = generate_keypair()
    coord_private, _ = generate_keypair()
    (tmp_path / "grid.pub").write_bytes(grid_public)
    (tmp_path / "coordinator").write_bytes(coord_private)
    nats_port = free_port()
    nats = nats_server(tmp_path, nats_port)
    config = tmp_path / "program.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "program_id": program,
                "signing_key": "coordinator",
                "grid_public_keys": ["grid.pub"],
                "fabric": {
                    "brokers": [f"{HOST}:{mosquitto.plain_port}"],
                    "nats_servers": [f"nats://{HOST}:{nats_port}"],
                },
                "sites": [{"id": f"{program}-a", "cap_kw": 100}, {"id": f"{program}-b", "cap_kw": 60}],
                "lease": {"ttl_s": 2, "replicas": 1},
                "state": {"replicas": 1},
                "step_s": 0.2,
                "settle_s": 0.2,
            }
        )
    )
    # nothing retained yet: status says so (exit 2) rather than showing a stale or empty program
    code, output = status(config, "--timeout", "0.5")
    assert code == 2
    assert f"no program state on hashflex/program/{program}/state" in output
    log = (tmp_path / "coordinator.log").open("w")
    argv = [HASHFLEX, "coordinator", "run", "--config", str(config), "--name", "t1"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        doc = _until_status(proc, config, lambda d: d["revision"] == 0, 20)
        assert doc == {"program": program, "revision": 0, "alarms": [], "dispatches": []}
        # a signed hold from the grid: 50 kW for the next hour, over two sites never heard from
        hold = sign_command(
            {
                "program": program,
                "verb": "hold",
                "id": "evening",
                "issued_at": int(time.time()),
                "target_kw": 50.0,
                "end": int(time.time()) + 3600,
            },
            Ed25519PrivateKey.from_private_bytes(_raw(grid_private)),
        )
        mqtt_publish.single(
            f"hashflex/program/{program}/cmd/hold", json.dumps(hold), qos=1, hostname=HOST, port=mosquitto.plain_port
        )
        doc = _until_status(proc, config, lambda d: bool(d["dispatches"]), 10)
        assert doc["program"] == program
        assert doc["revision"] >= 1
        (evening,) = doc["dispatches"]
        assert evening["id"] == "evening"
        assert evening["level_w"] == 50_000.0
        # no site has been heard: each is counted at its cap, so 160 kW against 50 kW is short by 110 kW
        assert {s["site"]: s["counted_w"] for s in evening["sites"]} == {
            f"{program}-a": 100_000.0,
            f"{program}-b": 60_000.0,
        }
        assert evening["unmet_w"] == pytest.approx(110_000.0)
        assert doc["alarms"], doc
        code, output = status(config)
        assert code == 0, output
        assert f"program {program}" in output
        assert "hold evening: target 50.00 kW" in output
        assert "short 110.00 kW" in output
        assert "alarm:" in output
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=10)
        finally:
            proc.kill()
            log.close()
            nats.terminate()
            nats.wait(timeout=10)
    text = (tmp_path / "coordinator.log").read_text()
    assert returncode == 0, text
    assert "lease_released" in text
    assert "coordinator stopped" in text


def _raw(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _until_status(proc: subprocess.Popen[bytes], config: Path, ready: Any, within_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the coordinator exited with {proc.returncode}"
        code, output = status(config, "--json", "--timeout", "0.5")
        last = output
        if code == 0:
            doc: dict[str, Any] = json.loads(output)
            if ready(doc):
                return doc
        time.sleep(0.2)
    raise AssertionError(f"program status not ready within {within_s} s: {last}")


def test_sigterm_while_nats_is_unreachable_is_a_clean_exit(tmp_path: Path) -> None:
    """A cluster that never answers is waited for (logged once, not every retry), and SIGTERM still ends it."""
    private, public = generate_keypair()
    (tmp_path / "grid.pub").write_bytes(public)
    (tmp_path / "coordinator").write_bytes(private)
    config = tmp_path / "program.yaml"
    closed = free_port()  # nothing listens there
    config.write_text(
        yaml.safe_dump(
            {
                "program_id": "down",
                "signing_key": "coordinator",
                "grid_public_keys": ["grid.pub"],
                "fabric": {"brokers": [f"{HOST}:{closed}"], "nats_servers": [f"nats://{HOST}:{closed}"]},
                "sites": [{"id": "a", "cap_kw": 100}],
            }
        )
    )
    log = tmp_path / "coordinator.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [HASHFLEX, "coordinator", "run", "--config", str(config)], stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 15
            while "nats_error" not in read_log(log):
                assert proc.poll() is None, read_log(log)
                assert time.monotonic() < deadline, read_log(log)
                time.sleep(0.1)
            time.sleep(1.5)  # three of nats-py's 0.5-s retries
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=5)
        finally:
            proc.kill()
    assert returncode == 0, read_log(log)
    assert read_log(log).count("nats_error") == 1, read_log(log)
