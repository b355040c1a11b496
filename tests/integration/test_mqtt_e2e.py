"""The whole agent over MQTT, end to end: `hashflex run` (a subprocess) on a simulated site, a real Mosquitto built
from configs/mosquitto/, and the grid side played by real clients — aiomqtt from the test, and the
`hashflex sign | mosquitto_pub` / `mosquitto_sub` tools an operator would use.

What is checked is what the grid and the site would see: the reply on …/reply/<verb>, the retained …/state, the
lifecycle on …/events, …/telemetry, …/availability, and the simulator's ground truth (GET /truth), never the
agent's own opinion of the miners. Clocks are scaled (sim --speed K, agent --time-scale K): every site-time figure
below (start, end, ramps, timeouts) passes K times faster on the wall.

Loopback range of this file: 127.40.0.0 – 127.49.255.255 (one /16 per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hashflex.agent.io.store import Store
from tests.agent_harness import AgentConfigFiles, AgentProcess, iso, sign_for
from tests.broker import DEFAULT_USERS, HOST, REPO, Mosquitto
from tests.integration.site_support import K, Site, running_site
from tests.mqtt_support import Observer, payload_bytes, wait_until

pytestmark = pytest.mark.timeout(150)

Factory = Callable[[], Mosquitto]


# ===================================================== helpers (the site itself is site_support.py's)
def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def miners_as_told(truth: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """What the agent controls on each miner, per the simulator: its state and its power limit."""
    return sorted((m["ip"], m["state"], m["power_limit_w"]) for m in truth["miners"])


def audit_commands(files: AgentConfigFiles) -> list[dict[str, Any]]:
    """The `command` records of the agent's audit trail (read from its SQLite file; the agent may be stopped)."""
    store = Store.open(files.state_dir / "hashflex.db")
    try:
        assert store.verify_audit().ok
        return [r.data for r in store.audit_records() if r.kind == "command"]
    finally:
        store.close()


def hashflex_bin() -> str:
    """The venv's `hashflex` entry point, as an operator would run it."""
    candidate = Path(sys.executable).with_name("hashflex")
    return str(candidate) if candidate.exists() else f"{sys.executable} -m hashflex"


# ================================================================================================ every verb
async def test_every_verb_end_to_end_changes_ground_truth_and_is_reported(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with running_site(tmp_path, mosquitto, base_ip="127.40.0.1", miners=40) as site:
        full, root = site.full_kw, site.root
        assert site.state()["miners"]["total"] == 40

        # --- ping, with an MQTT 5 response topic and correlation data (answered on both topics)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"{root}/reply/grid-desk"
        props.CorrelationData = b"corr-42"
        pong = await site.request("ping", {"id": "p-1"}, properties=props)
        assert pong["status"] == "ok"
        assert pong["data"]["pong"] is True
        answer = await site.grid.wait(f"{root}/reply/grid-desk")
        assert json.loads(payload_bytes(answer.payload)) == pong
        assert answer.properties is not None
        assert getattr(answer.properties, "CorrelationData", None) == b"corr-42"

        # --- dispatch A: target_kw, starting in 40 site s, ramped down over ~60 site s
        target_a = round(full * 0.5, 1)
        ramp = round((full - target_a) / 1.0, 1)  # kW per minute: ~one site minute from full to the target
        start_a = site.agent.now() + 40
        a = await site.ok(
            "dispatch",
            site.signed(
                {
                    "id": "disp-a",
                    "target_kw": target_a,
                    "start": iso(start_a),
                    "end": iso(start_a + 3600),
                    "ramp_kw_per_min": ramp,
                }
            ),
        )
        assert a["dispatch"]["status"] == "pending"
        assert (a["dispatch"]["target_kw"], a["dispatch"]["ramp_kw_per_min"]) == (target_a, ramp)
        await site.event("received", "disp-a")
        await site.event("accepted", "disp-a")
        # accepted but not started: nothing changes on the site yet
        await asyncio.sleep(1.5)
        assert await site.kw() > 0.95 * full
        assert site.state()["target_source"] != "grid"
        assert [d["status"] for d in site.state()["dispatches"]] == ["pending"]
        reached = await site.event("target_reached", "disp-a", within=40)
        at_reached = await site.kw()
        # the agent judges "reached" on its own readings (stock firmware reports no power: estimated); the truth
        # follows within a sweep or two
        await site.wait_kw(lambda kw: kw <= target_a * 1.02, 10, f"at {target_a} kW")
        # the ramp was honoured: not there before (full − target) / ramp minutes after the start
        assert epoch(reached["ts"]) - start_a >= 0.8 * 60 * (full - target_a) / ramp
        await site.event("commands_sent", "disp-a")
        state = await site.wait_state(lambda s: s["dispatches"] and s["dispatches"][0]["target_met_at"] is not None)
        retained = await site.retained_state()
        for doc in (state, retained):
            assert (doc["target_kw"], doc["target_source"], doc["target_reason"]) == (target_a, "grid", "grid:disp-a")
            assert [(d["id"], d["status"]) for d in doc["dispatches"]] == [("disp-a", "active")]

        # --- cancel A: the site comes back up
        c = await site.ok("cancel", site.signed({"id": "cancel-a", "dispatch_id": "disp-a"}))
        assert c == {"dispatch_id": "disp-a", "status": "cancelled"}
        await site.event("cancelled", "disp-a")
        await site.wait_kw(lambda kw: kw > 0.85 * full, 30, "back up after the cancel")
        assert (await site.wait_state(lambda s: not s["dispatches"]))["target_source"] == "cap"

        # --- dispatch B: curtail_kw from the present draw, for 100 site s: reached, then expired, then back up
        before_b = await site.kw()
        b = await site.ok(
            "dispatch",
            site.signed({"id": "disp-b", "curtail_kw": round(full * 0.4, 1), "end": iso(site.agent.now() + 100)}),
        )
        level_b = b["dispatch"]["level_kw"]
        assert level_b == pytest.approx(b["dispatch"]["baseline_kw"] - round(full * 0.4, 1), abs=0.01)
        assert b["dispatch"]["baseline_kw"] > 0.7 * full  # the agent's last reading: the site was up again
        reached_b = await site.event("target_reached", "disp-b", within=20)
        baseline_b = b["dispatch"]["baseline_kw"]
        print(
            f"A (ramped) met {epoch(reached['ts']) - start_a:.0f} site s after its start (truth then "
            f"{at_reached / target_a:.3f} × target); B (no ramp) met after {reached_b['data']['after_s']:.0f} "
            f"site s; truth before B {before_b:.1f} kW, agent's baseline {baseline_b:.1f} kW"
        )
        await site.wait_kw(lambda kw: kw <= level_b * 1.02, 10, f"at B's {level_b} kW")
        await site.event("expired", "disp-b", within=20)
        await site.wait_kw(lambda kw: kw > 0.85 * full, 30, "back up after the expiry")

        # --- cap: the run-time cap binds; an operator override (signed with the operator key) goes lower; resume
        # ends the override, the cap still holds; the cap restored to the licence lets the site up again
        cap = round(full * 0.6, 1)
        assert (await site.ok("cap", site.signed({"id": "cap-1", "cap_kw": cap})))["cap_kw"] == cap
        await site.event("accepted", "cap-1")
        assert [e["data"]["to_kw"] for e in site.events("cap_changed") if e["data"]["by"] == "cap-1"] == [cap]
        await site.wait_kw(lambda kw: kw <= cap * 1.02, 20, f"under the {cap} kW cap")
        assert (await site.wait_state(lambda s: s["cap_kw"] == cap))["target_kw"] == cap

        to_kw = round(full * 0.3, 1)
        cur = await site.ok("curtail", site.operator_signed({"id": "op-1", "to_kw": to_kw}))
        assert (cur["dispatch"]["source"], cur["dispatch"]["target_kw"]) == ("operator", to_kw)
        await site.wait_kw(lambda kw: kw <= to_kw * 1.02, 20, f"under the operator's {to_kw} kW")
        # operator overrides have their own id namespace ("op:"), apart from grid dispatch ids
        assert (await site.ok("resume", site.operator_signed({"id": "op-2"}))) == {"cancelled": ["op:op-1"]}
        await site.event("cancelled", "op:op-1")
        await site.wait_kw(lambda kw: kw > to_kw * 1.3, 30, "up again after resume")
        assert await site.kw() <= cap * 1.02  # the cap still binds
        licensed = site.state()["licensed_cap_kw"]
        assert (await site.ok("cap", site.signed({"id": "cap-2", "cap_kw": licensed})))["cap_kw"] == licensed
        await site.wait_kw(lambda kw: kw > 0.85 * full, 30, "back up with the cap restored")

        # --- telemetry flowed all along; the store kept every dispatch, each once, with how it ended
        telemetry = site.grid.json(f"{root}/telemetry")
        assert len(telemetry) >= 10
        assert {"ts", "target_kw", "cap_kw", "power_kw_measured", "power_kw_estimated", "miners"} <= set(telemetry[-1])
        listed = await site.ok("dispatches", {"id": "list-1", "all": True})
        assert sorted((d["id"], d["status"]) for d in listed["dispatches"]) == [
            ("disp-a", "cancelled"),
            ("disp-b", "expired"),
            ("op:op-1", "cancelled"),
        ]
        for request_id in ("disp-a", "cancel-a", "disp-b", "cap-1", "op-1", "op-2", "cap-2"):
            assert len(site.events("accepted", request_id)) == 1, request_id
        assert await site.retained("availability") == b"online"


# ================================================================================================== bad input
async def test_every_class_of_bad_input_is_refused_with_a_reason_and_an_event_and_changes_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_site(tmp_path, mosquitto, base_ip="127.41.0.1", miners=20) as site:
        cap = site.files.doc["site"]["cap_kw"]
        rules = site.files.doc["dispatch"]
        # one accepted dispatch (at the cap: the site stays as it is) whose id is then replayed with other content
        real = site.signed({"id": "real-1", "target_kw": cap, "end": iso(site.agent.now() + 3600)})
        first = await site.request("dispatch", real)
        assert first["status"] == "ok", first
        await site.wait_state(lambda s: s["target_reason"] == "grid:real-1")
        await asyncio.sleep(1.0)  # a tick or two: the picture to compare against is a settled one
        truth_before = await site.truth()
        state_before = site.state()
        listed_before = (await site.ok("dispatches", {"id": "ls-0", "all": True}))["dispatches"]

        now = site.agent.now()
        stranger = Ed25519PrivateKey.generate()
        valid = {"target_kw": 1, "end": iso(now + 3600)}  # would curtail the whole site if it got through
        tampered = site.signed({"id": "bad-sig", **valid})
        tampered["target_kw"] = 2
        cases: list[tuple[str, str, dict[str, Any] | bytes, str]] = [
            # (what, verb, payload, expected code)
            ("unsigned", "dispatch", {"id": "unsigned", "issued_at": iso(now), **valid}, "unsigned"),
            ("badly signed", "dispatch", tampered, "bad_signature"),
            (
                "unknown key",
                "dispatch",
                sign_for(stranger, {"id": "stranger", **valid}, site=site.site_id, verb="dispatch", issued_at=now),
                "bad_signature",
            ),
            (
                "signed for another site",
                "dispatch",
                site.agent.signed({"id": "elsewhere", **valid}, site="another-site"),
                "wrong_scope",
            ),
            ("signed as another verb", "cancel", site.signed({"id": "as-dispatch", **valid}), "wrong_scope"),
            (
                "expired",
                "dispatch",
                site.signed({"id": "old", **valid}, issued_at=now - 2 * rules["max_age_s"]),
                "expired",
            ),
            (
                "future",
                "dispatch",
                site.signed({"id": "future", **valid}, issued_at=now + 2 * rules["max_skew_s"]),
                "future",
            ),
            ("replayed id, other content", "dispatch", site.signed({"id": "real-1", **valid}), "conflict"),
            ("malformed JSON", "dispatch", b'{"id": "broken", "target_kw": 1', "bad_json"),
            ("wrong type", "dispatch", site.signed({"id": "wrong-type", **valid, "target_kw": [1]}), "bad_request"),
            ("wrong type (rev)", "dispatch", site.signed({"id": "wrong-rev", **valid, "rev": "high"}), "bad_request"),
            ("negative kW", "dispatch", site.signed({"id": "negative", **valid, "target_kw": -5}), "out_of_range"),
            (
                "above the cap",
                "dispatch",
                site.signed({"id": "above-cap", **valid, "target_kw": cap * 2}),
                "out_of_range",
            ),
            (
                "end before start",
                "dispatch",
                site.signed({"id": "backwards", "target_kw": 1, "start": iso(now + 600), "end": iso(now + 60)}),
                "out_of_range",
            ),
            ("unknown verb", "launch", site.signed({"id": "launch-1", **valid}), "unknown_verb"),
            ("oversize", "dispatch", json.dumps({"id": "huge", "pad": "x" * 70_000}).encode(), "too_large"),
            ("unsigned cap", "cap", {"id": "cap-u", "issued_at": iso(now), "cap_kw": 1}, "unsigned"),
            (
                "grid key on an operator verb",
                "curtail",
                site.signed({"id": "op-grid", "to_kw": 1}, verb="curtail"),
                "bad_signature",
            ),
            ("unsigned operator verb", "curtail", {"id": "op-u", "to_kw": 1}, "unsigned"),
        ]
        for what, verb, payload, code in cases:
            reply = await site.request(verb, payload)
            assert reply["status"] == "error", (what, reply)
            assert reply["error"]["code"] == code, (what, reply)
            assert len(reply["error"]["message"]) > 10, (what, reply)
            request_id = None if isinstance(payload, bytes) else payload.get("id")
            if request_id is not None:  # (events follow the reply; an id-less one is counted below)
                event = await site.event("rejected", request_id, within=5)
                assert event["data"]["code"] == code, (what, event)
        # a retained command, published live: flagged and refused the same way
        retained = site.signed({"id": "retained-1", **valid})
        reply = await site.request("dispatch", retained, retain=True)
        assert reply["error"]["code"] == "retained", reply
        await site.event("rejected", "retained-1", within=5)
        await wait_until(lambda: len(site.events("rejected")) >= len(cases) + 1, 5, "a rejected event for each")
        await asyncio.sleep(0.5)
        rejected = site.events("rejected")
        assert len(rejected) == len(cases) + 1  # one each, no more
        assert {e["data"]["code"] for e in rejected} == {c[3] for c in cases} | {"retained"}

        # nothing changed: not on the site, not in the state, not in the store; the agent kept running
        await asyncio.sleep(2.0)  # 20 site s: an accepted command would have been acted on by now
        truth_after = await site.truth()
        assert miners_as_told(truth_after) == miners_as_told(truth_before)
        assert truth_after["site"]["power_w"] == pytest.approx(truth_before["site"]["power_w"], rel=0.02)
        state_after = await site.retained_state()
        for key in ("target_kw", "target_reason", "target_source", "cap_kw", "dispatches", "failsafe"):
            assert state_after[key] == state_before[key], key
        assert (await site.ok("dispatches", {"id": "ls-1", "all": True}))["dispatches"] == listed_before
        # an exact repeat of the accepted one is not an error: it gets the stored reply, and is not applied again
        assert await site.request("dispatch", real) == first
        assert [e["data"]["id"] for e in site.events("accepted")] == ["real-1"]
        assert (await site.request("ping", {"id": "still-alive"}))["status"] == "ok"
    # every refusal the agent parsed is in the audit trail as a count per code (one record per interval, written at
    # the latest when the agent stops; the oversize one is refused unread), never as a record per refusal
    counted: dict[str, int] = {}
    for record in audit_commands(site.files):
        if record.get("status") == "refused":
            for code, n in record["by_channel"].get("mqtt", {}).items():
                counted[code] = counted.get(code, 0) + n
    expected: dict[str, int] = {"retained": 1}
    for _, _, _, code in cases:
        if code != "too_large":
            expected[code] = expected.get(code, 0) + 1
    assert counted == expected
    await mosquitto_clear_retained(site)


async def mosquitto_clear_retained(site: Site) -> None:
    """Leave the shared broker clean: drop the retained command (the agent is stopped)."""
    async with aiomqtt.Client(HOST, site.grid.port, identifier=f"clean-{uuid.uuid4().hex[:8]}") as client:
        await client.publish(f"{site.root}/cmd/dispatch", b"", qos=1, retain=True)


# =========================================================================================== broker outages
def log_lines(agent: AgentProcess, event: str) -> list[dict[str, Any]]:
    return list(agent.log_events(event))


async def test_broker_killed_and_restarted_loses_nothing_and_applies_nothing_twice(
    mosquitto_factory: Factory, tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    # mqtt at debug: every failed reconnect is logged with its backoff, so the test knows when the agent is away
    async with running_site(
        tmp_path, broker, base_ip="127.42.0.1", miners=30, overrides={"logging": {"levels": {"mqtt": "debug"}}}
    ) as site:
        full, root, agent = site.full_kw, site.root, site.agent
        # P: accepted now, starts in 60 site s: pending when the broker dies
        target_p = round(full * 0.5, 1)
        start_p = agent.now() + 60
        p = await site.ok(
            "dispatch",
            site.signed({"id": "disp-p", "target_kw": target_p, "start": iso(start_p), "end": iso(start_p + 3600)}),
        )
        assert p["dispatch"]["status"] == "pending"
        await asyncio.to_thread(broker.wait_saved, time.time() + 0.1)  # the session is on disk
        broker.kill()

        # the control loop does not wait on the broker: P starts and is met while the agent cannot publish
        def p_met() -> dict[str, Any] | None:
            s = agent.status()
            met = [d for d in s["dispatches"] if d["id"] == "disp-p" and d["target_met_at"]]
            return s if met and s["broker"]["state"] != "connected" else None

        status = await asyncio.to_thread(agent.wait_for, p_met, 40)
        assert status is not None
        assert status["target_kw"] == target_p
        assert await site.kw() <= target_p * 1.02
        # wait for a failed reconnect that leaves ≥ 1.8 s until the next attempt, then bring the broker back and
        # publish at once: the commands are queued in the agent's persistent session, not delivered live
        failed_before = len(log_lines(agent, "mqtt connect failed"))
        await asyncio.to_thread(
            agent.wait_for,
            lambda: [x for x in log_lines(agent, "mqtt connect failed")[failed_before:] if x["retry_s"] >= 1.8],
            30,
        )
        broker.start()
        expiring = site.signed({"id": "disp-e", "target_kw": round(full * 0.2, 1), "end": iso(agent.now() + 5)})
        target_q = round(full * 0.3, 1)
        fresh = site.signed({"id": "disp-q", "target_kw": target_q, "end": iso(agent.now() + 3600)})
        async with Observer(broker, f"{root}/#") as grid:
            site.grid = grid
            await site.publish("dispatch", expiring)
            await site.publish("dispatch", fresh)
            published_at = time.monotonic()
            await wait_until(lambda: len(site.replies("dispatch")) >= 2, 30, "the replies after the reconnect")
            replies = {r["id"]: r for r in site.replies("dispatch")}
            # the precondition: the agent reconnected only after both were published
            log = broker.log()
            reconnect = log.rfind(f"as hashflex-{site.files.doc['site']['id']}")
            published = log.rfind(f"Received PUBLISH from {grid.client.identifier}")
            assert 0 <= published < reconnect, "precondition: the agent was back before the commands were published"
            # none lost: both answered; the one whose window closed during the outage is refused, the other honoured
            assert replies["disp-e"]["status"] == "error"
            assert replies["disp-e"]["error"]["code"] == "expired"
            assert replies["disp-q"]["status"] == "ok"
            assert time.monotonic() - published_at < 30
            await site.wait_kw(lambda kw: kw <= target_q * 1.02, 20, f"down to Q's {target_q} kW")
            # republished after the reconnect, live: availability, state (connected, with both dispatches)
            await grid.wait(f"{root}/availability", lambda m: m.payload == b"online" and not m.retain)
            both = {"disp-p", "disp-q"}
            state = await site.wait_state(
                lambda s: s["broker"]["state"] == "connected" and {d["id"] for d in s["dispatches"]} == both
            )
            assert state["target_kw"] == target_q
            # events raised during the outage were kept and sent after it
            await site.event("target_reached", "disp-p")
            await site.event("accepted", "disp-q")
            # the grid retries Q (it cannot know its reply was on the way): the stored reply, nothing applied again
            again = await site.request("dispatch", fresh)
            assert again == replies["disp-q"]
            await asyncio.sleep(0.5)
            assert len(site.events("accepted", "disp-q")) == 1
            listed = await site.ok("dispatches", {"id": "ls", "all": True})
            assert sorted((d["id"], d["status"]) for d in listed["dispatches"]) == [
                ("disp-p", "active"),
                ("disp-q", "active"),
            ]
            events = (await site.ok("events", {"id": "ev", "limit": 1000}))["events"]
            accepted = [e["data"]["id"] for e in events if e["type"] == "accepted"]
            assert sorted(accepted) == ["disp-p", "disp-q"]
    # the audit trail: each applied command once, with its verdict; the refused one counted (refusals are audited as
    # counts per code, not one record each)
    records = audit_commands(site.files)
    commands = [(r["id"], r["status"], r["code"]) for r in records if r.get("verb") == "dispatch"]
    assert sorted(commands) == [("disp-p", "ok", None), ("disp-q", "ok", None)]
    refused = [r["by_channel"] for r in records if r.get("status") == "refused"]
    assert refused == [{"mqtt": {"expired": 1}}]


# ================================================================================================ last will
async def test_killed_agent_shows_offline_through_its_last_will(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with running_site(tmp_path, mosquitto, base_ip="127.43.0.1", miners=10) as site:
        assert await site.retained("availability") == b"online"
        await asyncio.to_thread(site.agent.kill)  # SIGKILL: no goodbye
        await site.grid.wait(f"{site.root}/availability", lambda m: m.payload == b"offline", within=15)
        assert await site.retained("availability") == b"offline"
        # the agent comes back: online again, retained
        site.agent = await asyncio.to_thread(AgentProcess.start, site.files, time_scale=K)
        availability = f"{site.root}/availability"
        await wait_until(lambda: site.grid.payloads(availability)[-1:] == [b"online"], 20, "online again")
        assert site.grid.payloads(availability) == [b"online", b"offline", b"online"]
        assert await site.retained("availability") == b"online"


# ============================================================================================ TLS and the ACL
def tls_args(broker: Mosquitto, user: str) -> list[str]:
    pki = broker.pki
    return [
        "-h",
        HOST,
        "-p",
        str(broker.tls_port),
        "--cafile",
        str(pki.ca_cert),
        "--cert",
        str(pki.client_cert),
        "--key",
        str(pki.client_key),
        "-u",
        user,
        "-P",
        DEFAULT_USERS[user],
        "-V",
        "5",
    ]


async def mosquitto_sub(*args: str) -> asyncio.subprocess.Process:
    """mosquitto_sub printing `topic payload` lines; returns once its subscription is acknowledged."""
    # stdbuf: its stdout is block-buffered in a pipe, and the SUBACK debug line is the "subscribed" signal
    proc = await asyncio.create_subprocess_exec(
        "stdbuf",
        "-oL",
        "mosquitto_sub",
        "-d",
        "-v",
        "-q",
        "1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(10):
        while b"received SUBACK" not in await proc.stdout.readline():
            pass
    return proc


async def printed(proc: asyncio.subprocess.Process, *, stop: bool = False) -> list[str]:
    """The `topic payload` lines a mosquitto_sub printed (its -d debug lines left out)."""
    if stop and proc.returncode is None:
        proc.terminate()
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return [line for line in out.decode().splitlines() if line.startswith("hashflex/")]


async def test_tls_password_and_acl_from_the_example_config_with_the_whole_agent(
    mosquitto_factory: Factory, tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    pki = broker.pki
    (tmp_path / "mqtt-password").write_text(DEFAULT_USERS["site-a"] + "\n")
    tls = {"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    context = ssl_context(broker)
    async with running_site(
        tmp_path,
        broker,
        base_ip="127.44.0.1",
        miners=20,
        site_id="site-a",
        mqtt={
            "port": broker.tls_port,
            "username": "site-a",
            "password_file": str(tmp_path / "mqtt-password"),
            "tls": tls,
        },
        grid_client={
            "port": broker.tls_port,
            "username": "grid-operator",
            "password": DEFAULT_USERS["grid-operator"],
            "tls_context": context,
        },
    ) as site:
        root = site.root
        assert "u'site-a'" in broker.log()  # the agent logged in as its site id...
        await site.wait_state(lambda s: s["broker"]["state"] == "connected")  # ...on the TLS listener, with its cert
        # another site's agent listens to everything of site-a it can name: the ACL lets nothing through
        snoop = await mosquitto_sub(
            "-h",
            HOST,
            "-p",
            str(broker.password_port),
            "-u",
            "site-b",
            "-P",
            DEFAULT_USERS["site-b"],
            "-V",
            "5",
            "-t",
            f"{root}/#",
        )
        try:
            # the grid side, as README.md tells it: hashflex sign | mosquitto_pub over TLS; the answer by mosquitto_sub
            answer = await mosquitto_sub(
                *tls_args(broker, "grid-operator"), "-C", "1", "-W", "30", "-t", f"{root}/reply/#"
            )
            target = round(site.full_kw * 0.5, 1)
            command = json.dumps({"target_kw": target, "end": iso(site.agent.now() + 3600)})
            key = shlex.quote(str(site.files.path.parent / "grid.key"))
            pipeline = (
                f"echo {shlex.quote(command)} | {hashflex_bin()} sign --key {key} --site {site.site_id} --verb dispatch"
                f" | mosquitto_pub {shlex.join(tls_args(broker, 'grid-operator'))} -q 1 -t {root}/cmd/dispatch -s"
            )
            sent = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-o", "pipefail", "-c", pipeline],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
            assert sent.returncode == 0, sent.stderr
            [line] = await printed(answer)
            topic, body = line.split(" ", 1)
            reply = json.loads(body)
            assert topic == f"{root}/reply/dispatch"
            assert reply["status"] == "ok", reply
            assert reply["data"]["dispatch"]["target_kw"] == target
            await site.wait_kw(lambda kw: kw <= target * 1.02, 30, f"down to {target} kW")
            # site-b cannot command site-a either, not even with a validly signed command it got hold of
            forged = site.signed({"id": "from-site-b", "target_kw": 1, "end": iso(site.agent.now() + 3600)})
            denied = await asyncio.to_thread(
                subprocess.run,
                [
                    "mosquitto_pub",
                    "-h",
                    HOST,
                    "-p",
                    str(broker.password_port),
                    "-u",
                    "site-b",
                    "-P",
                    DEFAULT_USERS["site-b"],
                    "-V",
                    "5",
                    "-q",
                    "1",
                    "-t",
                    f"{root}/cmd/dispatch",
                    "-m",
                    json.dumps(forged),
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert "Not authorized" in denied.stderr
            before = miners_as_told(await site.truth())
            assert await site.request("ping", {"id": "after-forgery"})  # the agent is there, and answers in order
            assert not [r for r in site.replies("dispatch") if r["id"] == "from-site-b"]
            assert not site.events(request_id="from-site-b")
            await asyncio.sleep(1.0)
            assert miners_as_told(await site.truth()) == before
            assert site.state()["target_kw"] == target
        finally:
            seen_by_b = await printed(snoop, stop=True)
        assert seen_by_b == []  # not the commands, not the state, telemetry or replies
        assert len(site.grid.on(f"{root}/state")) > 3  # ...which were flowing all along


def ssl_context(broker: Mosquitto) -> ssl.SSLContext:
    """The grid side's TLS context (the test PKI has one client certificate; the password says who is connecting)."""
    context = ssl.create_default_context(cafile=str(broker.pki.ca_cert))
    context.load_cert_chain(broker.pki.client_cert, broker.pki.client_key)
    return context


# ======================================================================================= heartbeat fail-safe
async def test_heartbeat_feeds_the_failsafe(mosquitto: Mosquitto, tmp_path: Path) -> None:
    timeout_s = 40.0  # site seconds: four on the wall

    def failsafe(full_kw: float) -> dict[str, Any]:
        return {
            "failsafe": {
                "enabled": True,
                "level": round(full_kw * 0.3, 1),
                "hold_at_start": True,
                "heartbeat_timeout_s": timeout_s,
                "release_after_s": 3600,
            }
        }

    async with running_site(tmp_path, mosquitto, base_ip="127.45.0.1", miners=30, overrides=failsafe) as site:
        full, root = site.full_kw, site.root
        level = round(full * 0.3, 1)
        # held at the fail-safe level from the start, until the grid is heard [LPC-901/1]
        state = await site.wait_state(lambda s: s["failsafe"]["active"])
        assert (state["failsafe"]["reason"], state["target_source"]) == ("startup", "failsafe")
        assert state["target_kw"] == level
        await site.wait_kw(lambda kw: kw <= level * 1.02, 15, f"at the fail-safe level {level} kW")
        last_beat = 0.0
        beating = True

        async def heartbeats() -> None:
            nonlocal last_beat
            seq = 0
            while True:
                if beating:
                    seq += 1
                    last_beat = site.agent.now()
                    # signed (hashflex-sig-v2, verb heartbeat) for this site: an anonymous one is ignored
                    beat = sign_for(
                        site.files.grid_key, {"seq": seq}, site=site.site_id, verb="heartbeat", issued_at=last_beat
                    )
                    await site.grid.publish(f"{root}/heartbeat", beat)
                await asyncio.sleep(0.3)

        beat_task = asyncio.create_task(heartbeats())
        try:
            # heartbeat + a fresh grid command: released, the dispatch binds
            d1 = round(full * 0.7, 1)
            await site.ok("dispatch", site.signed({"id": "fs-1", "target_kw": d1, "end": iso(site.agent.now() + 3600)}))
            await site.event("failsafe_exited")
            state = await site.wait_state(lambda s: not s["failsafe"]["active"])
            assert (state["target_source"], state["target_kw"]) == ("grid", d1)
            await site.wait_kw(lambda kw: d1 * 0.8 < kw <= d1 * 1.02, 30, f"up at the dispatch's {d1} kW")

            # the heartbeat stops: the fail-safe level within the timeout
            beating = False
            await asyncio.sleep(0.1)
            stopped_at = last_beat
            entered = await site.event("failsafe_entered", within=timeout_s / K + 10)
            assert entered["data"]["reason"] == "heartbeat_lost"
            waited = epoch(entered["ts"]) - stopped_at
            assert timeout_s - 5 <= waited <= timeout_s + 20, f"fail-safe after {waited:.0f} site s"
            await site.wait_kw(lambda kw: kw <= level * 1.02, 15, f"at the fail-safe level {level} kW")
            await site.wait_state(lambda s: s["failsafe"]["active"])
            retained = await site.retained_state()
            assert (retained["failsafe"]["active"], retained["target_source"]) == (True, "failsafe")

            # the heartbeat alone does not release it (no release timer here)...
            beating = True
            await asyncio.sleep(2.0)
            assert site.state()["failsafe"]["active"]
            assert await site.kw() <= level * 1.02
            # ...the heartbeat and a fresh command do
            d2 = round(full * 0.6, 1)
            await site.ok("dispatch", site.signed({"id": "fs-2", "target_kw": d2, "end": iso(site.agent.now() + 3600)}))
            await wait_until(lambda: len(site.events("failsafe_exited")) == 2, 10, "the second release")
            await site.wait_kw(lambda kw: kw > level * 1.3, 30, "up from the fail-safe level")
            assert (site.state()["target_source"], site.state()["target_kw"]) == ("grid", d2)
        finally:
            beat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat_task
