"""The one way the agent writes a time: ISO 8601 in UTC with a `Z` (logs, status and state documents, replies,
exports). Pure: a Unix timestamp in, a string out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso(ts: float, *, ms: bool = ...) -> str: ...
@overload
def iso(ts: None, *, ms: bool = ...) -> None: ...
def iso(ts: float | None, *, ms: bool = False) -> str | None:
    """`ts` as ISO 8601 UTC with `Z`; `ms`: to the millisecond (documents people read), else to the microsecond
    (exports and wire timestamps, where a later reader may need the exact value). None stays None."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds" if ms else "auto")
    return text.replace("+00:00", "Z")
