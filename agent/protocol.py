"""The contract between the command transports (MQTT, the local control socket) and the runtime.

Transports are thin: they hand the raw verb and payload to one `CommandHandler` and send back the `Reply`
it returns. Parsing, signature checks, freshness, idempotency and applying the command all live behind it,
so MQTT and the CLI share one set of verbs and one validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Channel(StrEnum):
    MQTT = "mqtt"  # remote: grid commands must be signed by a grid key, operator ones by an operator key
    LOCAL = "local"  # the Unix control socket: trusted by file permissions (owner and operator group)


@dataclass(frozen=True, slots=True)
class Reply:
    """`{id, status, data, error}` on the wire (zigbee2mqtt-style request/response)."""

    id: str | None
    status: str  # "ok" | "error"
    data: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def ok(cls, request_id: str | None, data: dict[str, Any] | None = None) -> Reply:
        return cls(request_id, "ok", data or {})

    @classmethod
    def error(cls, request_id: str | None, code: str, message: str) -> Reply:
        return cls(request_id, "error", {}, code, message)

    @property
    def is_ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status, "data": self.data}
        if self.status != "ok":
            out["error"] = {"code": self.error_code, "message": self.error_message}
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str).encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Reply:
        err = raw.get("error") or {}
        return cls(
            raw.get("id"), raw.get("status", "error"), raw.get("data") or {}, err.get("code"), err.get("message")
        )


class CommandHandler(Protocol):
    async def handle(self, verb: str, payload: bytes, channel: Channel, *, retained: bool = False) -> Reply:
        """Validate and apply one request. Never raises for bad input: bad input is an error Reply."""
        ...


class HeartbeatSink(Protocol):
    def heartbeat(self, payload: bytes) -> None:
        """A grid heartbeat arrived (the fail-safe's input), unchecked: the sink (agent.runtime.service) passes on
        only a signed, fresh one for this site, newer than the last. Non-blocking; never raises."""
        ...
