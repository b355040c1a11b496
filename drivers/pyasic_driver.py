"""The miner driver on pyasic 0.79.0: the ONLY module of hashflex that imports pyasic (with its patches).

pyasic knows how to talk to every firmware; this module fences off how it behaves at site scale (the tests in
tests/drivers/ show each point against the simulated site and misbehaving ports, through unmodified pyasic):

- Identification is bounded: `pyasic.get_miner` bounds nothing and 700+ at once all fail, so every
  `identify` takes a slot of one semaphore per driver (`DriverSettings.identify_concurrency`).
- Identify once, then never again: the Identity stores pyasic's class name; `attach` rebuilds the object
  from the class with no I/O, and the handle keeps it alive (LuxOS session ids, Whatsminer salts live on it).
- Every call runs under `asyncio.timeout`: pyasic's RPC has no connect timeout and a 100 s read timeout.
- pyasic hides unreachability (a refused connection comes back as `{}`, then as a reading full of None)
  and mixes `False`, raised `APIError` and swallowed errors for control calls. Reads here send pyasic's
  own RPC/web commands and hand the replies to pyasic's own parsers, so an empty reply is `Unreachable`
  and a garbled one `ProtocolError`; control calls end as `Ok | Unsupported | Failed(reason, retryable)`:
  where pyasic answers True without looking, the reply is checked (Whatsminer v3 power limit) or the state
  read back (stock Antminer sleep/wake); a stale cached session or salt is renewed once (pyasic never does).
- Cost: identification asks RPC first (pyasic races an httpx web probe against it for every address);
  stock Antminer reads avoid the digest-auth web UI except where it decides something (see
  `_collect_stock_antminer`); `pyasic_patches` removes two per-request CPU sinks.
- LuxOS: `is_mining` is True even asleep and `get_hashrate()`/`get_wattage_limit()` alone return None;
  hashrate comes from the hash boards (`stats`), the limit from `config` + `profiles`, sleep is inferred.
- Whatsminer v3 behind a closed port 4028 is identified with the v2 backend (every call then goes to a
  dead port), or not at all: both are detected here and the v3 backend is used.
- pyasic configures the root logger when imported; this module puts the root logger back as it found it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hashflex.drivers import catalogue
from hashflex.drivers.base import (
    Capability,
    DriverError,
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

# pyasic's logger module calls logging.basicConfig() and sets the ROOT logger to WARNING at import time;
# logging is the application's to configure, so the root logger is restored right after the import.
_root_logger = logging.getLogger()
_root_level, _root_handlers = _root_logger.level, list(_root_logger.handlers)
import pyasic  # noqa: E402
from pyasic import settings as pyasic_settings  # noqa: E402
from pyasic.errors import APIError  # noqa: E402
from pyasic.miners.backends.bmminer import BMMiner  # noqa: E402
from pyasic.miners.backends.unknown import UnknownMiner  # noqa: E402
from pyasic.miners.factory import MINER_CLASSES, MinerTypes, miner_factory  # noqa: E402
from pyasic.rpc.base import BaseMinerRPCAPI  # noqa: E402

from hashflex.drivers import pyasic_patches  # noqa: E402

_root_logger.setLevel(_root_level)
_root_logger.handlers[:] = _root_handlers
pyasic_patches.apply()

log = logging.getLogger("hashflex.drivers.pyasic")

PYASIC_VERSION = "0.79.0"

# ---------------------------------------------------------------------------------------------- classes
# Every class pyasic's factory can return, by name (names are unique across families in 0.79.0).
_CLASSES: dict[str, type[Any]] = {cls.__name__: cls for group in MINER_CLASSES.values() for cls in group.values()}

# Whatsminer classes pick their backend in __new__ from a firmware date; these dates select each backend.
_WHATSMINER_BACKEND_VERSION: dict[str, str | None] = {"BTMinerV2": None, "BTMinerV3": "20250101"}


def _mro_names(cls: type[Any]) -> set[str]:
    return {c.__name__ for c in cls.__mro__}


def family_of(cls: type[Any]) -> Family:
    names = _mro_names(cls)
    if "LuxOSFirmware" in names:
        return Family.LUXOS
    if "BraiinsOSFirmware" in names:
        return Family.BRAIINS
    if names & {"BTMiner", "BTMinerV2", "BTMinerV3"}:
        return Family.WHATSMINER
    if names & {"AntminerModern", "AntminerOld"} and "StockFirmware" in names:
        return Family.ANTMINER
    return Family.OTHER


def _whatsminer_backend(miner: Any) -> str | None:
    names = _mro_names(type(miner))
    return next((b for b in _WHATSMINER_BACKEND_VERSION if b in names), None)


def _class_spec(miner: Any) -> str:
    """`Identity.driver_class`: pyasic's class name, plus the backend where the class picks one at runtime."""
    backend = _whatsminer_backend(miner)
    name = type(miner).__name__
    return f"{name}:{backend}" if backend else name


def build_miner(driver_class: str, ip: str) -> Any:
    """A pyasic miner object from `Identity.driver_class`, with no I/O."""
    name, _, backend = driver_class.partition(":")
    cls = _CLASSES.get(name)
    if cls is None:
        raise DriverError(f"pyasic {PYASIC_VERSION} has no miner class {name!r}; the miner must be re-identified")
    if backend:
        if backend not in _WHATSMINER_BACKEND_VERSION:
            raise DriverError(f"unknown Whatsminer backend {backend!r} in {driver_class!r}")
        return cls(ip, _WHATSMINER_BACKEND_VERSION[backend])
    return cls(ip)


# ---------------------------------------------------------------------------------------------- read plans
@dataclass(frozen=True, slots=True)
class _Step:
    option: str  # pyasic DataOptions value
    function: str  # the miner's parser, e.g. "_get_wattage"
    args: tuple[tuple[str, bool, str], ...]  # (keyword, is_web, command)


@dataclass(frozen=True, slots=True)
class _Plan:
    rpc_commands: tuple[str, ...]
    web_commands: tuple[str, ...]
    steps: tuple[_Step, ...]


_PLANS: dict[tuple[type[Any], tuple[str, ...]], _Plan] = {}


def _plan_for(miner: Any, options: tuple[str, ...]) -> _Plan:
    """Which RPC/web commands pyasic's data locations need for `options`, and which parser reads each."""
    key = (type(miner), options)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    rpc: dict[str, None] = {}
    web: dict[str, None] = {}
    steps = []
    for option in options:
        location = getattr(miner.data_locations, option)
        args = []
        for arg in location.kwargs:
            is_web = type(arg).__name__ == "WebAPICommand"
            (web if is_web else rpc).setdefault(arg.cmd, None)
            args.append((arg.name, is_web, arg.cmd))
        steps.append(_Step(option, location.cmd, tuple(args)))
    plan = _Plan(tuple(rpc), tuple(web), tuple(steps))
    _PLANS[key] = plan
    return plan


# What a read asks for, per family: only what the agent needs. Fast fields on every read; slow fields (board
# temperatures, error codes: they change slowly and cost extra connections) every SLOW_FIELDS_EVERY-th read of
# a handle, on a beat of its own so no sweep carries them for the whole site, and carried over in between.
SLOW_FIELDS_EVERY = 12
_FAST_OPTIONS: dict[Family, tuple[str, ...]] = {
    # LuxOS: one connection (stats+power+config+profiles). "hashrate" is skipped: its parser returns None
    # unconditionally in 0.79.0; the boards' chain rates (stats) carry hashrate and temperatures.
    Family.LUXOS: ("hashboards", "wattage", "wattage_limit"),
    # Whatsminer v3: one connection (get.miner.status:summary) for power, limit, hashrate, ambient temp.
    Family.WHATSMINER: ("hashrate", "wattage", "wattage_limit", "env_temp", "is_mining"),
    # Stock Antminer, old web UI (the modern ones take `_collect_stock_antminer`).
    Family.ANTMINER: ("hashrate", "is_mining", "errors", "hashboards"),
    Family.BRAIINS: ("hashrate", "wattage", "wattage_limit", "is_mining"),
    Family.OTHER: ("hashrate", "wattage", "wattage_limit", "is_mining", "hashboards"),
}
_SLOW_OPTIONS: dict[Family, tuple[str, ...]] = {
    Family.WHATSMINER: ("errors", "hashboards"),  # get.device.info + get.miner.status:edevs: two more connections
    Family.BRAIINS: ("errors", "hashboards"),
}


def telemetry_options(family: Family) -> tuple[str, ...]:
    """Every pyasic data item a read of this family needs, fast and slow (what a bare get_data would ask)."""
    return _FAST_OPTIONS[family] + _SLOW_OPTIONS.get(family, ())


_IDENTIFY_OPTIONS = ("mac", "serial_number", "fw_ver", "expected_hashrate", "wattage_limit", "wattage")


@dataclass(slots=True)
class _Collected:
    values: dict[str, Any]
    rpc: dict[str, dict[str, Any] | None]  # raw replies per command; None = garbled or error status
    answered: bool  # something came back from the miner


# what pyasic raises on replies it cannot read (a Decode Error, or its parsers indexing into the unexpected)
_GARBLED = (APIError, LookupError, TypeError, ValueError, AttributeError, UnicodeDecodeError)


def _part(reply: dict[str, Any], command: str) -> dict[str, Any] | None:
    part = reply.get(command)
    if isinstance(part, list) and part and isinstance(part[0], dict):
        return part[0]
    return None


async def _rpc_replies(rpc: Any, commands: tuple[str, ...]) -> dict[str, dict[str, Any] | None]:
    """Each command's reply: a dict, `{}` when nothing came back (pyasic's form of "refused"), None if garbled."""
    if not commands:
        return {}
    if type(rpc).multicommand is not BaseMinerRPCAPI.multicommand:
        # Whatsminer-style APIs split the commands themselves and drop failures: missing = garbled.
        data = await rpc.multicommand(*commands, allow_warning=False)
        return {c: _part(data, c) for c in commands}
    if len(commands) == 1:  # a single command's reply is not keyed by the command
        try:
            return {commands[0]: await rpc.send_command(commands[0], allow_warning=False)}
        except _GARBLED:
            return {commands[0]: None}
    try:
        reply = await rpc.send_command("+".join(commands), allow_warning=False)
    except _GARBLED:
        reply = None
    if reply is not None:
        if not reply:
            return {c: {} for c in commands}
        return {c: _part(reply, c) for c in commands}
    # pyasic's own fallback when a joined command fails: one connection per command
    results = await asyncio.gather(
        *(rpc.send_command(c, allow_warning=False) for c in commands), return_exceptions=True
    )
    out: dict[str, dict[str, Any] | None] = {}
    for c, r in zip(commands, results, strict=True):
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            out[c] = None
        else:
            out[c] = r
    return out


async def _collect(miner: Any, options: tuple[str, ...]) -> _Collected:
    """pyasic's `get_data` minus the MinerData model, keeping whether the miner answered at all."""
    plan = _plan_for(miner, options)
    rpc_replies: dict[str, dict[str, Any] | None] = {}
    web_replies: dict[str, Any] = {}
    if plan.rpc_commands and miner.rpc is not None and plan.web_commands and miner.web is not None:
        rpc_replies, web_data = await asyncio.gather(
            _rpc_replies(miner.rpc, plan.rpc_commands),
            miner.web.multicommand(*plan.web_commands, allow_warning=False),
        )
        web_replies = web_data or {}
    elif plan.rpc_commands and miner.rpc is not None:
        rpc_replies = await _rpc_replies(miner.rpc, plan.rpc_commands)
    elif plan.web_commands and miner.web is not None:
        web_replies = await miner.web.multicommand(*plan.web_commands, allow_warning=False) or {}

    answered = any(rpc_replies.values()) or any(web_replies.get(c) for c in plan.web_commands)
    values: dict[str, Any] = {}
    for step in plan.steps:
        kwargs: dict[str, Any] = {}
        for name, is_web, cmd in step.args:
            data = web_replies.get(cmd) if is_web else rpc_replies.get(cmd)
            if not data:
                break  # missing input: skip rather than let the parser fetch it again on its own
            kwargs[name] = data
        else:
            try:
                values[step.option] = await getattr(miner, step.function)(**kwargs)
            except _GARBLED:
                values[step.option] = None
    if not (plan.rpc_commands or plan.web_commands):  # parsers that fetch for themselves
        answered = any(v not in (None, [], {}) for v in values.values())
    return _Collected(values, rpc_replies, answered)


# ---------------------------------------------------------------------------------------------- values
def _ths(miner: Any, rate: Any) -> float | None:
    if rate is None:
        return None
    unit_th = getattr(getattr(miner.algo, "unit", None), "TH", None)
    try:
        if unit_th is not None and rate.unit != unit_th:
            rate = rate.into(unit_th)
        return float(rate.rate)
    except (AttributeError, TypeError, ValueError):
        return None


def _board_figures(miner: Any, boards: Iterable[Any] | None) -> tuple[float | None, list[float]]:
    hashrate: float | None = None
    temps: list[float] = []
    for board in boards or ():
        ths = _ths(miner, board.hashrate)
        if ths is not None:
            hashrate = (hashrate or 0.0) + ths
        for t in (board.temp, board.chip_temp):
            if isinstance(t, int | float) and t > 0:
                temps.append(float(t))
    return hashrate, temps


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def infer_mining(hashrate_ths: float | None, power_w: float | None, nominal_w: float) -> bool | None:
    """Is it hashing? From hashrate first, then from power (LuxOS reports is_mining=True while asleep)."""
    if hashrate_ths is not None:
        return hashrate_ths > 0.0
    if power_w is not None:
        return power_w > max(5 * catalogue.STANDBY_W, 0.2 * nominal_w)
    return None


def _error_text(error: Any) -> str:
    message = getattr(error, "error_message", None)
    code = getattr(error, "error_code", None)
    if message:
        return str(message)
    return f"code {code}" if code is not None else str(error)


# Stock Antminer (modern web UI): pyasic reads mining state, errors and board temperatures through digest-auth
# CGI calls, a new httpx client per request and two round trips each (~8 ms of CPU per read, against ~0.3 ms
# for one RPC connection). So a read is one RPC connection (summary+stats: hashrate per board); the web work
# mode is asked only when the hashrate is zero (asleep, or coming up: the only case where it decides
# anything); errors and board temperatures come from the web UI every SLOW_FIELDS_EVERY-th read and are
# carried over in between (they change slowly).


async def _collect_stock_antminer(miner: Any, slow: bool) -> _Collected:
    rpc = await _rpc_replies(miner.rpc, ("summary", "stats"))
    values: dict[str, Any] = {}
    summary, stats = rpc.get("summary"), rpc.get("stats")
    try:
        if summary:
            values["hashrate"] = await miner._get_hashrate(rpc_summary=summary)
        if stats:  # the RPC parser of pyasic's own BMMiner base; AntminerModern's override goes to the web
            values["rpc_boards"] = await BMMiner._get_hashboards(miner, rpc_stats=stats)
    except _GARBLED:
        pass
    answered = any(rpc.values())
    if not answered:
        return _Collected(values, rpc, answered)
    ths = _ths(miner, values.get("hashrate"))
    if ths is None:
        ths, _ = _board_figures(miner, values.get("rpc_boards"))
    if ths:
        values["is_mining"] = True
    else:
        conf = await miner.web.get_miner_conf()
        values["is_mining"] = await miner._is_mining(web_get_conf=conf) if conf else None
    if slow:
        try:
            values["hashboards"] = await miner._get_hashboards()
            values["errors"] = await miner._get_errors(web_summary=await miner.web.summary())
        except _GARBLED:
            pass
    return _Collected(values, rpc, answered)


# ---------------------------------------------------------------------------------------------- handle
class PyasicHandle:
    """One live pyasic miner object; keeps its sessions and tokens between calls."""

    __slots__ = ("_beat", "_fast", "_identity", "_lean_antminer", "_miner", "_reads", "_settings", "_slow",
                 "_slow_fields", "_slow_options")  # fmt: skip

    def __init__(self, identity: Identity, miner: Any, settings: DriverSettings) -> None:
        self._identity = identity
        self._miner = miner
        self._settings = settings
        self._lean_antminer = "AntminerModern" in _mro_names(type(miner)) and miner.web is not None
        self._fast = _FAST_OPTIONS[identity.family]
        self._slow_options = _SLOW_OPTIONS.get(identity.family, ())
        self._slow_fields = self._lean_antminer or bool(self._slow_options)
        self._reads = 0
        self._beat = zlib.crc32(identity.ip.encode()) % SLOW_FIELDS_EVERY
        self._slow: tuple[tuple[float, ...], tuple[str, ...]] = ((), ())  # board temps, errors carried over

    @property
    def identity(self) -> Identity:
        return self._identity

    def __repr__(self) -> str:
        return f"PyasicHandle({self._identity.ip} {self._identity.driver_class})"

    # ------------------------------------------------------------------ telemetry
    async def read(self) -> Reading:
        ident = self._identity
        try:
            async with asyncio.timeout(self._settings.read_timeout_s):
                slow = self._slow_fields and (self._reads + self._beat) % SLOW_FIELDS_EVERY == 0
                if self._lean_antminer:
                    got = await _collect_stock_antminer(self._miner, slow)
                else:
                    got = await _collect(self._miner, self._fast + self._slow_options if slow else self._fast)
        except TimeoutError:
            raise Unreachable(f"{ident.ip}: no answer within {self._settings.read_timeout_s:g} s") from None
        except OSError as exc:
            raise Unreachable(f"{ident.ip}: {exc.strerror or exc}") from None
        except _GARBLED as exc:
            raise ProtocolError(f"{ident.ip}: unreadable reply: {exc}") from None
        if not got.answered:
            if any(r is None for r in got.rpc.values()):
                raise ProtocolError(f"{ident.ip}: the miner answered, but nothing pyasic could parse")
            raise Unreachable(f"{ident.ip}: connection refused or closed without a reply")
        reading = self._reading(got.values, slow)
        self._reads += 1
        return reading

    def _reading(self, values: dict[str, Any], slow: bool) -> Reading:
        miner, ident = self._miner, self._identity
        board_ths, temps = _board_figures(miner, values.get("hashboards"))
        errors = tuple(_error_text(e) for e in values.get("errors") or ())
        if self._lean_antminer:
            board_ths, _ = _board_figures(miner, values.get("rpc_boards"))
        if self._slow_fields:
            if slow:
                self._slow = (tuple(temps), errors)
            temps, errors = list(self._slow[0]), self._slow[1]
        hashrate = _ths(miner, values.get("hashrate"))
        if hashrate is None:
            hashrate = board_ths
        power = _number(values.get("wattage")) if ident.reports_power else None
        limit = _number(values.get("wattage_limit"))
        env = _number(values.get("env_temp"))
        if env is not None and env > 0:
            temps.append(env)
        mining = values.get("is_mining")
        if not isinstance(mining, bool) or ident.family is Family.LUXOS:
            mining = infer_mining(hashrate, power, ident.nominal_w)
        if power is None and hashrate is None and mining is None and limit is None:
            raise ProtocolError(f"{ident.ip}: the reply carried none of power, hashrate, mining state or limit")
        return Reading(
            ts=time.time(),
            power_w=power,
            hashrate_ths=hashrate,
            mining=mining,
            power_limit_w=limit if limit and limit > 0 else None,
            temps_c=tuple(temps),
            errors=errors,
        )

    # ------------------------------------------------------------------ control
    async def set_power(self, watts: int) -> Result:
        cap = self._identity.capability
        if isinstance(cap, OnOff):
            return Unsupported(f"{self._identity.model} ({self._identity.family}) has on/off control only")
        target = round_to_capability(cap, watts)
        if target is None:
            lowest = cap.watts[0] if isinstance(cap, Presets) else cap.min_w
            return Failed(f"{watts} W is below the lowest setting ({lowest} W); sleep the miner instead", False)
        if self._identity.family is Family.WHATSMINER and _whatsminer_backend(self._miner) == "BTMinerV3":
            # pyasic's BTMinerV3.set_power_limit returns True without looking at the reply
            return await self._control(f"set_power {target} W", lambda: self._v3_call("set_miner_power_limit", target))
        return await self._control(f"set_power {target} W", lambda: self._miner.set_power_limit(target))

    async def prepare_control(self) -> bool:
        """Fetch, ahead of any command, what this miner's first control call would fetch on the way: the LuxOS
        session id (`session`, else `logon`) or the Whatsminer v3 salt (`get.device.info`). pyasic keeps them on
        the miner object, so that call is then one exchange instead of two or three: for a pre-armed shed list
        (agent.runtime.frequency) this halves the connections of a cold batch. Best effort and idempotent: True
        when there is nothing left to fetch. A session that has expired by the time it is used costs what a cold
        call costs plus one refused exchange (`_control` renews it once)."""
        rpc = self._miner.rpc
        try:
            async with asyncio.timeout(self._settings.command_timeout_s):
                if self._identity.family is Family.LUXOS and hasattr(rpc, "auth"):
                    if rpc.session_token is None:
                        await rpc.auth()
                    return rpc.session_token is not None
                if _whatsminer_backend(self._miner) == "BTMinerV3" and hasattr(rpc, "get_salt"):
                    if rpc.salt is None:
                        await rpc.get_salt()
                    return rpc.salt is not None
        except (TimeoutError, OSError, APIError, LookupError, TypeError, ValueError):
            return False
        return True  # nothing to fetch for this family

    async def sleep(self) -> Result:
        return await self._switch(on=False)

    async def wake(self) -> Result:
        return await self._switch(on=True)

    async def _switch(self, *, on: bool) -> Result:
        miner, op = self._miner, ("wake" if on else "sleep")
        if not getattr(miner, "supports_shutdown", False):
            return Unsupported(f"pyasic cannot {op} a {type(miner).__name__}")
        call = miner.resume_mining if on else miner.stop_mining
        if self._identity.family is Family.ANTMINER:
            # stock stop/resume_mining return True whatever the miner said: read the work mode back
            return await self._control(op, call, confirm=lambda: self._antminer_mode_is(sleeping=not on))
        return await self._control(op, call)

    async def _v3_call(self, method: str, *args: Any) -> bool:
        reply = await getattr(self._miner.rpc, method)(*args)
        if not reply:
            raise ConnectionRefusedError("no reply")
        return bool(reply.get("code") == 0 or reply.get("msg") == "ok")

    async def _antminer_mode_is(self, *, sleeping: bool) -> bool | None:
        conf = await self._miner.web.get_miner_conf()
        mode = conf.get("bitmain-work-mode") if isinstance(conf, dict) else None
        if mode is None:
            return None
        return (str(mode) == "1") == sleeping

    async def _control(
        self,
        op: str,
        call: Callable[[], Awaitable[Any]],
        *,
        confirm: Callable[[], Awaitable[bool | None]] | None = None,
    ) -> Result:
        """Run one pyasic control call under the command timeout and say plainly how it went."""
        ip, timeout = self._identity.ip, self._settings.command_timeout_s
        try:
            async with asyncio.timeout(timeout):
                accepted, refusal = await _attempt(call)
                if accepted is not True and self._forget_session():
                    # the cached LuxOS session id or Whatsminer salt may be stale (another client logged on,
                    # the miner rebooted): pyasic never renews them by itself, so renew and try once more
                    accepted, refusal = await _attempt(call)
                if refusal is not None:
                    raise refusal
                if accepted is not True:
                    return Failed(f"{op}: the miner did not accept it (or did not answer)")
                if confirm is not None:
                    confirmed = await confirm()
                    if confirmed is None:
                        return Failed(f"{op}: sent, but the miner's state could not be read back")
                    if not confirmed:
                        return Failed(f"{op}: sent, but the miner's state did not change")
        except TimeoutError:
            return Failed(f"{op}: no answer from {ip} within {timeout:g} s")
        except OSError as exc:
            return Failed(f"{op}: {ip} unreachable: {exc.strerror or exc}")
        except APIError as exc:
            return Failed(f"{op}: the miner refused: {exc}")
        except LookupError as exc:  # pyasic indexes into a reply that did not come (e.g. `{}` when refused)
            return Failed(f"{op}: no usable reply from {ip} (unreachable or unexpected answer: {exc!r})")
        except Exception as exc:  # pyasic raises whatever its parsers hit (KeyError, TypeError, ...)
            return Failed(f"{op}: {type(exc).__name__}: {exc}")
        return Ok(op)

    def _forget_session(self) -> bool:
        rpc = self._miner.rpc
        renewed = False
        if getattr(rpc, "session_token", None) is not None:
            rpc.session_token = None
            renewed = True
        if getattr(rpc, "salt", None) is not None:
            rpc.salt = None
            renewed = True
        return renewed


async def _attempt(call: Callable[[], Awaitable[Any]]) -> tuple[Any, Exception | None]:
    """One control call: what it returned, or the refusal it raised (connection errors propagate)."""
    try:
        return await call(), None
    except (APIError, LookupError) as exc:
        return None, exc


def round_to_capability(cap: Capability, watts: int) -> int | None:
    """The setting to use for `watts`: the highest preset not above it, or the range's nearest step."""
    if isinstance(cap, Presets):
        fitting = [w for w in cap.watts if w <= watts]
        return max(fitting) if fitting else None
    if isinstance(cap, PowerRange):
        if watts < cap.min_w:
            return None
        clipped = min(watts, cap.max_w)
        step = max(cap.step_w, 1)
        return cap.min_w + ((clipped - cap.min_w) // step) * step
    return None


# ---------------------------------------------------------------------------------------------- driver
_PASSWORD_SETTINGS: dict[str, tuple[str, ...]] = {
    "antminer": ("default_antminer_web_password",),
    "whatsminer": ("default_whatsminer_rpc_password",),
    # pyasic's BOSer reads `default_bosminer_password` though Settings declares the `_web_` key: set both
    "braiins": ("default_bosminer_web_password", "default_bosminer_password"),
}


class PyasicDriver:
    """`drivers.base.MinerDriver` on pyasic: identify (bounded, timed), then attach without I/O."""

    name = "pyasic"

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self._identify_slots = asyncio.Semaphore(settings.identify_concurrency)
        # pyasic's identification reads default passwords from process-global settings
        for family, password in settings.passwords.items():
            for key in _PASSWORD_SETTINGS.get(family, ()):
                pyasic_settings.update(key, password)

    # ------------------------------------------------------------------ identify
    async def identify(self, ip: str) -> Identity | None:
        async with self._identify_slots:
            try:
                async with asyncio.timeout(self.settings.identify_timeout_s):
                    miner = await self._probe(ip)
                    if miner is None:
                        return None
                    return await self._describe(ip, miner)
            except TimeoutError:
                log.debug("identify %s: no answer within %ss", ip, self.settings.identify_timeout_s)
                return None
            except DriverError as exc:
                log.debug("identify %s: %s", ip, exc)
                return None

    async def _probe(self, ip: str) -> Any:
        # pyasic.get_miner races a web probe (a new httpx client, GET http:// and https://) against the RPC
        # probe for every address; for RPC firmwares (LuxOS, Whatsminer, Braiins, stock bmminer) the RPC
        # answer decides anyway, and the web probe is ~half of identification's CPU. Ask RPC first, with
        # pyasic's own factory steps, and fall back to the full get_miner for web-only firmwares.
        miner_type = await miner_factory._get_miner_socket(ip)
        miner = await self._from_type(ip, miner_type) if miner_type is not None else None
        if miner is None:
            miner = await pyasic.get_miner(ip)
        if miner is None:
            # pyasic returns None for a Whatsminer v3 whose port 4028 answers errors: ask 4433 directly
            miner = await self._probe_whatsminer_v3(ip)
        if miner is None or isinstance(miner, UnknownMiner):
            return None
        return miner

    @staticmethod
    async def _from_type(ip: str, miner_type: Any) -> Any:
        """The rest of `MinerFactory.get_miner` once the type is known: model, Whatsminer version, class."""
        suffix = "luxos" if miner_type is MinerTypes.LUX_OS else miner_type.name.lower()
        model_fn = getattr(miner_factory, f"get_miner_model_{suffix}", None)
        if model_fn is None:
            return None
        model = await model_fn(ip)
        version = None
        if miner_type is MinerTypes.WHATSMINER:
            version = await miner_factory.get_miner_version_whatsminer(ip)
        return miner_factory._select_miner_from_classes(ip, model, miner_type, version)

    @staticmethod
    async def _probe_whatsminer_v3(ip: str) -> Any:
        info = await miner_factory.send_btminer_v3_api_command(ip, "get.device.info")
        try:
            raw_model = info["msg"]["miner"]["type"].replace("_", "")
            version = info["msg"]["system"]["fwversion"]
        except (LookupError, TypeError, AttributeError):
            return None
        model = raw_model[:-1] + "0"  # pyasic's normalisation of the board revision (factory.py)
        return miner_factory._select_miner_from_classes(ip, model, MinerTypes.WHATSMINER, version)

    async def _describe(self, ip: str, miner: Any) -> Identity:
        family = family_of(type(miner))
        got = await _collect(miner, _IDENTIFY_OPTIONS)
        if family is Family.WHATSMINER and _whatsminer_backend(miner) == "BTMinerV2" and not got.answered:
            # identified through the web UI with port 4028 closed: pyasic picked the v2 backend, whose every
            # call goes to the dead port; a v3 firmware answers on 4433
            v3 = await self._probe_whatsminer_v3(ip)
            if v3 is not None:
                miner = v3
                got = await _collect(miner, _IDENTIFY_OPTIONS)
        if not got.answered:
            raise Unreachable(f"{ip}: identified as {type(miner).__name__}, then stopped answering")
        values = got.values
        model = str(miner.raw_model) if miner.raw_model is not None else type(miner).__name__
        spec = catalogue.lookup(model)
        expected_ths = _ths(miner, values.get("expected_hashrate"))
        profiles = self._luxos_profiles(got) if family is Family.LUXOS else {}
        limit = _number(values.get("wattage_limit"))
        nominal_w = self._nominal_w(spec, profiles, limit)
        capability = self._capability(family, spec, profiles, nominal_w)
        mac = values.get("mac") or self._luxos_mac(got)
        firmware = values.get("fw_ver") or str(miner.firmware or "unknown")
        reports_power = family is not Family.ANTMINER and (
            family is not Family.OTHER or values.get("wattage") is not None
        )
        return Identity(
            ip=ip,
            family=family,
            make=str(miner.make or "unknown"),
            model=model,
            firmware=str(firmware),
            driver_class=_class_spec(miner),
            capability=capability,
            nominal_w=nominal_w,
            nominal_ths=float(spec.nominal_ths) if spec else (expected_ths or 0.0),
            mac=str(mac).upper() if mac else None,
            serial=str(values["serial_number"]) if values.get("serial_number") else None,
            reports_power=reports_power,
        )

    @staticmethod
    def _luxos_profiles(got: _Collected) -> dict[str, float]:
        reply = got.rpc.get("profiles") or {}
        out: dict[str, float] = {}
        for p in reply.get("PROFILES", []):
            watts = _number(p.get("Watts")) if isinstance(p, dict) else None
            if watts and watts > 0:
                out[str(p.get("Profile Name"))] = watts
        return out

    @staticmethod
    def _luxos_mac(got: _Collected) -> str | None:
        # pyasic 0.79.0's LUXMiner._get_mac returns None before parsing; the MAC is in `config`
        config = got.rpc.get("config") or {}
        try:
            return str(config["CONFIG"][0]["MACAddr"]) or None
        except (LookupError, TypeError):
            return None

    @staticmethod
    def _nominal_w(spec: catalogue.ModelSpec | None, profiles: dict[str, float], limit: float | None) -> float:
        if spec is not None:
            return float(spec.nominal_w)
        if profiles:
            return profiles.get("default", max(profiles.values()))
        if limit and limit > 0:
            return limit
        return catalogue.UNKNOWN_MODEL_W

    @staticmethod
    def _capability(
        family: Family, spec: catalogue.ModelSpec | None, profiles: dict[str, float], nominal_w: float
    ) -> Capability:
        if family is Family.LUXOS:
            watts = tuple(sorted({int(w) for w in profiles.values()}))
            return Presets(watts) if watts else OnOff()
        if family in (Family.WHATSMINER, Family.BRAIINS):
            floor = spec.min_limit_w if spec and spec.min_limit_w else nominal_w * catalogue.DEFAULT_MIN_LIMIT_SHARE
            return PowerRange(min_w=int(floor), max_w=int(nominal_w), step_w=1)
        return OnOff()

    # ------------------------------------------------------------------ attach
    def attach(self, identity: Identity) -> PyasicHandle:
        miner = build_miner(identity.driver_class, identity.ip)
        password = self.settings.passwords.get(str(identity.family))
        if password is not None:
            for api in (miner.rpc, miner.web):
                if api is not None and hasattr(api, "pwd"):
                    api.pwd = password
        return PyasicHandle(identity, miner, self.settings)
