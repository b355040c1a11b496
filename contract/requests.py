"""The requests a site accepts, one pydantic model per verb, on `<root>/<site>/cmd/<verb>` and the local control
socket, and what every request must look like before the agent reads it: the strict JSON reader (`load_json`), the
field converters (ISO or epoch timestamps, powers and durations with units) and the wire's limits.

Who may send what (the agent's gate, agent.commands, checks it; `Request.kind` says which rule applies):
- grid verbs (`dispatch`, `cancel`) carry a grid signature on EVERY channel;
- `cap` needs a grid signature over MQTT; on the local socket it is an operator command;
- operator verbs (`curtail`, `resume`) over MQTT need an operator signature;
- read verbs (`READ_VERBS`: `ping`, `status`, `miners`, `preview`, `dispatches`, `events`) are open on both channels.
Any signed request carries `id`, `issued_at`, `site` and `verb` (`SCOPE_FIELDS`), all under the signature
(contract.signing, format `hashflex-sig-v2`). Unknown fields are errors.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from hashflex.contract.units import parse_duration_s, parse_power_kw
from hashflex.contract.vocabulary import MinerState

MAX_ID_LEN = 128
# the envelope of a signed command: what it is for, outside the verb's own fields (see contract.signing)
SCOPE_FIELDS = ("site", "verb")
MAX_DEPTH = 16  # a command is a flat object; nothing legitimate nests deeper than this
MAX_INT_DIGITS = 18  # |n| < 10**18: every integer field fits, and no huge int reaches float() or int limits
# timestamps: epoch seconds between 2000-01-01 and 2200-01-01 (epoch milliseconds land far beyond it)
MIN_TIMESTAMP = 946_684_800.0
MAX_TIMESTAMP = 7_258_118_400.0
MAX_AHEAD_S = 400 * 86400.0  # a dispatch window may start or end at most this far after the agent's now
MAX_DURATION_S = 366 * 86400.0  # an operator override lasts at most a year (or until `hashflex resume`)
MAX_RAMP_KW_PER_MIN = 1e7
# operator overrides live in their own id namespace: their dispatch ids carry this prefix, so a grid dispatch and a
# local override with the same id never meet (the grid may not use the prefix, nor the safe start's id)
OPERATOR_ID_PREFIX = "op:"
RESERVED_GRID_IDS = frozenset({"safe-start"})


# ------------------------------------------------------------------------------------------- field converters
def parse_timestamp(value: Any) -> float:
    """Epoch seconds from an ISO 8601 time with a zone (`2025-01-01T12:00:00Z`) or a number of epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("must be an ISO 8601 time such as 2025-01-01T12:00:00Z")
    if isinstance(value, int | float):
        try:
            ts = float(value)
        except OverflowError:
            ts = math.inf
        if not math.isfinite(ts):
            raise ValueError("must be a finite number of epoch seconds")
        return _in_window(ts, value)
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time such as 2025-01-01T12:00:00Z")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time (e.g. 2025-01-01T12:00:00Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone: add Z for UTC (e.g. 2025-01-01T12:00:00Z)")
    try:
        ts = parsed.timestamp()
    except (OverflowError, ValueError):  # a zone offset that pushes year 9999 over the edge
        raise ValueError(f"{value!r} is outside the accepted window (2000-01-01 to 2200-01-01 UTC)") from None
    return _in_window(ts, value)


def _in_window(ts: float, value: Any) -> float:
    # the store, the audit and every ISO rendering must be able to hold it; epoch milliseconds are the usual mistake
    if not MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:
        raise ValueError(
            f"{value!r} is outside the accepted window (2000-01-01 to 2200-01-01 UTC; epoch seconds, not milliseconds)"
        )
    return ts


def _power(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number of kW or a string such as '12MW' or '850kW'")
    try:
        kw = parse_power_kw(value)
    except OverflowError:
        kw = math.inf
    if not math.isfinite(kw):
        raise ValueError("must be a finite power")
    if kw < 0:
        raise ValueError(f"{value!r} is negative: powers are ≥ 0 kW")
    return kw


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be seconds or a string such as '30m' or '2h'")
    try:
        seconds = parse_duration_s(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be longer than 0 s")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{value!r} is outside the accepted range: at most {MAX_DURATION_S / 86400:.0f} days")
    return seconds


Timestamp = Annotated[float, BeforeValidator(parse_timestamp)]
PowerKw = Annotated[float, BeforeValidator(_power)]
DurationS = Annotated[float, BeforeValidator(_duration)]
CommandId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9_.:@/+-]+$")]


# ------------------------------------------------------------------------------------------------ requests
class Request(BaseModel):
    """Every request may carry an id, an issue time and a signature; unknown fields are errors."""

    # allow_inf_nan=False: "inf"/"nan" strings are refused by every float field, not only by the JSON hooks
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    verb: ClassVar[str] = ""
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "read"
    id: CommandId | None = None
    issued_at: Timestamp | None = None
    signature: str | None = Field(None, min_length=1, max_length=512)
    # optional fields added to a verb after its replies were first stored: left out of the request digest while at
    # their default, so a retry of a request stored before they existed is still recognised as the same request
    added_fields: ClassVar[frozenset[str]] = frozenset()
    # fields a verb no longer has, at the value every stored request had them: kept in the request digest
    retired_fields: ClassVar[dict[str, object]] = {}


class PingRequest(Request):
    verb: ClassVar[str] = "ping"


class DispatchRequest(Request):
    """Hold the site at `target_kw`, or `curtail_kw` below its power at acceptance, from start to end."""

    verb: ClassVar[str] = "dispatch"
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "grid"
    id: CommandId
    issued_at: Timestamp
    target_kw: PowerKw | None = None
    curtail_kw: PowerKw | None = None
    start: Timestamp | None = None
    end: Timestamp | None = None
    ramp_kw_per_min: float | None = Field(
        None, le=MAX_RAMP_KW_PER_MIN, description="> 0 kW/min; None = as fast as allowed."
    )
    rev: int = Field(0, ge=0, le=2**31)
    # `priority` was accepted here and had no effect (the lowest level in force always binds: a priority that let one
    # dispatch override a lower one would break the lower one's promise); removed in contract 1.0. A request digest
    # still counts it at its old default, so a retry of a dispatch answered before is recognised as the same request.
    retired_fields: ClassVar[dict[str, object]] = {"priority": 0}

    @model_validator(mode="after")
    def _shape(self) -> DispatchRequest:
        if (self.target_kw is None) == (self.curtail_kw is None):
            raise ValueError("give exactly one of target_kw (a level) and curtail_kw (a reduction)")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        if self.ramp_kw_per_min is not None and not (self.ramp_kw_per_min > 0):
            raise ValueError("ramp_kw_per_min must be > 0 (leave it out for no ramp)")
        return self


class CancelRequest(Request):
    verb: ClassVar[str] = "cancel"
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "grid"
    id: CommandId
    issued_at: Timestamp
    dispatch_id: CommandId


class CapRequest(Request):
    """Lower (or restore, up to the licensed cap) the site cap at run time."""

    verb: ClassVar[str] = "cap"
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "cap"
    cap_kw: PowerKw
    # local socket only: also clear the grid's run-time cap (audited); without it an operator cap never lifts the
    # grid's, the lower of the two binds (agent/runtime/apply.py `_cap`)
    lift_grid_cap: bool = False


class CurtailRequest(Request):
    """An operator override: hold the site at `to_kw`, or `by_kw` below its power now, for `for_s` (or until resume).

    It replaces the operator overrides in force (an operator means "hold it here now", not "and also there"), unless
    `add` is true: then it is held beside them and the lowest level binds. Optional on the wire: a sender that does
    not know it gets the replacing behaviour."""

    verb: ClassVar[str] = "curtail"
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "operator"
    added_fields: ClassVar[frozenset[str]] = frozenset({"add"})
    to_kw: PowerKw | None = None
    by_kw: PowerKw | None = None
    for_s: DurationS | None = None
    add: bool = False

    @model_validator(mode="after")
    def _shape(self) -> CurtailRequest:
        if (self.to_kw is None) == (self.by_kw is None):
            raise ValueError("give exactly one of to_kw (a level) and by_kw (a reduction)")
        return self


class ResumeRequest(Request):
    """End every operator override."""

    verb: ClassVar[str] = "resume"
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "operator"


class StatusRequest(Request):
    verb: ClassVar[str] = "status"


MinerSortKey = Literal["ip", "model", "state", "power", "limit", "hashrate", "efficiency", "temp", "last_seen"]


class MinersRequest(Request):
    verb: ClassVar[str] = "miners"
    state: MinerState | None = None
    sort: MinerSortKey = "ip"
    desc: bool = False
    limit: int | None = Field(None, ge=1, le=100_000)


class PreviewRequest(Request):
    verb: ClassVar[str] = "preview"
    target_kw: PowerKw


class DispatchesRequest(Request):
    verb: ClassVar[str] = "dispatches"
    all: bool = False


class EventsRequest(Request):
    verb: ClassVar[str] = "events"
    limit: int = Field(100, ge=1, le=10_000)


REQUESTS: dict[str, type[Request]] = {
    cls.verb: cls
    for cls in (
        PingRequest,
        DispatchRequest,
        CancelRequest,
        CapRequest,
        CurtailRequest,
        ResumeRequest,
        StatusRequest,
        MinersRequest,
        PreviewRequest,
        DispatchesRequest,
        EventsRequest,
    )
}
VERBS = tuple(REQUESTS)
# the verbs that only read (open on every channel, logged at debug) and those that change something
READ_VERBS = frozenset(verb for verb, model in REQUESTS.items() if model.kind == "read")
MUTATING_VERBS = frozenset(VERBS) - READ_VERBS
HEARTBEAT_VERB = "heartbeat"
# what a `hashflex-sig-v2` signature may be made for (`hashflex sign --verb`)
SIGNED_VERBS = (*(verb for verb in VERBS if verb in MUTATING_VERBS), HEARTBEAT_VERB)


# ------------------------------------------------------------------------------------------------- JSON in
class _Refused(ValueError):
    """A payload `load_json` will not parse; the message says why."""


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def _depth(payload: bytes) -> int:
    """How deep objects and arrays nest (string contents ignored), without recursion."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b'""', payload)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"the integer {text[:24]}… has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:24]} overflows to infinity")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not a JSON number (NaN and Infinity are refused)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # a signature checker and a reader could disagree about which one counts
            raise _Refused(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def load_json(payload: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON: bounded nesting, finite numbers only, integers of at most MAX_INT_DIGITS digits, no duplicate
    keys. Raises ValueError (with a message for the sender) for anything else; never another exception."""
    try:
        if _depth(payload) > max_depth:
            raise _Refused(f"nested deeper than {max_depth} levels")
        return json.loads(
            payload,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_unique_keys,
        )
    except _Refused:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
        raise ValueError(str(exc)[:200]) from None


class HeartbeatRequest(BaseModel):
    """A grid heartbeat: signed (`hashflex-sig-v2`, verb "heartbeat") for this site, fresh, newer than the last."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    site: str = Field(max_length=MAX_ID_LEN)
    verb: Literal["heartbeat"]
    issued_at: Timestamp
    signature: str = Field(min_length=1, max_length=512)
    id: CommandId | None = None
    seq: int | None = Field(None, ge=0)
