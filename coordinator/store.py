"""The program state, durable and replicated: one JetStream key-value entry (replicas 3), written with a
compare-and-set on the revision this instance last read or wrote, so a deposed leader's late write is refused
instead of overwriting the new leader's state. The coordinator's audit chain (`JetStreamAuditLog`): an append-only
stream, one per program, each record appended with a compare-and-set on the stream's last sequence (why:
coordinator/audit.py). Also the coordinator's NATS connection (`connect_nats`, and `connect_once` for a command):
this module and the lease are the only ones that speak NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from hashflex.agent.core.audit import AuditRecord
from hashflex.agent.logging import get_logger
from hashflex.agent.runtime.cancel import within
from hashflex.coordinator.audit import GENESIS_HASH, ChainConflict, next_record, record_from_dict
from hashflex.coordinator.program import ProgramState, StateConflict

__all__ = ["JetStreamAuditLog", "JetStreamProgramStore", "NoChain", "StateConflict", "connect_nats", "connect_once"]

log = get_logger("coordinator.store")

# JetStream's error codes for a failed expected-last-(subject-)sequence: nats-py maps them to
# KeyWrongLastSequenceError in `KeyValue.update`, but not on every path (a `create` over a key another instance
# wrote came back as a plain BadRequestError 10071); both mean the same thing here
WRONG_LAST_SEQUENCE = 10071
WRONG_LAST_SEQUENCE_CONSTANT = 10164


class JetStreamProgramStore:
    def __init__(
        self, js: JetStreamContext, program_id: str, *, bucket: str = "hashflex_program", replicas: int = 3
    ) -> None:
        self.js = js
        self.key = program_id
        self.bucket = bucket
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._revision: int | None = None
        self._conflicted = False  # a write was refused: nothing more is written until the state is loaded again

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
            self._revision, self._conflicted = None, False
            return None
        self._revision, self._conflicted = entry.revision, False
        return None if entry.value is None else ProgramState.from_dict(json.loads(entry.value))

    async def save(self, state: ProgramState) -> None:
        """Write `state` over the revision this instance last read or wrote. StateConflict when another instance
        wrote since (nothing written), and on every save after that until `load`: an instance that lost a race
        must read the state again before it writes, never `create` over a key it merely failed to update."""
        if self._conflicted:
            raise StateConflict(f"program {self.key!r}: the state must be read again before it is written")
        kv = await self._open()
        value = json.dumps(state.to_dict(), separators=(",", ":")).encode()
        try:
            if self._revision is None:
                self._revision = await kv.create(self.key, value)
            else:
                self._revision = await kv.update(self.key, value, last=self._revision)
        except nats.js.errors.APIError as exc:
            if not (
                isinstance(exc, nats.js.errors.KeyWrongLastSequenceError)
                or exc.err_code in (WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_CONSTANT)
            ):
                raise
            # the revision held is not the stored one: only a `load` (the state read again) may write next
            self._revision = None
            self._conflicted = True
            raise StateConflict(f"program {self.key!r}: the state was written by another instance") from exc


class NoChain(LookupError):
    """The program has no audit stream (no coordinator of it has run against this cluster)."""


class JetStreamAuditLog:
    """One program's audit chain on a JetStream stream: record seq = stream sequence, appended by compare-and-set.

    The stream denies deletes and purges (append-only through the API) and keeps everything (no limits): pruning
    a regulator's trail is a decision for an operator with the NATS admin tools, after an export."""

    def __init__(self, js: JetStreamContext, stream: str, *, replicas: int = 3) -> None:
        self.js = js
        self.stream = stream
        self.subject = f"hashflex_audit.{stream}"
        self.replicas = replicas
        self._open_done = False
        self._head: tuple[int, str] | None = None  # (seq, hash) of the last record as this writer knows it

    async def _open(self, *, create: bool = True) -> None:
        if self._open_done:
            return
        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if not create:
                raise
            await self.js.add_stream(
                StreamConfig(
                    name=self.stream,
                    subjects=[self.subject],
                    storage=StorageType.FILE,
                    num_replicas=self.replicas,
                    deny_delete=True,
                    deny_purge=True,
                    description="hashflex coordinator audit chain",
                )
            )
        self._open_done = True

    async def head(self) -> tuple[int, str]:
        """(seq, hash) of the chain's last record: (0, genesis) when it is empty."""
        await self._open()
        info = await self.js.stream_info(self.stream)
        last = int(info.state.last_seq)
        if last == 0:
            return 0, GENESIS_HASH
        record = record_from_dict(json.loads((await self.js.get_msg(self.stream, last)).data or b"null"))
        if record.seq != last:
            raise ValueError(f"audit stream {self.stream}: message {last} holds record {record.seq}")
        return record.seq, record.hash

    async def append(self, ts: float, kind: str, data: Mapping[str, Any]) -> AuditRecord:
        """Append one record after the head this writer knows (read on first use and after a conflict).
        ChainConflict when someone else appended since: nothing written; the next call re-reads the head."""
        await self._open()
        if self._head is None:
            self._head = await self.head()
        seq, prev = self._head
        record = next_record(seq, prev, ts, kind, data)
        payload = json.dumps(record.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()
        try:
            ack = await self.js.publish(
                self.subject, payload, stream=self.stream, headers={"Nats-Expected-Last-Sequence": str(seq)}
            )
        except nats.js.errors.APIError as exc:
            self._head = None
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise ChainConflict(f"audit stream {self.stream}: the chain moved past record {seq}") from exc
            raise
        if ack.seq != record.seq:  # cannot happen with the expected-sequence header; never trust it silently
            self._head = None
            raise ChainConflict(f"audit stream {self.stream}: record {record.seq} stored at {ack.seq}")
        self._head = (record.seq, record.hash)
        return record

    async def last_seq(self) -> int:
        """The stream's last sequence (NoChain when there is no stream: a reader never creates one)."""
        try:
            await self._open(create=False)
            return int((await self.js.stream_info(self.stream)).state.last_seq)
        except nats.js.errors.NotFoundError:
            raise NoChain(self.stream) from None

    async def records(self, *, wait_s: float = 5.0) -> AsyncIterator[tuple[int, dict[str, Any] | None]]:
        """(stream sequence, the stored document or None when it is not JSON), oldest first, up to the last record
        stored when the read began. An ordered consumer: no state left on the server."""
        last = await self.last_seq()
        if last == 0:
            return
        sub = await self.js.subscribe(self.subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                msg = await sub.next_msg(timeout=wait_s)
                seq = msg.metadata.sequence.stream
                try:
                    doc = json.loads(msg.data)
                except ValueError:
                    doc = None
                yield seq, doc if isinstance(doc, dict) else None
                if seq >= last:
                    return
        finally:
            await sub.unsubscribe()


async def connect_once(servers: list[str], timeout_s: float) -> NatsClient:
    """A connection for a command (`program audit verify`): each server tried once; OSError naming them when
    none answers within `timeout_s`."""
    problems: list[str] = []

    async def quiet(exc: Exception) -> None:
        problems.append(str(exc) or type(exc).__name__)

    try:
        return await within(
            nats.connect(
                servers=servers,
                connect_timeout=timeout_s,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
                name="hashflex-program-cli",
            ),
            timeout_s * len(servers) + 1,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        why = problems[-1] if problems else str(exc) or type(exc).__name__
        raise OSError(f"no NATS server answered ({', '.join(servers)}): {why}") from None


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
        nats.connect(
            servers=servers,
            name=holder,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,
            connect_timeout=2,
            error_cb=nats_error,
        )
    )
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if connecting.done():
        return connecting.result()  # a failure that nats-py gave up on is a failed start
    # cancelled until it is done, bounded: on 3.11 a cancel can be swallowed by a `wait_for` inside nats-py
    for _ in range(25):
        connecting.cancel()
        await asyncio.wait([connecting], timeout=0.2)
        if connecting.done():
            break
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        with contextlib.suppress(Exception):  # it connected as the stop came: not kept
            async with asyncio.timeout(2):
                await connecting.result().close()
    return None
