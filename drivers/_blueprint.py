"""Copy-me template for a new miner driver (after evcc's charger/_blueprint.go).

1. Copy this file to drivers/<name>_driver.py and rename the classes.
2. Import only `drivers.base` and your vendor library (tests/unit/test_layers.py checks it).
3. Fill in each method; until a method works, return `Unsupported` (control) or raise `ProtocolError`
   (reads) so the agent treats the miner as unknown, never as drawing zero.
4. Add one line to drivers/registry.py: `"<name>": BlueprintDriver`.
5. Put every vendor call under `asyncio.timeout(...)` with the DriverSettings deadlines, map the vendor's
   errors to Unreachable / AuthError / ProtocolError in one place, and keep handles alive (sessions, tokens).
"""

from __future__ import annotations

import asyncio

from hashflex.drivers.base import (
    DriverSettings,
    Identity,
    ProtocolError,
    Reading,
    Result,
    Unsupported,
)


class BlueprintHandle:
    """A live connection to one miner. Long-lived: cache sessions and tokens on it."""

    def __init__(self, identity: Identity, settings: DriverSettings) -> None:
        self._identity = identity
        self._settings = settings

    @property
    def identity(self) -> Identity:
        return self._identity

    async def read(self) -> Reading:
        async with asyncio.timeout(self._settings.read_timeout_s):
            reply = await self._fetch_telemetry()
        raise ProtocolError(f"{self._identity.ip}: blueprint driver cannot parse {sorted(reply)} yet")

    async def _fetch_telemetry(self) -> dict[str, object]:
        """Replace with the vendor call(s) for power, hashrate, mining state, limit, temperatures, errors."""
        await asyncio.sleep(0)
        return {}

    async def set_power(self, watts: int) -> Result:
        return Unsupported(f"blueprint driver cannot set {watts} W yet")

    async def sleep(self) -> Result:
        return Unsupported("blueprint driver cannot sleep a miner yet")

    async def wake(self) -> Result:
        return Unsupported("blueprint driver cannot wake a miner yet")


class BlueprintDriver:
    """Identifies miners once and builds handles from the cached Identity with no I/O."""

    name = "blueprint"

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings
        self._identify_slots = asyncio.Semaphore(settings.identify_concurrency)

    async def identify(self, ip: str) -> Identity | None:
        async with self._identify_slots, asyncio.timeout(self.settings.identify_timeout_s):
            return await self._probe(ip)

    async def _probe(self, ip: str) -> Identity | None:
        """Replace with the vendor's identification; None = nothing this driver knows answered at `ip`."""
        await asyncio.sleep(0)
        return None

    def attach(self, identity: Identity) -> BlueprintHandle:
        return BlueprintHandle(identity, self.settings)
