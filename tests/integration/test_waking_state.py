"""A wake-up as `status`/`miners` show it, against the simulator's ground truth (issue 16, item 8): a miner told to
wake is `waking` until its power says it is up — not "hashing" or "throttled" while it boots and ramps (a booting
unit reports mining at a fraction of its power), nor "sleeping". `hashflex run` (a subprocess) on a simulated site
over real TCP; the truth endpoint reports each miner's state.

Loopback range of this file: 127.147.0.0 – 127.147.255.255.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, write_agent_config

pytestmark = pytest.mark.timeout(240)

MIX = "luxos:40,whatsminer:40,antminer:20"
WAKE_S = 30.0  # sim seconds from wake to full power: a boot at a few % of the power, then a ramp
SETTLE_S = 3.0  # a miner waking in the truth this long is one the agent has been told about and has read since


def full_w(m: dict[str, Any]) -> float:
    """What a miner draws once up, per the truth: its limit, or its nominal power at stock."""
    return float(m["power_limit_w"] or m["nominal_w"])


def test_a_woken_miner_is_waking_until_its_power_is_up(tmp_path: Path) -> None:
    with SimProcess(miners=12, mix=MIX, base_ip="127.147.0.1", seed=3, extra_args=["--wake-s", str(WAKE_S)]) as sim:
        full_kw = sum(float(m["nominal_w"]) for m in sim.truth()["miners"]) / 1000.0
        files = write_agent_config(tmp_path, sim.ips, cap_kw=round(full_kw * 1.2, 1))
        with AgentProcess.start(files) as agent:
            target = round(full_kw * 0.2, 1)
            agent.ok("dispatch", agent.signed({"id": "w-low", "target_kw": target}))

            def sleeping() -> list[str]:
                return [m["ip"] for m in sim.truth()["miners"] if m["state"] == "sleeping"]

            asleep = agent.wait_for(lambda: ips if len(ips := sleeping()) >= 6 else [], 60, what="half the site asleep")
            time.sleep(6.0)  # past min_off_s
            agent.ok("cancel", agent.signed({"id": "w-low-cancel", "dispatch_id": "w-low"}))

            first_seen: dict[str, float] = {}  # when the truth first showed each miner waking
            checked: list[tuple[str, str, float]] = []  # (ip, agent's state, truth's power share) mid-ramp
            counted: list[tuple[int, int]] = []  # (status count waking, truth miners checked) per sample
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                truth = {m["ip"]: m for m in sim.truth()["miners"]}
                rows = {r["ip"]: r for r in agent.ok("miners", {})["miners"]}
                status = agent.status()
                now = time.monotonic()
                waking = [ip for ip, m in truth.items() if m["state"] == "waking"]
                for ip in waking:
                    first_seen.setdefault(ip, now)
                # waking in the truth for a while, and well short of its power: the agent must say waking
                mid = [
                    ip
                    for ip in waking
                    if now - first_seen[ip] >= SETTLE_S and truth[ip]["power_w"] < 0.7 * full_w(truth[ip])
                ]
                checked += [(ip, rows[ip]["state"], truth[ip]["power_w"] / full_w(truth[ip])) for ip in mid]
                if mid:
                    counted.append((status["miners"]["waking"], len(mid)))
                if first_seen and not waking:
                    break
                time.sleep(0.3)
            assert set(first_seen) >= set(asleep) - {ip for ip, m in truth.items() if m["state"] == "sleeping"}
            assert first_seen, "no miner woke"
            # the ramp (the part a booting unit already reports mining in) was sampled, not just the boot
            assert any(share > 0.3 for _ip, _state, share in checked), checked
            wrong = [(ip, state, round(share, 2)) for ip, state, share in checked if state != "waking"]
            assert not wrong, f"shown other than waking while the truth says waking: {wrong}"
            assert all(shown >= mid for shown, mid in counted), counted
            # up: shown as running once its power says so (no miner left `waking`)
            agent.wait_for(lambda: agent.status()["miners"]["waking"] == 0, 15, what="no miner shown waking")
            rows = {r["ip"]: r for r in agent.ok("miners", {})["miners"]}
            assert {rows[ip]["state"] for ip in first_seen} <= {"hashing", "throttled"}
