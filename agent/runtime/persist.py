"""Write-behind for the control loop's own records: what it writes while controlling (audit records of targets,
actions, alarms and closed dispatches, dispatch progress, miner control memory, energy minutes) must not stop it
controlling when the state store cannot take a write (a full disk, another process's lock, a read-only or failing
file system).

`write(what, fn)` runs `fn(store)` now; when the store refuses (StoreError), the write is queued, the loop carries
on from memory, and the queue is retried in order (`flush`, every tick, at most once per `retry_every_s`): a write
never overtakes one queued before it, so the audit chain keeps the order things happened in. A write that fails for
any other reason (a bug, a row that no longer exists) is logged and dropped: retrying cannot help it.

Not for commands: a command's change, reply and audit record commit together before any `ok` (agent/runtime/
apply.py), and a command that cannot be stored is refused, never queued. Before one is applied the queue is flushed
(`flush(force=True)`): a command is stored only behind everything that happened before it.

The queue is bounded (`limit`): past it the oldest writes are dropped and counted (`dropped`); at ~10 writes a tick
that is many minutes of outage, and the loop's memory, not the queue, is what keeps the site under its limit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from hashflex.agent.io.store import StoreError
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.ports import ControlStore

log = get_logger("store")

RETRY_EVERY_S = 1.0  # wall seconds between retries of a refused store (each costs at most the busy timeout)
QUEUE_LIMIT = 20_000


class WriteBehind:
    def __init__(
        self,
        store: ControlStore,
        *,
        retry_every_s: float = RETRY_EVERY_S,
        limit: int = QUEUE_LIMIT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.retry_every_s = retry_every_s
        self.limit = limit
        self._monotonic = monotonic
        self._queue: deque[tuple[str, Callable[[ControlStore], object]]] = deque()
        self._retry_at = 0.0
        self.error: str | None = None  # why the store refused the last write (None: it takes writes)
        self.failed_since: float | None = None  # monotonic time of the first refusal of this outage
        self.dropped = 0

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def write(self, what: str, fn: Callable[[ControlStore], object]) -> bool:
        """Run `fn(store)` now, or queue it behind earlier refused writes. True when it was written now."""
        if not self._queue:
            try:
                fn(self.store)
            except StoreError as exc:
                self._refused(what, exc)
            except Exception:
                log.exception("store write failed; dropped", what=what)
                return False
            else:
                return True
        self._queue.append((what, fn))
        if len(self._queue) > self.limit:
            lost, _ = self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("store write-behind queue full; oldest writes dropped", dropped=self.dropped, last=lost)
        return False

    def call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """`store.<method>(*args, **kwargs)` now, or queued behind earlier refused writes (see `write`)."""
        return self.write(method, lambda s: getattr(s, method)(*args, **kwargs))

    def audit(self, kind: str, data: Mapping[str, Any], ts: float) -> bool:
        record = dict(data)  # the caller may reuse its dict (events): what is queued is what happened now
        return self.write(f"audit {kind}", lambda s: s.append_audit(kind, record, ts))

    def flush(self, *, force: bool = False) -> bool:
        """Retry the queued writes in order until one is refused; True when none is left. Without `force` at most
        once per retry_every_s (a refused store costs up to its busy timeout per attempt)."""
        if not self._queue:
            return True
        now = self._monotonic()
        if not force and now < self._retry_at:
            return False
        while self._queue:
            what, fn = self._queue[0]
            try:
                fn(self.store)
            except StoreError as exc:
                self._refused(what, exc)
                return False
            except Exception:
                log.exception("queued store write failed; dropped", what=what)
            self._queue.popleft()
        outage_s = round(now - (self.failed_since or now), 1)
        log.warning("state store takes writes again; queued writes stored", after_s=outage_s, dropped=self.dropped)
        self.error, self.failed_since = None, None
        return True

    def _refused(self, what: str, exc: StoreError) -> None:
        now = self._monotonic()
        self._retry_at = now + self.retry_every_s
        if self.error is None:
            self.failed_since = now
            log.error("state store refuses writes; controlling from memory, retrying", what=what, error=str(exc))
        self.error = str(exc)
