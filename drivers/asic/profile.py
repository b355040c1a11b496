"""A firmware family's profile: what the family-neutral pyasic driver asks of each family.

The driver (`driver.py`, `handle.py`) identifies, times out, maps errors and runs control calls the same way for
every miner. What differs by firmware is asked of the family's profile: how pyasic's class names it, what it can be
set to, what a read asks for, how a limit is sent and a sleep or wake checked, what a session needs ahead of a
command. `BaseProfile` is the answer for firmware nothing special is known about (`Family.OTHER`); a family's
module subclasses it, overrides what differs, and is listed in `families.PROFILES`: that is all a new family takes
on the driver's side (plus its `Family` member, the name identities and the site config use).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hashflex.drivers import catalogue
from hashflex.drivers.asic.collect import Collected, collect, number
from hashflex.drivers.base import Capability, DriverError, Family, OnOff, PowerRange

ControlCall = Callable[[], Awaitable[Any]]  # one pyasic control call, run by the handle under its timeout
StateCheck = Callable[[], Awaitable[bool | None]]  # read back whether a command took: None = could not read


def class_names(cls: type[Any]) -> frozenset[str]:
    """The names of a pyasic class and its bases: pyasic says a firmware by its backend classes."""
    return frozenset(c.__name__ for c in cls.__mro__)


@dataclass(frozen=True, slots=True)
class Traits:
    """What identification concludes from a firmware's answers, beyond pyasic's own fields."""

    nominal_w: float
    capability: Capability
    reports_power: bool  # False: the agent estimates this miner's power
    mac: str | None


@dataclass(frozen=True, slots=True)
class Reader:
    """How a handle reads its miner: `collect(miner, slow)`. `has_slow`: some fields are asked only on a slow read
    (every `handle.SLOW_FIELDS_EVERY`-th) and carried over in between."""

    collect: Callable[[Any, bool], Awaitable[Collected]]
    has_slow: bool


class FirmwareProfile(Protocol):
    """One firmware family, as the pyasic driver needs to know it. Methods take pyasic's miner object."""

    @property
    def family(self) -> Family: ...

    @property
    def password_settings(self) -> tuple[str, ...]:
        """pyasic settings keys that take the site's password for this family (pyasic reads them to identify)."""
        ...

    @property
    def trusts_is_mining(self) -> bool:
        """False where pyasic's `is_mining` is not to be believed: the state is inferred from hashrate and power."""
        ...

    def recognises(self, names: frozenset[str]) -> bool:
        """Is a pyasic class with these `class_names` this family's?"""
        ...

    # ------------------------------------------------------------------ identification
    async def probe(self, ip: str) -> Any | None:
        """A miner object for `ip` where pyasic's factory found none, or None."""
        ...

    async def reprobe(self, ip: str, miner: Any) -> Any | None:
        """A better object for a miner identified as `miner` that then did not answer, or None."""
        ...

    def class_spec(self, miner: Any) -> str:
        """`Identity.driver_class` for `miner`: enough to rebuild it with `build`, with no I/O."""
        ...

    def build(self, cls: type[Any], ip: str, variant: str) -> Any:
        """The miner object for `cls` at `ip`; `variant` is what `class_spec` put after the class name's `:`."""
        ...

    def describe(self, spec: catalogue.ModelSpec | None, got: Collected) -> Traits:
        """Capability, nominal power and what else identification reads from the firmware's replies."""
        ...

    # ------------------------------------------------------------------ telemetry
    def reader(self, miner: Any) -> Reader:
        """How a handle reads `miner` (a family may read some of its models its own way)."""
        ...

    def telemetry_options(self) -> tuple[str, ...]:
        """Every pyasic data item a read of this family asks for, fast and slow (what a bare get_data would ask)."""
        ...

    # ------------------------------------------------------------------ control
    def power_call(self, miner: Any, watts: int) -> ControlCall:
        """The call that sets the limit to `watts` (already rounded to the capability)."""
        ...

    def switch_check(self, miner: Any, *, on: bool) -> StateCheck | None:
        """After pyasic's stop/resume_mining answered True: how to read back that it took (None: trust it)."""
        ...

    async def prepare(self, miner: Any) -> bool:
        """Fetch what the first control call would fetch on the way (session id, salt). True when none is left."""
        ...

    def forget_session(self, miner: Any) -> bool:
        """Drop a cached session or salt that may be stale; True if there was one to drop (the call is retried)."""
        ...


class BaseProfile:
    """The profile of firmware nothing special is known about: pyasic as it comes, on/off control, one read
    plan. Families subclass it and override what differs."""

    family: Family = Family.OTHER
    password_settings: tuple[str, ...] = ()
    trusts_is_mining: bool = True
    # pyasic data items each read asks for, and those asked only on a slow read
    fast_options: tuple[str, ...] = ("hashrate", "wattage", "wattage_limit", "is_mining", "hashboards")
    slow_options: tuple[str, ...] = ()
    # whether the miner's power readings are used; None: if it reported a wattage when it was identified
    reports_power: bool | None = None

    def recognises(self, names: frozenset[str]) -> bool:
        return False  # the fallback: picked when no registered family recognises a class

    async def probe(self, ip: str) -> Any | None:
        return None

    async def reprobe(self, ip: str, miner: Any) -> Any | None:
        return None

    def class_spec(self, miner: Any) -> str:
        return type(miner).__name__

    def build(self, cls: type[Any], ip: str, variant: str) -> Any:
        if variant:
            raise DriverError(f"{cls.__name__} has no variant {variant!r}; the miner must be re-identified")
        return cls(ip)

    def describe(self, spec: catalogue.ModelSpec | None, got: Collected) -> Traits:
        nominal = nominal_w(spec, got)
        reports = self.reports_power if self.reports_power is not None else got.values.get("wattage") is not None
        return Traits(nominal, self.capability(spec, nominal), reports, got.values.get("mac"))

    def capability(self, spec: catalogue.ModelSpec | None, nominal: float) -> Capability:
        return OnOff()

    def reader(self, miner: Any) -> Reader:
        fast, everything = self.fast_options, self.telemetry_options()

        async def read(miner: Any, slow: bool) -> Collected:
            return await collect(miner, everything if slow else fast)

        return Reader(read, has_slow=bool(self.slow_options))

    def telemetry_options(self) -> tuple[str, ...]:
        return self.fast_options + self.slow_options

    def power_call(self, miner: Any, watts: int) -> ControlCall:
        return lambda: miner.set_power_limit(watts)

    def switch_check(self, miner: Any, *, on: bool) -> StateCheck | None:
        return None

    async def prepare(self, miner: Any) -> bool:
        return True  # nothing to fetch

    def forget_session(self, miner: Any) -> bool:
        return False


# ---------------------------------------------------------------------------------------------- shared by families
def nominal_w(spec: catalogue.ModelSpec | None, got: Collected, presets: dict[str, float] | None = None) -> float:
    """Full-power draw: the catalogue's figure, else the firmware's default preset (or its highest), else the limit
    the miner reports, else the catalogue's guess for an unknown model."""
    if spec is not None:
        return float(spec.nominal_w)
    if presets:
        return presets.get("default", max(presets.values()))
    limit = number(got.values.get("wattage_limit"))
    if limit and limit > 0:
        return limit
    return catalogue.UNKNOWN_MODEL_W


def power_range(spec: catalogue.ModelSpec | None, nominal: float) -> PowerRange:
    """A continuous limit from the model's floor (or a share of nominal) up to nominal, in 1 W steps."""
    floor = spec.min_limit_w if spec and spec.min_limit_w else nominal * catalogue.DEFAULT_MIN_LIMIT_SHARE
    return PowerRange(min_w=int(floor), max_w=int(nominal), step_w=1)


def drop_cached(api: Any, attribute: str) -> bool:
    """Clear a session value pyasic caches on an API object (and never renews); True if there was one."""
    if getattr(api, attribute, None) is None:
        return False
    setattr(api, attribute, None)
    return True
