"""Gateway health from psutil: real values for this machine and process, and the low-disk alarm."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

from hashflex.agent.runtime.health import existing_ancestor, gateway_health


def test_values_for_this_gateway(tmp_path: Path) -> None:
    health = gateway_health(tmp_path, disk_alarm_mb=0)
    assert set(health) == {"cpu_pct", "mem_pct", "disk_free_mb", "rss_mb", "low_disk"}
    assert 0.0 <= health["cpu_pct"] <= 100.0
    assert 0.0 < health["mem_pct"] <= 100.0
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    assert abs(health["disk_free_mb"] - free_mb) < max(50.0, free_mb * 0.01)
    rss_mb = psutil.Process().memory_info().rss / 2**20
    assert abs(health["rss_mb"] - rss_mb) < 50.0
    assert health["rss_mb"] > 10
    assert health["low_disk"] is False


def test_low_disk_alarm_when_free_space_is_under_the_threshold(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    assert gateway_health(tmp_path, disk_alarm_mb=free_mb * 10 + 1)["low_disk"] is True
    assert gateway_health(tmp_path, disk_alarm_mb=free_mb / 10)["low_disk"] is False


def test_state_dir_not_created_yet_uses_its_filesystem(tmp_path: Path) -> None:
    missing = tmp_path / "var" / "lib" / "hashflex"
    assert existing_ancestor(missing) == tmp_path
    assert gateway_health(missing, disk_alarm_mb=0)["disk_free_mb"] > 0
    assert not missing.exists()
