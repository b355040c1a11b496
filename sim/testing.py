"""Run the simulated site in a subprocess, for tests, benchmarks and demos.

Usage:

    from hashflex.sim.testing import SimProcess

    with SimProcess(miners=12, mix="luxos:34,whatsminer:33,antminer:33", base_ip="127.10.0.1", seed=11,
                    speed=10) as sim:
        sim.ips                      # ["127.10.0.1", ...] in family blocks, in --mix order
        sim.truth()                  # GET /truth: {"sim_time_s", "speed", "site": {...}, "miners": [...]}
        sim.set_faults({"mode": "refuse", "share": 0.25})     # POST /faults; returns {"applied", "active"}
        sim.set_faults({"mode": "clear"})

Sync API (from async tests: `await asyncio.to_thread(sim.truth)`). Each miner listens on its own loopback address
on its firmware's ports, so `pyasic.get_miner(ip)` works on it unmodified. Truth JSON per miner: ip, family
(luxos|whatsminer|antminer), model, firmware, state (hashing|sleeping|waking|offline), power_limit_w (null for stock
Antminer), power_w, hashrate_ths, nominal_w, nominal_ths, temp_c, energy_kwh, mac, serial, faults, reachable (+
profile/atm for LuxOS, mode for Antminer). Fault JSON: see sim/faults.py. Use only your own loopback range.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any


class SimError(RuntimeError):
    pass


class SimProcess:
    def __init__(
        self,
        miners: int,
        *,
        mix: str = "luxos:40,whatsminer:40,antminer:20",
        base_ip: str = "127.10.0.1",
        seed: int = 7,
        speed: float = 1.0,
        faults: Any = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.miners = miners
        self.mix = mix
        self.base_ip = base_ip
        self.seed = seed
        self.speed = speed
        self.faults = faults
        self.extra_args = list(extra_args)
        self.ips: list[str] = []
        self.truth_url = ""
        self.meter = ""  # "host:port" of the simulated site meter (extra_args=["--meter", ...]), else ""
        self.summary = ""
        self._proc: subprocess.Popen[str] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise SimError("not started")
        return self._proc.pid

    def start(self, timeout: float = 120) -> SimProcess:
        self._dir = tempfile.TemporaryDirectory(prefix="hashflex-sim-")
        ready = Path(self._dir.name) / "ready.json"
        self._log = Path(self._dir.name) / "sim.log"
        cmd = [
            sys.executable,
            "-m",
            "hashflex.sim",
            "--miners",
            str(self.miners),
            "--mix",
            self.mix,
            "--base-ip",
            self.base_ip,
            "--seed",
            str(self.seed),
            "--speed",
            str(self.speed),
            "--truth-port",
            "0",
            "--ready-file",
            str(ready),
            *self.extra_args,
        ]
        if self.faults is not None:
            cmd += ["--faults", json.dumps(self.faults)]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = self._log.open("w")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self._proc.poll() is not None:
                raise SimError(f"simulator exited with {self._proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise SimError(f"simulator not ready after {timeout} s: {self.log_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.ips = list(info["ips"])
        self.truth_url = str(info["truth_url"])
        self.meter = str(info.get("meter") or "")
        self.summary = self.log_text().strip().splitlines()[0] if self.log_text().strip() else ""
        return self

    def log_text(self) -> str:
        try:
            return self._log.read_text()
        except (OSError, AttributeError):
            return ""

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.truth_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise SimError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from None

    def truth(self) -> dict[str, Any]:
        """GET /truth: the site as the physics has it."""
        doc: dict[str, Any] = self._request("GET", "/truth")
        return doc

    def miner(self, ip: str) -> dict[str, Any]:
        """One miner's truth."""
        return next(m for m in self.truth()["miners"] if m["ip"] == ip)

    def set_faults(self, spec: Any) -> dict[str, Any]:
        """POST /faults (spec as in sim/faults.py); raises SimError on a refused spec."""
        doc: dict[str, Any] = self._request("POST", "/faults", spec)
        return doc

    def clear_faults(self) -> dict[str, Any]:
        return self.set_faults({"mode": "clear"})

    def meter_truth(self) -> dict[str, Any]:
        """GET /meter: the site meter's figures (sim/meter.py)."""
        doc: dict[str, Any] = self._request("GET", "/meter")["meter"]
        return doc

    def meter_fault(self, fault: str, **params: Any) -> dict[str, Any]:
        """POST /meter: offline | frozen | garbage (kind nan|absurd) | counter_reset | clear."""
        doc: dict[str, Any] = self._request("POST", "/meter", {"fault": fault, **params})["meter"]
        return doc

    def facility_truth(self) -> list[dict[str, Any]]:
        """GET /facility: each facility load (sim/facility.py): setpoint, power, history, wakes of its miners."""
        doc: list[dict[str, Any]] = self._request("GET", "/facility")["facility"]
        return doc

    def facility_fault(self, name: str, fault: str) -> dict[str, Any]:
        """POST /facility: offline | refuse | clear, for the load named."""
        doc: dict[str, Any] = self._request("POST", "/facility", {"name": name, "fault": fault})["facility"]
        return doc

    def grid_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """POST /grid: a frequency event (sim/grid.py): step, ramp, dip, trace, nominal."""
        doc: dict[str, Any] = self._request("POST", "/grid", event)
        return doc

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup()
        return proc.returncode

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
