"""`hashflex program dispatches`, `program audit verify`, `program export` and the coordinator's Prometheus endpoint,
as an operator uses them: a real `hashflex coordinator run` process on a real 3-node NATS cluster (lease, state, audit
chain in JetStream; the fabric on the cluster's MQTT listeners), every command a real subprocess.

No agent runs here: a signed hold is taken, an unsigned one refused, and with no site heard every site is counted at
its cap, so the program is short by a known number."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from hashflex.agent.cli import render as r
from hashflex.agent.cli.coordinator import (
    DISPATCH_COLUMNS,
    DISPATCH_PRIORITY,
    SITE_COLUMNS,
    SITE_PRIORITY,
    dispatch_row,
    site_row,
)
from hashflex.contract.signing import sign_command
from tests.broker import HOST, free_port
from tests.nats_cluster import NatsCluster

pytestmark = pytest.mark.timeout(60)
HASHFLEX = str(Path(sys.executable).parent / "hashflex")
METRICS_HOST = "127.73.0.1"  # this task's loopback range
GRID = Ed25519PrivateKey.generate()


def cli(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HASHFLEX, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def pem(key: Ed25519PrivateKey, private: bool) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    if private:
        return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    return key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


def free_metrics_port() -> int:
    with socket.socket() as sock:
        sock.bind((METRICS_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield nodes
    nodes.stop()


def write_config(path: Path, program: str, cluster: NatsCluster, *, metrics_port: int, **extra: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "grid.pub").write_bytes(pem(GRID, False))
    (path / "coordinator").write_bytes(pem(Ed25519PrivateKey.generate(), True))
    config = path / "program.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "program_id": program,
                "signing_key": "coordinator",
                "grid_public_keys": ["grid.pub"],
                "fabric": {"brokers": [f"{HOST}:{p}" for p in cluster.mqtt_ports], "nats_servers": cluster.urls},
                "sites": [{"id": f"{program}-a", "cap_kw": 100}, {"id": f"{program}-b", "cap_kw": 60}],
                "step_s": 0.2,
                "settle_s": 0.2,  # the lease's default TTL (6 s): no term lost to a loaded host's pauses
                "metrics": {"enabled": True, "host": METRICS_HOST, "port": metrics_port},
                **extra,
            }
        )
    )
    return config


def until(what: str, within_s: float, probe: Any) -> Any:
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last and not isinstance(last, tuple):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {within_s} s (last: {last!r})")


def test_dispatches_audit_verify_export_and_metrics_of_a_running_coordinator(
    tmp_path: Path, cluster: NatsCluster
) -> None:
    program = f"p{uuid.uuid4().hex[:8]}"
    metrics_port = free_metrics_port()
    config = write_config(tmp_path, program, cluster, metrics_port=metrics_port)
    log = (tmp_path / "coordinator.log").open("w")
    proc = subprocess.Popen(
        [HASHFLEX, "coordinator", "run", "--config", str(config), "--name", "t1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # nothing in force yet: said on stderr, exit 0
        done = until(
            "the coordinator's first state",
            20,
            lambda: (d := cli("program", "dispatches", "-c", str(config), "--timeout", "0.5")).returncode == 0 and d,
        )
        assert "no program dispatch in force" in done.stderr
        now = int(time.time())
        hold = {
            "program": program,
            "verb": "hold",
            "id": "evening",
            "issued_at": now,
            "target_kw": 50.0,
            "end": now + 3600,
        }
        for doc in ({**hold, "id": "unsigned"}, sign_command(hold, GRID)):
            mqtt_publish.single(
                f"hashflex/program/{program}/cmd/hold",
                json.dumps(doc),
                qos=1,
                hostname=HOST,
                port=cluster.mqtt_ports[1],
            )

        def listed() -> Any:
            done = cli("program", "dispatches", "-c", str(config), "--json", "--timeout", "1")
            return done.returncode == 0 and json.loads(done.stdout)["dispatches"]

        (evening,) = until("the hold in `program dispatches`", 25, listed)
        assert (evening["id"], evening["rev"], evening["kind"], evening["state"]) == ("evening", 0, "hold", "short")
        assert evening["end"] == now + 3600
        assert evening["unmet_w"] == pytest.approx(110_000.0)  # no site heard: 100 + 60 kW counted against 50 kW
        assert {s["site"]: s["counted_w"] for s in evening["sites"]} == {
            f"{program}-a": 100_000.0,
            f"{program}-b": 60_000.0,
        }
        # piped: tab-separated, the header first, then each dispatch's per-site allocation
        table = cli("program", "dispatches", "-c", str(config))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split("\t") == list(DISPATCH_COLUMNS)
        assert lines[1].split("\t")[:3] == ["evening", "0", "hold"]
        assert lines[1].split("\t")[5:] == ["short", "0/0", "—", "110.00 kW"]
        assert lines[2:4] == ["# evening", "\t".join(SITE_COLUMNS)]

        # the chain: leading, the refused command, the accepted one, the allocation
        def chain() -> Any:
            done = cli("program", "audit", "verify", "-c", str(config), "--json")
            doc = json.loads(done.stdout) if done.stdout else {}
            return (done.returncode == 0 and doc.get("records", 0) >= 4 and doc) or (done.stdout, done.stderr)

        verdict = until("four records in the chain", 20, chain)
        assert (verdict["status"], verdict["first_seq"], verdict["stream"]) == ("ok", 1, f"hashflex_audit_{program}")
        plain = cli("program", "audit", "verify", "-c", str(config))
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.startswith("program audit chain OK: ")
        exported = cli("program", "export", "-c", str(config), "--from", "-1h", "--to", "now")
        assert exported.returncode == 0, exported.stderr
        doc = json.loads(exported.stdout)
        assert doc["format"] == "hashflex-program-export/1"
        assert doc["chain"]["ok"] is True
        kinds = [(rec["kind"], rec["data"].get("outcome")) for rec in doc["records"]]
        assert kinds[:4] == [
            ("leading", None),
            ("program_command", "refused"),
            ("program_command", "accepted"),
            ("allocation", None),
        ]
        assert doc["records"][1]["data"]["code"] == "unsigned"
        assert doc["records"][2]["data"]["document"]["signature"]  # the grid's signed document, as received
        assert doc["records"][3]["data"]["unmet_w"] == pytest.approx(110_000.0)
        zipped = cli(
            "program", "audit", "export", "-c", str(config), "--format", "csv", "--out", str(tmp_path / "audit.zip")
        )
        assert zipped.returncode == 0, zipped.stderr
        with zipfile.ZipFile(tmp_path / "audit.zip") as z:
            assert sorted(z.namelist()) == ["audit.csv", "compliance.csv", "manifest.json"]

        # Prometheus, scraped over HTTP as Prometheus does
        with urllib.request.urlopen(f"http://{METRICS_HOST}:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for line in (
            "hashflex_coordinator_leader 1.0",
            "hashflex_program_target_watts 50000.0",
            "hashflex_program_short_watts 110000.0",
            'hashflex_program_sites{state="offline"} 2.0',
            'hashflex_program_commands_total{outcome="refused"} 1.0',
            'hashflex_program_commands_total{outcome="accepted"} 1.0',
            'hashflex_program_dispatch_short_watts{dispatch="evening"} 110000.0',
            f'hashflex_program_site_counted_watts{{site="{program}-a"}} 100000.0',
        ):
            assert line in text.splitlines(), (line, text)
        (allocations,) = [x for x in text.splitlines() if x.startswith("hashflex_program_allocations_total ")]
        assert float(allocations.split()[1]) >= 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=10)
        finally:
            proc.kill()
            log.close()
    assert returncode == 0, (tmp_path / "coordinator.log").read_text()


def test_audit_commands_say_in_one_line_what_is_wrong(tmp_path: Path, cluster: NatsCluster) -> None:
    # a program no coordinator has run: no stream
    config = write_config(tmp_path / "new", "never-run", cluster, metrics_port=0)
    done = cli("program", "audit", "verify", "-c", str(config), "--timeout", "2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no audit chain for program 'never-run' (stream hashflex_audit_never-run does not exist: has a "
        "coordinator of this program run?)"
    ]
    # no NATS server answers
    closed = free_port()
    config = write_config(tmp_path / "down", "down", cluster, metrics_port=0)
    raw = yaml.safe_load(config.read_text())
    raw["fabric"]["nats_servers"] = [f"nats://{HOST}:{closed}"]
    config.write_text(yaml.safe_dump(raw))
    done = cli("program", "audit", "verify", "-c", str(config), "--timeout", "1", "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"].startswith(f"no NATS server answered (nats://{HOST}:{closed})")
    assert len(done.stderr.strip().splitlines()) == 1
    # a bad --from
    done = cli("program", "export", "-c", str(config), "--from", "last tuesday")
    assert done.returncode == 1
    assert done.stderr.startswith("error: not a time: 'last tuesday'")


def test_the_dispatch_tables_fit_80_columns_dropping_the_least_important_columns() -> None:
    doc: dict[str, Any] = {
        "id": "evening-peak-2026",
        "rev": 12,
        "kind": "hold",
        "level_now_w": 1_400_000_000.0,
        "start": 1.7e9,
        "end": 1.7e9 + 14_400,
        "state": "delivering",
        "metered_w": 1_398_765_432.0,
        "unmet_w": 0.0,
        "sites": [
            {
                "site": f"site-{i:02d}-karachi-east",
                "share_w": 46_666_000.0,
                "present_w": 46_500_123.0,
                "counted_w": 46_666_000.0,
                "rev": 3,
                "acked": True,
                "failure": "not_met" if i else None,
            }
            for i in range(30)
        ],
    }
    console = Console(width=80, force_terminal=True)
    for columns, rows, priority in (
        (DISPATCH_COLUMNS, [dispatch_row(doc)], DISPATCH_PRIORITY),
        (SITE_COLUMNS, [site_row(s) for s in doc["sites"]], SITE_PRIORITY),
    ):
        table = r.fitted_table(console, columns, rows, priority=priority)
        assert r.natural_width(console, table) <= 80
        shown = [c.header for c in table.columns]
        assert {c for c, rank in priority.items() if rank == 0} <= set(shown)
    assert dispatch_row(doc)[6] == "30/30"


def test_a_metrics_port_in_use_is_a_one_line_start_error(tmp_path: Path, cluster: NatsCluster) -> None:
    with socket.socket() as taken:
        taken.bind((METRICS_HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, f"p{uuid.uuid4().hex[:8]}", cluster, metrics_port=port)
        done = cli("coordinator", "run", "-c", str(config), "--name", "busy", timeout=30)
    assert done.returncode == 2, done.stderr
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert last.startswith(f"error: metrics: cannot listen on {METRICS_HOST}:{port}: "), done.stderr
