"""Whatsminer (MicroBT btminer, API v2 and v3), as pyasic 0.79.0 drives it.

- A Whatsminer class picks its backend (`BTMinerV2` or `BTMinerV3`) in `__new__` from a firmware date. The
  identity keeps the backend after the class name (`M60SVK10:BTMinerV3`) and `build` passes a date that picks it.
- A v3 firmware behind a closed port 4028 is identified with the v2 backend (every call then goes to the dead
  port), or, when 4028 answers errors, not at all: `reprobe` and `probe` ask port 4433 directly.
- v3's `set_power_limit` returns True without looking at the reply: the reply is checked here.
- v3 signs privileged commands with a salt pyasic fetches once, keeps on the RPC object and never renews: it is
  fetched ahead for a prepared shed, and dropped for one retry when a command is refused.
- The power limit is a stored setting the miner wakes at (`drivers.base.WAKES_AT_LIMIT`).
"""

from __future__ import annotations

from typing import Any

from hashflex.drivers import catalogue
from hashflex.drivers.asic.profile import (
    BaseProfile,
    ControlCall,
    FirmwareProfile,
    class_names,
    drop_cached,
    power_range,
)
from hashflex.drivers.asic.vendor import MinerTypes, miner_factory
from hashflex.drivers.base import Capability, DriverError, Family

# The firmware dates that make a Whatsminer class pick each backend.
_BACKEND_VERSION: dict[str, str | None] = {"BTMinerV2": None, "BTMinerV3": "20250101"}


def backend(miner: Any) -> str | None:
    """The backend pyasic picked for this Whatsminer object, or None for any other miner."""
    names = class_names(type(miner))
    return next((b for b in _BACKEND_VERSION if b in names), None)


class WhatsminerProfile(BaseProfile):
    family = Family.WHATSMINER
    password_settings = ("default_whatsminer_rpc_password",)
    reports_power = True
    # v3: one connection (get.miner.status:summary) for power, limit, hashrate, ambient temperature
    fast_options = ("hashrate", "wattage", "wattage_limit", "env_temp", "is_mining")
    slow_options = ("errors", "hashboards")  # get.device.info + get.miner.status:edevs: two more connections

    def recognises(self, names: frozenset[str]) -> bool:
        return bool(names & {"BTMiner", "BTMinerV2", "BTMinerV3"})

    async def probe(self, ip: str) -> Any | None:
        return await _probe_v3(ip)  # pyasic returns None for a v3 whose port 4028 answers errors

    async def reprobe(self, ip: str, miner: Any) -> Any | None:
        # identified through the web UI with port 4028 closed: pyasic picked the v2 backend, whose every call goes
        # to the dead port; a v3 firmware answers on 4433
        return await _probe_v3(ip) if backend(miner) == "BTMinerV2" else None

    def class_spec(self, miner: Any) -> str:
        name, picked = type(miner).__name__, backend(miner)
        return f"{name}:{picked}" if picked else name

    def build(self, cls: type[Any], ip: str, variant: str) -> Any:
        if not variant:
            return cls(ip)
        if variant not in _BACKEND_VERSION:
            spec = f"{cls.__name__}:{variant}"
            raise DriverError(f"unknown Whatsminer backend {variant!r} in {spec!r}")
        return cls(ip, _BACKEND_VERSION[variant])

    def capability(self, spec: catalogue.ModelSpec | None, nominal: float) -> Capability:
        return power_range(spec, nominal)

    def power_call(self, miner: Any, watts: int) -> ControlCall:
        if backend(miner) == "BTMinerV3":
            # pyasic's BTMinerV3.set_power_limit returns True without looking at the reply
            return lambda: _v3_call(miner, "set_miner_power_limit", watts)
        return super().power_call(miner, watts)

    async def prepare(self, miner: Any) -> bool:
        rpc = miner.rpc
        if backend(miner) != "BTMinerV3" or not hasattr(rpc, "get_salt"):
            return True
        if rpc.salt is None:
            await rpc.get_salt()  # get.device.info
        return rpc.salt is not None

    def forget_session(self, miner: Any) -> bool:
        return drop_cached(miner.rpc, "salt")


async def _v3_call(miner: Any, method: str, *args: Any) -> bool:
    reply = await getattr(miner.rpc, method)(*args)
    if not reply:
        raise ConnectionRefusedError("no reply")
    return bool(reply.get("code") == 0 or reply.get("msg") == "ok")


async def _probe_v3(ip: str) -> Any | None:
    info = await miner_factory.send_btminer_v3_api_command(ip, "get.device.info")
    try:
        raw_model = info["msg"]["miner"]["type"].replace("_", "")
        version = info["msg"]["system"]["fwversion"]
    except (LookupError, TypeError, AttributeError):
        return None
    model = raw_model[:-1] + "0"  # pyasic's normalisation of the board revision (factory.py)
    return miner_factory._select_miner_from_classes(ip, model, MinerTypes.WHATSMINER, version)


PROFILE: FirmwareProfile = WhatsminerProfile()
