"""Run the real agent (`hashflex run`, a subprocess) against a simulated site from a test, in a few lines.

    with SimProcess(miners=20, base_ip="127.70.0.1", speed=10) as sim:
        cfg = write_agent_config(tmp_path, sim.ips, cap_kw=80, time_scale=10)
        with AgentProcess.start(cfg, time_scale=10) as agent:
            agent.request("dispatch", agent.signed({"id": "d1", "target_kw": 40}))
            agent.wait_for(lambda: sim.truth()["site"]["power_w"] <= 40_000, timeout=30)

The agent talks to the simulator through unmodified pyasic over real TCP, keeps its state in real SQLite in the
test's folder, and is driven through its control socket, exactly as `hashflex` CLI commands drive it. A scaled
clock (`--time-scale K`, with the simulator's `--speed K`) compresses the agent's timers the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.io.control_socket import AgentUnavailable, request_sync
from hashflex.contract import signing
from hashflex.contract.reply import Reply

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class AgentConfigFiles:
    path: Path  # the YAML
    state_dir: Path
    socket: Path
    grid_key: Ed25519PrivateKey
    doc: dict[str, Any] = field(default_factory=dict)


def write_agent_config(
    folder: Path,
    addresses: list[str],
    *,
    cap_kw: float,
    site_id: str = "test-site",
    time_scale: float = 1.0,
    overrides: Mapping[str, Any] | None = None,
    grid_key: Ed25519PrivateKey | None = None,
) -> AgentConfigFiles:
    """A site config for `addresses` (the simulator's IPs), with its own grid key pair, state dir and socket.

    Timers are in site seconds; with `time_scale` K they pass K times faster. Defaults suit a small site: quick
    sweeps and ticks, no MQTT, no metrics endpoint, no wake stagger to speak of, short min on/off times.
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = grid_key or Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / "grid.key").write_bytes(private_pem)
    (folder / "grid.pub").write_bytes(public_pem)
    state_dir = folder / "state"
    socket = folder / "ctl.sock"
    k = time_scale
    doc: dict[str, Any] = {
        "site": {"id": site_id, "cap_kw": cap_kw},
        "miners": {"addresses": list(addresses)},
        "polling": {
            # network deadlines are wall seconds; the sweep period is site time
            "interval_s": 1.0 * k,
            "read_timeout_s": 3.0,
            "command_timeout_s": 5.0,
            "identify_timeout_s": 8.0,
            "stale_after_s": max(20.0 * k, 10.0),
            "concurrency": 100,
            "identify_concurrency": 64,
        },
        "control": {
            "tick_s": 1.0 * k,
            "min_on_s": 5.0 * k,
            "min_off_s": 5.0 * k,
            "confirm_after_s": 6.0 * k,
            "wake": {"max_per_interval": 1000, "interval_s": 1.0 * k},
            "headroom_pct": 1.0,
        },
        "dispatch": {"debounce_s": 0, "max_age_s": min(3600 * k, 7 * 86400), "max_skew_s": min(60 * k, 86400)},
        "failsafe": {"enabled": False},
        "mqtt": {"enabled": False},
        "grid": {"public_keys": [str(folder / "grid.pub")]},
        "state_dir": str(state_dir),
        "control_socket": {"path": str(socket)},
        "metrics": {"enabled": False},
        "logging": {"level": "info", "format": "json"},
    }
    if overrides:
        doc = _deep_merge(doc, overrides)
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return AgentConfigFiles(path, state_dir, socket, key, doc)


def guess_verb(doc: Mapping[str, Any]) -> str:
    """The grid verb a test document is meant for (tests sign it without saying)."""
    if "dispatch_id" in doc:
        return "cancel"
    if "cap_kw" in doc:
        return "cap"
    return "dispatch"


def sign_for(
    key: Ed25519PrivateKey, doc: Mapping[str, Any], *, site: str, verb: str, issued_at: float
) -> dict[str, Any]:
    """What the grid side sends (hashflex-sig-v2): `doc` with issued_at, site and verb, signed with `key`. Fields
    already in `doc` win (a test may sign a wrong site or verb on purpose)."""
    return signing.sign_command({"issued_at": iso(issued_at), "site": site, "verb": verb, **doc}, key)


class AgentProcess:
    """`hashflex run --config FILE [--time-scale K]` as a subprocess, driven through its control socket."""

    def __init__(
        self,
        files: AgentConfigFiles,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        time_scale: float,
        time_origin: float,
    ) -> None:
        self.files = files
        self.proc = proc
        self.log_path = log_path
        self.time_scale = time_scale
        self.time_origin = time_origin

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def start(
        cls,
        files: AgentConfigFiles,
        *,
        time_scale: float = 1.0,
        time_origin: float | None = None,
        ready_timeout: float = 90.0,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> AgentProcess:
        """Start the agent and wait until it answers on its socket.

        With `time_scale` K its clock runs K times faster than the wall from `time_origin` (default: now); pass
        the same origin to every restart within one test so they share a timeline (and `agent.now()` agrees).
        """
        args = [sys.executable, "-m", "hashflex", "run", "--config", str(files.path), *extra_args]
        origin = time.time() if time_origin is None else time_origin
        if time_scale != 1.0:
            args += ["--time-scale", str(time_scale), "--time-origin", repr(origin)]
        log_path = files.path.parent / f"agent-{int(time.time() * 1000)}.log"
        out = log_path.open("wb")
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        out.close()
        agent = cls(files, proc, log_path, time_scale, origin)
        try:
            agent.wait_ready(ready_timeout)
        except BaseException:
            agent.kill()
            raise
        return agent

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            if self.files.socket.exists():
                with contextlib.suppress(AgentUnavailable):
                    if request_sync(self.files.socket, "ping", {}, timeout=2.0).is_ok:
                        return
            time.sleep(0.1)
        raise TimeoutError(f"the agent was not ready within {timeout:g} s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: a clean stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise RuntimeError(f"the agent did not stop within {timeout:g} s:\n{self.tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()

    # ------------------------------------------------------------------------------------------ talking
    def request(self, verb: str, payload: Mapping[str, Any] | None = None, timeout: float = 15.0) -> Reply:
        return request_sync(self.files.socket, verb, dict(payload or {}), timeout=timeout)

    def ok(self, verb: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        reply = self.request(verb, payload)
        assert reply.is_ok, f"{verb} refused: {reply.error_code}: {reply.error_message}"
        return reply.data

    def status(self) -> dict[str, Any]:
        return self.ok("status")

    def now(self) -> float:
        """The agent's clock (scaled like the agent's own): for issued_at, start and end fields."""
        return self.time_origin + (time.time() - self.time_origin) * self.time_scale

    def signed(
        self,
        doc: Mapping[str, Any],
        *,
        issued_at: float | None = None,
        verb: str | None = None,
        site: str | None = None,
    ) -> dict[str, Any]:
        """`doc` grid-signed (hashflex-sig-v2) for this site: with issued_at (the agent's now, unless given), `site`
        and `verb`. The verb defaults to what the fields say (dispatch_id: cancel, cap_kw: cap, else dispatch)."""
        when = self.now() if issued_at is None else issued_at
        site = site or str(self.files.doc["site"]["id"])
        return sign_for(self.files.grid_key, doc, site=site, verb=verb or guess_verb(doc), issued_at=when)

    # ------------------------------------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "") -> T:
        """Poll `predicate` until it returns something truthy (returned), or fail with the agent's log."""
        deadline = time.monotonic() + timeout
        last: T | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.tail()}")
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(
            f"timed out after {timeout:g} s waiting for {what or predicate}: last={last!r}\n{self.tail()}"
        )

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def log_events(self, event: str | None = None) -> Iterator[dict[str, Any]]:
        """The agent's JSON log lines (optionally only one event name)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(line)
                if isinstance(doc, dict) and (event is None or doc.get("event") == event):
                    yield doc


def site_power_kw(truth: Mapping[str, Any]) -> float:
    return float(truth["site"]["power_w"]) / 1000.0


def states(truth: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in truth["miners"]:
        out[m["state"]] = out.get(m["state"], 0) + 1
    return out
