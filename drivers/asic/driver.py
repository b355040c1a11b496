"""`drivers.base.MinerDriver` on pyasic: identify (bounded, timed), then attach without I/O.

- Identification is bounded: `pyasic.get_miner` bounds nothing and 700+ at once all fail, so every `identify`
  takes a slot of one semaphore per driver (`DriverSettings.identify_concurrency`).
- Identify once, then never again: the Identity stores pyasic's class name; `attach` rebuilds the object from the
  class with no I/O, and the handle keeps it alive (LuxOS session ids, Whatsminer salts live on it).
- Cost: identification asks RPC first (pyasic races an httpx web probe against it for every address).
- What differs per firmware family comes from its profile (`families.PROFILES`), chosen by pyasic's class when
  a miner is identified and by the identity's family when it is attached.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hashflex.drivers import catalogue
from hashflex.drivers.asic.collect import collect, ths
from hashflex.drivers.asic.families import PROFILES, for_class, for_family
from hashflex.drivers.asic.handle import PyasicHandle
from hashflex.drivers.asic.vendor import (
    MINER_CLASSES,
    PYASIC_VERSION,
    MinerTypes,
    UnknownMiner,
    get_miner,
    miner_factory,
    pyasic_settings,
)
from hashflex.drivers.base import DriverError, DriverSettings, Family, Identity, Unreachable

log = logging.getLogger("hashflex.drivers.pyasic")

# Every class pyasic's factory can return, by name (names are unique across families in 0.79.0).
CLASSES: dict[str, type[Any]] = {cls.__name__: cls for group in MINER_CLASSES.values() for cls in group.values()}

_IDENTIFY_OPTIONS = ("mac", "serial_number", "fw_ver", "expected_hashrate", "wattage_limit", "wattage")


def family_of(cls: type[Any]) -> Family:
    """The firmware family of pyasic's miner class `cls`."""
    return for_class(cls).family


def telemetry_options(family: Family) -> tuple[str, ...]:
    """Every pyasic data item a read of this family needs, fast and slow (what a bare get_data would ask)."""
    return for_family(family).telemetry_options()


def build_miner(driver_class: str, ip: str) -> Any:
    """A pyasic miner object from `Identity.driver_class`, with no I/O."""
    name, _, variant = driver_class.partition(":")
    cls = CLASSES.get(name)
    if cls is None:
        raise DriverError(f"pyasic {PYASIC_VERSION} has no miner class {name!r}; the miner must be re-identified")
    return for_class(cls).build(cls, ip, variant)


class PyasicDriver:
    """`drivers.base.MinerDriver` on pyasic: identify (bounded, timed), then attach without I/O."""

    name = "pyasic"

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self._identify_slots = asyncio.Semaphore(settings.identify_concurrency)
        # pyasic's identification reads default passwords from process-global settings
        for family, password in settings.passwords.items():
            for key in for_family(family).password_settings:
                pyasic_settings.update(key, password)

    # ------------------------------------------------------------------ identify
    async def identify(self, ip: str) -> Identity | None:
        async with self._identify_slots:
            try:
                async with asyncio.timeout(self.settings.identify_timeout_s):
                    miner = await self._probe(ip)
                    if miner is None:
                        return None
                    return await self._describe(ip, miner)
            except TimeoutError:
                log.debug("identify %s: no answer within %ss", ip, self.settings.identify_timeout_s)
                return None
            except DriverError as exc:
                log.debug("identify %s: %s", ip, exc)
                return None

    async def _probe(self, ip: str) -> Any:
        # pyasic.get_miner races a web probe (a new httpx client, GET http:// and https://) against the RPC
        # probe for every address; for RPC firmwares (LuxOS, Whatsminer, Braiins, stock bmminer) the RPC
        # answer decides anyway, and the web probe is ~half of identification's CPU. Ask RPC first, with
        # pyasic's own factory steps, and fall back to the full get_miner for web-only firmwares.
        miner_type = await miner_factory._get_miner_socket(ip)
        miner = await self._from_type(ip, miner_type) if miner_type is not None else None
        if miner is None:
            miner = await get_miner(ip)
        if miner is None:
            miner = await self._probe_families(ip)
        if miner is None or isinstance(miner, UnknownMiner):
            return None
        return miner

    @staticmethod
    async def _probe_families(ip: str) -> Any:
        """pyasic found nothing: a family may know a way in that its factory does not take (a Whatsminer v3 whose
        port 4028 answers errors)."""
        for profile in PROFILES.values():
            miner = await profile.probe(ip)
            if miner is not None:
                return miner
        return None

    @staticmethod
    async def _from_type(ip: str, miner_type: Any) -> Any:
        """The rest of `MinerFactory.get_miner` once the type is known: model, Whatsminer version, class (pyasic's
        own `miner_model_fns` / `miner_version_fns` tables, by their naming)."""
        suffix = "luxos" if miner_type is MinerTypes.LUX_OS else miner_type.name.lower()
        model_fn = getattr(miner_factory, f"get_miner_model_{suffix}", None)
        if model_fn is None:
            return None
        model = await model_fn(ip)
        version = None
        if miner_type is MinerTypes.WHATSMINER:
            version = await miner_factory.get_miner_version_whatsminer(ip)
        return miner_factory._select_miner_from_classes(ip, model, miner_type, version)

    async def _describe(self, ip: str, miner: Any) -> Identity:
        profile = for_class(type(miner))
        got = await collect(miner, _IDENTIFY_OPTIONS)
        if not got.answered:
            better = await profile.reprobe(ip, miner)
            if better is not None:
                miner = better
                got = await collect(miner, _IDENTIFY_OPTIONS)
        if not got.answered:
            raise Unreachable(f"{ip}: identified as {type(miner).__name__}, then stopped answering")
        values = got.values
        model = str(miner.raw_model) if miner.raw_model is not None else type(miner).__name__
        spec = catalogue.lookup(model)
        expected_ths = ths(miner, values.get("expected_hashrate"))
        traits = profile.describe(spec, got)
        firmware = values.get("fw_ver") or str(miner.firmware or "unknown")
        return Identity(
            ip=ip,
            family=profile.family,
            make=str(miner.make or "unknown"),
            model=model,
            firmware=str(firmware),
            driver_class=profile.class_spec(miner),
            capability=traits.capability,
            nominal_w=traits.nominal_w,
            nominal_ths=float(spec.nominal_ths) if spec else (expected_ths or 0.0),
            mac=str(traits.mac).upper() if traits.mac else None,
            serial=str(values["serial_number"]) if values.get("serial_number") else None,
            reports_power=traits.reports_power,
        )

    # ------------------------------------------------------------------ attach
    def attach(self, identity: Identity) -> PyasicHandle:
        miner = build_miner(identity.driver_class, identity.ip)
        password = self.settings.passwords.get(str(identity.family))
        if password is not None:
            for api in (miner.rpc, miner.web):
                if api is not None and hasattr(api, "pwd"):
                    api.pwd = password
        return PyasicHandle(identity, miner, self.settings, for_family(identity.family))
