"""The program state, durable and replicated: one JetStream key-value entry (replicas 3), written with a
compare-and-set on the revision this instance last read or wrote, so a deposed leader's late write is refused
instead of overwriting the new leader's state. Also the coordinator's NATS connection (`connect_nats`): this module and
the lease are the only ones that speak NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from hashflex.agent.logging import get_logger
from hashflex.coordinator.program import ProgramState

log = get_logger("coordinator.store")


class StateConflict(RuntimeError):
    """Someone else wrote the program state since this instance read it: it must reload before it acts."""


class JetStreamProgramStore:
    def __init__(self, js: JetStreamContext, program_id: str, *, bucket: str = "hashflex_program",
                 replicas: int = 3) -> None:  # fmt: skip
        self.js = js
        self.key = program_id
        self.bucket = bucket
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._revision: int | None = None

    async def _open(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.create_key_value(
                KeyValueConfig(bucket=self.bucket, history=1, replicas=self.replicas, storage=StorageType.FILE)
            )
        return self._kv

    async def load(self) -> ProgramState | None:
        kv = await self._open()
        try:
            entry = await kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            self._revision = None
            return None
        self._revision = entry.revision
        return None if entry.value is None else ProgramState.from_dict(json.loads(entry.value))

    async def save(self, state: ProgramState) -> None:
        kv = await self._open()
        value = json.dumps(state.to_dict(), separators=(",", ":")).encode()
        try:
            if self._revision is None:
                self._revision = await kv.create(self.key, value)
            else:
                self._revision = await kv.update(self.key, value, last=self._revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            self._revision = None
            raise StateConflict(f"program {self.key!r}: the state was written by another instance") from exc


async def connect_nats(servers: list[str], holder: str, stop: asyncio.Event) -> NatsClient | None:
    """A NATS connection, waited for until the cluster answers or `stop` is set (None then): a cluster still
    starting, or this host cut off, is waited out, not a failed start. nats-py retries on its own (for ever,
    max_reconnect_attempts=-1), so the attempt races `stop` rather than being retried here."""
    seen: set[str] = set()

    async def nats_error(exc: Exception) -> None:
        if repr(exc) not in seen:  # once per distinct error, not every 0.5-s retry
            seen.add(repr(exc))
            log.warning("nats_error", servers=servers, error=repr(exc)[:200])

    connecting = asyncio.create_task(
        nats.connect(servers=servers, name=holder, reconnect_time_wait=0.5, max_reconnect_attempts=-1,
                     connect_timeout=2, error_cb=nats_error)
    )  # fmt: skip
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if connecting.done():
        return connecting.result()  # a failure that nats-py gave up on is a failed start
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError):
        await connecting
    return None
