"""Chaos: generated hostile input on every channel of the whole agent — MQTT command topics, the MQTT heartbeat, the
local control socket — and what must hold: no crash, a reply for every request, no state change from any refused
input, no `internal` reply, and bounded audit growth (bytes of state database per 1,000 refused).

The generator is grammar-based and seeded (reproducible): wrong types in every field of every verb, huge and
non-finite numbers (1e400, NaN, a 401-digit and a 5,000-digit integer, epoch milliseconds, 99999999999d), deep
nesting, duplicate keys, unicode (zero-width, right-to-left, lone surrogates, invalid UTF-8, NUL), truncations of
valid signed documents, oversized payloads, and valid signatures over wrong scopes: signed for another site, signed
for another verb than the topic's, signed in the old unscoped format, stale or future `issued_at`, a field changed
after signing, another key. None of them is a valid mutating command, so every one must be refused (reads may be
answered), and the site's state — dispatches, caps, target, fail-safe, stored replies — must not move.

The fail-safe is held at start (no grid heard yet) with a short release time: a fuzzed heartbeat that counts as
proof of life would release it, and that shows as a state change.

    python -m tests.bench.chaos_fuzz --payloads 10000 [--seed 4] [--json-out rows.jsonl]

Loopback range: 127.183.0.0/16 (full runs), 127.188.0.0/16 (the short test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hashflex.contract import signing
from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, iso, write_agent_config
from tests.bench.chaos_common import Row, emit, full_power_kw, resign, settled_db_bytes, sign_raw, signed
from tests.broker import HOST, Mosquitto

MUTATING = ("dispatch", "cancel", "cap", "curtail", "resume")
READS = ("ping", "status", "miners", "preview", "dispatches", "events")
ODD_VERBS = ("nope", "DISPATCH", "dïspatch", "dispatch ", "heartbeat", "reply")
RAW_NUMBERS = (
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "-Infinity",
    "1" + "0" * 400,
    "9" * 5000,
    "1e-400",
    "-0",
    "1.7e12",
    "17000000000000",
    "4e307",
    "123456789012345678901234567890",
)
_NOT_A_NUMBER: tuple[Any, ...] = (
    True,
    [],
    {},
    [1],
    {"kw": 1},
    "12XW",
    "1e400",
    "NaN",
    "-Infinity",
    "∞",
    "0x10",
    "x" * 300,
    "",
    -1,
    -1e-9,
)
_NOT_A_TIME: tuple[Any, ...] = (
    True,
    [],
    {},
    "yesterday",
    "2026-13-45T99:00:00Z",
    "2026-01-01T00:00:00",
    -1,
    0,
    1e400,
    "",
    "x" * 300,
)
_NOT_AN_ID: tuple[Any, ...] = (0, True, [], {}, "", "x" * 300, "a b", "naïve")
_NOT_A_START = tuple(v for v in _NOT_A_TIME if not isinstance(v, int))  # a past start is a valid start
WRONG: dict[str, tuple[Any, ...]] = {  # per field, values it can never take
    "id": _NOT_AN_ID,
    "dispatch_id": _NOT_AN_ID,
    "target_kw": _NOT_A_NUMBER,
    "cap_kw": _NOT_A_NUMBER,
    "to_kw": _NOT_A_NUMBER,
    "start": _NOT_A_START,
    "end": _NOT_A_TIME,
    "ramp_kw_per_min": ("fast", 0, -5, [], {}),
    "rev": (-1, 1.5, 2**40, None, []),
    "for_s": (True, [], "forever", 0, -60, "99999999999d", "1e400s"),
    "state": (1, "on fire", []),
    "sort": (1, "random", []),
    "limit": (0, -1, "all", 10**12, 1.5),
}
UNICODE = ("d\u200b1", "\u202eevil", "ß" * 3, "😀", "\ud800", "\x00", "id\nnew", "\u0000\u0001", "ＩＤ", "a" * 129)


# ------------------------------------------------------------------------------------------------ the generator
class Generator:
    """Hostile payloads for one site. Every mutating document it makes is invalid in at least one way."""

    def __init__(self, agent: AgentProcess, rng: random.Random) -> None:
        self.agent = agent
        self.rng = rng
        self.other_key = Ed25519PrivateKey.generate()
        self.n = 0

    def uid(self) -> str:
        self.n += 1
        return f"fz{self.n}"

    def body(self, verb: str) -> dict[str, Any]:
        """A well-formed body for `verb` (unsigned), to be broken."""
        now = self.agent.now()
        r = self.rng
        if verb == "dispatch":
            return {
                "id": self.uid(),
                "target_kw": round(r.uniform(1, 10), 1),
                "start": iso(now),
                "end": iso(now + 600),
                "ramp_kw_per_min": 5,
                "rev": 0,
            }
        if verb == "cancel":
            return {"id": self.uid(), "dispatch_id": r.choice(("nope", "fz1", "safe-start", "x"))}
        if verb == "cap":
            return {"id": self.uid(), "cap_kw": round(r.uniform(1, 10), 1)}
        if verb == "curtail":
            return {"id": self.uid(), "to_kw": round(r.uniform(1, 10), 1), "for_s": "30m"}
        if verb == "resume":
            return {"id": self.uid()}
        if verb == "preview":
            return {"id": self.uid(), "target_kw": 5}
        if verb == "miners":
            return {"id": self.uid(), "state": "hashing", "sort": "power", "limit": 5}
        return {"id": self.uid()}

    def sign(self, verb: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return signed(self.agent, verb, body, **kw)

    # every method returns (bytes, kind); `verb` is the verb of the topic (or socket request) it goes to
    def wrong_type(self, verb: str) -> tuple[bytes, str]:
        """One field of a well-formed body given a value of a type (or shape) it can never take."""
        body = self.body(verb)
        key = self.rng.choice([k for k in body if k in WRONG] or ["id"])
        body[key] = self.rng.choice(WRONG[key])
        if self.rng.random() < 0.5:  # signed over the wrong value: only the schema can refuse it
            return json.dumps(self.sign(verb, body)).encode(), "wrong type, signed"
        return json.dumps(body).encode(), "wrong type"

    def bad_number(self, verb: str) -> tuple[bytes, str]:
        body = self.body(verb)
        field = {
            "dispatch": "target_kw",
            "cap": "cap_kw",
            "curtail": "to_kw",
            "preview": "target_kw",
            "miners": "limit",
            "cancel": "dispatch_id",
        }.get(verb, "id")
        choice = self.rng.random()
        if verb == "dispatch" and choice < 0.3:
            field = self.rng.choice(("end", "start", "ramp_kw_per_min", "rev"))
        if verb == "curtail" and choice < 0.3:
            field = "for_s"
            body[field] = self.rng.choice(("99999999999d", "1e400s", "-1s", "0"))
            return self._guard(verb, json.dumps(body)), "huge duration"
        number = self.rng.choice(RAW_NUMBERS)
        text = json.dumps({**body, field: "@@N@@"}).replace('"@@N@@"', number)
        tiny = number in ("1e-400", "-0")  # a valid 0: signed, it would be a genuine command
        if verb in ("dispatch", "cancel") and not tiny and self.rng.random() < 0.7:
            # a valid signature over the huge number itself (Python renders it back the same)
            with contextlib.suppress(ValueError, OverflowError):
                parsed = json.loads(text)
                return json.dumps(self.sign(verb, parsed)).encode(), "huge number, signed"
        return self._guard(verb, text), "huge or non-finite number"

    def _guard(self, verb: str, text: str) -> bytes:
        """Locally a curtail/cap/resume needs no signature: an unknown field keeps every such document invalid."""
        if verb in ("cap", "curtail", "resume") and text.endswith("}"):
            text = text[:-1] + ', "zz_unknown": 0}'
        return text.encode("utf-8", "surrogatepass")

    def deep(self, verb: str) -> tuple[bytes, str]:
        depth = self.rng.choice((64, 500, 1000, 5000, 20000))
        lists = self.rng.random() < 0.5
        inner = "[" * depth + "]" * depth if lists else '{"a":' * depth + "1" + "}" * depth
        text = json.dumps({**self.body(verb), "nest": "@@N@@"}).replace('"@@N@@"', inner)
        return text.encode(), "deep nesting"

    def duplicate(self, verb: str) -> tuple[bytes, str]:
        doc = self.sign(verb, self.body(verb)) if verb in MUTATING else self.body(verb)
        text = json.dumps(doc)
        key = self.rng.choice([*doc.keys(), "id", "site", "verb", "signature"])
        value = json.dumps(self.rng.choice(["other", "fz-dup", 1, None, "other-site", "cap"]))
        text = text[:-1] + f', "{key}": {value}' + "}"
        return text.encode(), "duplicate key"

    def unicode(self, verb: str) -> tuple[bytes, str]:
        body = self.body(verb)
        key = self.rng.choice(list(body.keys()))
        body[key] = self.rng.choice(UNICODE)
        text = json.dumps(body, ensure_ascii=self.rng.random() < 0.5)
        if self.rng.random() < 0.3:
            return self._guard(verb, text[:-1]) + b', "x": "\xff\xfe\xc0\xaf"}', "invalid utf-8"
        return self._guard(verb, text), "unicode"

    def truncated(self, verb: str) -> tuple[bytes, str]:
        doc = self.sign(verb, self.body(verb)) if verb in MUTATING else self.body(verb)
        raw = json.dumps(doc).encode()
        return raw[: self.rng.randrange(0, max(1, len(raw) - 1))], "truncation"

    def wrong_scope(self, verb: str) -> tuple[bytes, str]:
        """Authentic-looking documents that are not for this site, this verb, this moment or this key."""
        target = verb if verb in MUTATING else self.rng.choice(MUTATING)
        body = self.body(target)
        kind = self.rng.randrange(7)
        if kind == 0:
            doc, what = self.sign(target, body, site="other-site"), "signed for another site"
        elif kind == 1:
            others = [v for v in (*MUTATING, "heartbeat") if v != verb]
            doc, what = self.sign(self.rng.choice(others), body), "signed for another verb"
        elif kind == 2:
            doc = signing.sign({"issued_at": iso(self.agent.now()), **body}, self.agent.files.grid_key)
            what = "old unscoped signature"
        elif kind == 3:
            when = self.agent.now() + self.rng.choice((-10 * 86400.0, 10 * 86400.0, -1e9, 3e9))
            doc, what = self.sign(target, body, issued_at=when), "signed, stale or future"
        elif kind == 4:
            doc = {**self.sign(target, body), "id": self.uid()}
            what = "changed after signing"
        elif kind == 5:
            doc = sign_raw({**self.sign(target, body), "signature": None}, self.other_key)
            what = "another key"
        else:
            doc = resign(self.agent, self.sign(target, body), site=None, verb=None)
            what = "signature without site and verb"
        return self._guard(verb, json.dumps(doc)) if doc is body else json.dumps(doc).encode(), what

    def junk(self, _verb: str) -> tuple[bytes, str]:
        choice = self.rng.randrange(6)
        if choice == 0:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 200))), "random bytes"
        if choice == 1:
            return self.rng.choice((b"", b" ", b"null", b"[]", b'"str"', b"42", b"{", b"}")), "not an object"
        if choice == 2:
            return b'{"id": "' + b"x" * 70_000 + b'"}', "oversized"
        if choice == 3:
            return b'{"id": "a", "target_kw": 1}' * 3, "concatenated"
        if choice == 4:
            return b"\xef\xbb\xbf" + json.dumps({"id": self.uid()}).encode(), "byte order mark"
        return json.dumps([self.body("dispatch")]).encode(), "array"

    def one(self, verb: str) -> tuple[bytes, str]:
        makers: list[Callable[[str], tuple[bytes, str]]] = [
            self.wrong_type,
            self.bad_number,
            self.deep,
            self.duplicate,
            self.unicode,
            self.truncated,
            self.wrong_scope,
            self.wrong_scope,
            self.junk,
        ]
        return self.rng.choice(makers)(verb)

    def heartbeat(self) -> tuple[bytes, str]:
        """A heartbeat that proves nothing: unsigned, signed for another site or verb, stale, or garbage."""
        choice = self.rng.randrange(6)
        now = self.agent.now()
        base = {"id": self.uid(), "seq": self.rng.randrange(10**6)}
        if choice == 0:
            return json.dumps(base).encode(), "unsigned heartbeat"
        if choice == 1:
            return json.dumps(self.sign("heartbeat", base, site="other-site")).encode(), "heartbeat for another site"
        if choice == 2:
            return json.dumps(self.sign("dispatch", base)).encode(), "heartbeat signed as a dispatch"
        if choice == 3:
            stale = self.sign("heartbeat", base, issued_at=now - 30 * 86400)
            return json.dumps(stale).encode(), "stale signed heartbeat"
        if choice == 4:
            return json.dumps(
                sign_raw({**base, "site": "x", "verb": "heartbeat"}, self.other_key)
            ).encode(), "heartbeat by another key"
        return self.one("heartbeat")


# ------------------------------------------------------------------------------------------------ state and audit
def snapshot(agent: AgentProcess) -> dict[str, Any]:
    """What a refused input must not change."""
    status = agent.status()
    dispatches = agent.ok("dispatches", {"all": True})["dispatches"]
    db = agent.files.state_dir / "hashflex.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        replies = con.execute("SELECT count(*) FROM replies").fetchone()[0]
        disp_rows = con.execute("SELECT count(*) FROM dispatches").fetchone()[0]
    finally:
        con.close()
    fs = status.get("failsafe") or {}
    return {
        "dispatches": sorted((d["id"], d["status"], d.get("level_kw")) for d in dispatches),
        "dispatch_rows": disp_rows,
        "stored_replies": replies,
        "cap_kw": status.get("cap_kw"),
        "target_kw": status.get("target_kw"),
        "target_source": status.get("target_source"),
        "failsafe_active": fs.get("active"),
        "last_heartbeat": fs.get("last_heartbeat"),
    }


def audit_size(agent: AgentProcess) -> tuple[int, int]:
    """(records, bytes of record data) in the audit chain."""
    db = agent.files.state_dir / "hashflex.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        n, size = con.execute("SELECT count(*), coalesce(sum(length(data)), 0) FROM audit").fetchone()
    finally:
        con.close()
    return int(n), int(size)


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What changed, leaving out stored replies: an authentic request refused when applied (a cancel of an unknown
    dispatch) keeps its reply for its retries, which is no change to the site."""
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "stored_replies"}


# ------------------------------------------------------------------------------------------------ the channels
class MqttFuzzer:
    """Publishes with a response topic under the site's reply/ and correlation data: each reply is matched."""

    def __init__(self, port: int, root: str) -> None:
        self.root = root
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.subscribe(f"{root}/reply/fuzz", qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        corr = getattr(message.properties, "CorrelationData", None)
        if corr is None:
            return
        try:
            doc = json.loads(message.payload)
        except ValueError:
            doc = {"unparseable": True}
        with self.lock:
            self.replies[bytes(corr)] = doc

    def publish(self, topic: str, payload: bytes, corr: bytes | None) -> None:
        props = None
        if corr is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = f"{self.root}/reply/fuzz"
            props.CorrelationData = corr
        self.client.publish(topic, payload, qos=1, properties=props)

    def count(self) -> int:
        with self.lock:
            return len(self.replies)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class SocketFuzzer:
    """Raw lines on the control socket; one reply line per request line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(15)
            self.sock.connect(str(self.path))
            self.buf = b""
        return self.sock

    def request(self, line: bytes) -> dict[str, Any] | None:
        """The reply, or None when the connection ended without one."""
        sock = self._connect()
        try:
            sock.sendall(line)
            while b"\n" not in self.buf:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
        except OSError:
            self.close()
            return None
        raw, _, self.buf = self.buf.partition(b"\n")
        try:
            doc: dict[str, Any] = json.loads(raw)
        except ValueError:
            return {"unparseable": raw[:100].decode(errors="replace")}
        if (doc.get("error") or {}).get("code") == "too_large":
            self.close()  # the server closes a stream it cannot resynchronise (documented): the next request reconnects
        return doc

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None


# ------------------------------------------------------------------------------------------------ the run
def run(
    payloads: int, *, seed: int = 4, base_ip: str = "127.183.0.1", batch: int = 200, workdir: Path | None = None
) -> list[Row]:
    """One row per channel: mqtt commands, heartbeat, control socket."""
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-fuzz-")) if workdir is None else workdir
    site_id = f"chaos-f-{uuid.uuid4().hex[:6]}"
    root = f"hashflex/{site_id}"
    rows: list[Row] = []
    with SimProcess(miners=4, base_ip=base_ip, seed=seed) as sim:
        full = full_power_kw(sim)
        broker = Mosquitto(tmp / "broker").start()
        files = write_agent_config(
            tmp / "agent",
            sim.ips,
            cap_kw=round(full * 0.8, 1),
            site_id=site_id,
            overrides={
                "mqtt": {"enabled": True, "host": HOST, "port": broker.plain_port, "telemetry_interval_s": 30},
                "failsafe": {
                    "enabled": True,
                    "level": round(full * 0.5, 1),
                    "hold_at_start": True,
                    "heartbeat_timeout_s": 3600,
                    "release_after_s": 2,
                },
            },
        )
        agent = AgentProcess.start(files)
        fuzz_mqtt: MqttFuzzer | None = None
        sock = SocketFuzzer(files.socket)
        try:
            agent.wait_for(lambda: agent.status()["broker"]["state"] == "connected", 30, what="mqtt connected")
            gen = Generator(agent, rng)
            fuzz_mqtt = MqttFuzzer(broker.plain_port, root)
            for channel in ("mqtt commands", "heartbeat", "control socket"):
                row = Row(f"fuzz: {channel}")
                started = time.monotonic()
                kinds: Counter[str] = Counter()
                codes: Counter[str] = Counter()
                before = snapshot(agent)
                stored0 = before["stored_replies"]
                audit0 = audit_size(agent)
                bytes0 = settled_db_bytes(files.state_dir)
                refused = 0
                sent = 0
                while sent < payloads:
                    n = min(batch, payloads - sent)
                    corrs: list[bytes] = []
                    batch_ok_mutating: list[str] = []
                    what: dict[bytes, str] = {}
                    for i in range(n):
                        idx = sent + i
                        if channel == "heartbeat":
                            payload, kind = gen.heartbeat()
                            fuzz_mqtt.publish(f"{root}/heartbeat", payload, None)
                        else:
                            verb = rng.choice((*MUTATING, *MUTATING, *READS, *ODD_VERBS))
                            payload, kind = gen.one(verb)
                            if channel == "mqtt commands":
                                corr = f"c{idx}".encode()
                                corrs.append(corr)
                                what[corr] = f"{kind} ({verb}): {payload[:200]!r}"
                                fuzz_mqtt.publish(f"{root}/cmd/{verb}", payload, corr)
                            else:
                                if verb in ("cap", "curtail", "resume"):  # trusted locally without a signature
                                    payload = gen._guard(verb, payload.decode("utf-8", "surrogateescape"))
                                reply = sock.request(_socket_line(verb, payload, rng))
                                if reply is None:
                                    reply = {"status": "none"}
                                    if agent.proc.poll() is None:
                                        row.lost += 1  # no reply: counted as a lost answer
                                        row.note(f"no reply on the socket to {kind} ({verb}): {payload[:80]!r}")
                                code = _tally(reply, codes)
                                refused += code != "ok"
                                row.acked += "status" in reply and reply["status"] != "none"
                                if code == "internal":
                                    row.violations += 1
                                    row.note(f"internal reply to {kind} ({verb}): {payload[:120]!r}")
                                if code == "ok" and verb in MUTATING:
                                    batch_ok_mutating.append(f"{kind} ({verb}): {payload[:160]!r}")
                        kinds[kind] += 1
                    sent += n
                    if channel == "mqtt commands":
                        deadline = time.monotonic() + 30
                        while time.monotonic() < deadline and any(c not in fuzz_mqtt.replies for c in corrs):
                            if agent.proc.poll() is not None:
                                break
                            time.sleep(0.05)
                        for c in corrs:
                            reply = fuzz_mqtt.replies.get(c)
                            if reply is None:
                                row.lost += 1
                                continue
                            row.acked += 1
                            code = _tally(reply, codes)
                            refused += code != "ok"
                            if code == "internal":
                                row.violations += 1
                                row.note(f"internal reply over MQTT: {reply.get('error')}")
                            if code == "ok" and reply.get("data", {}).get("dispatch") is not None:
                                batch_ok_mutating.append(what[c])
                    elif channel == "heartbeat":
                        time.sleep(0.5)
                    if agent.proc.poll() is not None:
                        row.crashes += 1
                        row.note(f"the agent exited with {agent.proc.returncode} after {sent}: {agent.tail(10)}")
                        agent = AgentProcess.start(files)
                        gen.agent = agent
                        sock.close()
                        before = snapshot(agent)
                        continue
                    time.sleep(0.3 if channel == "heartbeat" else 0.0)
                    now = snapshot(agent)
                    changed = diff(before, now)
                    if changed:
                        row.violations += 1
                        row.note(
                            f"state changed by refused input (payloads {sent - n}..{sent}): "
                            f"{json.dumps(changed, default=str)[:300]}"
                            + (f"; accepted: {batch_ok_mutating[:3]}" if batch_ok_mutating else "")
                        )
                        before = now
                    row.cycles = sent
                row.sent = sent
                if channel == "heartbeat":
                    row.acked = 0
                    refused = sent
                    # the control: a heartbeat the agent should take must show, or the check above sees nothing
                    last = snapshot(agent)["last_heartbeat"]
                    good = json.dumps(signed(agent, "heartbeat", {"id": gen.uid(), "seq": 1})).encode()
                    fuzz_mqtt.publish(f"{root}/heartbeat", good, None)
                    time.sleep(1.0)
                    taken = snapshot(agent)["last_heartbeat"]
                    row.note(f"control: a valid signed heartbeat {'was' if taken != last else 'was NOT'} taken")
                    if taken == last:  # then the check above could not have seen a heartbeat taken either
                        row.violations += 1
                    fuzz_mqtt.publish(f"{root}/heartbeat", good, None)  # and the same again: a replay
                    time.sleep(1.0)
                    if snapshot(agent)["last_heartbeat"] != taken:
                        row.violations += 1
                        row.note("a replayed heartbeat was taken as a new proof of life")
                    time.sleep(3.0)  # the fail-safe may be released by it: let that settle before the next channel
                audit1 = audit_size(agent)
                growth = settled_db_bytes(files.state_dir) - bytes0
                per_k = growth / max(refused, 1) * 1000
                row.disk_growth = f"{per_k:.0f} B/1k refused"
                record_kb = (audit1[1] - audit0[1]) / 1e3
                row.note(
                    f"{refused} refused; audit +{audit1[0] - audit0[0]} records, +{record_kb:.0f}"
                    f" kB of record data; files +{growth / 1e3:.0f} kB ({per_k / 1e3:.1f} kB per 1,000 refused)"
                )
                row.note(
                    f"reply codes: {dict(codes.most_common())}; stored replies +"
                    f"{snapshot(agent)['stored_replies'] - stored0}"
                )

                row.note(f"payload kinds: {dict(kinds.most_common())}")
                errors = sum(1 for e in agent.log_events() if e.get("level") in ("error", "critical"))
                row.note(f"agent RSS {_rss(agent):.0f} MB; error lines in its log so far: {errors}")
                row.wall_s = time.monotonic() - started
                rows.append(row)
        finally:
            sock.close()
            if fuzz_mqtt is not None:
                fuzz_mqtt.close()
            agent.kill()
            broker.stop()
            if workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _rss(agent: AgentProcess) -> float:
    from tests.bench.chaos_common import rss_mb

    return rss_mb(agent.proc.pid)


def _tally(reply: dict[str, Any], codes: Counter[str]) -> str:
    if reply.get("status") == "ok":
        codes["ok"] += 1
        return "ok"
    code = str((reply.get("error") or {}).get("code") or reply.get("status"))
    codes[code] += 1
    return code


def _socket_line(verb: str, payload: bytes, rng: random.Random) -> bytes:
    """One request line around the fuzzed payload (its newlines flattened: one line, one reply)."""
    body = payload.replace(b"\n", b" ").replace(b"\r", b" ")
    if rng.random() < 0.05:  # the envelope itself broken
        envelopes = (
            b'{"verb": 1}',
            b'{"payload": {}}',
            b"[]",
            b'{"verb": "ping", "payload": []}',
            b'{"verb": "ping", "verb": "cap", "payload": {"cap_kw": "1e400"}}',
            body,
        )
        return rng.choice(envelopes) + b"\n"
    if rng.random() < 0.001:
        return b'{"verb": "ping", "payload": {"id": "' + b"x" * (1 << 20) + b'"}}\n'  # above the line limit
    return b'{"verb": ' + json.dumps(verb).encode() + b', "payload": ' + (body or b"null") + b"}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--payloads", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    for row in run(args.payloads, seed=args.seed):
        emit(row, args.json_out)


if __name__ == "__main__":
    main()
