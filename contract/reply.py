"""The reply to every request: `{id, status, data, error}` (zigbee2mqtt-style request/response), and its error codes.

`id` echoes the request's; `status` is "ok" or "error"; `data` is the verb's answer; `error` (only on an error) is
`{code, message}`: `code` one of the constants below (a program branches on it), `message` words for a person.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------------ refused at the gate
TOO_LARGE = "too_large"
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"  # schema, types, unknown fields
UNKNOWN_VERB = "unknown_verb"
OUT_OF_RANGE = "out_of_range"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
DISABLED = "disabled"
EXPIRED = "expired"
FUTURE = "future"
RETAINED = "retained"
WRONG_SCOPE = "wrong_scope"  # a signed document for another site or another verb
# ------------------------------------------------------------- refused when applying a well-formed command
UNKNOWN_DISPATCH = "unknown_dispatch"
STALE_REVISION = "stale_revision"
CONFLICT = "conflict"
STALE = "stale"  # issued before a newer command of the same kind that was already applied
INTERNAL = "internal"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Reply:
    """`{id, status, data, error}` on the wire."""

    id: str | None
    status: str  # "ok" | "error"
    data: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def ok(cls, request_id: str | None, data: Mapping[str, Any] | None = None) -> Reply:
        # a copy: the reply keeps what was true when it was made (a typed document is a Mapping, not a dict)
        return cls(request_id, "ok", dict(data) if data else {})

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
