"""The command line: summary line, ready file, clean shutdown, refused arguments, determinism, energy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hashflex.sim.testing import SimProcess
from tests.sim.conftest import wait_until

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def start(
    args: list[str], tmp_path: Path, command: list[str] | None = None
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*(command or [sys.executable, "-m", "hashflex.sim"]), *args, "--truth-port", "0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    wait_until(lambda: ready.exists() or proc.poll() is not None, 30, "ready file")
    assert proc.poll() is None, proc.communicate()
    return proc, json.loads(ready.read_text())


@pytest.mark.parametrize("via_hashflex", [False, True])
def test_one_summary_line_then_a_clean_exit_on_sigterm(tmp_path: Path, via_hashflex: bool) -> None:
    command = [str(Path(sys.executable).parent / "hashflex"), "sim"] if via_hashflex else None
    base = "127.17.1.1" if via_hashflex else "127.17.0.1"
    proc, info = start(
        ["--miners", "10", "--mix", "luxos:4,whatsminer:4,antminer:2", "--base-ip", base], tmp_path, command
    )
    assert info["ips"][0] == base
    assert len(info["ips"]) == 10
    assert info["pid"] > 0
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("hashflex sim: 10 miners (luxos 4, whatsminer 4, antminer 2), 0.032 MW nominal")
    assert info["truth_url"] + "/truth" in lines[0]
    assert lines[-1] == "hashflex sim: stopped"
    assert "Traceback" not in err


def test_sigint_stops_it_too(tmp_path: Path) -> None:
    proc, _ = start(["--miners", "2", "--mix", "luxos:1", "--base-ip", "127.17.2.1"], tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--miners", "0"], "--miners must be >= 1"),
        (["--speed", "0"], "must be > 0"),
        (["--mix", "avalon:1"], "unknown family 'avalon'"),
        (["--mix", "luxos:x"], "bad weight"),
        (["--base-ip", "10.0.0.1"], "loopback"),
        (["--faults", '{"mode": "melt"}'], "unknown mode"),
        (["--faults", "{not json"], "Expecting"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hashflex.sim", "--base-ip", "127.17.3.1", "--truth-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_port_in_use_is_reported_not_a_traceback() -> None:
    with SimProcess(miners=1, mix="luxos:1", base_ip="127.17.4.1"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "hashflex.sim",
                "--miners",
                "1",
                "--mix",
                "luxos:1",
                "--base-ip",
                "127.17.4.1",
                "--truth-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
    assert proc.returncode == 2
    assert "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_same_seed_builds_the_same_site() -> None:
    def fingerprint(base: str, seed: int) -> list[tuple[str, str, float]]:
        with SimProcess(miners=12, base_ip=base, seed=seed) as site:
            return [(m["family"], m["model"], m["nominal_w"]) for m in site.truth()["miners"]]

    a, b, c = fingerprint("127.17.5.1", 4), fingerprint("127.17.6.1", 4), fingerprint("127.17.7.1", 5)
    assert a == b
    assert a != c
    assert [f for f, _, _ in a] == ["luxos"] * 5 + ["whatsminer"] * 5 + ["antminer"] * 2


def test_energy_integrates_power_over_sim_time() -> None:
    with SimProcess(miners=5, mix="luxos:1", base_ip="127.17.8.1", speed=50.0) as site:
        first = site.truth()
        time.sleep(1.0)
        second = site.truth()
    dt = second["sim_time_s"] - first["sim_time_s"]
    assert dt == pytest.approx(50.0, rel=0.2)  # sim time runs at --speed
    kwh = second["site"]["energy_kwh"] - first["site"]["energy_kwh"]
    assert kwh == pytest.approx(first["site"]["power_w"] * dt / 3.6e6, rel=0.01)
    assert second["speed"] == 50.0


def test_truth_is_bound_to_localhost_only(tmp_path: Path) -> None:
    proc, info = start(["--miners", "1", "--mix", "luxos:1", "--base-ip", "127.17.9.1"], tmp_path)
    try:
        assert info["truth_url"].startswith("http://127.0.0.1:")
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=False).stdout
        mine = [line for line in out.splitlines() if f"pid={proc.pid}," in line]
        local = [line.split()[3] for line in mine]  # State Recv-Q Send-Q Local Peer ...
        assert sorted(local) == sorted([info["truth_url"].removeprefix("http://"), "127.17.9.1:4028"])
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=10)
