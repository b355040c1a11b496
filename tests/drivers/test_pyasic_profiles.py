"""The firmware profile registry is the pyasic driver's extension point (issue 13): a firmware family is one
profile module listed in `drivers.asic.families.PROFILES`, and the family-neutral driver asks it at every point
where families differ. Shown with a toy profile for Auradine, a firmware the driver has no profile for today.
No I/O: the toy answers for the miner."""

from __future__ import annotations

from typing import Any

import pytest

from hashflex.drivers.asic import CLASSES, PyasicDriver, build_miner, family_of
from hashflex.drivers.asic.collect import Collected
from hashflex.drivers.asic.families import FALLBACK, PROFILES, for_class
from hashflex.drivers.asic.profile import BaseProfile, ControlCall, Reader, StateCheck, class_names
from hashflex.drivers.base import DriverError, DriverSettings, Family, Identity, Ok, PowerRange

AURADINE = "AuradineFluxAT1500"


class ToyAuradine(BaseProfile):
    # a real family adds its own Family member; the toy borrows OTHER, which no registered profile claims
    family = Family.OTHER
    reports_power = True

    def __init__(self) -> None:
        self.sent: list[str] = []

    def recognises(self, names: frozenset[str]) -> bool:
        return "Auradine" in names

    def reader(self, miner: Any) -> Reader:
        async def collect(miner: Any, slow: bool) -> Collected:
            self.sent.append("read")
            return Collected({"wattage": 2100, "wattage_limit": 2200, "is_mining": True}, {}, answered=True)

        return Reader(collect, has_slow=False)

    def power_call(self, miner: Any, watts: int) -> ControlCall:
        async def send() -> bool:
            self.sent.append(f"mode custom {watts} W")
            return True

        return send

    def switch_check(self, miner: Any, *, on: bool) -> StateCheck | None:
        async def check() -> bool:
            self.sent.append(f"read back sleep {'off' if on else 'on'}")
            return True

        return check


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyAuradine:
    profile = ToyAuradine()
    monkeypatch.setitem(PROFILES, profile.family, profile)
    return profile


def test_a_class_no_profile_recognises_gets_the_fallback() -> None:
    assert for_class(CLASSES[AURADINE]) is FALLBACK
    assert family_of(CLASSES[AURADINE]) is Family.OTHER


def test_a_registered_profile_is_picked_for_its_classes(toy: ToyAuradine) -> None:
    assert for_class(CLASSES[AURADINE]) is toy
    assert for_class(CLASSES["LUXMinerS19Pro"]) is PROFILES[Family.LUXOS]  # the others keep theirs


async def test_the_driver_reads_and_commands_through_the_registered_profile(
    toy: ToyAuradine, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = Identity(
        ip="127.20.252.1",
        family=Family.OTHER,
        make="Auradine",
        model="AT1500",
        firmware="toy",
        driver_class=AURADINE,
        capability=PowerRange(1500, 3000, 100),
        nominal_w=3000.0,
        nominal_ths=100.0,
    )
    handle = PyasicDriver(DriverSettings()).attach(identity)
    miner = handle._miner
    monkeypatch.setattr(miner, "stop_mining", _accepted)

    reading = await handle.read()
    assert (reading.power_w, reading.power_limit_w, reading.mining) == (2100.0, 2200.0, True)
    assert await handle.set_power(2250) == Ok("set_power 2200 W")  # rounded to the capability by the driver
    assert await handle.sleep() == Ok("sleep")
    assert toy.sent == ["read", "mode custom 2200 W", "read back sleep on"]


def test_no_pyasic_class_is_claimed_by_two_families() -> None:
    # so the order of PROFILES never decides a family, and a new profile cannot take over another's classes
    claimed = {
        name: [p.family for p in PROFILES.values() if p.recognises(class_names(cls))] for name, cls in CLASSES.items()
    }
    assert {name: families for name, families in claimed.items() if len(families) > 1} == {}
    assert {f for families in claimed.values() for f in families} == set(PROFILES)


def test_a_class_variant_is_for_the_family_that_made_it() -> None:
    assert "BTMinerV3" in class_names(type(build_miner("BTMinerM60SVK10:BTMinerV3", "127.20.252.2")))
    with pytest.raises(DriverError, match="no variant"):
        build_miner(f"{AURADINE}:BTMinerV3", "127.20.252.3")


async def _accepted() -> bool:
    return True
