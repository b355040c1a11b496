"""Chaos: the broker killed (SIGKILL, sometimes SIGTERM) and restarted at random moments while the grid side publishes
dispatches and cancels throughout, over MQTT, to the whole agent on the simulated site.

The grid side behaves as the MQTT README tells a grid integration to: QoS 1, a persistent session, and every request
retried with the same id (and the same signed bytes) until a reply arrives. At the end every request must have a
reply; every dispatch answered `ok` must be known to the agent and accepted exactly once in its audit chain; every
retry must get the first reply; the site never above its cap (ground truth).

    python -m tests.bench.chaos_broker --cycles 100 [--seed 1] [--json-out rows.jsonl]

Loopback range: 127.180.0.0/16 (full runs), 127.185.0.0/16 (the short test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, write_agent_config
from tests.bench.chaos_common import (
    TOLERANCE_SHARE,
    WAKE_S,
    Row,
    TruthRecorder,
    above,
    accepted_counts,
    audit_verify,
    db_bytes,
    dispatch_body,
    emit,
    full_power_kw,
    is_final,
    known_dispatches,
    settled_db_bytes,
    signed,
)
from tests.broker import HOST, Mosquitto

RETRY_AFTER_S = 3.0
# A grid integration must retry with backoff and keep its own queue bounded. Retrying every unanswered request every
# 3 s into paho's unbounded queue while the broker was down built a 56,495-message backlog behind paho's in-flight
# window of 20, so new requests and retries queued behind stale ones and never reached the broker (06:42 run: 819
# never answered). Mosquitto also keeps at most 1,000 messages for the agent's offline session.
RETRY_MAX_S = 20.0  # per-request backoff: 3, 6, 12, 20, 20 ... s
CLIENT_QUEUE = 50  # paho's outgoing QoS 1 queue (in flight + waiting); a publish past it is tried again later
# Dispatch windows (s). A broker that flaps makes the agent back off up to a minute (a connection shorter than 10 s
# counts as flapping, by design): windows shorter than that expire in the broker's queue and are refused `expired`
# on delivery (answered, not lost). 20-90 s windows showed it: 323 of 431 expired at 06:30.
WINDOW_S = (120.0, 600.0)


@dataclass
class Outgoing:
    verb: str
    rid: str
    payload: bytes
    first_sent: float
    last_sent: float
    dispatch_id: str | None = None  # a cancel's target
    tries: int = 1
    next_at: float = 0.0  # when to (re)publish next; 0: as soon as the link is up


@dataclass
class GridSide:
    """The grid integration: a paho MQTT 5 client with a persistent session that retries until it has a reply."""

    port: int
    root: str
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    out: dict[str, Outgoing] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"grid-chaos-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.max_queued_messages_set(CLIENT_QUEUE)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect_async(HOST, self.port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(f"{self.root}/reply/#", qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            doc = json.loads(message.payload)
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                with self.lock:
                    self.replies.setdefault(doc["id"], []).append(doc)

    def send(self, verb: str, doc: dict[str, Any], dispatch_id: str | None = None) -> None:
        payload = json.dumps(doc).encode()
        now = time.monotonic()
        o = Outgoing(verb, doc["id"], payload, now, now, dispatch_id, tries=0)
        with self.lock:
            self.out[doc["id"]] = o
        self._publish(o, now)

    def _publish(self, o: Outgoing, now: float) -> bool:
        """Publish `o` now if the link is up and paho's queue has room (True); otherwise leave it due."""
        if not self.client.is_connected():
            return False  # nothing piles up while the broker is away: due requests go out after the reconnect
        info = self.client.publish(f"{self.root}/cmd/{o.verb}", o.payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return False
        with self.lock:
            o.tries += 1
            o.last_sent = now
            o.next_at = now + min(RETRY_AFTER_S * 2 ** (o.tries - 1), RETRY_MAX_S)
        return True

    def final(self, rid: str) -> list[dict[str, Any]]:
        """The final replies to `rid` (a transient error is no answer: the grid retries)."""
        with self.lock:
            return [r for r in self.replies.get(rid, []) if is_final(r)]

    def retry_unanswered(self) -> int:
        """Re-publish the unanswered requests that are due, longest waiting first, while paho's queue has room."""
        if not self.client.is_connected():
            return 0
        now = time.monotonic()
        with self.lock:
            due = sorted(
                (
                    o
                    for o in self.out.values()
                    if now >= o.next_at and not any(is_final(r) for r in self.replies.get(o.rid, []))
                ),
                key=lambda o: o.next_at,
            )
        sent = 0
        for o in due:
            if not self._publish(o, now):
                break
            sent += 1
        return sent

    def unanswered(self) -> list[Outgoing]:
        with self.lock:
            return [o for o in self.out.values() if not any(is_final(r) for r in self.replies.get(o.rid, []))]

    def first_reply(self, rid: str) -> dict[str, Any] | None:
        got = self.final(rid)
        return got[0] if got else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def run(
    cycles: int, *, seed: int = 1, base_ip: str = "127.180.0.1", miners: int = 6, workdir: Path | None = None
) -> Row:
    row = Row("broker kill/restart")
    rng = random.Random(seed)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="chaos-broker-")) if workdir is None else workdir
    site_id = f"chaos-b-{uuid.uuid4().hex[:6]}"
    root = f"hashflex/{site_id}"
    with SimProcess(miners=miners, base_ip=base_ip, seed=seed, extra_args=["--wake-s", WAKE_S]) as sim:
        full = full_power_kw(sim)
        cap = round(full * 0.8, 1)
        tol = full * TOLERANCE_SHARE
        broker = Mosquitto(tmp / "broker").start()
        files = write_agent_config(
            tmp / "agent",
            sim.ips,
            cap_kw=cap,
            site_id=site_id,
            overrides={
                "mqtt": {
                    "enabled": True,
                    "host": HOST,
                    "port": broker.plain_port,
                    "telemetry_interval_s": 5,
                    "keepalive_s": 5,
                },
            },
        )
        grid: GridSide | None = None
        agent: AgentProcess | None = None
        try:
            with TruthRecorder(sim) as truth:
                agent = AgentProcess.start(files)
                agent.wait_for(lambda: agent.status()["broker"]["state"] == "connected", 30, what="mqtt connected")
                agent.wait_for(lambda: truth.latest().power_kw <= cap + tol, 60, what="the site under its cap")
                grid = GridSide(broker.plain_port, root)
                bytes0 = settled_db_bytes(files.state_dir)  # the WAL checkpointed: what stays on disk
                t_begin = time.monotonic()
                stop = threading.Event()
                sent_ids: list[str] = []
                cancels = [0]

                def publisher() -> None:
                    n = 0
                    while not stop.is_set():
                        assert agent is not None
                        assert grid is not None
                        n += 1
                        oks = [i for i in sent_ids if (r := grid.first_reply(i)) and r.get("status") == "ok"]
                        if oks and rng.random() < 0.3:
                            target = rng.choice(oks)
                            doc = signed(agent, "cancel", {"id": f"x{n}-{target}", "dispatch_id": target})
                            grid.send("cancel", doc, target)
                            cancels[0] += 1
                        else:
                            did = f"b{n}"
                            body = dispatch_body(
                                agent, did, target_kw=rng.uniform(0.3, 0.95) * cap, lasts_s=rng.uniform(*WINDOW_S)
                            )
                            grid.send("dispatch", signed(agent, "dispatch", body))
                            sent_ids.append(did)
                        grid.retry_unanswered()
                        stop.wait(rng.uniform(0.1, 0.5))

                pub = threading.Thread(target=publisher, name="grid", daemon=True)
                pub.start()
                for cycle in range(cycles):
                    # mostly flapping, sometimes up long enough for the agent's link to count as stable again
                    time.sleep(rng.uniform(0.3, 2.0) if rng.random() < 0.8 else rng.uniform(10.0, 15.0))
                    if rng.random() < 0.8:
                        broker.kill()
                    else:
                        broker.stop()
                    time.sleep(rng.uniform(0.05, 1.5))
                    broker.start()
                    row.cycles = cycle + 1
                    if agent.proc.poll() is not None:
                        row.crashes += 1
                        row.note(f"cycle {cycle}: the agent exited with {agent.proc.returncode}: {agent.tail(8)}")
                        agent = AgentProcess.start(files)
                stop.set()
                pub.join(30)
                # every request must end with a reply: keep retrying, as a grid integration would
                deadline = time.monotonic() + 90
                while grid.unanswered() and time.monotonic() < deadline:
                    grid.retry_unanswered()
                    time.sleep(0.5)
                time.sleep(2.0)  # late duplicates of replies, for the consistency check
                t_end = time.monotonic()
                if agent.proc.poll() is not None:
                    row.crashes += 1
                    row.note(f"the agent exited with {agent.proc.returncode}: {agent.tail(8)}")
                    agent = AgentProcess.start(files)
                # ---------------------------------------------------------------- what the agent has
                known = known_dispatches(agent)
                accepted = accepted_counts(files.state_dir, "dispatch")
                cancelled = accepted_counts(files.state_dir, "cancel")
                row.sent = len(sent_ids)
                refusals: Counter[str] = Counter()
                transient = 0
                for did in sent_ids:
                    transient += len(grid.replies.get(did, [])) - len(grid.final(did))
                    replies = grid.final(did)
                    if not replies:
                        row.lost += 1
                        row.note(f"{did}: never answered (tries {grid.out[did].tries})")
                        continue
                    if len({json.dumps(r, sort_keys=True) for r in replies}) > 1:
                        row.doubled += 1
                        row.note(
                            f"{did}: answered differently on a retry: {[r.get('status') for r in replies]} "
                            f"{[r.get('error', {}).get('code') for r in replies]}"
                        )
                    if replies[0].get("status") != "ok":
                        refusals[str((replies[0].get("error") or {}).get("code"))] += 1
                        if accepted[did]:
                            row.doubled += 1
                            row.note(f"{did}: refused in its reply, yet accepted {accepted[did]}x in the chain")
                        continue
                    row.acked += 1
                    if accepted[did] == 1 and did in known:
                        row.applied_once += 1
                    elif accepted[did] > 1:
                        row.doubled += 1
                        row.note(f"{did}: accepted {accepted[did]} times")
                    else:
                        row.lost += 1
                        row.note(f"{did}: acknowledged but {'not in the chain' if not accepted[did] else 'unknown'}")
                for o in list(grid.out.values()):
                    if o.verb == "cancel":
                        if cancelled[o.rid] > 1:
                            row.doubled += 1
                            row.note(f"cancel {o.rid}: accepted {cancelled[o.rid]} times")
                        if not grid.final(o.rid):
                            row.lost += 1
                            row.note(f"cancel {o.rid}: never answered")
                over = above(truth.since(t_begin, t_end), cap, tol)
                if over:
                    row.violations += 1
                    row.note(
                        f"site above its cap {cap} kW in {len(over)} samples, max "
                        f"{max(s.power_kw for s in over):.2f} kW"
                    )
                if refusals or transient:
                    row.note(f"dispatches refused, by code: {dict(refusals)}; {transient} transient errors retried")
                retries = sum(max(o.tries - 1, 0) for o in grid.out.values())
                row.note(
                    f"{cancels[0]} cancels sent, {sum(cancelled.values())} accepted; {retries} retries; "
                    f"{sum(1 for r in grid.replies.values() if r[0].get('status') != 'ok')} refused; "
                    f"truth samples {len(truth.samples)}"
                )
                agent.stop()  # a clean stop checkpoints the WAL: the growth is the database's own
                growth = db_bytes(files.state_dir) - bytes0
                row.disk_growth = f"{growth / 1e6:.2f} MB"
                ok, said = audit_verify(files)
                if not ok:
                    row.violations += 1
                    row.note(f"audit verify failed: {said}")
        finally:
            if grid is not None:
                grid.close()
            if agent is not None:
                agent.kill()
            broker.stop()
            if workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    row.wall_s = time.monotonic() - started
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--workdir", type=Path, help="keep the broker's and the agent's files and logs here")
    args = ap.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    emit(run(args.cycles, seed=args.seed, workdir=args.workdir), args.json_out)


if __name__ == "__main__":
    main()
