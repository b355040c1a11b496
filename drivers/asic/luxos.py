"""LuxOS (Luxor firmware on Antminer hardware), as pyasic 0.79.0 drives it.

- `is_mining` is True even asleep, and `get_hashrate()` / `get_wattage_limit()` alone return None: hashrate comes
  from the hash boards (`stats`), the limit from `config` + `profiles`, and sleep is inferred.
- Power limits are the firmware's profiles: presets, the highest not above the target (pyasic toggles ATM around
  `profileset`). A profile set while asleep is the one the miner wakes at (`drivers.base.WAKES_AT_LIMIT`).
- Privileged commands carry a session id that pyasic fetches on the first one, keeps on the RPC object and never
  renews: it is fetched ahead for a prepared shed, and dropped for one retry when a command is refused.
"""

from __future__ import annotations

from typing import Any

from hashflex.drivers import catalogue
from hashflex.drivers.asic.collect import Collected, number
from hashflex.drivers.asic.profile import BaseProfile, FirmwareProfile, Traits, drop_cached, nominal_w
from hashflex.drivers.base import Family, OnOff, Presets


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

    async def prepare(self, miner: Any) -> bool:
        rpc = miner.rpc
        if not hasattr(rpc, "auth"):
            return True
        if rpc.session_token is None:
            await rpc.auth()  # `session`, else `logon`
        return rpc.session_token is not None

    def forget_session(self, miner: Any) -> bool:
        return drop_cached(miner.rpc, "session_token")


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
