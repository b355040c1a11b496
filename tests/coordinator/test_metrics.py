"""The coordinator's Prometheus endpoint, scraped over HTTP: the program's figures from the latest snapshot, series
gone with the site or dispatch that left, and a failing snapshot still a good scrape (leader 0)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from hashflex.coordinator.metrics import CoordinatorMetrics

HOST = "127.73.0.2"  # this task's loopback range


def snapshot(sites: dict[str, dict[str, Any]], dispatches: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "leader": True,
        "sites": sites,
        "counts": {"allocation": 3, "redispatch": 1, "command_accepted": 2, "command_refused": 1},
        "status": {"program": "p", "revision": 7, "alarms": ["short"], "dispatches": dispatches},
    }


@pytest.fixture
def served() -> Iterator[tuple[CoordinatorMetrics, dict[str, Any], int]]:
    holder: dict[str, Any] = {"snap": None}

    def provide() -> Any:
        if isinstance(holder["snap"], Exception):
            raise holder["snap"]
        return holder["snap"]

    metrics = CoordinatorMetrics(provide, version="9.9", commit="abc")
    port = metrics.start_http(HOST, 0)
    yield metrics, holder, port
    metrics.stop_http()


def scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return [line for line in resp.read().decode().splitlines() if not line.startswith("#")]


def test_the_program_as_scraped(served: tuple[CoordinatorMetrics, dict[str, Any], int]) -> None:
    _, holder, port = served
    site = {"site": "a", "share_w": 40e6, "counted_w": 40e6, "present_w": 39e6}
    holder["snap"] = snapshot(
        {"a": {"state": "ok", "present_w": 39e6}, "b": {"state": "offline", "present_w": 25e6}},
        [
            {
                "id": "eve",
                "kind": "hold",
                "level_now_w": 60e6,
                "unmet_w": 4e6,
                "sites": [site, {"site": "b", "share_w": None, "counted_w": 30e6, "present_w": 25e6}],
            },
            {"id": "cap", "kind": "cap", "level_now_w": 80e6, "unmet_w": 0.0, "sites": [{**site, "share_w": 50e6}]},
        ],
    )
    lines = scrape(port)
    for line in (
        'hashflex_coordinator_build_info{commit="abc",version="9.9"} 1.0',
        "hashflex_coordinator_leader 1.0",
        "hashflex_program_target_watts 6e+07",
        "hashflex_program_short_watts 4e+06",
        "hashflex_program_metered_watts 6.4e+07",
        'hashflex_program_sites{state="ok"} 1.0',
        'hashflex_program_sites{state="offline"} 1.0',
        'hashflex_program_sites{state="stale"} 0.0',
        'hashflex_program_site_share_watts{site="a"} 4e+07',  # the lower of its two shares: what binds
        'hashflex_program_site_delivered{site="a"} 1.0',
        'hashflex_program_site_counted_watts{site="b"} 3e+07',
        'hashflex_program_dispatch_target_watts{dispatch="eve",kind="hold"} 6e+07',
        'hashflex_program_dispatch_short_watts{dispatch="eve"} 4e+06',
        "hashflex_program_allocations_total 3.0",
        "hashflex_program_redispatches_total 1.0",
        'hashflex_program_commands_total{outcome="refused"} 1.0',
        "hashflex_program_alarms_active 1.0",
    ):
        assert line in lines, line
    assert not any(line.startswith('hashflex_program_site_share_watts{site="b"}') for line in lines)
    # site b leaves the config, the cap ends: their series are gone at the next scrape
    eve = {**holder["snap"]["status"]["dispatches"][0], "sites": [site]}
    holder["snap"] = snapshot({"a": {"state": "ok", "present_w": 39e6}}, [eve])
    lines = scrape(port)
    assert not any('site="b"' in line or 'dispatch="cap"' in line for line in lines)
    # a snapshot that fails: still a scrape (build info, leader 0), said once in the log
    holder["snap"] = RuntimeError("boom")
    lines = scrape(port)
    assert "hashflex_coordinator_leader 0.0" in lines
    assert not any(line.startswith("hashflex_program_target_watts") for line in lines)
