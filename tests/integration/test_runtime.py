"""The agent end to end: `hashflex run` as a subprocess, a simulated site over real TCP (unmodified pyasic), real
SQLite, driven through the control socket. Ground truth comes from the simulator, never from the agent.

Loopback range of this file: 127.70.0.0/16 (see COMMON.md: each helper's tests keep to their own range).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, iso, write_agent_config

pytestmark = pytest.mark.timeout(240)

MIX = "luxos:40,whatsminer:40,antminer:20"  # power limits (LuxOS profiles, Whatsminer watts) and on/off only


def nominal_kw(sim: SimProcess) -> float:
    return sum(float(m["nominal_w"]) for m in sim.truth()["miners"]) / 1000.0


def truth_kw(sim: SimProcess) -> float:
    return float(sim.truth()["site"]["power_w"]) / 1000.0


def dispatch_by_id(agent: AgentProcess, dispatch_id: str, *, closed: bool = True) -> dict[str, Any] | None:
    for d in agent.ok("dispatches", {"all": closed})["dispatches"]:
        if d["id"] == dispatch_id:
            return d
    return None


@pytest.fixture(scope="module")
def site() -> Any:
    # woken miners reach full power in 10 s (the default 180 s is realistic, and too slow for these tests)
    with SimProcess(miners=12, mix=MIX, base_ip="127.70.1.1", seed=11, extra_args=["--wake-s", "10"]) as sim:
        yield sim


def wait_kw_at_most(agent: AgentProcess, sim: SimProcess, kw: float, timeout: float) -> float:
    agent.wait_for(lambda: truth_kw(sim) <= kw, timeout, what=f"site ≤ {kw:.1f} kW")
    return truth_kw(sim)


def test_dispatch_changes_ground_truth_and_is_reported(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    files = write_agent_config(tmp_path, site.ips, cap_kw=round(full * 1.2, 1))
    with AgentProcess.start(files) as agent:
        status = agent.status()
        assert status["miners"]["total"] == 12
        assert status["miners"]["unreachable"] == 0
        target = round(full * 0.5, 1)
        reply = agent.request("dispatch", agent.signed({"id": "rt-half", "target_kw": target}))
        assert reply.is_ok, reply
        assert reply.data["dispatch"]["status"] == "active"
        started = time.monotonic()
        wait_kw_at_most(agent, site, target, timeout=30)
        took = time.monotonic() - started
        d = agent.wait_for(lambda: (x := dispatch_by_id(agent, "rt-half")) and x["target_met_at"] and x, 15)
        assert d["commands_sent_at"] is not None
        assert d["time_to_target_s"] is not None
        events = [e["type"] for e in agent.ok("events", {"limit": 200})["events"]]
        for expected in ("received", "accepted", "commands_sent", "target_reached"):
            assert expected in events, events
        # the site stays under the target while the dispatch holds
        for _ in range(10):
            assert truth_kw(site) <= target + 0.05 * full
            time.sleep(0.3)
        # cancel: the site may come back up
        cancel = agent.request("cancel", agent.signed({"id": "rt-half-cancel", "dispatch_id": "rt-half"}))
        assert cancel.is_ok, cancel
        assert cancel.data["status"] == "cancelled"
        agent.wait_for(lambda: truth_kw(site) > target + 0.1 * full, 40, what="site back above the dispatch level")
        print(f"dispatch to {target:.1f} kW met after {took:.1f} s")


def test_repeated_id_is_never_applied_twice(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    files = write_agent_config(tmp_path, site.ips, cap_kw=round(full * 1.2, 1))
    with AgentProcess.start(files) as agent:
        doc = agent.signed({"id": "rt-once", "target_kw": round(full * 0.6, 1)})
        first = agent.request("dispatch", doc)
        assert first.is_ok
        again = agent.request("dispatch", doc)
        assert again.to_dict() == first.to_dict()  # the stored reply, word for word
        assert agent.ok("cancel", agent.signed({"id": "rt-once-x", "dispatch_id": "rt-once"}))["status"] == "cancelled"
        # the same dispatch again after its cancel: the stored reply, and it does not come back to life
        third = agent.request("dispatch", doc)
        assert third.to_dict() == first.to_dict()
        d = dispatch_by_id(agent, "rt-once")
        assert d is not None
        assert d["status"] == "cancelled"
        assert dispatch_by_id(agent, "rt-once", closed=False) is None
        assert agent.status()["target_source"] == "cap"
        accepted = [
            e
            for e in agent.ok("events", {"limit": 500})["events"]
            if e["type"] == "accepted" and e["data"].get("id") == "rt-once"
        ]
        assert len(accepted) == 1


def test_bad_input_is_refused_and_changes_nothing(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    files = write_agent_config(tmp_path, site.ips, cap_kw=round(full * 1.2, 1))
    with AgentProcess.start(files) as agent:
        before = agent.status()
        cases = [
            ("dispatch", {"id": "u1", "issued_at": "2030-01-01T00:00:00Z", "target_kw": 1}, "unsigned"),
            ("dispatch", agent.signed({"id": "u2", "target_kw": -1}), "out_of_range"),
            ("dispatch", agent.signed({"id": "u3", "target_kw": full * 5}), "out_of_range"),
            ("dispatch", agent.signed({"id": "u4", "target_kw": 1, "bogus": 1}), "bad_request"),
            ("cap", {"cap_kw": "-5kW"}, "out_of_range"),
            ("curtail", {"to_kw": 1, "by_kw": 2}, "bad_request"),
            ("cancel", agent.signed({"id": "u5", "dispatch_id": "nope"}), "unknown_dispatch"),
            ("launch", {}, "unknown_verb"),
        ]
        for verb, payload, code in cases:
            reply = agent.request(verb, payload)
            assert reply.status == "error", (verb, payload)
            assert reply.error_code == code, (verb, reply)
            assert reply.error_message
        after = agent.status()
        assert after["dispatches"] == before["dispatches"] == []
        assert after["cap_kw"] == before["cap_kw"]
        assert after["target_kw"] == before["target_kw"]
        rejected = [e for e in agent.ok("events", {"limit": 500})["events"] if e["type"] == "rejected"]
        assert len(rejected) == len(cases)


def test_operator_override_survives_a_restart_without_a_surge(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    files = write_agent_config(tmp_path, site.ips, cap_kw=round(full * 1.2, 1))
    target = round(full * 0.4, 1)
    with AgentProcess.start(files) as agent:
        data = agent.ok("curtail", {"id": "rt-op", "to_kw": target})
        assert data["dispatch"]["source"] == "operator"
        wait_kw_at_most(agent, site, target, timeout=30)
        agent.ok("cap", {"cap_kw": round(full * 1.1, 1)})
    # stopped (SIGTERM): miners are left as they are, and the agent says so (issue 16 item 10)
    assert truth_kw(site) <= target + 0.05 * full
    assert "miners left as they are; hashflex no longer holds the cap" in agent.log_path.read_text()
    with AgentProcess.start(files) as agent:
        status = agent.status()
        assert [d["id"] for d in status["dispatches"]] == ["op:rt-op"]  # overrides: their own id namespace
        assert status["cap_kw"] == round(full * 1.1, 1)
        assert status["target_source"] == "operator"
        for _ in range(15):  # the restart does not wake what the override holds down
            assert truth_kw(site) <= target + 0.05 * full
            time.sleep(0.3)
        assert agent.ok("resume", {})["cancelled"] == ["op:rt-op"]
        agent.wait_for(lambda: truth_kw(site) > target + 0.1 * full, 40, what="site back up after resume")


def test_killed_agent_restarts_in_the_right_state(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    scale = 4.0  # the agent's clock runs 4x (both runs share one timeline: the same origin)
    files = write_agent_config(tmp_path, site.ips, cap_kw=round(full * 1.2, 1), time_scale=scale)
    origin = time.time()
    target = round(full * 0.5, 1)
    agent = AgentProcess.start(files, time_scale=scale, time_origin=origin)
    try:
        end = agent.now() + 48  # 12 s of wall time
        reply = agent.request("dispatch", agent.signed({"id": "rt-kill", "target_kw": target, "end": iso(end)}))
        assert reply.is_ok
        wait_kw_at_most(agent, site, target, timeout=30)
    finally:
        agent.kill()  # SIGKILL: no clean-up at all
    with AgentProcess.start(files, time_scale=scale, time_origin=origin) as agent:
        d = dispatch_by_id(agent, "rt-kill", closed=False)
        assert d is not None
        assert d["target_met_at"] is not None  # progress survived
        while agent.now() < end - 2:
            assert truth_kw(site) <= target + 0.05 * full
            time.sleep(0.3)
        closed = agent.wait_for(lambda: (x := dispatch_by_id(agent, "rt-kill")) and x["status"] == "expired" and x, 15)
        assert closed["close_reason"] == "window ended"


def test_dispatch_that_ended_while_down_is_closed_not_applied(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    scale = 10.0  # the agent's clock runs 10x: a minute of site time passes in 6 s
    files = write_agent_config(tmp_path, site.ips, cap_kw=round(full * 1.2, 1), time_scale=scale)
    origin = time.time()
    with AgentProcess.start(files, time_scale=scale, time_origin=origin) as agent:
        start, end = agent.now() + 40, agent.now() + 50
        doc = {"id": "rt-later", "target_kw": round(full * 0.2, 1), "start": iso(start), "end": iso(end)}
        reply = agent.request("dispatch", agent.signed(doc))
        assert reply.is_ok
        assert reply.data["dispatch"]["status"] == "pending"
    time.sleep(max(0.0, (end - agent.now()) / scale) + 0.5)  # the window passes while the agent is down
    with AgentProcess.start(files, time_scale=scale, time_origin=origin) as agent:
        d = dispatch_by_id(agent, "rt-later")
        assert d is not None
        assert d["status"] == "expired"
        assert d["close_reason"] == "expired while the agent was down"
        assert d["commands_sent_at"] is None
        assert agent.status()["target_source"] == "cap"


def test_corrupt_store_starts_safe_at_the_failsafe_level(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    level = round(full * 0.3, 1)
    files = write_agent_config(
        tmp_path, site.ips, cap_kw=round(full * 1.2, 1), overrides={"failsafe": {"level": level}}
    )
    files.state_dir.mkdir(parents=True)
    (files.state_dir / "hashflex.db").write_bytes(b"this is not a database" * 200)
    with AgentProcess.start(files) as agent:
        status = agent.status()
        assert any(a["key"] == "safe_start" for a in status["alarms"])
        assert status["target_kw"] == level
        wait_kw_at_most(agent, site, level, timeout=30)
        assert list(files.state_dir.glob("hashflex.db.corrupt-*"))
        assert agent.ok("resume", {})["cancelled"] == ["safe-start"]
        assert not any(a["key"] == "safe_start" for a in agent.status()["alarms"])


def test_on_shutdown_sleep_puts_the_site_to_sleep_on_stop(site: SimProcess, tmp_path: Path) -> None:
    full = nominal_kw(site)
    scale = 4.0  # min on/off times pass 4x faster
    files = write_agent_config(
        tmp_path,
        site.ips,
        cap_kw=round(full * 1.2, 1),
        time_scale=scale,
        overrides={"control": {"on_shutdown": "sleep"}},
    )
    running = lambda: sum(m["state"] != "sleeping" for m in site.truth()["miners"])  # noqa: E731
    with AgentProcess.start(files, time_scale=scale) as agent:
        agent.wait_for(lambda: running() >= 6, 30, what="miners running before the stop")
        assert agent.stop() == 0
    assert running() == 0
    assert "miners put to sleep (those that could be reached); hashflex no longer holds the cap" in (
        agent.log_path.read_text()
    )
    # the next agent (default: leave) finds them asleep, and wakes them again within the stagger and the cap
    files = write_agent_config(tmp_path / "again", site.ips, cap_kw=round(full * 1.2, 1), time_scale=scale)
    with AgentProcess.start(files, time_scale=scale) as agent:
        agent.wait_for(lambda: running() >= 6, 30, what="miners woken again")
