"""LuxOS (Luxor firmware on Antminer hardware), as pyasic 0.79.0 drives it.

- `is_mining` is True even asleep, and `get_hashrate()` / `get_wattage_limit()` alone return None: hashrate comes
  from the hash boards (`stats`), the limit from `config` + `profiles`, and sleep is inferred.
- Power limits are the firmware's profiles: presets, the highest not above the target. A profile set while asleep
  is the one the miner wakes at (`drivers.base.WAKES_AT_LIMIT`).
- ATM (Advanced Thermal Management) blocks `profileset` while enabled and moves the profile by itself afterwards,
  up as well as down. pyasic's `set_power_limit` switches it off around `profileset` and back on unbounded, so ATM
  could step a miner above the limit it was just given, a rise nobody sees before the next poll (issue 11: a
  circuit 2 % over its cap). The limit is set here as pyasic sets it, but ATM comes back on with its highest
  profile bound to the one just set (`atmset max_profile=`, LuxOS API): it may still step down, never up.
- Privileged commands carry a session id that pyasic fetches on the first one, keeps on the RPC object and never
  renews: it is fetched ahead for a prepared shed, and dropped for one retry when a command is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from hashflex.drivers import catalogue
from hashflex.drivers.asic.collect import Collected, number
from hashflex.drivers.asic.profile import BaseProfile, ControlCall, FirmwareProfile, Traits, drop_cached, nominal_w
from hashflex.drivers.asic.vendor import APIError
from hashflex.drivers.base import Family, OnOff, Presets

log = logging.getLogger("hashflex.drivers.pyasic")


class LuxOSProfile(BaseProfile):
    family = Family.LUXOS
    trusts_is_mining = False
    # one connection (stats+power+config+profiles). "hashrate" is skipped: its parser returns None
    # unconditionally in 0.79.0; the boards' chain rates (stats) carry hashrate and temperatures.
    fast_options = ("hashboards", "wattage", "wattage_limit")

    def recognises(self, names: frozenset[str]) -> bool:
        return "LuxOSFirmware" in names

    def describe(self, spec: catalogue.ModelSpec | None, got: Collected) -> Traits:
        presets = _profile_watts(got)
        watts = tuple(sorted({int(w) for w in presets.values()}))
        return Traits(
            nominal_w=nominal_w(spec, got, presets),
            capability=Presets(watts) if watts else OnOff(),
            reports_power=True,
            mac=got.values.get("mac") or _config_mac(got),
        )

    def power_call(self, miner: Any, watts: int) -> ControlCall:
        return lambda: set_profile(miner, watts)

    async def prepare(self, miner: Any) -> bool:
        rpc = miner.rpc
        if not hasattr(rpc, "auth"):
            return True
        if rpc.session_token is None:
            await rpc.auth()  # `session`, else `logon`
        return rpc.session_token is not None

    def forget_session(self, miner: Any) -> bool:
        return drop_cached(miner.rpc, "session_token")


async def set_profile(miner: Any, watts: int) -> bool:
    """pyasic's `set_power_limit` (the highest profile not above `watts`; ATM off around `profileset`), with ATM
    switched back on bounded above by that profile. True when the miner took it; refusals raise `APIError`."""
    rpc = miner.rpc
    fitting = {
        str(p.get("Profile Name")): w
        for p in (await rpc.profiles()).get("PROFILES", [])
        if isinstance(p, dict) and (w := number(p.get("Watts"))) and 0 < w <= watts
    }
    if not fitting:
        return False
    name = max(fitting, key=fitting.__getitem__)
    atm_on = (await rpc.atm())["ATM"][0]["Enabled"] is True
    if atm_on:
        await rpc.atmset(enabled=False)
    try:
        reply = await rpc.profileset(name)
    finally:  # back on even if the profile was refused: a miner is never left without thermal management
        if atm_on:
            try:
                await rpc.atmset(enabled=True, max_profile=name)
            except APIError as exc:  # firmware without ATM bounds: back on as pyasic leaves it (it may step up)
                log.warning(
                    "%s: ATM cannot be bounded to %s (%s); it may step the miner above its limit", rpc.ip, name, exc
                )
                await rpc.atmset(enabled=True)
    return bool(reply["PROFILE"][0]["Profile"] == name)


def _profile_watts(got: Collected) -> dict[str, float]:
    """The firmware's profiles by name, in watts (the `profiles` reply identification asked for)."""
    reply = got.rpc.get("profiles") or {}
    out: dict[str, float] = {}
    for p in reply.get("PROFILES", []):
        watts = number(p.get("Watts")) if isinstance(p, dict) else None
        if watts and watts > 0:
            out[str(p.get("Profile Name"))] = watts
    return out


def _config_mac(got: Collected) -> str | None:
    # pyasic 0.79.0's LUXMiner._get_mac returns None before parsing; the MAC is in `config`
    config = got.rpc.get("config") or {}
    try:
        return str(config["CONFIG"][0]["MACAddr"]) or None
    except (LookupError, TypeError):
        return None


PROFILE: FirmwareProfile = LuxOSProfile()
