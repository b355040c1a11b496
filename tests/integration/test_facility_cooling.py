"""Facility loads (issue 14): the real agent (`hashflex run`) with a circuit's cooling configured, against the
simulated site's cooling devices on Modbus TCP, judged by the simulator's own record (GET /facility).

Two circuits of three miners: pdu-a cooled by a fan drive (speed reference in a holding register), pdu-b by a pump
relay (a coil). The story:
1. the fan drive goes offline: the agent raises `cooling:pdu-a`, and a curtailment to zero still sleeps every miner
   (a failed cooling device never blocks curtailment);
2. the drive back, the alarm clears; each circuit's cooling steps down only once its miners have slept for
   `down_after_s` (the simulator's timeline of setpoints against its record of the sleeps);
3. the curtailment ends: each circuit's cooling is raised first, and no miner of the circuit wakes before its
   cooling has been running for `up_lead_s` (the simulator's exact wake times).

Clocks: the simulator runs --speed K and the agent --time-scale K; deadlines below are wall seconds.
Loopback range of this file: 127.75.0.0/16 (miners from 127.75.0.1, devices on 127.75.1.x).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, write_agent_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

K = 10.0  # site seconds per wall second
DOWN_AFTER_S = 20.0  # site seconds
UP_LEAD_S = 30.0
A = ["127.75.0.1", "127.75.0.2", "127.75.0.3"]
B = ["127.75.0.4", "127.75.0.5", "127.75.0.6"]
FANS, PUMP = "127.75.1.1:5021", "127.75.1.2:5021"
SLACK_S = 1.0  # sim seconds: a sleep is seen by the simulator's watcher within 50 ms of wall time (0.5 s at K)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, AgentProcess]]:
    folder: Path = tmp_path_factory.mktemp("facility")
    loads = [
        {"name": "fans-a", "address": FANS, "kind": "drive", "full_kw": 2.0, "miners": A},
        {"name": "pump-b", "address": PUMP, "kind": "relay", "full_kw": 1.0, "miners": B},
    ]
    extra = ["--meter", "127.75.1.250:5020", "--facility", json.dumps(loads), "--wake-s", "20"]
    with SimProcess(miners=6, mix="luxos:100", base_ip="127.75.0.1", seed=21, speed=K, extra_args=extra) as sim:
        nominal_kw = sum(m["nominal_w"] for m in sim.truth()["miners"]) / 1000.0
        common = {
            "port": 5021,
            "full_kw": 2.0,
            "power_register": 5,
            "down_after_s": DOWN_AFTER_S,
            "up_lead_s": UP_LEAD_S,
        }
        circuits = [
            {
                "id": "pdu-a",
                "cap_kw": round(nominal_kw, 1),
                "miners": A,
                "cooling": {
                    **common,
                    "kind": "drive",
                    "host": "127.75.1.1",
                    "setpoint_register": 1,
                    "speed_register": 3,
                    "min_pct": 30,
                    "curve": [[0, 30], [100, 100]],
                },
            },
            {
                "id": "pdu-b",
                "cap_kw": round(nominal_kw, 1),
                "miners": B,
                "cooling": {**common, "kind": "relay", "host": "127.75.1.2", "setpoint_register": 0},
            },
        ]
        files = write_agent_config(
            folder, sim.ips, cap_kw=round(nominal_kw * 1.2, 1), time_scale=K, overrides={"site": {"circuits": circuits}}
        )
        with AgentProcess.start(files, time_scale=K) as agent:
            yield sim, agent


def _loads(sim: SimProcess) -> dict[str, dict[str, Any]]:
    return {ld["name"]: ld for ld in sim.facility_truth()}


def _facility(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    return {f["circuit"]: f for f in agent.status().get("facility") or []}


def _alarm(agent: AgentProcess, key: str) -> dict[str, Any] | None:
    return next((a for a in agent.status()["alarms"] if a["key"] == key), None)


def test_cooling_steps_down_after_its_miners_sleep_and_up_before_they_wake(
    site: tuple[SimProcess, AgentProcess],
) -> None:
    sim, agent = site
    # the agent has read both devices: running, nothing held
    agent.wait_for(
        lambda: all(f["acknowledged_pct"] == 100.0 for f in _facility(agent).values()) and len(_facility(agent)) == 2,
        20,
        what="both cooling devices read",
    )
    agent.wait_for(
        lambda: sum(m["state"] == "hashing" for m in sim.truth()["miners"]) == 6, 20, what="every miner hashing"
    )

    # 1. the fan drive offline: an alarm, and the curtailment still goes out
    sim.facility_fault("fans-a", "offline")
    alarm = agent.wait_for(lambda: _alarm(agent, "cooling:pdu-a"), 10, what="the cooling:pdu-a alarm")
    assert "wakes on pdu-a are held" in alarm["message"]
    assert "sleeps go on" in alarm["message"]
    assert _facility(agent)["pdu-a"]["error"]
    assert _facility(agent)["pdu-a"]["wakes"].startswith("blocked")
    agent.ok("curtail", {"id": "cool-down", "to_kw": 0})
    agent.wait_for(
        lambda: all(m["state"] == "sleeping" for m in sim.truth()["miners"]),
        20,
        what="every miner asleep with the fan drive offline",
    )
    assert _alarm(agent, "cooling:pdu-a") is not None

    # 2. the drive back: the alarm clears; each circuit's cooling steps down once its miners slept down_after_s
    sim.facility_fault("fans-a", "clear")
    agent.wait_for(lambda: _alarm(agent, "cooling:pdu-a") is None, 20, what="the alarm cleared")
    agent.wait_for(
        lambda: all(ld["setpoint_pct"] == 0.0 for ld in _loads(sim).values()),
        20,
        what="both cooling loads stepped down",
    )
    loads = _loads(sim)
    for name, miners in (("fans-a", A), ("pump-b", B)):
        ld = loads[name]
        down_at = next(t for t, pct in ld["history"] if pct == 0.0)
        slept_at = max(t for t, ip in ld["sleeps"] if ip in miners)
        assert {ip for _t, ip in ld["sleeps"]} == set(miners)
        assert down_at >= slept_at + DOWN_AFTER_S - SLACK_S, (name, slept_at, down_at, ld["history"])
        assert ld["power_w"] == 0.0
    assert sim.meter_truth()["facility_w"] == 0.0

    # 3. the curtailment ends: cooling first, then the miners, each circuit on its own
    agent.ok("resume", {})

    # the status says why the miners wait
    def held() -> bool:
        return any(f["wakes"].startswith("held") and f["wakes_held"] == 3 for f in _facility(agent).values())

    agent.wait_for(held, 5, what="wakes held for cooling, in the status")
    agent.wait_for(
        lambda: sum(m["state"] in ("waking", "hashing") for m in sim.truth()["miners"]) == 6,
        30,
        what="every miner woken",
    )
    loads = _loads(sim)
    for name, miners in (("fans-a", A), ("pump-b", B)):
        ld = loads[name]
        down_at = next(t for t, pct in ld["history"] if pct == 0.0)
        up_at = next(t for t, pct in ld["history"] if t > down_at and pct > 0.0)
        wakes = [t for t, ip in ld["wakes"] if ip in miners]
        assert len(wakes) == 3, ld["wakes"]
        assert min(wakes) >= up_at + UP_LEAD_S, (name, up_at, sorted(wakes))
        assert ld["setpoint_pct"] == 100.0  # all three on: the top of the curve (relay: on)
    assert sim.meter_truth()["facility_w"] == pytest.approx(3000.0)
    assert not [a for a in agent.status()["alarms"] if a["key"].startswith("cooling")]
