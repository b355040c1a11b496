"""What the demo needs to drive the agent from the outside, as a grid operator and an observer would.

Nothing here imports the agent: it is reached through its Unix control socket (one JSON line per request,
one JSON line per reply) and through `hashflex` subprocesses (`run`, `sign`, `audit export|verify`, `energy`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from hashflex.contract.status import StatusDoc

REPO = Path(__file__).resolve().parents[1]
DEMO_KEY = REPO / "configs" / "demo" / "keys" / "demo-grid.key"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


def hashflex_command() -> list[str]:
    """The `hashflex` of this installation (next to this Python), else the same CLI as a module."""
    script = Path(sys.executable).with_name("hashflex")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "hashflex"]


def run_hashflex(
    args: list[str], *, stdin: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*hashflex_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def public_key_for(private: Path) -> Path:
    """`demo-grid.key` → `demo-grid.pub`; `hashflex keygen --out grid` → `grid.pub`."""
    for candidate in (private.with_suffix(".pub"), private.with_name(private.name + ".pub")):
        if candidate.is_file():
            return candidate
    raise DemoError(f"no public key next to {private} (expected {private.with_suffix('.pub')})")


DEMO_SITE_ID = "demo"  # site.id in the demo's agent config; signed commands name it (hashflex-sig-v2)


def sign(key: Path, doc: Mapping[str, Any], *, verb: str = "dispatch", site: str = DEMO_SITE_ID) -> dict[str, Any]:
    """The grid operator's side: `hashflex sign --key KEY --site SITE --verb VERB` over the command JSON."""
    done = run_hashflex(["sign", "--key", str(key), "--site", site, "--verb", verb], stdin=json.dumps(dict(doc)))
    if done.returncode != 0:
        raise DemoError(f"hashflex sign failed: {done.stderr.strip()}")
    signed: dict[str, Any] = json.loads(done.stdout)
    return signed


# ---------------------------------------------------------------------------------------------- site clock
def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class SiteClock:
    """The agent's scaled clock (`hashflex run --time-scale K --time-origin O`), read from outside.

    It reads O + (wall - O) × K; the simulator's physics runs at the same K, so both agree on site seconds.
    """

    scale: float
    origin: float
    utc_offset_h: float

    @classmethod
    def reading(cls, site_at: float, *, wall_at: float, scale: float, utc_offset_h: float) -> SiteClock:
        """The clock that reads `site_at` at wall time `wall_at` (solved for the origin)."""
        return cls(scale, (wall_at * scale - site_at) / (scale - 1.0), utc_offset_h)

    def now(self) -> float:
        return self.origin + (time.time() - self.origin) * self.scale

    def wall_until(self, site_at: float) -> float:
        """Wall seconds until the clock reads `site_at` (≤ 0 once it has)."""
        return (site_at - self.now()) / self.scale

    def local(self, ts: float) -> datetime:
        """Site-local wall-clock time (naive), as the schedule windows are written."""
        return (datetime.fromtimestamp(ts, UTC) + timedelta(hours=self.utc_offset_h)).replace(tzinfo=None)

    def hhmm(self, ts: float, seconds: bool = False) -> str:
        return self.local(ts).strftime("%H:%M:%S" if seconds else "%H:%M")


def local_today(hhmm: str, utc_offset_h: float, now: float) -> float:
    """Epoch seconds of HH:MM site-local time on today's (UTC) date."""
    hours, minutes = (int(p) for p in hhmm.split(":"))
    midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight + timedelta(hours=hours, minutes=minutes) - timedelta(hours=utc_offset_h)).timestamp()


# ---------------------------------------------------------------------------------------------- the socket
class AgentLink:
    """One connection to the agent's control socket, reopened when it drops (JSON lines both ways)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self._sock, self._buffer = sock, b""
        return self._sock

    def request(self, verb: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The reply document {id, status, data, error?}; OSError when the agent cannot be reached."""
        line = json.dumps({"verb": verb, "payload": dict(payload or {})}).encode() + b"\n"
        for attempt in (1, 2):  # the agent closes idle connections: one reconnect is normal
            try:
                sock = self._connect()
                sock.sendall(line)
                while b"\n" not in self._buffer:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise ConnectionResetError("the agent closed the connection")
                    self._buffer += chunk
                raw, _, self._buffer = self._buffer.partition(b"\n")
                reply: dict[str, Any] = json.loads(raw)
                return reply
            except (ConnectionError, BrokenPipeError, ValueError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ok(self, verb: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        reply = self.request(verb, payload)
        if reply.get("status") != "ok":
            error = reply.get("error") or {}
            raise DemoError(f"the agent refused {verb!r}: {error.get('message')} [{error.get('code')}]")
        data: dict[str, Any] = reply.get("data") or {}
        return data

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------------------------- the agent
def write_agent_config(
    path: Path,
    *,
    ips: list[str],
    cap_kw: float,
    scale: float,
    ramp_kw_per_min: float,
    window: Mapping[str, Any],
    grid_pub: Path,
    state_dir: Path,
    socket_path: Path,
    timezone: str,
    meter: Mapping[str, Any] | None = None,
    frequency: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The site config the demo's agent runs with. Site timers are site seconds (they pass `scale` times faster);
    network deadlines are wall seconds. Sweeps and ticks come every half wall second, so the agent sees a change
    within a few site seconds even at 50×. `meter` (site.meter) puts the agent's control at the site meter;
    `frequency` is its frequency_response section."""
    beat = 0.5 * scale  # site seconds in half a wall second
    doc: dict[str, Any] = {
        "site": {
            "id": DEMO_SITE_ID,
            "cap_kw": cap_kw,
            "timezone": timezone,
            **({"meter": dict(meter)} if meter is not None else {}),
        },
        "miners": {"addresses": address_ranges(ips)},
        "polling": {
            "interval_s": beat,
            "read_timeout_s": 3.0,
            "command_timeout_s": 5.0,
            "identify_timeout_s": 8.0,
            "stale_after_s": 10 * beat,
            "concurrency": 200,
        },
        "control": {
            "tick_s": beat,
            "ramp_up_kw_per_min": round(ramp_kw_per_min, 1),
            "min_on_s": 120,
            "min_off_s": 120,
            "confirm_after_s": 6 * beat,
            "headroom_pct": 1.0,
        },
        "dispatch": {"max_skew_s": max(30.0, 2 * beat)},
        "schedule": [dict(window)],
        "failsafe": {"enabled": False},
        "mqtt": {"enabled": False},
        "grid": {"public_keys": [str(grid_pub)]},
        "state_dir": str(state_dir),
        "control_socket": {"path": str(socket_path)},
        "metrics": {"enabled": False},
        "logging": {"level": "info", "format": "json"},
    }
    if frequency is not None:
        doc["frequency_response"] = dict(frequency)
    header = (
        "# Written by `hashflex demo`: the simulated site's agent config (its clock ran scaled, from\n"
        "# --time-origin). After the demo, read its state with\n"
        f"#   hashflex audit verify --config {path}\n#   hashflex energy --config {path} --from 0 --to now\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return doc


def address_ranges(ips: list[str]) -> list[str]:
    """Runs of consecutive addresses as `a-b` ranges (the simulator skips .0 and .255, so there are gaps)."""
    numbers = sorted(int(ipaddress.IPv4Address(ip)) for ip in ips)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return [
        str(ipaddress.IPv4Address(a)) if a == b else f"{ipaddress.IPv4Address(a)}-{ipaddress.IPv4Address(b)}"
        for a, b in runs
    ]


class AgentRun:
    """`hashflex run --config FILE --time-scale K --time-origin O` as a subprocess; its log goes to a file."""

    def __init__(self, config: Path, clock: SiteClock, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        args = [
            *hashflex_command(),
            "run",
            "--config",
            str(config),
            "--time-scale",
            repr(clock.scale),
            "--time-origin",
            repr(clock.origin),
        ]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            )

    def wait_ready(self, timeout: float) -> None:
        link = AgentLink(self.socket_path, timeout=2.0)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DemoError(
                        f"the agent exited with {self.proc.returncode} before it was ready; "
                        f"see {self.log_path}:\n{self.tail()}"
                    )
                if self.socket_path.exists():
                    with contextlib.suppress(OSError, ValueError):
                        if link.request("ping").get("status") == "ok":
                            return
                time.sleep(0.1)
        finally:
            link.close()
        raise DemoError(f"the agent was not ready within {timeout:g} s; see {self.log_path}:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a clean stop: the audit trail gets agent_stop); if it hangs, SIGABRT first, so that Python's
        faulthandler writes every thread's stack to the agent's log (where it hung), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# ---------------------------------------------------------------------------------------------- the record
TRUTH_STATES = ("hashing", "throttled", "sleeping", "waking", "offline")


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the site: ground truth from the simulator, and what the agent says at the same moment."""

    site_ts: float  # the site clock
    truth_kw: float
    hashrate_ths: float
    states: dict[str, int]  # TRUTH_STATES; throttled = hashing under a power limit below nominal
    agent_kw: float | None = None
    target_kw: float | None = None
    planning_kw: float | None = None  # the level the ramp limit allows now (≤ target)
    cap_kw: float | None = None
    reason: str | None = None  # cap | grid:<id> | schedule:<name> | operator:<id> | failsafe
    meter_kw: float | None = None  # the site meter's ground truth (miners + cooling + base load + losses)
    hz: float | None = None  # grid frequency at the meter, ground truth
    frequency_event: bool = False  # the agent's frequency response held a stage's shed at this look


def truth_states(truth: Mapping[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(TRUTH_STATES, 0)
    for m in truth["miners"]:
        state = str(m["state"])
        limit, nominal = m.get("power_limit_w"), m.get("nominal_w")
        if state == "hashing" and limit is not None and nominal is not None and limit < nominal - 1:
            state = "throttled"
        counts[state if state in counts else "offline"] += 1
    return counts


def make_sample(site_ts: float, truth: Mapping[str, Any], status: StatusDoc | None) -> Sample:
    """One sample: the simulated site's truth beside the agent's status document (None: not answered)."""
    s: Mapping[str, Any] = status or {}
    meter: Mapping[str, Any] = truth.get("meter") or {}

    def num(key: str) -> float | None:
        value = s.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return Sample(
        site_ts=site_ts,
        truth_kw=float(truth["site"]["power_w"]) / 1000.0,
        hashrate_ths=float(truth["site"]["hashrate_ths"]),
        states=truth_states(truth),
        agent_kw=num("power_kw"),
        target_kw=num("target_kw"),
        planning_kw=num("planning_level_kw"),
        cap_kw=num("cap_kw"),
        reason=str(s["target_reason"]) if s.get("target_reason") else None,
        meter_kw=_kw_of(meter.get("power_w")),
        hz=_finite(meter.get("hz")),
        frequency_event=bool(((s.get("meter") or {}).get("frequency_response") or {}).get("active")),
    )


def _finite(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _kw_of(watts: Any) -> float | None:
    w = _finite(watts)
    return None if w is None else w / 1000.0


@dataclass(frozen=True, slots=True)
class MeterPoint:
    """One fast look at the simulated meter around the frequency event (GET /meter: light, unlike /truth)."""

    site_ts: float
    hz: float
    power_kw: float  # the whole site at the meter
    it_kw: float  # the miners' part of it


@dataclass(frozen=True, slots=True)
class DipView:
    """What the plot's frequency panel draws: the fast meter trace, the thresholds, and the verdict's moments."""

    points: list[MeterPoint]
    below_hz: float
    restore_above_hz: float
    verdict: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Mark:
    """A moment of the scenario, drawn as a line on the plot."""

    site_ts: float
    label: str


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of the scenario (a dispatch, a time-of-use window), shaded on the plot."""

    start: float
    end: float
    label: str
    kind: str  # grid | schedule
    level_kw: float


@dataclass(frozen=True, slots=True)
class Ramp:
    """The most the site may draw while it comes back up: from where it was when its target rose, at most
    `kw_per_min` more per site minute (control.ramp_up_kw_per_min), never above the target."""

    start: float
    start_kw: float
    kw_per_min: float
    ceiling_kw: float

    def limit_kw(self, ts: float) -> float:
        return min(self.ceiling_kw, self.start_kw + self.kw_per_min * max(0.0, ts - self.start) / 60.0)

    @property
    def end(self) -> float:
        """When the limit reaches the ceiling."""
        return self.start + max(0.0, self.ceiling_kw - self.start_kw) / self.kw_per_min * 60.0
