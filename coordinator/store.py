"""The program state, durable and replicated: one JetStream key-value entry (replicas 3), written with a
compare-and-set on the revision this instance last read or wrote, so a deposed leader's late write is refused
instead of overwriting the new leader's state."""

from __future__ import annotations

import json

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from hashflex.coordinator.program import ProgramState


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
