"""What every simulated miner has, whatever its firmware: identity, physics, faults, and the hooks the transports
call. A family subclass maps requests to replies in its firmware's shapes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import TYPE_CHECKING, Any

from hashflex.sim.catalogue import ModelSpec
from hashflex.sim.physics import MinerPhysics, PhysicsParams
from hashflex.sim.transport import http_response

if TYPE_CHECKING:
    from hashflex.sim.site import Site
    from hashflex.sim.transport import HttpRequest


class Device:
    family = "generic"
    firmware = ""
    ports: tuple[int, ...] = (4028,)

    def __init__(self, site: Site, ip: str, spec: ModelSpec, seed: int) -> None:
        self.site = site
        self.ip = ip
        self.spec = spec
        digest = hashlib.sha256(f"{seed}:{ip}".encode()).digest()
        self.rng = random.Random(digest)
        self.mac = "02:" + ":".join(f"{b:02X}" for b in digest[:5])
        self.serial = digest[5:13].hex().upper()
        self.physics = MinerPhysics(
            spec, site.physics_params, rng_seed=f"{seed}:{ip}:unit", setpoint_w=self.default_setpoint_w()
        )
        self.boot_t = -self.rng.uniform(3600.0, 30 * 86400.0)  # it has been running for a while
        self.faults: dict[str, dict[str, Any]] = {}
        self.accepted = self.rng.randint(1000, 90000)

    # -- model hooks --------------------------------------------------------------------------------------
    def default_setpoint_w(self) -> float:
        return self.spec.nominal_w

    def power_limit_w(self) -> float | None:
        """The limit as the truth reports it (None where the firmware has no such notion)."""
        return None

    def reset_to_defaults(self) -> None:
        """After a reboot: the firmware's factory configuration (the worst case for a controller: whatever it
        had set is gone, and the unit comes back hashing at full power after its wake-up)."""

    def fault_started(self, mode: str) -> None:
        """A fault was just switched on (family-specific side effects)."""

    def tick(self, t: float) -> None:
        """Called about once a second for devices with time-driven faults (ATM, …)."""

    # -- common readings ----------------------------------------------------------------------------------
    @property
    def params(self) -> PhysicsParams:
        return self.site.physics_params

    def now(self) -> float:
        return self.site.clock.now()

    def uptime_s(self, t: float) -> int:
        return max(0, int(t - self.boot_t))

    def truth(self, t: float) -> dict[str, Any]:
        p = self.physics
        _board, chip = p.temps(t)
        return {
            "ip": self.ip,
            "family": self.family,
            "model": self.spec.name,
            "firmware": self.firmware,
            "state": p.current_state(t),
            "power_limit_w": self.power_limit_w(),
            "power_w": round(p.power_w(t), 1),
            # what it draws once up at its present setting (limit, profile or work mode; PSU spread and drift)
            "setpoint_draw_w": round(p.setpoint_w * p.power_factor * (1.0 + p.drift), 1),
            "hashrate_ths": round(p.hashrate_ths(t), 3),
            "nominal_w": self.spec.nominal_w,
            "nominal_ths": self.spec.nominal_ths,
            "temp_c": round(chip, 1),
            "energy_kwh": round(p.energy_at(t) / 3.6e6, 6),
            "mac": self.mac,
            "serial": self.serial,
            "faults": sorted(self.faults),
        }

    def note_connection(self) -> None:
        self.site.connections += 1

    # -- faults -------------------------------------------------------------------------------------------
    def latency_s(self) -> float:
        slow = self.faults.get("slow")
        if slow is None:
            return 0.0
        lo = float(slow.get("min_ms", 500)) / 1000.0
        hi = float(slow.get("max_ms", 3000)) / 1000.0
        return self.rng.uniform(lo, max(lo, hi))

    def ignoring(self) -> bool:
        """The `ignore` fault: acknowledge control commands, apply nothing."""
        return "ignore" in self.faults

    # -- protocol entry points ----------------------------------------------------------------------------
    def rpc_error_bytes(self, code: int, msg: str) -> bytes:
        return self.dumps({"STATUS": [self.status("E", code, msg)], "id": 1})

    def status(self, kind: str, code: int, msg: str) -> dict[str, Any]:
        return {"STATUS": kind, "When": self.site.clock.unix(), "Code": code, "Msg": msg, "Description": self.firmware}

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def handle_rpc(self, req: dict[str, Any]) -> bytes | None:
        if "blackhole" in self.faults:
            return None
        if "error" in self.faults:
            return self.rpc_error_bytes(
                int(self.faults["error"].get("code", 45)), str(self.faults["error"].get("msg", "Internal error"))
            )
        command = req.get("command")
        if not isinstance(command, str) or not command:
            return self.rpc_error_bytes(23, "Missing JSON 'command'")
        parameter = req.get("parameter")
        param = None if parameter is None else str(parameter)
        if "+" in command:
            out: dict[str, Any] = {}
            for part in command.split("+")[:16]:
                if part in self.privileged_rpc:
                    reply = {"STATUS": [self.status("E", 45, f"Access denied to '{part}' command")], "id": 1}
                else:
                    reply = self.rpc(part, None, req)
                out[part] = [reply]
            out["id"] = 1
            return self.dumps(out)
        return self.dumps(self.rpc(command, param, req))

    privileged_rpc: frozenset[str] = frozenset()

    def rpc(self, command: str, param: str | None, req: dict[str, Any]) -> dict[str, Any]:
        return {"STATUS": [self.status("E", 14, "Invalid command")], "id": 1}

    def handle_v3(self, req: dict[str, Any]) -> dict[str, Any] | None:
        return self.v3_error(-2, "invalid command")

    def v3_error(self, code: int, msg: str) -> dict[str, Any]:
        return {"code": code, "msg": msg}

    def handle_http(self, port: int, request: HttpRequest) -> bytes | asyncio.Future[bytes] | None:
        return http_response(404, b"Not Found")
