"""Requests the agent accepts, one pydantic model per verb, and `parse_request`: bytes in, a typed command or an
error `Reply` out. MQTT and the local control socket share this one gate, so they accept and refuse the same things.

Order of checks (the first failure wins, and nothing is changed by a refused request):
size → JSON → object → known verb → not retained → schema and types (unknown fields are errors) → ranges that need
no context → who may send it (signatures) → a repeat? (an id already answered gets its stored reply, however old:
MQTT redelivers, and a grid retries until it has a reply; the same id with other content is refused as a conflict,
never answered with the first command's "ok") → issue time (too old, too far in the future) → ranges
that need the site (a target above the cap, a window that is already over).

Who may send what:
- grid verbs (`dispatch`, `cancel`) carry a grid signature on EVERY channel;
- `cap` needs a grid signature over MQTT; on the local socket it is an operator command (trusted by file permissions);
- operator verbs (`curtail`, `resume`) over MQTT need an operator signature, or are refused as disabled when no
  operator key is configured; on the local socket they need nothing more;
- read verbs (`ping`, `status`, `miners`, `preview`, `dispatches`, `events`) are open on both channels.
Any signed request must carry `issued_at`, and any request that carries `issued_at` is checked for freshness.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from agent.config import DispatchRules
from agent.core import signing
from agent.core.units import parse_duration_s, parse_power_kw
from agent.protocol import Channel, Reply

# ------------------------------------------------------------------------------------------------ error codes
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
# codes the runtime uses when applying a well-formed command
UNKNOWN_DISPATCH = "unknown_dispatch"
STALE_REVISION = "stale_revision"
CONFLICT = "conflict"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"

MAX_ID_LEN = 128
# stored with each reply (never sent): what the request said, to tell a repeat from a conflicting reuse of its id
REQUEST_DIGEST = "request_digest"


# ------------------------------------------------------------------------------------------- field converters
def parse_timestamp(value: Any) -> float:
    """Epoch seconds from an ISO 8601 time with a zone (`2025-01-01T12:00:00Z`) or a number of epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("must be an ISO 8601 time such as 2025-01-01T12:00:00Z")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number of epoch seconds")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time such as 2025-01-01T12:00:00Z")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time (e.g. 2025-01-01T12:00:00Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone: add Z for UTC (e.g. 2025-01-01T12:00:00Z)")
    return parsed.timestamp()


def _power(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number of kW or a string such as '12MW' or '850kW'")
    kw = parse_power_kw(value)
    if not math.isfinite(kw):
        raise ValueError("must be a finite power")
    if kw < 0:
        raise ValueError(f"{value!r} is negative: powers are ≥ 0 kW")
    return kw


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be seconds or a string such as '30m' or '2h'")
    seconds = parse_duration_s(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be longer than 0 s")
    return seconds


Timestamp = Annotated[float, BeforeValidator(parse_timestamp)]
PowerKw = Annotated[float, BeforeValidator(_power)]
DurationS = Annotated[float, BeforeValidator(_duration)]
CommandId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9_.:@/+-]+$")]


# ------------------------------------------------------------------------------------------------ requests
class Request(BaseModel):
    """Every request may carry an id, an issue time and a signature; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    verb: ClassVar[str] = ""
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "read"
    id: CommandId | None = None
    issued_at: Timestamp | None = None
    signature: str | None = Field(None, min_length=1, max_length=512)


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
    ramp_kw_per_min: float | None = Field(None, description="> 0 kW/min; None = as fast as allowed.")
    priority: int = Field(0, ge=-1000, le=1000)
    rev: int = Field(0, ge=0, le=2**31)

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


class CurtailRequest(Request):
    """An operator override: hold the site at `to_kw`, or `by_kw` below its power now, for `for_s` (or until resume)."""

    verb: ClassVar[str] = "curtail"
    kind: ClassVar[Literal["grid", "cap", "operator", "read"]] = "operator"
    to_kw: PowerKw | None = None
    by_kw: PowerKw | None = None
    for_s: DurationS | None = None

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


MinerStateName = Literal["hashing", "throttled", "sleeping", "waking", "unreachable"]
MinerSortKey = Literal["ip", "model", "state", "power", "limit", "hashrate", "efficiency", "temp", "last_seen"]


class MinersRequest(Request):
    verb: ClassVar[str] = "miners"
    state: MinerStateName | None = None
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
MUTATING_VERBS = frozenset({"dispatch", "cancel", "cap", "curtail", "resume"})


@dataclass(frozen=True, slots=True)
class Repeat:
    """An authentic request whose id was answered before: answer it the same way, apply nothing."""

    request: Request
    stored: dict[str, Any]  # the stored Reply.to_dict()

    @property
    def reply(self) -> Reply:
        return Reply.from_dict(self.stored)


def request_digest(request: Request) -> str:
    """What a request asks for, as a hash: every field but the issue time and the signature (a retry may be signed
    again later and is still the same request)."""
    body = request.model_dump(mode="json", exclude={"issued_at", "signature"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def answer_repeat(request: Request, stored: dict[str, Any]) -> Repeat | Reply:
    """A request whose idempotency key has a stored reply: a `Repeat` when it asks for the same thing, else a conflict
    error (replies stored before digests were kept count as repeats)."""
    digest = stored.get(REQUEST_DIGEST)
    if digest is None or digest == request_digest(request):
        return Repeat(request, stored)
    revise = " (or a higher rev to revise a dispatch)" if request.verb == "dispatch" else ""
    return Reply.error(
        request.id, CONFLICT,
        f"id {request.id!r} was already used for a different {request.verb!r} request, which keeps its reply; "
        f"a repeat must ask for the same thing: send new content with a new id{revise}",
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Command:
    """A request that passed every check: what to apply, from where, received when."""

    request: Request
    channel: Channel
    received_at: float

    @property
    def verb(self) -> str:
        return self.request.verb

    @property
    def id(self) -> str | None:
        return self.request.id

    @property
    def mutating(self) -> bool:
        return self.verb in MUTATING_VERBS

    @property
    def digest(self) -> str:
        return request_digest(self.request)

    @property
    def idempotency_key(self) -> str | None:
        """The key a repeat is recognised by: the id, plus the revision for revised dispatches (OpenADR)."""
        if self.request.id is None or not self.mutating:
            return None
        rev = getattr(self.request, "rev", 0)
        return f"{self.request.id}#rev{rev}" if rev else self.request.id


# ------------------------------------------------------------------------------------------------- the gate
def parse_request(
    verb: str,
    payload: bytes,
    channel: Channel,
    *,
    grid_keys: Sequence[Ed25519PublicKey],
    operator_keys: Sequence[Ed25519PublicKey],
    now: float,
    rules: DispatchRules,
    max_bytes: int,
    cap_kw: float,
    retained: bool = False,
    stored_reply: Callable[[str], dict[str, Any] | None] | None = None,
) -> Command | Repeat | Reply:
    """A `Command` ready to apply, a `Repeat` of one already answered, or an error `Reply` that says what to change.

    `cap_kw` is the licensed site cap: no target or cap may ask for more. `now` is the agent's clock.
    `stored_reply(key)`: the reply stored for an idempotency key, if any (see `Command.idempotency_key`).
    """
    if len(payload) > max_bytes:
        return Reply.error(None, TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        raw = json.loads(payload) if payload.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Reply.error(None, BAD_JSON, f"payload is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        return Reply.error(None, BAD_JSON, f"payload must be a JSON object, got {type(raw).__name__}")
    request_id = raw.get("id") if isinstance(raw.get("id"), str) else None

    model = REQUESTS.get(verb)
    if model is None:
        known = ", ".join(sorted(REQUESTS))
        return Reply.error(request_id, UNKNOWN_VERB, f"unknown verb {verb!r}; known verbs: {known}")
    if retained:
        return Reply.error(
            request_id, RETAINED, "retained messages on command topics are refused: publish commands without retain"
        )
    try:
        request = model.model_validate(raw)
    except ValidationError as exc:
        return Reply.error(request_id, *_schema_error(verb, exc))

    refusal = _check_authority(request, raw, channel, grid_keys, operator_keys)
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    command = Command(request, channel, now)
    key = command.idempotency_key
    if key is not None and stored_reply is not None:
        stored = stored_reply(key)
        if stored is not None:
            return answer_repeat(request, stored)
    refusal = _check_freshness(request, now, rules)
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    refusal = _check_site_ranges(request, now, cap_kw)
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    return command


def _schema_error(verb: str, exc: ValidationError) -> tuple[str, str]:
    parts: list[str] = []
    range_errors = 0
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(REQUESTS[verb].model_fields))
            parts.append(f"{loc}: unknown field (fields of {verb!r}: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required field is missing")
        else:
            if any(word in msg for word in ("negative", "greater than", "less than", "after start", "must be > 0")):
                range_errors += 1
            shown = f" = {err['input']!r}" if loc and "input" in err else ""
            parts.append(f"{loc}{shown}: {msg}" if loc else msg)
    # out of range only when every complaint is about a range: a missing field is the bigger problem
    code = OUT_OF_RANGE if range_errors == len(parts) else BAD_REQUEST
    return code, f"bad {verb!r} request: " + "; ".join(parts)


def _check_authority(
    request: Request,
    raw: dict[str, Any],
    channel: Channel,
    grid_keys: Sequence[Ed25519PublicKey],
    operator_keys: Sequence[Ed25519PublicKey],
) -> tuple[str, str] | None:
    verb, kind = request.verb, request.kind
    if kind == "read":
        return None
    if kind == "grid" or (kind == "cap" and channel is Channel.MQTT):
        return _check_signature(verb, raw, grid_keys, "grid")
    if kind == "operator" and channel is Channel.MQTT:
        if not operator_keys:
            return DISABLED, (
                f"operator command {verb!r} is disabled over MQTT: no grid.operator_public_keys are configured "
                "(use the local CLI on the gateway, or add an operator key)"
            )
        return _check_signature(verb, raw, operator_keys, "operator")
    # LOCAL operator and cap commands: the socket's file permissions are the authority; a signature, if present,
    # is not required, and a bad one is not silently accepted either
    if request.signature is not None and not signing.verify(raw, [*operator_keys, *grid_keys]):
        return BAD_SIGNATURE, f"{verb!r}: the signature does not match any configured key; send it unsigned locally"
    return None


def _check_signature(
    verb: str, raw: dict[str, Any], keys: Sequence[Ed25519PublicKey], who: str
) -> tuple[str, str] | None:
    if not keys:
        return UNSIGNED, f"{verb!r} needs a {who} signature, and no {who} public key is configured"
    if raw.get("signature") is None:
        return UNSIGNED, f"{verb!r} must be signed by a {who} key (field 'signature'; see `hashflex sign`)"
    if raw.get("issued_at") is None:
        return BAD_REQUEST, f"a signed {verb!r} must carry issued_at (ISO 8601 UTC)"
    if not signing.verify(raw, keys):
        return BAD_SIGNATURE, (
            f"{verb!r}: the signature does not match any configured {who} key "
            "(was the message changed after signing, or signed with another key?)"
        )
    return None


def _check_freshness(request: Request, now: float, rules: DispatchRules) -> tuple[str, str] | None:
    if request.issued_at is None:
        return None
    age = now - request.issued_at
    if age > rules.max_age_s:
        return EXPIRED, (
            f"{request.verb!r} was issued {age:.0f} s ago; commands older than {rules.max_age_s:.0f} s are refused "
            "(send a fresh one)"
        )
    if -age > rules.max_skew_s:
        return FUTURE, (
            f"{request.verb!r} is issued {-age:.0f} s in the future; more than {rules.max_skew_s:.0f} s ahead is "
            "refused (check the sender's clock)"
        )
    return None


def _check_site_ranges(request: Request, now: float, cap_kw: float) -> tuple[str, str] | None:
    if isinstance(request, DispatchRequest):
        if request.target_kw is not None and request.target_kw > cap_kw:
            return OUT_OF_RANGE, f"target_kw {request.target_kw:g} is above the site cap of {cap_kw:g} kW"
        if request.end is not None and request.end <= now:
            return EXPIRED, "the dispatch window is already over (end is in the past)"
    elif isinstance(request, CapRequest):
        if request.cap_kw > cap_kw:
            return OUT_OF_RANGE, (
                f"cap_kw {request.cap_kw:g} is above the licensed site cap of {cap_kw:g} kW; "
                "the run-time cap can only lower it"
            )
    elif isinstance(request, CurtailRequest):
        if request.to_kw is not None and request.to_kw > cap_kw:
            return OUT_OF_RANGE, f"to_kw {request.to_kw:g} is above the site cap of {cap_kw:g} kW"
    elif isinstance(request, PreviewRequest) and request.target_kw > cap_kw:
        return OUT_OF_RANGE, f"target_kw {request.target_kw:g} is above the site cap of {cap_kw:g} kW"
    return None
