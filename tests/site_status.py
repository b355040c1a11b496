"""A site's status document as the agent's status() returns it (a 10,000-miner site following a grid dispatch),
shared by the tests of what is made of it: the metrics (integration/test_ops_metrics.py) and the dashboard
(unit/test_ops_dashboard.py)."""

from __future__ import annotations

from typing import Any

STATUS: dict[str, Any] = {
    "ts": 1_700_000_000.0,
    "site_id": "demo",
    "version": "0.1.0",
    "target_kw": 38000.0,
    "target_reason": "grid:d-17",
    "target_source": "grid",
    "cap_kw": 45000.0,
    "licensed_cap_kw": 45000.0,
    "power_kw_measured": 40500.0,
    "power_kw_estimated": 41200.0,
    "power_kw_worst_case": 43000.0,
    "hashrate_ths": 1_230_000.0,
    "miners": {"hashing": 9812, "throttled": 120, "sleeping": 50, "waking": 3, "unreachable": 15, "total": 10000},
    "dispatches": [
        {"id": "d-17", "source": "grid", "target_kw": 38000.0, "status": "active"},
        {"id": "d-16", "source": "grid", "target_kw": 30000.0, "status": "expired"},
    ],
    "failsafe": {"active": False, "since": None, "reason": None, "last_heartbeat": 1_699_999_990.0},
    "broker": {"state": "connected", "since": 1_699_990_000.0},
    "alarms": ["miner 10.0.0.7 ignores commands"],
    "gateway": {"cpu_pct": 12.5, "mem_pct": 40.0, "disk_free_mb": 2048.0, "rss_mb": 310.0, "low_disk": False},
    "tick": {"n": 8123, "dur_ms": 12.0, "ts": 1_699_999_999.0},
}
