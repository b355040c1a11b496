"""`hashflex config check` refuses exactly what `hashflex run` refuses, with the same one line (issue 16, item 4),
and a file with only `site:` and `miners:` is a site without a grid link (item 5).

Both commands run as real subprocesses, as the unit runs them (ExecStartPre, then ExecStart); the agent of the
minimal-config test drives a simulated site over TCP.

Loopback range of this file: 127.91.0.0 - 127.91.255.255.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from hashflex.agent.cli.main import app
from hashflex.agent.config import load_config
from hashflex.sim.testing import SimProcess
from tests.agent_harness import ROOT, AgentConfigFiles, AgentProcess

pytestmark = pytest.mark.timeout(180)

MINIMAL = "site: {id: first-site, cap_kw: 50}\nminers: {addresses: [127.91.0.1-127.91.0.4]}\n"


def hashflex(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hashflex", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A TCP port another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _missing_group(tmp_path: Path, _port: int) -> tuple[str, list[str]]:
    return "control_socket: {group: hf-no-such-group-16}\n", [
        "control_socket.group = 'hf-no-such-group-16'",
        "no such group",
        "groupadd hf-no-such-group-16",
    ]


def _port_in_use(tmp_path: Path, port: int) -> tuple[str, list[str]]:
    return f"metrics: {{host: 127.0.0.1, port: {port}}}\n", [
        f"metrics.port = 127.0.0.1:{port}",
        "in use by another program",
        "set another metrics.port",
    ]


def _malformed_credentials(tmp_path: Path, _port: int) -> tuple[str, list[str]]:
    (tmp_path / "miners.yaml").write_text("luxos: hunter2\nwhatsminer: [admin\n")
    return "miners: {addresses: [127.91.0.1], credentials_file: miners.yaml}\n", [
        f"miners.credentials_file: {tmp_path / 'miners.yaml'}",
        "line 3 column 1",
        "not valid YAML",
        "family: password",
    ]


def _misspelt_family(tmp_path: Path, _port: int) -> tuple[str, list[str]]:
    (tmp_path / "miners.yaml").write_text("luxos: hunter2\nantminr: root\n")
    return "miners: {addresses: [127.91.0.1], credentials_file: miners.yaml}\n", [
        f"miners.credentials_file: {tmp_path / 'miners.yaml'}",
        "family 'antminr' is not a miner family",
        "did you mean 'antminer'?",
    ]


CASES: dict[str, Callable[[Path, int], tuple[str, list[str]]]] = {
    "missing_socket_group": _missing_group,
    "metrics_port_in_use": _port_in_use,
    "malformed_credentials_yaml": _malformed_credentials,
    "misspelt_credentials_family": _misspelt_family,
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_check_refuses_what_run_refuses_with_the_same_one_line(
    tmp_path: Path, listening_port: int, case: str
) -> None:
    extra, fragments = CASES[case](tmp_path, listening_port)
    base = {
        "site": "site: {id: t16, cap_kw: 50}\n",
        "miners": "miners: {addresses: [127.91.0.1]}\n",
        "state_dir": f"state_dir: {tmp_path / 'state'}\n",
        "control_socket": f"control_socket: {{path: {tmp_path / 'ctl.sock'}}}\n",
        "metrics": "metrics: {enabled: false}\n",
    }
    base[extra.split(":", 1)[0]] = extra  # the case replaces its section
    path = tmp_path / "site.yaml"
    path.write_text("".join(base.values()))

    check = hashflex("config", "check", "--config", str(path))
    run = hashflex("run", "--config", str(path))

    assert check.returncode == 1, check.stderr
    assert run.returncode == 2, run.stderr
    for result in (check, run):
        assert "Traceback" not in result.stdout + result.stderr
    refused = error_lines(check.stderr)
    assert len(refused) == 1, check.stderr
    assert error_lines(run.stderr) == refused
    assert run.stderr.strip().splitlines() == refused, "run printed more than the error line"
    assert not (tmp_path / "state").exists(), "run touched the state folder of a config it refuses"
    line = refused[0]
    assert line.startswith(f"error: {path}: "), line  # the file
    for fragment in fragments:  # the field, the value and what to do
        assert fragment in line, (fragment, line)


def test_a_config_with_only_site_and_miners_has_no_grid_link_and_passes_config_check(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(MINIMAL)
    cfg = load_config(path)
    assert cfg.mqtt.enabled is False
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"mqtt": "disabled"' in result.stdout


def test_mqtt_without_a_grid_key_says_how_to_make_and_list_one(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(MINIMAL + "mqtt: {host: 127.0.0.1, port: 1883}\n")
    result = hashflex("config", "check", "--config", str(path))
    assert result.returncode == 1
    assert "grid.public_keys" in result.stderr
    assert "hashflex keygen --out keys/grid" in result.stderr
    assert "grid: {public_keys: [keys/grid.pub]}" in result.stderr
    assert "remove the mqtt section" in result.stderr


def test_the_agent_runs_a_site_from_site_and_miners_alone(tmp_path: Path) -> None:
    """The minimal file plus where to keep its files in this test (the defaults are /var/lib/hashflex and :9708)."""
    path = tmp_path / "site.yaml"
    state, sock = tmp_path / "state", tmp_path / "ctl.sock"
    path.write_text(MINIMAL + f"state_dir: {state}\ncontrol_socket: {{path: {sock}}}\nmetrics: {{port: 0}}\n")
    assert hashflex("config", "check", "--config", str(path)).returncode == 0
    files = AgentConfigFiles(path, state, sock, Ed25519PrivateKey.generate())
    with SimProcess(miners=4, base_ip="127.91.0.1") as sim, AgentProcess.start(files) as agent:
        agent.wait_for(lambda: agent.status()["miners"]["total"] == 4, 60, what="the agent sees the four miners")
        status = agent.status()
        assert status["cap_kw"] == 50
        assert not status.get("failsafe", {}).get("active"), status.get("failsafe")  # no grid link, no fail-safe
        assert sim.truth()["site"]["power_w"] > 0
        agent.ok("cap", {"cap_kw": 40})  # the local CLI's commands work without a grid link
    said = agent.log_path.read_text().count("no grid link")
    assert said == 1, agent.tail()
