"""Every operator command as the installed `hashflex` executable (a real subprocess), against the real agent
(`hashflex run`) on a simulated site, through the control socket, with the MQTT broker stopped.

One site serves the module: 24 simulated miners (LuxOS, Whatsminer, stock Antminer) at 10× speed, the agent with
its MQTT link pointed at a real Mosquitto that is stopped once the link is up (the agent must keep working and say
that the link is down), and its Prometheus endpoint. Commands that change the site are judged by the simulator's
ground truth; each such test waits for the site to be back at full power before it starts, so any order works.
The agent's clock runs 10× (like the simulator's), so time ranges given to `audit export` and `energy` are the
agent's epoch seconds.

Loopback range of this file: 127.64.0.0 - 127.65.255.255.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hashflex.agent.core.audit import AuditRecord, verify_chain
from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentConfigFiles, AgentProcess, site_power_kw, write_agent_config
from tests.broker import HOST, Mosquitto, Pki, free_port

pytestmark = pytest.mark.timeout(240)

HASHFLEX = str(Path(sys.executable).parent / "hashflex")
MINERS = 24
MIX = "luxos:40,whatsminer:40,antminer:20"
SCALE = 10.0  # site seconds per wall second, simulator and agent alike
WAKE_SITE_S = 30.0  # a woken simulated miner reaches full power in 30 site s (3 wall s)
TOLERANCE_SHARE = 0.02  # ground truth may sit this share of full power above a level (PSU spread the agent can't see)
# From a command to the site at its new level: the fan-out (< 1 s), a sweep to confirm (1 s), the 4-5 site s power
# ramp; x4 for a loaded 2-core machine.
SETTLE_S = 15.0
# Back to full power: min_off (5 wall s in the harness config), the wake (3 wall s), a sweep; with margin.
RECOVER_S = 30.0
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


@dataclass
class Site:
    sim: SimProcess
    agent: AgentProcess
    files: AgentConfigFiles
    full_kw: float
    cap_kw: float
    metrics_port: int
    broker: Mosquitto

    @property
    def config(self) -> str:
        return str(self.files.path)

    @property
    def tol_kw(self) -> float:
        return TOLERANCE_SHARE * self.full_kw

    def truth_kw(self) -> float:
        return site_power_kw(self.sim.truth())

    def wait_truth(self, predicate: Callable[[float], bool], timeout: float, what: str) -> float:
        """The first ground-truth site power (kW) that satisfies `predicate`, polled until `timeout`."""

        def check() -> float | None:
            kw = self.truth_kw()
            return kw if predicate(kw) else None

        found = self.agent.wait_for(check, timeout, what=what)
        assert found is not None
        return found

    def back_to_full(self) -> None:
        """The state-changing tests start here: no override, the cap at the licensed cap, the site fully up."""
        self.wait_truth(lambda kw: kw >= 0.97 * self.full_kw, RECOVER_S, "the site back at full power")
        status = self.agent.status()
        assert status["target_source"] == "cap", status["target_reason"]
        assert status["cap_kw"] == self.cap_kw


def hashflex(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HASHFLEX, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env or ENV
    )


def same_model(agent_says: str, truth_says: str) -> bool:
    """pyasic names models its own way ("M50S VH50" for the simulator's "M50S", "S19K Pro" for "Antminer S19k
    Pro"): the same machine when the agent's first word is one of the simulator's."""
    return agent_says.split(maxsplit=1)[0].lower() in truth_says.lower().split()


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    """Exit 0 and exactly one JSON document on stdout (json.loads refuses anything after it)."""
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return json.loads(done.stdout)


def refused(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    for word in words:
        assert word in done.stderr, f"{word!r} not in: {done.stderr}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, mosquitto_pki: Pki) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("cli-e2e")
    broker = Mosquitto(folder / "broker", pki=mosquitto_pki).start()
    metrics_port = free_port()
    with SimProcess(
        miners=MINERS, mix=MIX, base_ip="127.64.0.1", seed=64, speed=SCALE, extra_args=["--wake-s", str(WAKE_SITE_S)]
    ) as sim:
        full_kw = site_power_kw(sim.truth())
        cap_kw = round(full_kw * 1.1, 1)
        files = write_agent_config(
            folder / "agent",
            sim.ips,
            cap_kw=cap_kw,
            time_scale=SCALE,
            site_id=f"e2e-{uuid.uuid4().hex[:6]}",
            overrides={
                "mqtt": {"enabled": True, "host": HOST, "port": broker.plain_port, "keepalive_s": 5 * SCALE},
                "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
            },
        )
        agent = AgentProcess.start(files, time_scale=SCALE, ready_timeout=90)
        try:
            agent.wait_for(lambda: agent.status()["broker"]["state"] == "connected", 20, what="the MQTT link up")
            broker.stop()  # from here on the broker is gone: the agent must carry on without it
            agent.wait_for(lambda: agent.status()["broker"]["state"] != "connected", 30, what="the link seen down")
            yield Site(sim, agent, files, full_kw, cap_kw, metrics_port, broker)
        finally:
            agent.stop()
            broker.stop()


# ---------------------------------------------------------------------------------------------- reading
def agent_in_step_with_truth(site: Site) -> None:
    """After a change, the agent's picture lags ground truth by up to a sweep: wait until they agree."""
    site.agent.wait_for(
        lambda: abs(site.agent.status()["power_kw"] - site.truth_kw()) <= 0.05 * site.full_kw,
        10,
        what="the agent's reading to agree with ground truth",
    )


def test_status_shows_the_site_and_the_broker_link_down(site: Site) -> None:
    site.back_to_full()
    agent_in_step_with_truth(site)
    doc = ok_json(hashflex("status", "--config", site.config, "--json"))
    assert doc["broker"]["state"] in ("disconnected", "connecting")
    assert doc["miners"]["total"] == MINERS
    assert doc["miners"]["unreachable"] == 0
    assert doc["cap_kw"] == site.cap_kw
    assert doc["target_source"] == "cap"
    assert abs(doc["power_kw"] - site.truth_kw()) <= 0.05 * site.full_kw
    text = hashflex("status", "--config", site.config)
    assert text.returncode == 0, text.stderr
    broker_line = next(line for line in text.stdout.splitlines() if line.strip().startswith("broker"))
    assert "disconnected" in broker_line or "connecting" in broker_line
    assert f"({MINERS} total)" in text.stdout
    assert "the site cap binds" in text.stdout
    assert "no dispatch in force" in text.stdout
    # the config may come from the environment instead of --config
    from_env = ok_json(hashflex("status", "--json", env={**ENV, "HASHFLEX_CONFIG": site.config}))
    assert from_env["site_id"] == doc["site_id"]
    # the agent keeps ticking with the broker gone (a tick a wall second here)
    assert from_env["tick"]["n"] > doc["tick"]["n"]


def test_watch_prints_count_views_and_one_json_array(site: Site) -> None:
    text = hashflex("watch", "--count", "2", "-n", "0.5", "--config", site.config)
    assert text.returncode == 0, text.stderr
    assert text.stdout.count(f"hashflex · site {site.files.doc['site']['id']}") == 2
    docs = ok_json(hashflex("watch", "--count", "3", "-n", "0.8", "--json", "--config", site.config))
    assert isinstance(docs, list)
    assert len(docs) == 3
    assert docs[0]["tick"]["n"] <= docs[1]["tick"]["n"] <= docs[2]["tick"]["n"]
    assert docs[2]["tick"]["n"] > docs[0]["tick"]["n"]  # live: the views differ
    refused(hashflex("watch", "--json", "--config", site.config), 1, "--json needs --count")


def test_miners_lists_every_miner_and_sorts_and_filters(site: Site) -> None:
    every = ok_json(hashflex("miners", "--config", site.config, "--json"))
    rows = every["miners"]
    assert every["total"] == MINERS
    assert {r["ip"] for r in rows} == set(site.sim.ips)
    truth = {m["ip"]: m for m in site.sim.truth()["miners"]}
    assert all(
        r["family"] == truth[r["ip"]]["family"] and same_model(r["model"], truth[r["ip"]]["model"]) for r in rows
    )

    top = ok_json(hashflex("miners", "--sort", "power", "--desc", "--limit", "5", "--config", site.config, "--json"))
    powers = [r["power_w"] for r in top["miners"]]
    assert len(powers) == 5
    assert powers == sorted(powers, reverse=True)
    assert powers[0] == pytest.approx(max(r["power_w"] for r in rows), rel=0.05)

    hashing = ok_json(hashflex("miners", "--state", "hashing", "--config", site.config, "--json"))
    assert hashing["total"] == MINERS
    assert {r["state"] for r in hashing["miners"]} == {"hashing"}

    needle = rows[0]["model"].split()[0]
    by_model = ok_json(hashflex("miners", "--model", needle, "--config", site.config, "--json"))
    assert by_model["total"] == sum(1 for r in rows if needle.lower() in r["model"].lower()) > 0

    first4 = sorted(site.sim.ips, key=lambda ip: int(ip.rsplit(".", 1)[1]))[:4]
    by_ip = ok_json(hashflex("miners", "--ip", f"{first4[0]}-{first4[-1]}", "--config", site.config, "--json"))
    assert sorted(r["ip"] for r in by_ip["miners"]) == sorted(first4)

    table = hashflex("miners", "--sort", "efficiency", "--config", site.config)
    assert table.returncode == 0, table.stderr
    assert "J/TH" in table.stdout
    assert sum(1 for ip in site.sim.ips if ip in table.stdout) == MINERS

    usage = hashflex("miners", "--sort", "colour", "--config", site.config)
    assert usage.returncode == 2
    assert "Invalid value" in usage.stderr
    refused(hashflex("miners", "--ip", "127.64.0.300", "--config", site.config), 1, "--ip:")


# ---------------------------------------------------------------------------------------------- acting
@pytest.fixture
def restored(site: Site) -> Iterator[Site]:
    """A test that changes the site leaves it as it found it, even when it fails half-way (no cascade)."""
    yield site
    site.agent.request("resume", {})
    site.agent.request("cap", {"cap_kw": site.cap_kw})


def test_curtail_to_lowers_ground_truth_and_resume_brings_it_back(restored: Site) -> None:
    site = restored
    site.back_to_full()
    level_kw = round(site.full_kw * 0.5, 1)
    doc = ok_json(
        hashflex(
            "curtail",
            "--to",
            f"{level_kw / 1000:.4f}MW",
            "--wait",
            "--wait-timeout",
            "30s",
            "--config",
            site.config,
            "--json",
        )
    )
    override = doc["dispatch"]
    assert override["source"] == "operator"
    assert override["target_kw"] == pytest.approx(level_kw, abs=0.1)
    assert doc["status"]["power_kw"] <= level_kw + 1e-6  # --wait returned once the agent saw the site there
    site.wait_truth(lambda kw: kw <= level_kw + site.tol_kw, SETTLE_S, f"ground truth ≤ {level_kw} kW")
    status = ok_json(hashflex("status", "--config", site.config, "--json"))
    assert status["target_source"] == "operator"
    assert status["target_kw"] == pytest.approx(level_kw, abs=0.1)
    text = hashflex("status", "--config", site.config)
    assert f"operator override {override['id']} binds" in text.stdout

    listed = ok_json(hashflex("dispatches", "--config", site.config, "--json"))["dispatches"]
    mine = next(d for d in listed if d["id"] == override["id"])
    assert mine["commands_sent_at"] is not None
    table = hashflex("dispatches", "--config", site.config)
    assert override["id"] in table.stdout

    resumed = ok_json(hashflex("resume", "--config", site.config, "--json"))
    assert override["id"] in [c if isinstance(c, str) else c["id"] for c in resumed["cancelled"]]
    site.wait_truth(lambda kw: kw >= 0.95 * site.full_kw, RECOVER_S, "ground truth back up after resume")
    again = hashflex("resume", "--config", site.config)
    assert again.returncode == 0
    assert "nothing to resume" in again.stderr
    ended = ok_json(hashflex("dispatches", "--all", "--config", site.config, "--json"))["dispatches"]
    assert next(d for d in ended if d["id"] == override["id"])["status"] == "cancelled"


def test_curtail_by_for_a_while_ends_on_its_own(restored: Site) -> None:
    site = restored
    site.back_to_full()
    before = site.truth_kw()
    by_kw = round(site.full_kw * 0.4, 1)
    done = hashflex("curtail", "--by", f"{by_kw}kW", "--for", "1m", "--config", site.config)
    assert done.returncode == 0, done.stderr
    assert "curtailment accepted" in done.stderr
    listed = ok_json(hashflex("dispatches", "--config", site.config, "--json"))["dispatches"]
    override = next(d for d in listed if d["source"] == "operator")
    assert override["end"] is not None
    site.wait_truth(lambda kw: kw <= before - by_kw + site.tol_kw, SETTLE_S, f"ground truth {by_kw} kW lower")
    # one site minute (6 wall s) later it expires and the cap binds again, without a resume
    site.agent.wait_for(
        lambda: ok_json(hashflex("status", "--config", site.config, "--json"))["target_source"] == "cap",
        30,
        what="the override to expire",
    )
    ended = ok_json(hashflex("dispatches", "--all", "--config", site.config, "--json"))["dispatches"]
    assert next(d for d in ended if d["id"] == override["id"])["status"] == "expired"
    site.wait_truth(lambda kw: kw >= 0.95 * site.full_kw, RECOVER_S, "ground truth back up after expiry")


def test_cap_lowers_ground_truth_and_goes_back_up_to_the_licensed_cap(restored: Site) -> None:
    site = restored
    site.back_to_full()
    shown = ok_json(hashflex("cap", "--config", site.config, "--json"))
    assert shown == {"cap_kw": site.cap_kw, "licensed_cap_kw": site.cap_kw}
    new_cap = round(site.full_kw * 0.6, 1)
    set_doc = ok_json(hashflex("cap", f"{new_cap}kW", "--config", site.config, "--json"))
    assert set_doc["cap_kw"] == new_cap
    site.wait_truth(lambda kw: kw <= new_cap + site.tol_kw, SETTLE_S, f"ground truth ≤ the new cap {new_cap} kW")
    status = ok_json(hashflex("status", "--config", site.config, "--json"))
    assert status["cap_kw"] == new_cap
    assert status["target_source"] == "cap"
    # above the licensed cap: refused with the agent's reason, and nothing changes
    too_high = hashflex("cap", f"{site.cap_kw * 2}kW", "--config", site.config)
    refused(too_high, 1, "the agent refused 'cap'")
    assert ok_json(hashflex("cap", "--config", site.config, "--json"))["cap_kw"] == new_cap
    back = hashflex("cap", f"{site.cap_kw}kW", "--config", site.config)
    assert back.returncode == 0, back.stderr
    assert "site cap set to" in back.stderr
    site.back_to_full()


def test_preview_plans_without_touching_a_miner(restored: Site) -> None:
    site = restored
    site.back_to_full()
    target_kw = round(site.full_kw * 0.3, 1)
    plan = ok_json(hashflex("preview", "--target", f"{target_kw}kW", "--config", site.config, "--json"))
    assert plan["target_kw"] == pytest.approx(target_kw)
    assert plan["worst_case_kw"] <= target_kw
    assert plan["changes"]  # it would send something ...
    text = hashflex("preview", "-t", f"{target_kw}kW", "--config", site.config)
    # plain sentences with the reason, not a key dump (issue 16 item 9)
    assert "Preview only: nothing is sent to any miner." in text.stdout, text.stdout
    assert "To get there, miners would be" in text.stdout, text.stdout
    assert "Chosen" in text.stdout, text.stdout
    assert "plan_ms" not in text.stdout
    time.sleep(2.0)  # ... but sent nothing: two sweeps later every miner still hashes at full power
    truth = site.sim.truth()
    assert all(m["state"] == "hashing" for m in truth["miners"])
    assert site_power_kw(truth) >= 0.97 * site.full_kw
    assert ok_json(hashflex("status", "--config", site.config, "--json"))["target_source"] == "cap"
    refused(hashflex("preview", "--target", "lots", "--config", site.config), 1, "--target: not a power")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["curtail"], "give exactly one of --to"),
        (["curtail", "--to", "12 parsecs"], "--to: not a power"),
        (["curtail", "--by", "1MW", "--for", "0s"], "--for: must be longer than zero"),
        (["cap", "0MW"], "must be more than zero"),
        (["logs", "--json", "--follow"], "--json and --follow do not mix"),
    ],
)
def test_bad_arguments_exit_1_say_what_to_do_and_change_nothing(site: Site, args: list[str], words: str) -> None:
    before = site.agent.status()
    refused(hashflex(*args, "--config", site.config), 1, words)
    as_json = hashflex(*args, "--config", site.config, "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)  # one JSON document, also for an error
    assert doc["status"] == "error"
    assert words in doc["error"]
    after = site.agent.status()
    assert (after["target_kw"], after["cap_kw"], after["dispatches"]) == (
        before["target_kw"],
        before["cap_kw"],
        before["dispatches"],
    )


def test_usage_errors_exit_2_with_one_line_and_where_the_help_is(site: Site) -> None:
    for args in (["preview"], ["watch", "--count", "0"], ["status", "--bogus"]):
        done = hashflex(*args, "--config", site.config)
        assert done.returncode == 2, args
        [line] = done.stderr.splitlines()  # no usage block, no framed box (issue 16 item 9)
        assert line.startswith("error: ")
        assert f"`hashflex {args[0]} --help` lists what it takes" in line


# ---------------------------------------------------------------------------------------------- logs, config
def test_logs_show_the_agents_events(site: Site) -> None:
    refused(hashflex("cap", f"{site.cap_kw * 3}kW", "--config", site.config), 1, "the agent refused")
    events = ok_json(hashflex("logs", "--limit", "200", "--config", site.config, "--json"))["events"]
    types = {e["type"] for e in events}
    assert {"target_changed", "rejected"} <= types
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps)  # oldest first
    rejected = ok_json(hashflex("logs", "--type", "rejected", "--config", site.config, "--json"))["events"]
    assert rejected
    assert {e["type"] for e in rejected} == {"rejected"}
    assert rejected[-1]["data"]["verb"] == "cap"
    text = hashflex("logs", "-n", "20", "--config", site.config)
    assert text.returncode == 0, text.stderr
    assert "rejected" in text.stdout
    follow = hashflex("logs", "-f", "--count", "1", "--interval", "0.2", "--config", site.config)
    assert follow.returncode == 0, follow.stderr


def test_config_check_and_dump(site: Site, tmp_path: Path) -> None:
    check = hashflex("config", "check", "--config", site.config)
    assert check.returncode == 0, check.stderr
    assert "config OK" in check.stderr
    checked = ok_json(hashflex("config", "check", "--config", site.config, "--json"))
    assert checked["ok"] is True
    assert checked["summary"]["addresses"] == MINERS
    dump = ok_json(hashflex("config", "dump", "--config", site.config, "--json"))
    assert dump["site"]["cap_kw"] == site.cap_kw
    assert dump["derived"]["socket_path"] == str(site.files.socket)
    assert yaml.safe_load(hashflex("config", "dump", "--config", site.config).stdout)["site"]["id"]
    broken = tmp_path / "broken.yaml"
    doc = yaml.safe_load(site.files.path.read_text())
    doc["site"]["cap_kw"] = -5
    broken.write_text(yaml.safe_dump(doc))
    refused(hashflex("config", "check", "--config", str(broken)), 1, "site.cap_kw")
    refused(hashflex("status", "--config", str(broken)), 2, "site.cap_kw")


def test_discover_finds_the_simulated_miners(site: Site) -> None:
    ips = sorted(site.sim.ips, key=lambda ip: int(ip.rsplit(".", 1)[1]))[:6]
    truth = {m["ip"]: m for m in site.sim.truth()["miners"]}
    empty = "127.64.0.200"  # nothing listens there
    found = ok_json(hashflex("discover", f"{ips[0]}-{ips[-1]}", empty, "--timeout", "5", "--json"))
    assert found["addresses"] == len(ips) + 1
    assert {m["ip"] for m in found["found"]} == set(ips)
    for m in found["found"]:
        assert m["family"] == truth[m["ip"]]["family"]
        assert same_model(m["model"], truth[m["ip"]]["model"])
    table = hashflex("discover", ips[0], "--timeout", "5")
    assert table.returncode == 0, table.stderr
    assert ips[0] in table.stdout
    refused(hashflex("discover", "127.64.0.0/33"), 1)


# ---------------------------------------------------------------------------------------------- the store
def agent_time_span(site: Site) -> list[str]:
    """--from/--to covering everything the agent has recorded: its clock runs SCALE× from its origin."""
    return ["--from", repr(site.agent.time_origin - 3600.0), "--to", repr(site.agent.now() + 3600.0)]


def test_audit_verify_and_export_read_the_running_agents_store(site: Site, tmp_path: Path) -> None:
    verified = ok_json(hashflex("audit", "verify", "--config", site.config, "--json"))
    assert verified["status"] == "ok"
    assert verified["records"] > 0
    text = hashflex("audit", "verify", "--config", site.config)
    assert text.returncode == 0
    assert "audit chain OK" in text.stdout
    out = tmp_path / "export.json"
    written = hashflex("audit", "export", "--config", site.config, *agent_time_span(site), "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert "exported" in written.stderr
    export = json.loads(out.read_text())
    assert export["chain"]["ok"] is True
    records = [AuditRecord(**r) for r in export["audit"]]
    assert records[0].kind == "agent_start"
    assert verify_chain(records).ok
    to_stdout = ok_json(hashflex("audit", "export", "--config", site.config, *agent_time_span(site)))
    assert to_stdout["format"] == "hashflex-export/1"
    assert len(to_stdout["audit"]) >= len(records)
    refused(hashflex("audit", "export", "--config", site.config, "--from", "now", "--to", "yesterday"), 1)


def test_energy_reports_what_the_site_drew(site: Site) -> None:
    site.agent.wait_for(lambda: site.agent.now() - site.agent.time_origin > 150, 20, what="2.5 site minutes")
    doc = ok_json(hashflex("energy", "--config", site.config, *agent_time_span(site), "--step", "1m", "--json"))
    total = doc["total"]
    assert total["kwh"] > 0
    assert doc["periods"]
    truth_kwh = float(site.sim.truth()["site"]["energy_kwh"])  # since the simulator started, a little earlier
    assert total["kwh"] <= truth_kwh * 1.05
    # a whole minute at full power is about full_kw / 60 kWh (the site may have been curtailed in some)
    assert max(p["kwh"] for p in doc["periods"]) == pytest.approx(site.full_kw / 60.0, rel=0.1)
    text = hashflex("energy", "--config", site.config, *agent_time_span(site))
    assert text.returncode == 0, text.stderr
    assert "total" in text.stdout
    refused(hashflex("energy", "--config", site.config, "--from", "soonish"), 1, "not a time")


# ---------------------------------------------------------------------------------------------- metrics
def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def test_prometheus_endpoint_serves_the_site_over_http(site: Site) -> None:
    site.back_to_full()
    agent_in_step_with_truth(site)
    m = scrape(site.metrics_port)
    status = site.agent.status()
    assert m[("hashflex_site_cap_watts", ())] == pytest.approx(status["cap_kw"] * 1000)
    assert m[("hashflex_site_target_watts", ())] == pytest.approx(status["target_kw"] * 1000)
    assert m[("hashflex_site_power_watts", ())] == pytest.approx(site.truth_kw() * 1000, abs=0.05 * site.full_kw * 1000)
    by_state = {dict(labels)["state"]: v for (name, labels), v in m.items() if name == "hashflex_miners"}
    assert sum(by_state.values()) == MINERS
    assert by_state["unreachable"] == 0
    link = {dict(labels)["state"]: v for (name, labels), v in m.items() if name == "hashflex_broker_state"}
    assert link["connected"] == 0  # the broker is down, and the metrics say so
    assert m[("hashflex_status_up", ())] == 1
    assert m[("hashflex_failsafe_active", ())] == 0
    names = {name for name, _ in m}
    assert {"hashflex_ticks_total", "hashflex_tick_duration_seconds_count", "hashflex_build_info"} <= names


# ---------------------------------------------------------------------------------------------- no agent
@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hf-e2e-", dir="/tmp"))  # short: a socket path has ~100 bytes at most
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config_for(folder: Path, *, miners: list[str] | None = None) -> Path:
    config = folder / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site": {"id": "gone", "cap_kw": 100},
                "miners": {"addresses": miners or []},
                "mqtt": {"enabled": False},
                "state_dir": str(folder / "state"),
                "control_socket": {"path": str(folder / "ctl.sock")},
            }
        )
    )
    return config


@pytest.mark.parametrize("command", [["status"], ["curtail", "--to", "50kW"], ["miners"], ["logs"]], ids=" ".join)
def test_no_agent_listening_exits_2_and_says_what_to_do(folder: Path, command: list[str]) -> None:
    config = str(config_for(folder))
    refused(
        hashflex(*command, "--config", config),
        2,
        "no agent listening on",
        "(no socket there)",
        "systemctl status hashflex",
    )
    doc = json.loads(hashflex(*command, "--config", config, "--json").stdout)
    assert doc["status"] == "error"
    assert doc["data"]["reason"] == "missing"


def test_an_agent_that_never_answers_times_out_with_a_hint(folder: Path) -> None:
    path = folder / "ctl.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        done = hashflex("status", "--config", str(config_for(folder)), "--json")
        assert done.returncode == 2
        doc = json.loads(done.stdout)
        assert doc["data"]["reason"] == "timeout"
        assert "did not answer 'status'" in doc["error"]
        assert "journalctl -u hashflex" in doc["error"]
        assert time.monotonic() - started < 30  # bounded: it does not hang with the agent
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_a_killed_agent_leaves_a_stale_socket_the_cli_explains_and_the_store_stays_readable(folder: Path) -> None:
    with SimProcess(miners=4, mix=MIX, base_ip="127.65.0.1", seed=65, speed=SCALE) as sim:
        files = write_agent_config(folder / "agent", sim.ips, cap_kw=100, time_scale=SCALE)
        agent = AgentProcess.start(files, time_scale=SCALE)
        agent.kill()  # a crash: the socket file stays behind with nobody listening
        assert files.socket.exists()
        config = str(files.path)
        refused(hashflex("status", "--config", config), 2, "no agent listening", "stale socket")
        doc = json.loads(hashflex("curtail", "--to", "10kW", "--config", config, "--json").stdout)
        assert doc["data"]["reason"] == "refused"
        # what reads the store directly works with the agent down
        verified = ok_json(hashflex("audit", "verify", "--config", config, "--json"))
        assert verified["status"] == "ok"
        assert verified["records"] >= 1
