"""One live pyasic miner object behind `drivers.base.MinerHandle`: timed reads and control calls, plain results.

Family-neutral: what a read asks for, how a limit is sent, how a sleep is checked and which session is renewed
come from the miner's firmware profile (`profile.FirmwareProfile`).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

from hashflex.drivers.asic.collect import GARBLED, Collected, board_figures, error_text, infer_mining, number, ths
from hashflex.drivers.asic.profile import ControlCall, FirmwareProfile, StateCheck
from hashflex.drivers.asic.vendor import APIError
from hashflex.drivers.base import (
    Capability,
    DriverSettings,
    Failed,
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

# Fast fields on every read; slow fields (board temperatures, error codes: they change slowly and cost extra
# connections) every SLOW_FIELDS_EVERY-th read of a handle, on a beat of its own so no sweep carries them for the
# whole site, and carried over in between.
SLOW_FIELDS_EVERY = 12


class PyasicHandle:
    """One live pyasic miner object; keeps its sessions and tokens between calls."""

    __slots__ = ("_beat", "_identity", "_miner", "_profile", "_reader", "_reads", "_settings", "_slow")

    def __init__(self, identity: Identity, miner: Any, settings: DriverSettings, profile: FirmwareProfile) -> None:
        self._identity = identity
        self._miner = miner
        self._settings = settings
        self._profile = profile
        self._reader = profile.reader(miner)
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
                slow = self._reader.has_slow and (self._reads + self._beat) % SLOW_FIELDS_EVERY == 0
                got = await self._reader.collect(self._miner, slow)
        except TimeoutError:
            raise Unreachable(f"{ident.ip}: no answer within {self._settings.read_timeout_s:g} s") from None
        except OSError as exc:
            raise Unreachable(f"{ident.ip}: {exc.strerror or exc}") from None
        except GARBLED as exc:
            raise ProtocolError(f"{ident.ip}: unreadable reply: {exc}") from None
        if not got.answered:
            if any(r is None for r in got.rpc.values()):
                raise ProtocolError(f"{ident.ip}: the miner answered, but nothing pyasic could parse")
            raise Unreachable(f"{ident.ip}: connection refused or closed without a reply")
        reading = self._reading(got, slow)
        self._reads += 1
        return reading

    def _reading(self, got: Collected, slow: bool) -> Reading:
        miner, ident, values = self._miner, self._identity, got.values
        board_ths, temps = board_figures(miner, values.get("hashboards"))
        errors = tuple(error_text(e) for e in values.get("errors") or ())
        if got.hashrate_boards != "hashboards":
            board_ths, _ = board_figures(miner, values.get(got.hashrate_boards))
        if self._reader.has_slow:
            if slow:
                self._slow = (tuple(temps), errors)
            temps, errors = list(self._slow[0]), self._slow[1]
        hashrate = ths(miner, values.get("hashrate"))
        if hashrate is None:
            hashrate = board_ths
        power = number(values.get("wattage")) if ident.reports_power else None
        limit = number(values.get("wattage_limit"))
        env = number(values.get("env_temp"))
        if env is not None and env > 0:
            temps.append(env)
        mining = values.get("is_mining")
        if not isinstance(mining, bool) or not self._profile.trusts_is_mining:
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
        return await self._control(f"set_power {target} W", self._profile.power_call(self._miner, target))

    async def prepare_control(self) -> bool:
        """Fetch, ahead of any command, what this miner's first control call would fetch on the way: the LuxOS
        session id (`session`, else `logon`) or the Whatsminer v3 salt (`get.device.info`). pyasic keeps them on
        the miner object, so that call is then one exchange instead of two or three: for a pre-armed shed list
        (agent.runtime.frequency) this halves the connections of a cold batch. Best effort and idempotent: True
        when there is nothing left to fetch. A session that has expired by the time it is used costs what a cold
        call costs plus one refused exchange (`_control` renews it once)."""
        try:
            async with asyncio.timeout(self._settings.command_timeout_s):
                return await self._profile.prepare(self._miner)
        except (TimeoutError, OSError, APIError, LookupError, TypeError, ValueError):
            return False

    async def sleep(self) -> Result:
        return await self._switch(on=False)

    async def wake(self) -> Result:
        return await self._switch(on=True)

    async def _switch(self, *, on: bool) -> Result:
        miner, op = self._miner, ("wake" if on else "sleep")
        if not getattr(miner, "supports_shutdown", False):
            return Unsupported(f"pyasic cannot {op} a {type(miner).__name__}")
        call = miner.resume_mining if on else miner.stop_mining
        return await self._control(op, call, confirm=self._profile.switch_check(miner, on=on))

    async def _control(self, op: str, call: ControlCall, *, confirm: StateCheck | None = None) -> Result:
        """Run one pyasic control call under the command timeout and say plainly how it went."""
        ip, timeout = self._identity.ip, self._settings.command_timeout_s
        try:
            async with asyncio.timeout(timeout):
                accepted, refusal = await _attempt(call)
                if accepted is not True and self._profile.forget_session(self._miner):
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


async def _attempt(call: ControlCall) -> tuple[Any, Exception | None]:
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
