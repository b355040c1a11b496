"""Every miner driver hashflex can use, by the name `miners.driver` gives in the site config.

An explicit dict, greppable, no import magic: adding a driver is one line here (copy drivers/_blueprint.py).
"""

from __future__ import annotations

from collections.abc import Callable

from hashflex.drivers.asic import PyasicDriver
from hashflex.drivers.base import DriverSettings, MinerDriver

DRIVERS: dict[str, Callable[[DriverSettings], MinerDriver]] = {
    "pyasic": PyasicDriver,
}


def create(name: str, settings: DriverSettings) -> MinerDriver:
    """The driver called `name`, or a KeyError naming the ones that exist."""
    try:
        factory = DRIVERS[name]
    except KeyError:
        raise KeyError(f"no miner driver {name!r}; known: {', '.join(sorted(DRIVERS))}") from None
    return factory(settings)
