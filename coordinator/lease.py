"""The leader lease: exactly one coordinator instance acts, chosen through JetStream's key-value store.

Every instance runs a `Lease` on the same bucket (replicated on the cluster's three nodes, `replicas=3`, with a
TTL: the bucket's max age). One key holds the lease: {holder, lease_id, ttl_s, since, renewed}.

- Acquire: `create(key)`, which the server accepts only while the key does not exist (it is gone once the
  holder stopped renewing for the TTL: the server ages it out; or when the holder released it).
- Renew: `update(key, last=revision)`, a compare-and-set on the revision the holder last wrote. It fails the
  moment anyone else wrote the key.
- Step down: at once when a renewal is refused (someone else wrote the key), and when the lease is older than
  its TTL by our own monotonic clock: renewals that go unanswered (a node lost, the lease stream electing a
  new leader, which takes nats-server 4–9 s) are retried, but never past that. The validity is counted from
  *before* the last write that was accepted, minus a safety margin, so it always ends before the server can
  age the entry out (same clock rate assumed; the server ages by its wall clock, so a server clock stepped
  forward by more than the margin could end it early: run NTP in slew mode).
- A holder whose renewal failed but whose write did land (the reply was lost in a node failure) finds its own
  lease_id in the entry and takes it back with a compare-and-set on that revision; any other holder's entry is
  left alone until it ages out.

`is_leader` reads the clock every time, so code that acts checks it right before acting (and `remaining_s`
for how long it may count on it).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from hashflex.agent.core import timefmt
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.cancel import raise_if_cancelled, within

log = get_logger("coordinator.lease")

# a connection lost, a request timed out, no stream leader yet (no responders), a JetStream API error
_NATS_FAILURES = (nats.errors.Error, TimeoutError, OSError)
INELIGIBLE_GRACE_S = 2.0  # a leader that cannot act this long gives the lease up (a reconnect is quicker)


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    bucket: str = "hashflex_coordinator"
    key: str = "leader"
    ttl_s: float = 6.0  # the bucket's max age: how long a silent holder keeps the lease
    renew_every_s: float | None = None  # default ttl / 4 (also how often a follower tries to acquire)
    op_timeout_s: float | None = None  # one KV request; default ttl / 4
    safety_s: float | None = None  # the holder stops counting on the lease this long before it could age out
    replicas: int = 3

    def __post_init__(self) -> None:
        for name in ("ttl_s", "renew_every_s", "op_timeout_s", "safety_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"lease.{name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and name != "safety_s"):
                raise ValueError(f"lease.{name} must be > 0, got {value!r}")
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= 5:
            raise ValueError(f"lease.replicas must be 1–5, got {self.replicas!r}")
        if not self.bucket or not self.key:
            raise ValueError("lease.bucket and lease.key must not be empty")
        # a renewal must be able to start and finish while the lease is still ours
        if self.renew + self.op_timeout >= self.ttl_s - self.safety:
            raise ValueError(
                f"lease: renew_every_s ({self.renew}) + op_timeout_s ({self.op_timeout}) must be below "
                f"ttl_s − safety_s ({self.ttl_s} − {self.safety})"
            )

    @property
    def renew(self) -> float:
        return self.ttl_s / 4 if self.renew_every_s is None else self.renew_every_s

    @property
    def op_timeout(self) -> float:
        return self.ttl_s / 4 if self.op_timeout_s is None else self.op_timeout_s

    @property
    def safety(self) -> float:
        return self.ttl_s / 10 if self.safety_s is None else self.safety_s


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What the lease key holds (its JSON value) and the revision it was read at."""

    holder: str
    lease_id: str
    ttl_s: float
    since: str
    renewed: str
    revision: int

    @classmethod
    def parse(cls, raw: bytes, revision: int) -> LeaseRecord | None:
        try:
            doc = json.loads(raw)
            return cls(
                str(doc["holder"]),
                str(doc["lease_id"]),
                float(doc["ttl_s"]),
                str(doc["since"]),
                str(doc["renewed"]),
                revision,
            )
        except (ValueError, KeyError, TypeError):
            return None


def _utc_now() -> str:
    return timefmt.iso(time.time(), ms=True)


class Lease:
    """One instance's view of the lease: `run()` keeps acquiring or renewing; `is_leader` says whether to act."""

    def __init__(
        self,
        js: JetStreamContext,
        holder: str,
        config: LeaseConfig | None = None,
        *,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        eligible: Callable[[], bool] | None = None,
    ) -> None:
        if not holder:
            raise ValueError("lease holder must not be empty")
        self.js = js
        self.holder = holder
        self.config = config or LeaseConfig()
        self._on_change = on_change
        self._clock = clock
        self._kv: KeyValue | None = None
        self._lease_id = uuid.uuid4().hex  # ours: recognises our own write after a lost reply
        self._revision: int | None = None
        self._valid_until = -math.inf
        self._since = ""
        self._leading = False
        self._changed = asyncio.Event()
        self.last_seen: LeaseRecord | None = None  # the holder's record as last read by a follower
        self._open_error: str | None = None  # logged once per distinct error, not every round
        # can this instance act now (the coordinator: connected to the site fabric)? One that cannot does not take
        # the lease, and gives it up when it has been unable to act for INELIGIBLE_GRACE_S: leading without a link
        # to the sites it counted every site at its cap and raised "cannot be met" alarms while a connected follower
        # waited (seen after a NATS node loss, 7 s)
        self._eligible = eligible
        self._ineligible_since: float | None = None

    # ------------------------------------------------------------------------------------------- state
    @property
    def is_leader(self) -> bool:
        return self._revision is not None and self._clock() < self._valid_until

    def remaining_s(self) -> float:
        """How long this instance may still count on being the leader (0 when it is not)."""
        return max(0.0, self._valid_until - self._clock()) if self._revision is not None else 0.0

    @property
    def revision(self) -> int | None:
        return self._revision

    @property
    def valid_until(self) -> float:
        """On this instance's clock: when it stops counting on the lease (−inf when it does not hold it)."""
        return self._valid_until if self._revision is not None else -math.inf

    async def wait_changed(self) -> None:
        """Until leadership changes (either way)."""
        self._changed.clear()
        await self._changed.wait()

    # ------------------------------------------------------------------------------------------- setup
    async def open(self) -> KeyValue:
        """The lease bucket, created if missing (the same config from every instance is accepted by the server)."""
        if self._kv is None:
            cfg = self.config
            self._kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=cfg.bucket,
                    description="hashflex coordinator leader lease",
                    history=1,
                    ttl=cfg.ttl_s,
                    replicas=cfg.replicas,
                    storage=StorageType.FILE,
                )
            )
        return self._kv

    # --------------------------------------------------------------------------------------------- loop
    async def run(self) -> None:
        """Acquire or renew every `renew_every_s`, for ever. Cancelling it does NOT release the lease (a crash
        looks the same to the others); call `release()` on a clean shutdown."""
        while True:
            await self.step()
            raise_if_cancelled()  # a cancel that nats-py's request swallowed (Python 3.11's wait_for)
            delay = self.config.renew
            if self._revision is not None:  # wake at the latest when our own count runs out
                delay = min(delay, max(0.0, self._valid_until - self._clock()))
            await asyncio.sleep(delay)

    async def step(self) -> bool:
        """One round: renew if we hold the lease, else try to acquire it. Returns `is_leader`."""
        if self._eligible is not None and not self._eligible():
            now = self._clock()
            self._ineligible_since = self._ineligible_since if self._ineligible_since is not None else now
            if self._revision is None:
                return False  # no lease taken by an instance that cannot act
            if now - self._ineligible_since >= INELIGIBLE_GRACE_S:
                log.warning(
                    "lease given up: this instance cannot act",
                    holder=self.holder,
                    for_s=round(now - self._ineligible_since, 1),
                )
                await self.release()
                return False
        else:
            self._ineligible_since = None
        try:  # creating the replicated bucket the first time takes longer than one KV request
            kv = await within(self.open(), self.config.ttl_s)
        except _NATS_FAILURES as exc:
            # e.g. no JetStream yet, or a bucket of the same name made with another TTL or replica count
            if repr(exc) != self._open_error:
                log.warning("lease_bucket_unavailable", holder=self.holder, bucket=self.config.bucket, error=repr(exc))
            self._open_error = repr(exc)
            return False
        self._open_error = None
        if self._revision is not None and self._clock() >= self._valid_until:
            self._lose("the lease is older than its TTL by our clock (renewals were late)")
        if self._revision is not None:
            await self._renew(kv)
        else:
            await self._acquire(kv)
        self._set_leading(self.is_leader)
        return self.is_leader

    async def release(self) -> None:
        """Give the lease up now (clean shutdown): a compare-and-set delete, so a lease already lost is untouched."""
        revision = self._revision
        self._revision = None
        self._valid_until = -math.inf
        self._set_leading(False)
        if revision is None or self._kv is None:
            return
        try:
            await within(self._kv.delete(self.config.key, last=revision), self.config.op_timeout)
            log.info("lease_released", holder=self.holder, revision=revision)
        except _NATS_FAILURES as exc:  # it ages out within the TTL anyway
            log.warning("lease_release_failed", holder=self.holder, error=repr(exc))

    async def current(self) -> LeaseRecord | None:
        """The lease as stored now (None: nobody holds it)."""
        kv = await self.open()
        try:
            entry = await within(kv.get(self.config.key), self.config.op_timeout)
        except nats.js.errors.KeyNotFoundError:
            return None
        return LeaseRecord.parse(entry.value or b"", entry.revision or 0)

    # -------------------------------------------------------------------------------------------- inner
    def _value(self) -> bytes:
        doc = {
            "holder": self.holder,
            "lease_id": self._lease_id,
            "ttl_s": self.config.ttl_s,
            "since": self._since or _utc_now(),
            "renewed": _utc_now(),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def _won(self, revision: int, started: float, how: str) -> None:
        first = self._revision is None
        self._revision = revision
        # from before the write: the server stamped it later, so it cannot age out before this
        self._valid_until = started + self.config.ttl_s - self.config.safety
        if first:
            log.info("lease_acquired", holder=self.holder, revision=revision, how=how, ttl_s=self.config.ttl_s)

    def _lose(self, why: str, exc: BaseException | None = None) -> None:
        if self._revision is not None:
            log.warning(
                "lease_lost",
                holder=self.holder,
                revision=self._revision,
                why=why,
                error=None if exc is None else repr(exc),
            )
        self._revision = None
        self._valid_until = -math.inf
        self._set_leading(False)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        self._changed.set()
        if self._on_change is not None:
            self._on_change(leading)

    async def _renew(self, kv: KeyValue) -> None:
        assert self._revision is not None
        started = self._clock()
        try:
            revision = await within(
                kv.update(self.config.key, self._value(), last=self._revision), self.config.op_timeout
            )
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            record = await self._read(kv)
            if record is not None and record.lease_id == self._lease_id:
                # our own earlier renewal landed though its reply was lost: go on from its revision (the
                # validity still counts from the last renewal we saw accepted)
                self._revision = record.revision
                return
            self._lose("renewal refused: someone else wrote the lease", exc)
            return
        except _NATS_FAILURES as exc:
            # not refused, only not answered (a node or the stream leader lost, an election under way): nobody
            # can have taken the lease before it ages out, so keep it until our own clock ends it, and retry
            log.warning(
                "lease_renewal_failed",
                holder=self.holder,
                revision=self._revision,
                error=repr(exc),
                remaining_s=round(self.remaining_s(), 3),
            )
            return
        self._won(revision, started, "renewed")

    async def _read(self, kv: KeyValue) -> LeaseRecord | None:
        try:
            entry = await within(kv.get(self.config.key), self.config.op_timeout)
        except _NATS_FAILURES:  # KeyNotFoundError included
            return None
        return LeaseRecord.parse(entry.value or b"", entry.revision or 0)

    async def _acquire(self, kv: KeyValue) -> None:
        started = self._clock()
        self._since = _utc_now()
        try:
            revision = await within(kv.create(self.config.key, self._value()), self.config.op_timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._reclaim(kv)  # someone holds it: perhaps us, from before a renewal whose reply was lost
            return
        except _NATS_FAILURES as exc:
            log.debug("lease_acquire_failed", holder=self.holder, error=repr(exc))
            return
        self._won(revision, started, "created")

    async def _reclaim(self, kv: KeyValue) -> None:
        record = await self._read(kv)  # None: it aged out meanwhile (the next round creates it) or no answer
        self.last_seen = record
        if record is None or record.lease_id != self._lease_id:
            return
        started = self._clock()
        self._since = record.since
        try:
            revision = await within(
                kv.update(self.config.key, self._value(), last=record.revision), self.config.op_timeout
            )
        except _NATS_FAILURES:
            return
        self._won(revision, started, "reclaimed")
