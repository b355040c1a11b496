"""Braiins OS (BOSer and legacy BOSMiner), as pyasic 0.79.0 drives it: a continuous power target."""

from __future__ import annotations

from hashflex.drivers import catalogue
from hashflex.drivers.asic.profile import BaseProfile, FirmwareProfile, power_range
from hashflex.drivers.base import Capability, Family


class BraiinsProfile(BaseProfile):
    family = Family.BRAIINS
    # pyasic's BOSer reads `default_bosminer_password` though Settings declares the `_web_` key: set both
    password_settings = ("default_bosminer_web_password", "default_bosminer_password")
    reports_power = True
    fast_options = ("hashrate", "wattage", "wattage_limit", "is_mining")
    slow_options = ("errors", "hashboards")

    def recognises(self, names: frozenset[str]) -> bool:
        return "BraiinsOSFirmware" in names

    def capability(self, spec: catalogue.ModelSpec | None, nominal: float) -> Capability:
        return power_range(spec, nominal)


PROFILE: FirmwareProfile = BraiinsProfile()
