"""The firmware families the pyasic driver knows: one profile module each, listed here.

An explicit dict, greppable, no import magic. A new family is its module (copy `braiins.py`, the smallest, and
override what `profile.BaseProfile` does not already do right) plus one entry here, and its `Family` member in
`drivers.base`. No pyasic class is recognised by two families (tests/drivers/test_pyasic_profiles.py), so the
order of the entries decides nothing.
"""

from __future__ import annotations

from typing import Any

from hashflex.drivers.asic import antminer, braiins, luxos, whatsminer
from hashflex.drivers.asic.profile import BaseProfile, FirmwareProfile, class_names
from hashflex.drivers.base import Family

PROFILES: dict[Family, FirmwareProfile] = {
    p.family: p for p in (luxos.PROFILE, braiins.PROFILE, whatsminer.PROFILE, antminer.PROFILE)
}

# Firmware no profile recognises (Family.OTHER): pyasic as it comes, on/off control.
FALLBACK: FirmwareProfile = BaseProfile()


def for_class(cls: type[Any]) -> FirmwareProfile:
    """The profile of the first family that recognises pyasic's class `cls`, else the fallback."""
    names = class_names(cls)
    return next((p for p in PROFILES.values() if p.recognises(names)), FALLBACK)


def for_family(family: str) -> FirmwareProfile:
    """The profile an identity's family (or the site config's name for it) stands for."""
    return next((p for p in PROFILES.values() if p.family == family), FALLBACK)
