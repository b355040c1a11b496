"""What the chaos runners share: the result row and its table, ground truth sampled from the simulator, what the
agent's own state database says was applied, `hashflex audit verify`, and signing through the test harness.

The runners (tests/bench/chaos_broker.py, chaos_kill.py, chaos_disk.py, chaos_fuzz.py) run the whole agent
(`hashflex run`, tests/agent_harness.py) on the simulated site (sim/testing.py) — with a real Mosquitto
(tests/broker.py) where MQTT is involved — break something over and over, and count. scripts/chaos.sh runs them at
full counts; tests/integration/test_chaos_short.py runs small counts in the normal suite.

Loopback range of the chaos runs: 127.180.0.0 – 127.189.255.255 (one /16 per runner and size, see each runner).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hashflex.contract import signing
from hashflex.sim.testing import SimProcess
from tests.agent_harness import ROOT, AgentConfigFiles, AgentProcess, iso

# Ground truth may exceed the agent's own figures a little: each simulated unit draws within ±2 % of its nominal
# and a miner finishing a limit change overshoots for a moment (as in tests/integration/test_crash_restart.py).
TOLERANCE_SHARE = 0.03  # of the site's full power
# A woken miner reaches full power in this many (simulated) seconds. Real units take minutes; the simulator lowers a
# power limit over 5 s. A wake faster than that (3 s, as some tests use) lets a re-plan that lowers some units and
# wakes others overshoot its level while the lowered ones are still coming down (the README, chaos runs).
# CHAOS_WAKE_S=3 reproduces it.
WAKE_S = os.environ.get("CHAOS_WAKE_S", "10")


# Error codes that say "not now, retry": no final answer, nothing stored, so a retry may be answered otherwise.
TRANSIENT_CODES = frozenset({"unavailable", "store_unavailable", "internal", "busy"})


def is_final(reply: Mapping[str, Any]) -> bool:
    """A reply (as a dict) the sender may take as the answer: ok, or an error that is not transient."""
    return reply.get("status") == "ok" or (reply.get("error") or {}).get("code") not in TRANSIENT_CODES


# ------------------------------------------------------------------------------------------------ the result
@dataclass
class Row:
    """One runner's figures: the table row scripts/chaos.sh prints and the README quotes."""

    runner: str
    cycles: int = 0
    sent: int = 0  # distinct dispatch ids published (or fuzz payloads, for the fuzz runner)
    acked: int = 0  # distinct dispatch ids answered `ok` (fuzz: payloads answered)
    applied_once: int = 0  # acknowledged ids the audit chain shows accepted exactly once and the agent still knows
    lost: int = 0  # acknowledged ids the agent does not have (or that never got any reply at all)
    doubled: int = 0  # ids accepted more than once, or answered differently on a retry
    violations: int = 0  # the site above its limit, a wake beyond it, a state change from refused input, ...
    crashes: int = 0  # the agent exited (or stopped answering) when nothing killed it
    disk_growth: str = "-"
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.runner}] {text}", flush=True)

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.doubled == 0 and self.violations == 0 and self.crashes == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


HEADER = (
    "runner",
    "cycles",
    "sent",
    "acked",
    "applied once",
    "lost",
    "doubled",
    "violations",
    "crashes",
    "disk growth",
    "wall s",
)


def table(rows: Iterable[Row]) -> str:
    """A Markdown table, one line per runner."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = (
            r.runner,
            r.cycles,
            r.sent,
            r.acked,
            r.applied_once,
            r.lost,
            r.doubled,
            r.violations,
            r.crashes,
            r.disk_growth,
            f"{r.wall_s:.0f}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def emit(row: Row, json_out: Path | None) -> None:
    """Print the row (table form) and, if asked, append it as one JSON line for scripts/chaos.sh."""
    print(table([row]), flush=True)
    for n in row.notes[-40:]:
        print(f"  - {n}")
    if json_out is not None:
        with json_out.open("a") as f:
            f.write(row.to_json() + "\n")


# ------------------------------------------------------------------------------------------------ ground truth
@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when the truth was read
    power_kw: float
    running_kw: float  # what every miner the truth shows hashing or waking draws once up at its setting
    waking: int
    states: tuple[str, ...] = ()  # each miner's state, in the simulator's order
    # each miner as the truth showed it: (ip, state, limit W or None, nominal W, power W), for a violation's story
    miners: tuple[tuple[str, str, float | None, float, float], ...] = ()

    def describe(self) -> str:
        return "; ".join(
            f"{ip} {state} limit {limit if limit is None else round(limit)} nominal {round(nominal)} "
            f"drawing {round(power)} W"
            for ip, state, limit, nominal, power in self.miners
        )


class TruthRecorder:
    """Reads the simulator's truth every `period_s` on a thread for the whole run: nothing happens unseen."""

    def __init__(self, sim: SimProcess, period_s: float = 0.1) -> None:
        self.sim = sim
        self.period_s = period_s
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="truth", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                truth = self.sim.truth()
            except Exception:  # the simulator is slow under load: a missed sample is not a finding
                self.errors += 1
                self._stop.wait(self.period_s)
                continue
            # what each miner on (hashing or waking) draws once up at its present setting: its limit, LuxOS
            # profile or Antminer work mode (a nominal figure over-counted a stock Antminer woken in low-power mode)
            running = sum(float(m["setpoint_draw_w"]) for m in truth["miners"] if m["state"] in ("hashing", "waking"))
            waking = sum(1 for m in truth["miners"] if m["state"] == "waking")
            states = tuple(str(m["state"]) for m in truth["miners"])
            miners = tuple(
                (
                    str(m["ip"]),
                    str(m["state"]),
                    None if m["power_limit_w"] is None else float(m["power_limit_w"]),
                    float(m["nominal_w"]),
                    float(m["power_w"]),
                )
                for m in truth["miners"]
            )
            self.samples.append(
                Sample(time.monotonic(), truth["site"]["power_w"] / 1000, running / 1000, waking, states, miners)
            )
            self._stop.wait(self.period_s)

    def __enter__(self) -> TruthRecorder:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def since(self, t0: float, t1: float | None = None) -> list[Sample]:
        return [s for s in list(self.samples) if s.at >= t0 and (t1 is None or s.at <= t1)]

    def latest(self, timeout: float = 10.0) -> Sample:
        start = time.monotonic()
        while not self.samples or self.samples[-1].at < start:
            if time.monotonic() - start > timeout:
                raise TimeoutError("no fresh truth sample")
            time.sleep(0.02)
        return self.samples[-1]


def full_power_kw(sim: SimProcess) -> float:
    return sum(float(m["nominal_w"]) for m in sim.truth()["miners"]) / 1000


def above(samples: Iterable[Sample], limit_kw: float, tol_kw: float) -> list[Sample]:
    """The samples where the site drew more than `limit_kw` (+ tolerance)."""
    return [s for s in samples if s.power_kw > limit_kw + tol_kw]


# ------------------------------------------------------------------------------------------------ the agent's word
def db_files(state_dir: Path) -> list[Path]:
    return [p for p in state_dir.glob("hashflex.db*") if p.is_file()]


def db_bytes(state_dir: Path) -> int:
    """The state database with its WAL and shared-memory files, in bytes."""
    total = 0
    for p in db_files(state_dir):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def settled_db_bytes(state_dir: Path) -> int:
    """The database file's size after a passive WAL checkpoint (what stays on disk, not the WAL's reusable pages)."""
    db = state_dir / "hashflex.db"
    with contextlib.suppress(sqlite3.Error):
        con = sqlite3.connect(db, timeout=5)
        try:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            con.close()
    try:
        return db.stat().st_size
    except OSError:
        return 0


def audit_commands(state_dir: Path) -> list[dict[str, Any]]:
    """Every `command` record of the audit chain, read from the file (read-only; the agent may be running)."""
    db = state_dir / "hashflex.db"
    if not db.exists():
        return []
    for _ in range(20):
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                rows = con.execute("SELECT data FROM audit WHERE kind = 'command' ORDER BY seq").fetchall()
            finally:
                con.close()
            return [json.loads(r[0]) for r in rows]
        except sqlite3.OperationalError:
            time.sleep(0.25)
    raise RuntimeError(f"could not read the audit chain of {db}")


def accepted_counts(state_dir: Path, verb: str) -> Counter[str]:
    """How many times the chain shows each id of `verb` accepted (`ok`); a dispatch revision counts on its own."""
    out: Counter[str] = Counter()
    for r in audit_commands(state_dir):
        if r.get("verb") == verb and r.get("status") == "ok" and isinstance(r.get("id"), str):
            rev = (r.get("request") or {}).get("rev") or 0
            out[f"{r['id']}#rev{rev}" if rev else r["id"]] += 1
    return out


def known_dispatches(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """The agent's dispatches, open and closed, by id (grid ones, as the `dispatches` verb lists them)."""
    docs = agent.ok("dispatches", {"all": True})["dispatches"]
    return {d["id"]: d for d in docs}


def audit_verify(files: AgentConfigFiles) -> tuple[bool, str]:
    """`hashflex audit verify --json` on the state database: (passed, what it said)."""
    done = subprocess.run(
        [sys.executable, "-m", "hashflex", "audit", "verify", "--config", str(files.path), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    text = (done.stdout + done.stderr).strip()
    with contextlib.suppress(json.JSONDecodeError):
        doc = json.loads(done.stdout)
        return done.returncode == 0 and doc.get("status") == "ok", text[-400:]
    return False, text[-400:]


# ------------------------------------------------------------------------------------------------ signing
def signed(
    agent: AgentProcess, verb: str, doc: Mapping[str, Any], *, issued_at: float | None = None, site: str | None = None
) -> dict[str, Any]:
    """`doc` signed by the test grid key for `verb` at this site, through the harness, whatever the format is today.

    The harness owns the signing format (it is changing: the signed scope gains `site` and `verb`); this adapter
    only passes the verb when the harness takes it. `site` set to another site's id makes a document signed for that
    site — what a replay from another site looks like.
    """
    params = inspect.signature(agent.signed).parameters
    kwargs: dict[str, Any] = {}
    if issued_at is not None:
        kwargs["issued_at"] = issued_at
    if "verb" in params:
        kwargs["verb"] = verb
    if site is not None and "site" in params:
        kwargs["site"] = site
    out = agent.signed(dict(doc), **kwargs)
    if hasattr(signing, "sign_command") and "verb" not in params:
        # the agent wants the scoped format and the harness does not give it yet: add the scope and sign again
        scope = {"site": site or agent.files.doc["site"]["id"], "verb": verb}
        out = sign_raw({**out, **{k: v for k, v in scope.items() if k not in out or k == "site"}}, agent.files.grid_key)
    elif site is not None and "site" not in params:  # put the other site in and sign again
        out = sign_raw({**out, "site": site}, agent.files.grid_key)
    return out


def resign(agent: AgentProcess, doc: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """`doc` with fields changed and a fresh valid grid signature over the result (a valid signature, wrong scope)."""
    body = {k: v for k, v in {**doc, **changes}.items() if v is not None}
    return sign_raw(body, agent.files.grid_key)


def sign_raw(body: Mapping[str, Any], key: Any) -> dict[str, Any]:
    """`body` signed as it stands, in the command format of contract.signing (the versioned one, once there)."""
    sign = getattr(signing, "sign_command", signing.sign)
    out: dict[str, Any] = sign(body, key)
    return out


def dispatch_body(
    agent: AgentProcess, dispatch_id: str, *, target_kw: float, lasts_s: float | None, start_in_s: float = 0.0
) -> dict[str, Any]:
    now = agent.now()
    body: dict[str, Any] = {"id": dispatch_id, "target_kw": round(target_kw, 1)}
    if start_in_s:
        body["start"] = iso(now + start_in_s)
    if lasts_s is not None:
        body["end"] = iso(now + start_in_s + lasts_s)
    return body


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
