"""A stand-in agent for CLI tests: a real ControlServer on a real socket, in its own thread and event loop, with
a small CommandHandler of our own that keeps state (a curtail changes the target `status` reports).

The real agent (runtime, simulated site) is exercised by the end-to-end CLI tests; this one lets every
command's output and exit codes be checked without a fleet.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hashflex.agent.config import LoggingConfig
from hashflex.agent.io.control_socket import ControlServer
from hashflex.agent.logging import configure_logging
from hashflex.agent.protocol import Channel
from hashflex.contract.reply import Reply

BASE_STATUS: dict[str, Any] = {
    "ts": None,
    "site_id": "demo",
    "version": "0.1.0",
    "target_kw": 45000.0,
    "target_reason": "cap",
    "target_source": "cap",
    "cap_kw": 45000.0,
    "licensed_cap_kw": 45000.0,
    "power_kw_measured": 40500.0,
    "power_kw_estimated": 41200.0,
    "power_kw_worst_case": 43000.0,
    "hashrate_ths": 1_230_000.0,
    "miners": {"hashing": 3, "throttled": 1, "sleeping": 1, "waking": 0, "unreachable": 1, "total": 6},
    "dispatches": [],
    "failsafe": {"active": False, "since": None, "reason": None, "last_heartbeat": None},
    "broker": {"state": "disconnected", "since": None},
    "alarms": [],
    "gateway": {"cpu_pct": 12.5, "mem_pct": 40.0, "disk_free_mb": 2048.0, "rss_mb": 310.0, "low_disk": False},
    "tick": {"n": 8123, "dur_ms": 12.0, "ts": None},
}

MINERS: list[dict[str, Any]] = [
    {
        "ip": "10.0.0.10",
        "model": "S19j Pro",
        "firmware": "luxos",
        "state": "hashing",
        "power_w": 3050.0,
        "limit_w": 3100.0,
        "hashrate_ths": 104.0,
        "temp_c": 68.0,
    },
    {
        "ip": "10.0.0.9",
        "model": "M30S++",
        "firmware": "stock",
        "state": "hashing",
        "power_w": 3400.0,
        "limit_w": None,
        "hashrate_ths": 112.0,
        "temp_c": 74.0,
    },
    {
        "ip": "10.0.0.2",
        "model": "S19",
        "firmware": "stock",
        "state": "throttled",
        "power_w": 2000.0,
        "limit_w": 2000.0,
        "hashrate_ths": 70.0,
        "temp_c": 61.0,
    },
    {
        "ip": "10.0.0.3",
        "model": "S9",
        "firmware": "stock",
        "state": "sleeping",
        "power_w": 10.0,
        "limit_w": None,
        "hashrate_ths": 0.0,
        "temp_c": 30.0,
    },
    {
        "ip": "10.0.1.1",
        "model": "S19",
        "firmware": "luxos",
        "state": "hashing",
        "power_w": 3250.0,
        "limit_w": 3300.0,
        "hashrate_ths": 95.0,
        "temp_c": 71.0,
    },
    {
        "ip": "10.0.0.4",
        "model": "M50",
        "firmware": "stock",
        "state": "unreachable",
        "power_w": None,
        "limit_w": None,
        "hashrate_ths": None,
        "temp_c": None,
    },
]


class StandInHandler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.status = copy.deepcopy(BASE_STATUS)
        self.events: list[dict[str, Any]] = []
        self.refuse: dict[str, tuple[str, str]] = {}  # verb -> (code, message) to refuse with
        self.preview_reply: dict[str, Any] | None = None  # what `preview` answers, when a test sets it

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"type": kind, "ts": time.time(), "data": data})

    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        body = json.loads(payload)
        self.calls.append((verb, body))
        rid = body.get("id")
        if verb in self.refuse:
            code, message = self.refuse[verb]
            self._event("rejected", verb=verb, code=code)
            return Reply.error(rid, code, message)
        now = time.time()
        if verb == "status":
            doc = copy.deepcopy(self.status)
            doc["ts"] = now
            doc["tick"]["ts"] = now
            return Reply.ok(rid, doc)
        if verb == "miners":
            rows = [m for m in MINERS if body.get("state") in (None, m["state"])]
            return Reply.ok(rid, {"miners": copy.deepcopy(rows)})
        if verb == "curtail":
            power = self.status["power_kw_estimated"]
            level = body["to_kw"] if "to_kw" in body else max(0.0, power - body["by_kw"])
            if level > self.status["cap_kw"]:
                return Reply.error(rid, "out_of_range", f"to_kw {level:g} is above the site cap")
            end = now + body["for_s"] if "for_s" in body else None
            # as the agent does: a new override replaces the ones in force unless asked to add
            in_force = [
                d["id"] for d in self.status["dispatches"] if d["source"] == "operator" and d["status"] == "active"
            ]
            replaced = [] if body.get("add") else in_force
            for d in self.status["dispatches"]:
                if d["id"] in replaced:
                    d["status"] = "cancelled"
            dispatch = {
                "id": rid,
                "source": "operator",
                "target_kw": body.get("to_kw"),
                "curtail_kw": body.get("by_kw"),
                "baseline_kw": power if "by_kw" in body else None,
                "start": now,
                "end": end,
                "status": "active",
                "received_at": now,
                "commands_sent_at": now,
                "target_met_at": None,
                "max_overshoot_kw": None,
            }
            self.status["dispatches"].append(dispatch)
            self.status.update(target_kw=level, target_source="operator", target_reason=f"operator:{rid}")
            # the site follows at once here (the real one takes ticks): power drops to the new level
            self.status["power_kw_estimated"] = min(power, level)
            self._event("accepted", dispatch_id=rid, level_kw=level)
            return Reply.ok(rid, {"dispatch": dispatch, "replaced": replaced})
        if verb == "resume":
            ended = [
                d["id"] for d in self.status["dispatches"] if d["source"] == "operator" and d["status"] == "active"
            ]
            for d in self.status["dispatches"]:
                if d["id"] in ended:
                    d["status"] = "cancelled"
            self.status.update(target_kw=self.status["cap_kw"], target_source="cap", target_reason="cap")
            return Reply.ok(rid, {"cancelled": ended})
        if verb == "cap":
            if body["cap_kw"] > self.status["licensed_cap_kw"]:
                return Reply.error(rid, "out_of_range", "cap_kw is above the licensed cap")
            self.status["cap_kw"] = body["cap_kw"]
            self.status["power_kw_estimated"] = min(self.status["power_kw_estimated"], body["cap_kw"])
            self._event("cap_changed", cap_kw=body["cap_kw"])
            return Reply.ok(rid, {"cap_kw": body["cap_kw"]})
        if verb == "preview":
            if self.preview_reply is not None:
                return Reply.ok(rid, copy.deepcopy(self.preview_reply))
            target = body["target_kw"]
            asleep = sum(1 for m in MINERS if (m["power_w"] or 0) / 1000 > target)  # those above it alone
            return Reply.ok(
                rid,
                {
                    "target_kw": target,
                    "expected_kw": min(target, 41200.0),
                    "worst_case_kw": min(target, 43000.0),
                    "sleep": asleep,
                },
            )
        if verb == "dispatches":
            rows = [d for d in self.status["dispatches"] if body.get("all") or d["status"] == "active"]
            return Reply.ok(rid, {"dispatches": rows})
        if verb == "events":
            return Reply.ok(rid, {"events": self.events[-int(body.get("limit", 100)) :]})
        return Reply.error(rid, "unknown_verb", f"unknown verb {verb!r}")


class StandInAgent:
    """Runs the server on a thread, so the (blocking) CLI can be invoked from the test's thread."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hf-cli-", dir="/tmp"))
        self.socket = self.dir / "run" / "control.sock"
        self.config = self.dir / "site.yaml"
        self.config.write_text(
            "site: {id: demo, cap_kw: 45000}\n"
            "miners: {addresses: [10.0.0.0/30]}\n"
            "mqtt: {enabled: false}\n"
            f"state_dir: {self.dir / 'state'}\n"
            f"control_socket: {{path: {self.socket}}}\n"
        )
        self.handler = StandInHandler()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ControlServer(self.socket, self.handler)

    def start(self) -> StandInAgent:
        # the server logs; the CLI under test shares this process and its stdout must hold only its own output
        self.log = (self.dir / "agent.log").open("w")
        configure_logging(LoggingConfig(level="debug"), force_json=True, stream=self.log)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        configure_logging(LoggingConfig(), force_json=True, stream=sys.stderr)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
