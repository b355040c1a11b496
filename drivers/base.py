"""The miner driver contract: every miner the agent controls is seen through these types.

This module is pure: value types and a Protocol, no I/O, no vendor imports. The agent's pure core
(`agent.core`) may import the value types from here and from nowhere else in `drivers` (the device contract
is shared, like evcc's api/api.go); the driver implementations import only this module and their vendor
library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class Family(StrEnum):
    """Firmware family: decides the wire protocol and what control is possible."""

    LUXOS = "luxos"
    WHATSMINER = "whatsminer"
    ANTMINER = "antminer"  # stock Bitmain firmware: sleep / normal / low-power modes only
    BRAIINS = "braiins"
    OTHER = "other"


# Client CPU of one control command per family, in ms (pyasic 0.79 with drivers/pyasic_patches.py, uvloop; measured
# on the simulated site at 1,000 miners): LuxOS and Whatsminer v3 answer one RPC exchange, a stock Antminer needs
# three Digest-authenticated HTTP calls (read its config, write it back, read the mode back). The actuator sends a
# batch's decreases in order of power shed per unit of this cost, so a site's draw falls fastest. Relative figures
# matter, not exact ones; unknown families sit in the middle.
CONTROL_COST_MS: dict[Family, float] = {
    Family.LUXOS: 0.4,
    Family.WHATSMINER: 0.25,
    Family.ANTMINER: 3.0,
    Family.BRAIINS: 2.0,
    Family.OTHER: 1.0,
}


# ---------------------------------------------------------------------------------------------- capability
@dataclass(frozen=True, slots=True)
class PowerRange:
    """Continuous power limit in watts, settable in `step_w` increments between min_w and max_w."""

    min_w: int
    max_w: int
    step_w: int = 1


@dataclass(frozen=True, slots=True)
class Presets:
    """Discrete power levels (LuxOS profiles, stock low-power mode): the miner runs at one of these watts."""

    watts: tuple[int, ...]  # ascending, each > 0; sleeping is not a preset


@dataclass(frozen=True, slots=True)
class OnOff:
    """Only sleep and wake: the miner runs at its nominal power or sleeps."""


Capability = PowerRange | Presets | OnOff

# Families whose firmware takes a power limit while the miner sleeps and comes up at it when woken: LuxOS
# `profileset` and the Whatsminer power limit are stored settings the wake starts from. The actuator sets the limit
# before the wake, so the plan may count such a wake at its planned limit instead of stock power (issue 11 finding
# 8). Stock Antminer is on/off; Braiins and unknown firmware are not known to, so they count at full power.
WAKES_AT_LIMIT: frozenset[Family] = frozenset({Family.LUXOS, Family.WHATSMINER})


def wakes_at_limit(family: Family, capability: Capability) -> bool:
    """Whether a sleeping miner of this family can be told its limit first and comes up at it."""
    return family in WAKES_AT_LIMIT and not isinstance(capability, OnOff)


# ---------------------------------------------------------------------------------------------- identity
@dataclass(frozen=True, slots=True)
class Identity:
    """What identification learned about a miner, once. Persisted so a restart does not re-identify a site."""

    ip: str
    family: Family
    make: str
    model: str
    firmware: str
    driver_class: str  # the vendor library's class name, to rebuild the miner object without any I/O
    capability: Capability
    nominal_w: float  # full-power draw at stock settings
    nominal_ths: float  # hashrate at nominal_w
    mac: str | None = None
    serial: str | None = None
    # watts reported by the miner are trusted; False means the agent estimates power (stock Antminer)
    reports_power: bool = True


# ---------------------------------------------------------------------------------------------- telemetry
@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of a miner. None means the miner did not say, never zero."""

    ts: float  # monotonic-free wall time (seconds since epoch) when the reading was taken
    power_w: float | None
    hashrate_ths: float | None
    mining: bool | None  # None where the firmware cannot tell (LuxOS reports True while asleep)
    power_limit_w: float | None
    temps_c: tuple[float, ...] = ()
    errors: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class Ok:
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Unsupported:
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str
    retryable: bool = True


Result = Ok | Unsupported | Failed


class DriverError(Exception):
    """A driver call that could not produce a value. Subclasses say why."""


class Unreachable(DriverError):
    """Connection refused, reset or timed out: the miner may be drawing power, but we cannot tell."""


class AuthError(DriverError):
    """The miner refused our credentials."""


class ProtocolError(DriverError):
    """The miner answered something we could not understand, or an error status."""


# ---------------------------------------------------------------------------------------------- contract
@runtime_checkable
class MinerHandle(Protocol):
    """A live miner object. Long-lived: it caches sessions and tokens between calls."""

    @property
    def identity(self) -> Identity: ...

    async def read(self) -> Reading:
        """Poll telemetry. Raises DriverError (Unreachable on timeout)."""
        ...

    async def set_power(self, watts: int) -> Result:
        """Apply a power limit (the driver rounds to what the capability allows)."""
        ...

    async def sleep(self) -> Result: ...

    async def wake(self) -> Result: ...


@runtime_checkable
class MinerDriver(Protocol):
    """A factory for handles: identifies a miner once, then builds handles with no I/O."""

    name: str

    async def identify(self, ip: str) -> Identity | None:
        """Probe `ip`; None when nothing known answers."""
        ...

    def attach(self, identity: Identity) -> MinerHandle:
        """Build a handle from a cached identity, with no network I/O."""
        ...


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """What every driver needs to know; built from the site config by the runtime."""

    read_timeout_s: float = 5.0
    command_timeout_s: float = 10.0
    identify_timeout_s: float = 10.0
    passwords: dict[str, str] = field(default_factory=dict)  # family -> password
    # identifications in flight at once, across every caller of one driver (pyasic fails past ~700)
    identify_concurrency: int = 128
