"""`hashflex discover CIDR…` against the simulated site: a table, or one JSON document with --json."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hashflex.sim.testing import SimProcess

pytestmark = pytest.mark.timeout(120)

BASE_IP = "127.23.0.1"  # this suite's loopback range (127.20-127.29)
HASHFLEX = [sys.executable, "-m", "hashflex"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site() -> Iterator[SimProcess]:
    with SimProcess(miners=9, mix="luxos:34,whatsminer:33,antminer:33", base_ip=BASE_IP, seed=3) as sim:
        yield sim


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HASHFLEX, *args], capture_output=True, text=True, timeout=90, cwd=ROOT, check=False)


def test_discover_json_lists_every_miner_with_its_capability(site: SimProcess) -> None:
    # a /27 around the site: 9 miners, the other addresses answer nothing
    done = run("discover", "127.23.0.0/27", "--json", "--concurrency", "16")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert doc["status"] == "ok"
    assert doc["addresses"] == 30
    found = {m["ip"]: m for m in doc["found"]}
    assert set(found) == set(site.ips)
    truth = {m["ip"]: m for m in site.truth()["miners"]}
    kinds = {"luxos": "presets", "whatsminer": "range", "antminer": "on_off"}
    for ip, miner in found.items():
        assert miner["family"] == truth[ip]["family"]
        assert miner["capability"]["kind"] == kinds[miner["family"]]
        assert miner["nominal_w"] > 0
        assert miner["mac"]


def test_discover_prints_a_table(site: SimProcess) -> None:
    done = run("discover", f"{site.ips[0]}-{site.ips[-1]}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split("\t")[:3] == ["IP", "FAMILY", "MODEL"]  # not a terminal: tab-separated
    assert len(lines) == 1 + len(site.ips)
    assert "9 miner(s) found on 9 address(es)" in done.stderr


def test_discover_refuses_a_bad_range_before_scanning() -> None:
    done = run("discover", "127.23.0.9-127.23.0.1", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"] == "range '127.23.0.9-127.23.0.1' ends before it starts"
