"""Upstream-ready fixes for pyasic 0.79.0's per-call CPU cost. Applied once by `drivers.pyasic_driver`.

Each patch is small, keeps pyasic's behaviour exactly, and is written so it could be sent upstream as is.

1. `BaseMinerRPCAPI.get_commands` (pyasic/rpc/base.py) lists the commands an RPC class supports by calling
   `dir(self)` and, for *every* attribute, `dir(BaseMinerRPCAPI)` again: O(n²), ~61 `dir()` calls per
   multicommand and 35-45 % of the CPU of a `get_data` call. The list depends only on the class (the instance
   attributes pyasic sets, `ip`, `port`, `pwd`, `session_token`, ..., are not callable and are filtered out),
   so it is computed once per class and copied out.
   Upstream form: `functools.cache` on a classmethod, or the same dict as here.

2. `BaseMinerRPCAPI.__repr__` formats `str(self.ip)` (an `ipaddress` object) every time, and pyasic calls it
   eagerly in about five `logging.debug(f"{self} ...")` lines per request, whether or not DEBUG is on:
   ~6 % of a Whatsminer read. The address never changes, so the text is built once per object.
   Upstream form: lazy `logging.debug("%s ...", self)` arguments, or the same cache.

Not patched here, for the record:
- httpcore retries `import sniffio` on every lock setup when sniffio is missing (25 % of identification CPU);
  the fix is a dependency (`sniffio` is in pyproject.toml), not a patch.
- The event loop: uvloop is the caller's choice (`agent` runs on it when installed).
"""

from __future__ import annotations

from typing import Any

from pyasic.rpc.base import BaseMinerRPCAPI

_ORIGINAL_GET_COMMANDS = BaseMinerRPCAPI.get_commands
_ORIGINAL_REPR = BaseMinerRPCAPI.__repr__
_COMMANDS_BY_CLASS: dict[type[Any], tuple[str, ...]] = {}


def _get_commands_cached(self: BaseMinerRPCAPI) -> list[str]:
    """Same list as pyasic's `get_commands`, computed once per RPC class."""
    cls = type(self)
    commands = _COMMANDS_BY_CLASS.get(cls)
    if commands is None:
        commands = tuple(_ORIGINAL_GET_COMMANDS(self))
        _COMMANDS_BY_CLASS[cls] = commands
    return list(commands)


def _repr_cached(self: BaseMinerRPCAPI) -> str:
    """Same text as pyasic's `__repr__`, built once per object (its address never changes)."""
    text: str | None = self.__dict__.get("_hashflex_repr")
    if text is None:
        text = _ORIGINAL_REPR(self)
        self.__dict__["_hashflex_repr"] = text
    return text


def apply() -> None:
    """Install the patches. Idempotent."""
    BaseMinerRPCAPI.get_commands = _get_commands_cached
    BaseMinerRPCAPI.__repr__ = _repr_cached


def revert() -> None:
    """Restore pyasic's originals (the benchmark's stock baseline uses this)."""
    BaseMinerRPCAPI.get_commands = _ORIGINAL_GET_COMMANDS
    BaseMinerRPCAPI.__repr__ = _ORIGINAL_REPR
    _COMMANDS_BY_CLASS.clear()


def applied() -> bool:
    return BaseMinerRPCAPI.get_commands is _get_commands_cached and BaseMinerRPCAPI.__repr__ is _repr_cached
