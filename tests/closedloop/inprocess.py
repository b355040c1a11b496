"""The simulated site without its TCP front: the same devices, physics and fault models as `python -m hashflex.sim`,
reached in-process through the driver contract (`drivers.base`) on a clock the caller advances.

    vt = VirtualTime(epoch=1_700_000_000.0)
    site = InProcessSite(miners=12, mix="luxos:1,whatsminer:1,antminer:1", seed=3, vt=vt)
    driver = InProcessDriver(site, DriverSettings())
    ...                                   # hand `driver` to the agent's Fleet, as the pyasic driver would be
    await vt.advance_to(60.0)             # a minute of site time passes: reboots finish, ATM steps, calls return

Nothing here sleeps on the wall clock. A call that a real network would delay (`slow`) or never answer
(`blackhole`) waits on `VirtualTime.sleep`, which returns when the caller has advanced the clock far enough; read
and command deadlines are applied in site seconds here, as the pyasic driver applies them in wall seconds.

Control goes through each firmware's own command handlers (LuxOS `logon`/`atmset`/`profileset`/`curtail`,
Whatsminer v3 `set.miner.*` with its token, the stock Antminer `set_miner_conf` CGI with a read-back), so their
session rules, ATM lock and the `ignore`, `error`, `session_held` faults behave as they do over the wire. Readings
are built from the device's physics the way the pyasic driver (`drivers/asic/`) maps the firmware's replies: LuxOS and
Whatsminer report watts and their limit, a stock Antminer reports no watts and its mining state from hashrate and
work mode. The TCP path stays tested end to end by the simulator's own tests and the agent's integration tests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import time
from collections.abc import Coroutine
from typing import Any

from hashflex.drivers.base import (
    DriverSettings,
    Failed,
    Family,
    Identity,
    Ok,
    OnOff,
    PowerRange,
    Presets,
    ProtocolError,
    Reading,
    Result,
    Unreachable,
    Unsupported,
)
from hashflex.sim.device import Device
from hashflex.sim.families.antminer import AntminerDevice
from hashflex.sim.families.luxos import LuxosDevice
from hashflex.sim.families.whatsminer import WhatsminerDevice, v3_token
from hashflex.sim.physics import PhysicsParams
from hashflex.sim.site import Site
from hashflex.sim.transport import HttpRequest

DEFAULT_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class VirtualTime:
    """Site seconds since the start, advanced only by `advance_to`. Coroutines wait on it with `sleep`."""

    def __init__(self, epoch: float = DEFAULT_EPOCH) -> None:
        self.t = 0.0
        self.epoch = epoch
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.t + seconds, next(self._seq), fut))
        await fut

    def next_timer(self) -> float | None:
        while self._timers and self._timers[0][2].done():  # cancelled waiters
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def fire_due(self) -> int:
        """Wake every waiter whose time has come; returns how many."""
        n = 0
        while self._timers and self._timers[0][0] <= self.t + 1e-9:
            _due, _seq, fut = heapq.heappop(self._timers)
            if not fut.done():
                fut.set_result(None)
                n += 1
        return n


class _SimClockAdapter:
    """What the devices read (`sim.clock.SimClock`'s interface) on virtual time."""

    def __init__(self, vt: VirtualTime) -> None:
        self.vt = vt
        self.speed = 1.0
        self.epoch = vt.epoch

    def now(self) -> float:
        return self.vt.t

    def unix(self) -> int:
        return int(self.vt.epoch + self.vt.t)

    def wall_delay(self, sim_seconds: float) -> float:
        return max(0.0, sim_seconds)


class InProcessSite(Site):
    """`sim.site.Site` with no listeners: "bound" means the device answers; reboots and ATM run on virtual time."""

    def __init__(
        self,
        *,
        miners: int,
        mix: str,
        seed: int,
        vt: VirtualTime,
        base_ip: str = "127.200.0.1",
        params: PhysicsParams | None = None,
    ) -> None:
        super().__init__(miners=miners, mix=mix, base_ip=base_ip, seed=seed, speed=1.0, params=params)
        self.vt = vt
        self.clock = _SimClockAdapter(vt)  # type: ignore[assignment]
        self._reboot_due: dict[str, float] = {}
        self._atm_next = 1.0
        for dev in self.devices:
            self._servers[dev.ip] = []

    # -- no sockets: answering or not is a set membership --------------------------------------------------
    async def _bind(self, dev: Device) -> None:
        self._servers[dev.ip] = []

    def _unbind(self, dev: Device) -> None:
        self._servers.pop(dev.ip, None)

    async def start(self) -> float:
        return 0.0

    async def close(self) -> None:
        self._servers.clear()

    def reboot(self, dev: Device, duration_s: float) -> None:
        t = self.clock.now()
        dev.physics.go_offline(t, duration_s)
        self._unbind(dev)
        self._reboot_due[dev.ip] = t + max(duration_s, 0.2)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:  # pragma: no cover - nothing spawns here
        raise AssertionError("the in-process site runs nothing in the background")

    def answers(self, dev: Device) -> bool:
        return dev.ip in self._servers and dev.physics.current_state(self.clock.now()) != "offline"

    def next_event(self) -> float | None:
        """When something happens by itself next (a reboot ends, an ATM step is due)."""
        times = list(self._reboot_due.values())
        if self._ticking:
            times.append(self._atm_next)
        return min(times) if times else None

    async def advance(self) -> None:
        """Bring the site to the virtual time now: finish reboots, run the once-a-second device ticks."""
        t = self.vt.t
        for ip, due in sorted(self._reboot_due.items(), key=lambda kv: kv[1]):
            if due <= t + 1e-9:
                del self._reboot_due[ip]
                await self._back(self.by_ip[ip])
        while self._atm_next <= t + 1e-9:
            for ip in list(self._ticking):
                self.by_ip[ip].tick(self._atm_next)
            self._atm_next += 1.0
        if not self._ticking:
            self._atm_next = max(self._atm_next, float(int(t)) + 1.0)

    def set_faults(self, spec: Any) -> None:
        """Validate and apply a fault spec (sim/faults.py), synchronously."""
        actions = self.parse_faults(spec)
        coro = self.apply_faults(actions)
        try:
            coro.send(None)  # nothing in apply_faults awaits anything real here: _bind is instant
        except StopIteration:
            return
        raise AssertionError("apply_faults suspended")  # pragma: no cover

    def power_w(self) -> float:
        t = self.clock.now()
        return sum(d.physics.power_w(t) for d in self.devices)


# ---------------------------------------------------------------------------------------------- driver
def _family(dev: Device) -> Family:
    return {"luxos": Family.LUXOS, "whatsminer": Family.WHATSMINER, "antminer": Family.ANTMINER}[dev.family]


def identity_of(dev: Device) -> Identity:
    """What identification learns, as the pyasic driver would build it from this device's replies."""
    family = _family(dev)
    spec = dev.spec
    cap: PowerRange | Presets | OnOff
    if isinstance(dev, LuxosDevice):
        cap = Presets(tuple(sorted({p.watts for p in dev.profiles})))
    elif isinstance(dev, WhatsminerDevice):
        cap = PowerRange(min_w=int(spec.wm_min_w), max_w=int(spec.nominal_w), step_w=1)
    else:
        cap = OnOff()
    model = spec.name.removeprefix("Antminer ")
    return Identity(
        ip=dev.ip,
        family=family,
        make="WhatsMiner" if family is Family.WHATSMINER else "AntMiner",
        model=model,
        firmware=dev.firmware,
        driver_class=f"inprocess:{dev.family}",
        capability=cap,
        nominal_w=float(spec.nominal_w),
        nominal_ths=float(spec.nominal_ths),
        mac=dev.mac,
        serial=dev.serial,
        reports_power=family is not Family.ANTMINER,
    )


class InProcessHandle:
    """`drivers.base.MinerHandle` for one simulated device."""

    def __init__(self, site: InProcessSite, dev: Device, identity: Identity, settings: DriverSettings) -> None:
        self.site = site
        self.dev = dev
        self._identity = identity
        self.settings = settings
        self._session = ""  # LuxOS session id, cached as pyasic caches it

    @property
    def identity(self) -> Identity:
        return self._identity

    # -- the network, in site seconds ---------------------------------------------------------------------
    async def _exchange(self, deadline_s: float) -> str | None:
        """None when the device answers in time; else why not ('refused', 'timeout')."""
        vt, dev = self.site.vt, self.dev
        if not self.site.answers(dev):
            return "refused"
        if "blackhole" in dev.faults:
            await vt.sleep(deadline_s)
            return "timeout"
        latency = dev.latency_s()
        if latency > 0:
            if latency >= deadline_s:
                await vt.sleep(deadline_s)
                return "timeout"
            await vt.sleep(latency)
            if not self.site.answers(dev):
                return "refused"
        return None

    # -- telemetry ----------------------------------------------------------------------------------------
    async def read(self) -> Reading:
        ip = self._identity.ip
        problem = await self._exchange(self.settings.read_timeout_s)
        if problem == "refused":
            raise Unreachable(f"{ip}: connection refused")
        if problem == "timeout":
            raise Unreachable(f"{ip}: no answer within {self.settings.read_timeout_s:g} s")
        dev = self.dev
        if "error" in dev.faults:
            raise ProtocolError(f"{ip}: the miner answered, but nothing pyasic could parse")
        t = self.site.clock.now()
        p = dev.physics
        hashrate = round(p.hashrate_ths(t), 3)
        power: float | None = float(round(p.power_w(t))) if self._identity.reports_power else None
        if isinstance(dev, AntminerDevice):
            mining = True if hashrate > 0 else dev.work_mode != 1
        else:
            mining = hashrate > 0.0 or (power is not None and power > max(100.0, 0.2 * self._identity.nominal_w))
        limit = dev.power_limit_w()
        _board, chip = p.temps(t)
        return Reading(
            ts=self.site.vt.epoch + t,
            power_w=power,
            hashrate_ths=hashrate,
            mining=mining,
            power_limit_w=limit if limit and limit > 0 else None,
            temps_c=(round(chip, 1),),
        )

    # -- control ------------------------------------------------------------------------------------------
    async def set_power(self, watts: int) -> Result:
        cap = self._identity.capability
        if isinstance(cap, OnOff):
            return Unsupported(f"{self._identity.model} ({self._identity.family}) has on/off control only")
        if isinstance(cap, Presets):
            fitting = [w for w in cap.watts if w <= watts]
            if not fitting:
                return Failed(
                    f"{watts} W is below the lowest setting ({cap.watts[0]} W); sleep the miner instead", False
                )
            target = max(fitting)
        else:
            if watts < cap.min_w:
                return Failed(f"{watts} W is below the lowest setting ({cap.min_w} W); sleep the miner instead", False)
            target = min(watts, cap.max_w)
        return await self._control(f"set_power {target} W", ("power", target))

    async def sleep(self) -> Result:
        return await self._control("sleep", ("switch", False))

    async def wake(self) -> Result:
        return await self._control("wake", ("switch", True))

    async def _control(self, op: str, what: tuple[str, Any]) -> Result:
        ip = self._identity.ip
        problem = await self._exchange(self.settings.command_timeout_s)
        if problem == "refused":
            return Failed(f"{op}: {ip} unreachable: Connection refused")
        if problem == "timeout":
            return Failed(f"{op}: no answer from {ip} within {self.settings.command_timeout_s:g} s")
        dev = self.dev
        if isinstance(dev, LuxosDevice):
            refusal = self._luxos(what)
        elif isinstance(dev, WhatsminerDevice):
            refusal = self._whatsminer(what)
        else:
            assert isinstance(dev, AntminerDevice)
            refusal = self._antminer(what)
        return Ok(op) if refusal is None else Failed(f"{op}: the miner refused: {refusal}")

    # LuxOS: cgminer-style RPC with a session; ATM blocks profileset, so it is switched off around it and back on
    # bounded above by the profile set (drivers/asic/luxos.py set_profile)
    def _rpc(self, command: str, *args: str) -> dict[str, Any]:
        raw = self.dev.handle_rpc({"command": command, **({"parameter": ",".join(args)} if args else {})})
        if raw is None:
            return {"STATUS": [{"STATUS": "E", "Msg": "no reply"}]}
        reply: dict[str, Any] = json.loads(raw)
        return reply

    @staticmethod
    def _ok(reply: dict[str, Any]) -> bool:
        status = reply.get("STATUS")
        return isinstance(status, list) and bool(status) and status[0].get("STATUS") == "S"

    def _privileged(self, command: str, *args: str) -> dict[str, Any] | str:
        for _attempt in range(2):  # a stale session is renewed once (drivers/asic/ profiles: forget_session)
            if not self._session:  # pyasic's auth(): the active session if there is one, else a new one
                current = self._rpc("session")
                sid = str(current["SESSION"][0].get("SessionID", "")) if self._ok(current) else ""
                if not sid:
                    logon = self._rpc("logon")
                    if not self._ok(logon):
                        return str(logon["STATUS"][0].get("Msg"))
                    sid = str(logon["SESSION"][0]["SessionID"])
                self._session = sid
            reply = self._rpc(command, self._session, *args)
            if self._ok(reply):
                return reply
            if "invalid session" not in str(reply["STATUS"][0].get("Msg")):
                return str(reply["STATUS"][0].get("Msg"))
            self._session = ""
        return "invalid session id"

    def _luxos(self, what: tuple[str, Any]) -> str | None:
        kind, value = what
        if kind == "switch":
            got = self._privileged("curtail", "wakeup" if value else "sleep")
            return got if isinstance(got, str) else None
        dev = self.dev
        assert isinstance(dev, LuxosDevice)
        profile = next((p.name for p in dev.profiles if p.watts == value), None)
        if profile is None:
            return f"no profile of {value} W"
        atm = self._rpc("atm")
        if not self._ok(atm):
            return str(atm["STATUS"][0].get("Msg"))
        enabled = bool(atm["ATM"][0]["Enabled"])
        if enabled:
            got = self._privileged("atmset", "enabled=false")
            if isinstance(got, str):
                return got
        got = self._privileged("profileset", profile)
        if enabled and isinstance(self._privileged("atmset", "enabled=true", f"max_profile={profile}"), str):
            self._privileged("atmset", "enabled=true")  # firmware without ATM bounds: back on unbounded
        return got if isinstance(got, str) else None

    # Whatsminer v3: a token per set command
    def _whatsminer(self, what: tuple[str, Any]) -> str | None:
        dev = self.dev
        assert isinstance(dev, WhatsminerDevice)
        kind, value = what
        cmd, param = (
            ("set.miner.service", "start" if value else "stop")
            if kind == "switch"
            else ("set.miner.power_limit", int(value))
        )
        ts = int(time.time())
        reply = dev.handle_v3(
            {
                "cmd": cmd,
                "param": param,
                "ts": ts,
                "account": "super",
                "token": v3_token(cmd, dev.password, dev.salt, ts),
            }
        )
        if reply is None:
            return "no reply"
        return None if reply.get("code") == 0 else str(reply.get("msg"))

    # stock Antminer: the work mode through the CGI, then read back (stop/resume_mining do not say)
    def _antminer(self, what: tuple[str, Any]) -> str | None:
        dev = self.dev
        assert isinstance(dev, AntminerDevice)
        kind, value = what
        if kind != "switch":
            return "no power limit on stock firmware"
        if "error" in dev.faults:
            return "HTTP 500"
        t = self.site.clock.now()
        body = json.dumps({"miner-mode": 0 if value else 1}).encode()
        doc = dev._cgi_set_miner_conf(HttpRequest("POST", "/cgi-bin/set_miner_conf.cgi", {}, body), t)
        if doc.get("stats") != "success":
            return str(doc.get("msg"))
        if (dev.work_mode == 1) == bool(value):
            return "sent, but the miner's state did not change"
        return None


class InProcessDriver:
    """`drivers.base.MinerDriver` over an `InProcessSite`."""

    name = "inprocess"

    def __init__(self, site: InProcessSite, settings: DriverSettings) -> None:
        self.site = site
        self.settings = settings

    async def identify(self, ip: str) -> Identity | None:
        dev = self.site.by_ip.get(ip)
        if dev is None or not self.site.answers(dev):
            return None
        if "blackhole" in dev.faults:
            await self.site.vt.sleep(self.settings.identify_timeout_s)
            return None
        if "error" in dev.faults:
            return None
        return identity_of(dev)

    def attach(self, identity: Identity) -> InProcessHandle:
        return InProcessHandle(self.site, self.site.by_ip[identity.ip], identity, self.settings)
