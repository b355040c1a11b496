"""The one way the agent writes a time: ISO 8601 in UTC with a `Z` (logs, status and state documents, replies,
events, exports, signed commands' `issued_at`), and reads one back for display. Pure: a Unix timestamp in, a string
out (and back)."""

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


@overload
def iso_ms(ts: float) -> str: ...
@overload
def iso_ms(ts: None) -> None: ...
def iso_ms(ts: float | None) -> str | None:
    """`iso(ts, ms=True)`: the form of the status document, events and dispatch documents."""
    return iso(ts, ms=True)


def epoch(value: object) -> float | None:
    """Unix time from an ISO 8601 string as `iso` writes it (a zone-less one is read as UTC); None for anything
    else. For readers of documents (the CLI, the metrics): a request's times are checked by
    contract.requests.parse_timestamp instead."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
