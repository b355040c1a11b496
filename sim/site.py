"""The simulated site: builds the miners, binds one listener per (address, port), applies faults, reboots,
and answers the truth endpoint."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from hashflex.sim.catalogue import family_models
from hashflex.sim.clock import SimClock
from hashflex.sim.device import Device
from hashflex.sim.families.antminer import AntminerDevice
from hashflex.sim.families.luxos import LuxosDevice
from hashflex.sim.families.whatsminer import WhatsminerDevice
from hashflex.sim.faults import FaultAction, parse
from hashflex.sim.physics import PhysicsParams
from hashflex.sim.transport import HttpProtocol, HttpRequest, RpcProtocol, V3Protocol, http_response

if TYPE_CHECKING:
    from hashflex.sim.meter import SiteMeter

log = structlog.get_logger("sim")


DEVICE_CLASSES: dict[str, type[Device]] = {
    "luxos": LuxosDevice,
    "whatsminer": WhatsminerDevice,
    "antminer": AntminerDevice,
}
FAMILIES = tuple(DEVICE_CLASSES)


def device_class(family: str) -> type[Device]:
    try:
        return DEVICE_CLASSES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})") from None


def parse_mix(mix: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in mix.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r} in --mix (one of {', '.join(FAMILIES)})")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} in --mix") from None
        if w < 0:
            raise ValueError("--mix weights must be >= 0")
        weights[name] = weights.get(name, 0.0) + w
    if sum(weights.values()) <= 0:
        raise ValueError("--mix needs a positive weight")
    return weights


def split_counts(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of n miners by weight, in the order given."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    rest = n - sum(counts.values())
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[:rest]:
        counts[k] += 1
    return counts


def allocate_ips(base_ip: str, n: int) -> list[str]:
    """n loopback addresses from base_ip upwards, skipping .0 and .255 (network/broadcast look-alikes)."""
    addr = ipaddress.IPv4Address(base_ip)
    if addr not in ipaddress.IPv4Network("127.0.0.0/8"):
        raise ValueError("--base-ip must be a 127.x.y.z loopback address")
    out: list[str] = []
    value = int(addr)
    last = int(ipaddress.IPv4Address("127.255.255.254"))
    while len(out) < n:
        if value > last:
            raise ValueError("not enough loopback addresses above --base-ip")
        if value & 0xFF not in (0, 255):
            out.append(str(ipaddress.IPv4Address(value)))
        value += 1
    return out


class Site:
    def __init__(
        self, *, miners: int, mix: str, base_ip: str, seed: int, speed: float, params: PhysicsParams | None = None
    ) -> None:
        self.seed = seed
        self.clock = SimClock(speed)
        self.physics_params = params or PhysicsParams()
        self.connections = 0
        self.devices: list[Device] = []
        self.by_ip: dict[str, Device] = {}
        self._servers: dict[str, list[asyncio.AbstractServer]] = {}
        self._refused: set[str] = set()
        self._rebooting: dict[str, asyncio.TimerHandle] = {}
        self._ticking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.meter: SiteMeter | None = None  # the site meter (sim/meter.py), when --meter is given
        counts = split_counts(miners, parse_mix(mix))
        ips = iter(allocate_ips(base_ip, miners))
        rng = random.Random(f"{seed}:models")
        for family, count in counts.items():
            cls = device_class(family)
            models = family_models(family)
            for _ in range(count):
                ip = next(ips)
                dev = cls(self, ip, rng.choice(models), seed)
                self.devices.append(dev)
                self.by_ip[ip] = dev
        self.counts = counts

    # -- listeners ----------------------------------------------------------------------------------------
    async def _bind(self, dev: Device) -> None:
        loop = asyncio.get_running_loop()
        servers: list[asyncio.AbstractServer] = []
        for port in dev.ports:
            factory: Any
            if port == 4028:
                factory = lambda d=dev: RpcProtocol(d)  # noqa: E731
            elif port == 4433:
                factory = lambda d=dev: V3Protocol(d)  # noqa: E731
            else:
                factory = lambda d=dev, p=port: HttpProtocol(d, p)  # noqa: E731
            servers.append(await loop.create_server(factory, host=dev.ip, port=port, reuse_address=True, backlog=64))
        self._servers[dev.ip] = servers

    def _unbind(self, dev: Device) -> None:
        for server in self._servers.pop(dev.ip, []):
            server.close()

    async def start(self) -> float:
        t0 = time.perf_counter()
        for dev in self.devices:
            await self._bind(dev)
        self._spawn(self._ticker())
        return time.perf_counter() - t0

    async def close(self) -> None:
        for dev in self.devices:
            self._unbind(dev)
        for handle in self._rebooting.values():
            handle.cancel()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            t = self.clock.now()
            for ip in list(self._ticking):
                self.by_ip[ip].tick(t)

    # -- reboots ------------------------------------------------------------------------------------------
    def reboot(self, dev: Device, duration_s: float) -> None:
        t = self.clock.now()
        dev.physics.go_offline(t, duration_s)
        # the listeners go once the reply to the reboot command is out
        asyncio.get_running_loop().call_later(0.05, self._unbind, dev)
        old = self._rebooting.pop(dev.ip, None)
        if old is not None:
            old.cancel()
        self._rebooting[dev.ip] = asyncio.get_running_loop().call_later(
            # never before the listeners are gone, however short the reboot
            max(0.2, self.clock.wall_delay(duration_s)),
            lambda: self._spawn(self._back(dev)),
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _back(self, dev: Device) -> None:
        self._rebooting.pop(dev.ip, None)
        dev.faults.pop("reboot", None)
        t = self.clock.now()
        dev.reset_to_defaults()
        dev.physics.boot(t, dev.default_setpoint_w())
        dev.boot_t = t
        if dev.ip not in self._refused and dev.ip not in self._servers:
            await self._bind(dev)

    # -- faults -------------------------------------------------------------------------------------------
    def parse_faults(self, spec: Any) -> list[FaultAction]:
        return parse(
            spec,
            all_ips=[d.ip for d in self.devices],
            families={d.ip: d.family for d in self.devices},
            site_seed=self.seed,
        )

    async def apply_faults(self, actions: list[FaultAction]) -> list[dict[str, Any]]:
        t = self.clock.now()
        applied = []
        for action in actions:
            for ip in action.ips:
                dev = self.by_ip[ip]
                if action.mode == "clear":
                    for mode in action.modes:
                        if mode in dev.faults:
                            await self._clear_one(dev, mode, t)
                else:
                    await self._set_one(dev, action.mode, action.params, t)
            applied.append(
                {"mode": action.mode, "ips": action.ips, **({"modes": action.modes} if action.mode == "clear" else {})}
            )
        return applied

    async def _set_one(self, dev: Device, mode: str, params: dict[str, Any], t: float) -> None:
        dev.faults[mode] = params
        dev.fault_started(mode)
        if mode == "refuse":
            self._refused.add(dev.ip)
            self._unbind(dev)
        elif mode == "reboot":
            self.reboot(dev, float(params.get("duration_s", self.physics_params.reboot_s)))
        elif mode == "drift":
            dev.physics.set_drift(t, float(params.get("pct", 8)) / 100.0)
        elif mode == "atm":
            self._ticking.add(dev.ip)

    async def _clear_one(self, dev: Device, mode: str, t: float) -> None:
        dev.faults.pop(mode, None)
        if mode == "refuse":
            self._refused.discard(dev.ip)
            if dev.ip not in self._rebooting and dev.ip not in self._servers:
                await self._bind(dev)
        elif mode == "drift":
            dev.physics.set_drift(t, 0.0)
        elif mode == "atm":
            self._ticking.discard(dev.ip)
        # reboot cannot be undone: the unit comes back when it has booted

    def active_faults(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for dev in self.devices:
            for mode in dev.faults:
                out.setdefault(mode, []).append(dev.ip)
        return out

    # -- truth --------------------------------------------------------------------------------------------
    def truth(self) -> dict[str, Any]:
        t = self.clock.now()
        miners = []
        power = hashrate = energy = 0.0
        for dev in self.devices:
            doc = dev.truth(t)
            doc["reachable"] = (
                dev.ip in self._servers and doc["state"] != "offline" and not ({"blackhole", "error"} & set(dev.faults))
            )
            miners.append(doc)
            power += doc["power_w"]
            hashrate += doc["hashrate_ths"]
            energy += dev.physics.energy_at(t)
        return {
            "sim_time_s": round(t, 3),
            "speed": self.clock.speed,
            "seed": self.seed,
            "site": {
                "power_w": round(power, 1),
                "hashrate_ths": round(hashrate, 3),
                "miners": len(self.devices),
                "energy_kwh": round(energy / 3.6e6, 6),
                "nominal_w": sum(d.spec.nominal_w for d in self.devices),
            },
            "miners": miners,
            **({"meter": self.meter.truth()} if self.meter is not None else {}),
        }


class TruthEndpoint:
    """GET /truth, GET /faults, POST /faults on 127.0.0.1: for tests, benchmarks and the demo, never the agent."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def note_connection(self) -> None:
        pass

    def latency_s(self) -> float:
        return 0.0

    def rpc_error_bytes(self, code: int, msg: str) -> bytes:
        return b""

    def handle_rpc(self, req: dict[str, Any]) -> bytes | None:
        return b""

    def v3_error(self, code: int, msg: str) -> dict[str, Any]:
        return {}

    def handle_v3(self, req: dict[str, Any]) -> dict[str, Any] | None:
        return {}

    @staticmethod
    def _json(status: int, doc: Any) -> bytes:
        return http_response(status, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

    async def _post_faults(self, actions: list[FaultAction]) -> bytes:
        applied = await self.site.apply_faults(actions)
        return self._json(200, {"applied": applied, "active": self.site.active_faults()})

    def handle_http(self, port: int, request: HttpRequest) -> bytes | asyncio.Future[bytes] | None:
        if request.path == "/truth" and request.method == "GET":
            return self._json(200, self.site.truth())
        if request.path in ("/meter", "/grid", "/facility"):
            if self.site.meter is None:
                return self._json(404, {"error": "no meter: start the sim with --meter HOST[:PORT]"})
            return self.site.meter.handle_http(request)
        if request.path == "/health" and request.method == "GET":
            return self._json(200, {"ok": True, "miners": len(self.site.devices)})
        if request.path == "/faults":
            if request.method == "GET":
                return self._json(200, {"active": self.site.active_faults()})
            if request.method == "POST":
                try:
                    spec = json.loads(request.body or b"null")
                    actions = self.site.parse_faults(spec)
                except ValueError as exc:  # JSONDecodeError and FaultSpecError
                    return self._json(400, {"error": str(exc)})
                # binding listeners is async: the reply goes out once the faults are in place
                return asyncio.get_running_loop().create_task(self._post_faults(actions))
            return self._json(405, {"error": "GET or POST"})
        return self._json(404, {"error": "GET /truth, GET /faults, POST /faults"})
