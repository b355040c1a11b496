"""The chaos runs (tests/bench/chaos_*.py) at small counts, in the normal suite: the whole agent on the simulated
site, a real Mosquitto, real SQLite; the broker killed, the agent killed at its crash points and at random, the state
directory full / locked / read-only, hostile input on every channel. Each must end with nothing lost, nothing applied
twice, no violation (the site above its limit, a state change from refused input, a missing alarm) and no crash.

scripts/chaos.sh runs the same at full counts (100 cycles each, 10,000 fuzz payloads per channel).

Loopback range of this file: 127.185.0.0 - 127.188.255.255 (one /16 per test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bench import chaos_broker, chaos_disk, chaos_fuzz, chaos_kill
from tests.bench.chaos_common import Row, table


def check(row: Row, cycles: int) -> None:
    print("\n" + table([row]) + "\n" + "\n".join(f"  - {n}" for n in row.notes))
    assert row.cycles == cycles, f"only {row.cycles} of {cycles} cycles ran: {row.notes}"
    assert row.crashes == 0, row.notes
    assert row.lost == 0, row.notes
    assert row.doubled == 0, row.notes
    assert row.violations == 0, row.notes


@pytest.mark.timeout(240)
def test_broker_killed_and_restarted_loses_and_doubles_no_dispatch(tmp_path: Path) -> None:
    row = chaos_broker.run(4, seed=11, base_ip="127.185.0.1", workdir=tmp_path)
    check(row, 4)
    assert row.acked > 0
    assert row.applied_once == row.acked


@pytest.mark.timeout(300)
def test_agent_killed_at_crash_points_and_at_random_keeps_the_site_and_the_dispatches(tmp_path: Path) -> None:
    row = chaos_kill.run(6, seed=12, base_ip="127.186.0.1", workdir=tmp_path, verify_every=3)
    check(row, 6)
    assert row.acked > 0
    assert row.applied_once == row.acked


@pytest.mark.timeout(300)
def test_state_dir_full_locked_and_read_only_keeps_the_site_and_the_dispatches(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "mounts a tmpfs: run the suite as root (as CI here does)"
    row = chaos_disk.run(len(chaos_disk.FAULTS), seed=13, base_ip="127.187.0.1", workdir=tmp_path)
    check(row, len(chaos_disk.FAULTS))
    assert row.applied_once == row.acked


@pytest.mark.timeout(240)
def test_fuzzed_input_on_every_channel_is_refused_without_a_trace_in_the_state(tmp_path: Path) -> None:
    rows = chaos_fuzz.run(300, seed=14, base_ip="127.188.0.1", workdir=tmp_path, batch=100)
    assert [r.runner for r in rows] == ["fuzz: mqtt commands", "fuzz: heartbeat", "fuzz: control socket"]
    for row in rows:
        check(row, 300)
    assert rows[0].acked == 300  # a reply for each
    assert rows[2].acked == 300
