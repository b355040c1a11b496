"""Slow upkeep of the state store, off the control loop: sign each whole UTC day's audit chain head with the site's
key (when `audit.sign_daily_head` is on), and once a day delete what is older than `audit.retention_days` *and*
already exported (Store.prune never deletes anything unexported; it leaves a `prune` record anchoring the chain).

Both run in a worker thread: the store serialises them with the control loop's writes under its own lock, and a
prune of a year of per-miner minutes must not stall a tick. Hourly on the agent's clock, and once at start, so a
day that ended while the agent was down is signed as soon as it is back.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.core.energy import DAY_S
from hashflex.agent.io.store import PruneResult, StoreUnavailable
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.clock import Clock

log = get_logger("housekeeping")

INTERVAL_S = 3600.0


class UpkeptStore(Protocol):
    """What the upkeep asks of the state store (agent.io.store.Store)."""

    def sign_pending_heads(self, key: Ed25519PrivateKey, site_id: str, now: float) -> list[str]: ...
    def prune(self, now: float) -> PruneResult: ...


class Housekeeping:
    def __init__(self, store: UpkeptStore, clock: Clock, site_id: str, signing_key: Ed25519PrivateKey | None) -> None:
        self.store = store
        self.clock = clock
        self.site_id = site_id
        self.signing_key = signing_key
        self.last_prune: float | None = None

    async def run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.clock.to_wall(INTERVAL_S))

    async def once(self) -> None:
        now = self.clock.time()
        if self.signing_key is not None:
            try:
                days = await asyncio.to_thread(self.store.sign_pending_heads, self.signing_key, self.site_id, now)
            except Exception:
                log.exception("daily chain heads not signed")
            else:
                if days:
                    log.info("audit chain heads signed", days=len(days), first=days[0], last=days[-1])
        if self.last_prune is None or now - self.last_prune >= DAY_S:
            try:
                result = await asyncio.to_thread(self.store.prune, now)
            except StoreUnavailable as exc:  # full, locked, read-only: try again next round, not in a day
                log.warning("retention prune postponed: the state store cannot be written now", error=str(exc))
            except Exception:
                self.last_prune = now
                log.exception("retention prune failed")
            else:
                self.last_prune = now
                deleted = result.audit_records + result.energy_minutes + result.miner_minutes + result.dispatches
                if deleted:
                    log.info(
                        "old exported records pruned",
                        cutoff=result.cutoff,
                        audit=result.audit_records,
                        energy_minutes=result.energy_minutes,
                        miner_minutes=result.miner_minutes,
                        dispatches=result.dispatches,
                    )
