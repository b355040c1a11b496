"""Reading a miner through pyasic: its own commands and parsers, without its `get_data` model.

pyasic hides unreachability (a refused connection comes back as `{}`, then as a reading full of None). A read here
sends the RPC/web commands pyasic's data locations name and hands the replies to pyasic's own parsers, keeping
whether the miner answered at all, so an empty reply can be told from a garbled one. Family-neutral: a firmware
profile picks the options, or collects in its own way with these pieces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hashflex.drivers import catalogue
from hashflex.drivers.asic.vendor import APIError, BaseMinerRPCAPI


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


@dataclass(slots=True)
class Collected:
    values: dict[str, Any]
    rpc: dict[str, dict[str, Any] | None]  # raw replies per command; None = garbled or error status
    answered: bool  # something came back from the miner
    # which of `values` holds the boards whose rates sum to the hashrate when the miner reports none
    hashrate_boards: str = "hashboards"


# what pyasic raises on replies it cannot read (a Decode Error, or its parsers indexing into the unexpected)
GARBLED = (APIError, LookupError, TypeError, ValueError, AttributeError, UnicodeDecodeError)


def _part(reply: dict[str, Any], command: str) -> dict[str, Any] | None:
    part = reply.get(command)
    if isinstance(part, list) and part and isinstance(part[0], dict):
        return part[0]
    return None


async def rpc_replies(rpc: Any, commands: tuple[str, ...]) -> dict[str, dict[str, Any] | None]:
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
        except GARBLED:
            return {commands[0]: None}
    try:
        reply = await rpc.send_command("+".join(commands), allow_warning=False)
    except GARBLED:
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


async def collect(miner: Any, options: tuple[str, ...]) -> Collected:
    """pyasic's `get_data` minus the MinerData model, keeping whether the miner answered at all."""
    plan = _plan_for(miner, options)
    rpc_replied: dict[str, dict[str, Any] | None] = {}
    web_replies: dict[str, Any] = {}
    if plan.rpc_commands and miner.rpc is not None and plan.web_commands and miner.web is not None:
        rpc_replied, web_data = await asyncio.gather(
            rpc_replies(miner.rpc, plan.rpc_commands),
            miner.web.multicommand(*plan.web_commands, allow_warning=False),
        )
        web_replies = web_data or {}
    elif plan.rpc_commands and miner.rpc is not None:
        rpc_replied = await rpc_replies(miner.rpc, plan.rpc_commands)
    elif plan.web_commands and miner.web is not None:
        web_replies = await miner.web.multicommand(*plan.web_commands, allow_warning=False) or {}

    answered = any(rpc_replied.values()) or any(web_replies.get(c) for c in plan.web_commands)
    values: dict[str, Any] = {}
    for step in plan.steps:
        kwargs: dict[str, Any] = {}
        for name, is_web, cmd in step.args:
            data = web_replies.get(cmd) if is_web else rpc_replied.get(cmd)
            if not data:
                break  # missing input: skip rather than let the parser fetch it again on its own
            kwargs[name] = data
        else:
            try:
                values[step.option] = await getattr(miner, step.function)(**kwargs)
            except GARBLED:
                values[step.option] = None
    if not (plan.rpc_commands or plan.web_commands):  # parsers that fetch for themselves
        answered = any(v not in (None, [], {}) for v in values.values())
    return Collected(values, rpc_replied, answered)


# ---------------------------------------------------------------------------------------------- values
def ths(miner: Any, rate: Any) -> float | None:
    """A pyasic hashrate object in TH/s, or None."""
    if rate is None:
        return None
    unit_th = getattr(getattr(miner.algo, "unit", None), "TH", None)
    try:
        if unit_th is not None and rate.unit != unit_th:
            rate = rate.into(unit_th)
        return float(rate.rate)
    except (AttributeError, TypeError, ValueError):
        return None


def board_figures(miner: Any, boards: Iterable[Any] | None) -> tuple[float | None, list[float]]:
    """The boards' summed hashrate (None if none says) and their board and chip temperatures."""
    hashrate: float | None = None
    temps: list[float] = []
    for board in boards or ():
        rate = ths(miner, board.hashrate)
        if rate is not None:
            hashrate = (hashrate or 0.0) + rate
        for t in (board.temp, board.chip_temp):
            if isinstance(t, int | float) and t > 0:
                temps.append(float(t))
    return hashrate, temps


def number(value: Any) -> float | None:
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


def error_text(error: Any) -> str:
    message = getattr(error, "error_message", None)
    code = getattr(error, "error_code", None)
    if message:
        return str(message)
    return f"code {code}" if code is not None else str(error)
