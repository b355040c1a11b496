"""How the inputs a dispatch brings bind, end to end: `hashflex run` against the simulated site over TCP, on a scaled
clock, judged from the simulator's ground truth. A ramped grid dispatch slows only itself (issue 11, finding 3); a
revised `curtail_kw` dispatch keeps the baseline of its first revision (issue 11, finding 6).

Loopback range of this file: 127.111.0.0/16.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, site_power_kw, write_agent_config

pytestmark = pytest.mark.timeout(240)

K = 10.0  # site seconds per wall second
MIX = "luxos:40,whatsminer:40,antminer:20"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(miners=12, mix=MIX, base_ip="127.111.1.1", seed=11, speed=K, extra_args=["--wake-s", "10"]) as s:
        yield s


def full_kw(sim: SimProcess) -> float:
    return sum(float(m["nominal_w"]) for m in sim.truth()["miners"]) / 1000.0


def start(sim: SimProcess, tmp_path: Path) -> tuple[AgentProcess, float]:
    """An agent on the site, once the whole site runs (a previous test may have left miners asleep)."""
    full = full_kw(sim)
    files = write_agent_config(tmp_path, sim.ips, cap_kw=round(full * 1.2, 1), time_scale=K)
    agent = AgentProcess.start(files, time_scale=K)
    try:
        agent.ok("resume", {})

        # running, and seen running by the agent (what it takes a "curtail by" from)
        def running() -> bool:
            return site_power_kw(sim.truth()) > 0.9 * full and (agent.status().get("power_kw") or 0) > 0.9 * full

        agent.wait_for(running, 120 / K + 60, what="the whole site running")
    except BaseException:
        agent.kill()
        raise
    return agent, full


def test_operator_curtail_binds_at_once_under_a_slow_grid_ramp(sim: SimProcess, tmp_path: Path) -> None:
    agent, full = start(sim, tmp_path)
    with agent:
        start_kw = site_power_kw(sim.truth())
        # a grid dispatch far down, at 1 kW/min: on its own it takes hours to get there
        slow = agent.request(
            "dispatch", agent.signed({"id": "g-slow", "target_kw": round(full * 0.3, 1), "ramp_kw_per_min": 1})
        )
        assert slow.is_ok, slow
        to_kw = round(full * 0.6, 1)  # above the grid's level, far below where its ramp is
        cur = agent.request("curtail", {"id": "op-hold", "to_kw": to_kw})
        assert cur.is_ok, cur
        # the operator's curtail has no ramp: it binds at once, whatever the grid dispatch's ramp
        margin = 0.05 * full  # one small miner's worth and the measurement noise
        agent.wait_for(
            lambda: site_power_kw(sim.truth()) <= to_kw + margin,
            200 / K + 20,
            what=f"site ≤ {to_kw + margin:.1f} kW within 200 site-seconds",
        )
        status = agent.status()
        assert status["target_kw"] <= to_kw
        print(f"site from {start_kw:.1f} kW to {site_power_kw(sim.truth()):.1f} kW under a curtail to {to_kw} kW")


def test_revising_a_curtail_kw_dispatch_keeps_its_first_baseline(sim: SimProcess, tmp_path: Path) -> None:
    agent, full = start(sim, tmp_path)
    with agent:
        first = agent.request("dispatch", agent.signed({"id": "g-by", "curtail_kw": round(full * 0.4, 1)}))
        assert first.is_ok, first
        baseline = first.data["dispatch"]["baseline_kw"]
        assert baseline > 0.9 * full
        level = baseline - round(full * 0.4, 1)
        agent.wait_for(lambda: site_power_kw(sim.truth()) <= level + 0.05 * full, 200 / K + 20, what="first level")
        # the grid deepens the event: "by 70 %" means from where the site was before it, not from the curtailed site
        deeper = round(full * 0.7, 1)
        rev = agent.request("dispatch", agent.signed({"id": "g-by", "curtail_kw": deeper, "rev": 1}))
        assert rev.is_ok, rev
        assert rev.data["dispatch"]["baseline_kw"] == baseline
        # when the event was first accepted stays; when this revision arrived is its own
        assert rev.data["dispatch"]["accepted_at"] == first.data["dispatch"]["accepted_at"] is not None
        assert rev.data["dispatch"]["received_at"] > first.data["dispatch"]["received_at"]
        assert rev.data["dispatch"]["level_kw"] == pytest.approx(baseline - deeper, abs=1e-3)
        agent.wait_for(
            lambda: agent.status()["target_kw"] == pytest.approx(baseline - deeper, abs=1e-2),
            10 / K + 10,
            what="the revised target",
        )
