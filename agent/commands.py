"""The agent's gate for requests, `parse_request`: bytes in, a typed command or an error `Reply` out. MQTT and the
local control socket share this one gate, so they accept and refuse the same things. The request models, the strict
JSON reader and the wire's limits are the contract's (hashflex.contract.requests); this module applies them.

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
- read verbs (contract.requests.READ_VERBS: `ping`, `status`, `miners`, `preview`, `dispatches`, `events`) are open
  on both channels.
Any signed request must carry `id`, `issued_at`, `site` (this site's id) and `verb` (the verb it is sent as): the
signature (contract.signing, format `hashflex-sig-v2`) covers them, so a signed command cannot be replayed at
another site or as another verb. Any request that carries `issued_at` is checked for freshness; `site` and `verb`,
when present on any request, must match.

Parsing never raises: payloads are bounded in size and nesting before `json.loads`, numbers are parsed by hooks that
refuse NaN, Infinity, floats that overflow to infinity and integers with more digits than any field needs, and
duplicate keys are refused. Timestamps must fall in a sane window and durations are bounded, so no absurd value
reaches the runtime.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from hashflex.agent.config import DispatchRules
from hashflex.agent.core.timefmt import iso
from hashflex.agent.core.timeline import SenderClock, sender_window
from hashflex.agent.protocol import Channel
from hashflex.contract import signing
from hashflex.contract.reply import (
    BAD_JSON,
    BAD_REQUEST,
    BAD_SIGNATURE,
    CONFLICT,
    DISABLED,
    EXPIRED,
    FUTURE,
    OUT_OF_RANGE,
    RETAINED,
    STALE,
    TOO_LARGE,
    UNKNOWN_VERB,
    UNSIGNED,
    WRONG_SCOPE,
    Reply,
)
from hashflex.contract.requests import (
    MAX_AHEAD_S,
    MAX_ID_LEN,
    MUTATING_VERBS,
    OPERATOR_ID_PREFIX,
    REQUESTS,
    RESERVED_GRID_IDS,
    SCOPE_FIELDS,
    CancelRequest,
    CapRequest,
    CurtailRequest,
    DispatchRequest,
    HeartbeatRequest,
    PreviewRequest,
    Request,
    load_json,
)

# stored with each reply (never sent): what the request said, to tell a repeat from a conflicting reuse of its id
REQUEST_DIGEST = "request_digest"


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
    at_default = {f for f in request.added_fields if getattr(request, f) == type(request).model_fields[f].default}
    fields = request.model_dump(mode="json", exclude={"issued_at", "signature", *at_default})
    body = {**request.retired_fields, **fields}
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
        request.id,
        CONFLICT,
        f"id {request.id!r} was already used for a different {request.verb!r} request, which keeps its reply; "
        f"a repeat must ask for the same thing: send new content with a new id{revise}",
    )


@dataclass(frozen=True, slots=True)
class Command:
    """A request that passed every check: what to apply, from where, received when."""

    request: Request
    channel: Channel
    received_at: float
    # how far the agent's time is ahead of the sender's clock, this message counted (timeline.SenderClock); None
    # for a request with no issue time
    sender_offset_s: float | None = None

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
    def source(self) -> str | None:
        """Whose command it is: "grid" (grid verbs; a cap over MQTT) or "operator" (overrides; a local cap)."""
        kind = self.request.kind
        if kind == "grid" or (kind == "cap" and self.channel is Channel.MQTT):
            return "grid"
        if kind in ("cap", "operator"):
            return "operator"
        return None

    @property
    def idempotency_key(self) -> str | None:
        """The key a repeat is recognised by: source, verb and id, plus the revision for revised dispatches
        (OpenADR). Namespaced, so a local override never answers for a grid dispatch that uses the same id."""
        if self.request.id is None or not self.mutating:
            return None
        rev = getattr(self.request, "rev", 0)
        key = f"{self.source}:{self.verb}:{self.request.id}"
        return f"{key}#rev{rev}" if rev else key

    @property
    def order_key(self) -> str | None:
        """What a command's issue time is ordered within: a newer applied command of the same key makes an older
        one stale (a cap delivered late must not undo a newer cap). None: no order to keep (no issued_at)."""
        req = self.request
        if req.issued_at is None or not self.mutating:
            return None
        if isinstance(req, DispatchRequest):
            return f"{self.source}:dispatch:{req.id}"
        if isinstance(req, CancelRequest):
            return f"{self.source}:dispatch:{req.dispatch_id}"
        if isinstance(req, CapRequest):
            return f"{self.source}:cap"
        return f"{self.source}:override"  # curtail and resume: a late resume must not end a newer override


def check_order(command: Command, newest_issued: Callable[[str], float | None]) -> Reply | None:
    """An error reply when a newer command of the same kind (`Command.order_key`) was already applied."""
    key = command.order_key
    issued = command.request.issued_at
    if key is None or issued is None:
        return None
    newest = newest_issued(key)
    if newest is None or issued >= newest:
        return None
    return Reply.error(
        command.id,
        STALE,
        f"{command.verb!r} was issued at {iso(issued)}, before a newer {key.split(':', 1)[1]!r} command "
        f"(issued {iso(newest)}) that is already applied: a late or replayed command cannot undo a newer one",
    )


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
    site_id: str,
    retained: bool = False,
    stored_reply: Callable[[str], dict[str, Any] | None] | None = None,
    grid_clock: SenderClock | None = None,
) -> Command | Repeat | Reply:
    """A `Command` ready to apply, a `Repeat` of one already answered, or an error `Reply` that says what to change.

    `cap_kw` is the licensed site cap: no target or cap may ask for more. `now` is the agent's clock. `site_id`: the
    site a signed command must name. `stored_reply(key)`: the reply stored for an idempotency key, if any (see
    `Command.idempotency_key`). `grid_clock`: what the grid's signed messages said of its clock so far (a grid
    window is read on it). Never raises for any payload.
    """
    if len(payload) > max_bytes:
        return Reply.error(None, TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        raw = load_json(payload) if payload.strip() else {}
    except ValueError as exc:
        return Reply.error(None, BAD_JSON, f"payload is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        return Reply.error(None, BAD_JSON, f"payload must be a JSON object, got {type(raw).__name__}")
    request_id = raw.get("id") if isinstance(raw.get("id"), str) and len(raw["id"]) <= MAX_ID_LEN else None

    model = REQUESTS.get(verb)
    if model is None:
        known = ", ".join(sorted(REQUESTS))
        return Reply.error(request_id, UNKNOWN_VERB, f"unknown verb {verb[:64]!r}; known verbs: {known}")
    if retained:
        return Reply.error(
            request_id, RETAINED, "retained messages on command topics are refused: publish commands without retain"
        )
    refusal = _check_scope(verb, raw, site_id)  # a document for another site or verb: say so, whatever its fields
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    try:
        request = model.model_validate({k: v for k, v in raw.items() if k not in SCOPE_FIELDS})
    except ValidationError as exc:
        return Reply.error(request_id, *_schema_error(verb, exc))
    except Exception as exc:  # a validator that raised something else: still the sender's input, still refused
        return Reply.error(request_id, BAD_REQUEST, f"bad {verb!r} request: {type(exc).__name__}")
    refusal = _check_reserved_id(request)
    if refusal is not None:
        return Reply.error(request_id, *refusal)

    refusal = _check_authority(request, raw, channel, grid_keys, operator_keys)
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    offset = None
    if request.issued_at is not None:
        offset = now - request.issued_at
        if grid_clock is not None and request.kind == "grid":
            offset = grid_clock.offset_s(now, issued_at=request.issued_at)
    command = Command(request, channel, now, offset)
    key = command.idempotency_key
    if key is not None and stored_reply is not None:
        stored = stored_reply(key)
        if stored is not None:
            return answer_repeat(request, stored)
    refusal = _check_freshness(request, now, rules)
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    refusal = _check_site_ranges(request, now, cap_kw, command.sender_offset_s)
    if refusal is not None:
        return Reply.error(request_id, *refusal)
    return command


def _check_scope(verb: str, raw: dict[str, Any], site_id: str) -> tuple[str, str] | None:
    """`site` and `verb`, when present (always, on a signed request), must name this site and this verb."""
    site, named = raw.get("site"), raw.get("verb")
    if "site" in raw and not isinstance(site, str):
        return BAD_REQUEST, "site: must be the site id (a string)"
    if "verb" in raw and not isinstance(named, str):
        return BAD_REQUEST, "verb: must be the verb the request is sent as (a string)"
    if site is not None and site != site_id:
        return WRONG_SCOPE, f"this request is for site {site[:64]!r}, and this is site {site_id!r}"
    if named is not None and named != verb:
        return WRONG_SCOPE, f"this request is a {named[:32]!r} request, sent as {verb!r}"
    return None


def _check_reserved_id(request: Request) -> tuple[str, str] | None:
    if request.kind != "grid":
        return None
    ids = [request.id, getattr(request, "dispatch_id", None)]
    for value in ids:
        if isinstance(value, str) and (value.startswith(OPERATOR_ID_PREFIX) or value in RESERVED_GRID_IDS):
            return BAD_REQUEST, (
                f"id {value!r} is reserved for the site's own overrides (ids starting with {OPERATOR_ID_PREFIX!r} "
                f"and {', '.join(sorted(RESERVED_GRID_IDS))}); use another id"
            )
    return None


def _schema_error(verb: str, exc: ValidationError) -> tuple[str, str]:
    parts: list[str] = []
    range_errors = 0
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])[:64]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(REQUESTS[verb].model_fields))
            parts.append(f"{loc}: unknown field (fields of {verb!r}: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required field is missing")
        else:
            range_words = ("negative", "greater than", "less than", "after start", "must be > 0", "outside")
            if any(word in msg for word in range_words):
                range_errors += 1
            shown = f" = {_short(err['input'])}" if loc and "input" in err else ""
            parts.append(f"{loc}{shown}: {msg}" if loc else msg)
    # out of range only when every complaint is about a range: a missing field is the bigger problem
    code = OUT_OF_RANGE if range_errors == len(parts) else BAD_REQUEST
    return code, f"bad {verb!r} request: " + "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    if request.signature is not None and not signing.verify_command(raw, [*operator_keys, *grid_keys]):
        return BAD_SIGNATURE, f"{verb!r}: the signature does not match any configured key; send it unsigned locally"
    return None


def _check_signature(
    verb: str, raw: dict[str, Any], keys: Sequence[Ed25519PublicKey], who: str
) -> tuple[str, str] | None:
    if not keys:
        return UNSIGNED, f"{verb!r} needs a {who} signature, and no {who} public key is configured"
    if raw.get("signature") is None:
        return UNSIGNED, f"{verb!r} must be signed by a {who} key (field 'signature'; see `hashflex sign`)"
    missing = [f for f in ("id", "issued_at", *SCOPE_FIELDS) if raw.get(f) is None]
    if missing:
        return BAD_REQUEST, (
            f"a signed {verb!r} must carry {', '.join(missing)} ({signing.COMMAND_FORMAT}: id, issued_at, and the "
            "site and verb it is for, all under the signature; `hashflex sign --site SITE --verb VERB` adds them)"
        )
    if not signing.verify_command(raw, keys):
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


def _check_site_ranges(
    request: Request, now: float, cap_kw: float, sender_offset_s: float | None
) -> tuple[str, str] | None:
    if isinstance(request, DispatchRequest):
        if request.target_kw is not None and request.target_kw > cap_kw:
            return OUT_OF_RANGE, f"target_kw {request.target_kw:g} is above the site cap of {cap_kw:g} kW"
        for name, ts in (("start", request.start), ("end", request.end)):
            if ts is not None and ts > now + MAX_AHEAD_S:
                return OUT_OF_RANGE, (
                    f"{name} {iso(ts)} is more than {MAX_AHEAD_S / 86400:.0f} days ahead; send the dispatch nearer "
                    "its time"
                )
        _, end = sender_window(request.start, request.end, offset_s=sender_offset_s)
        if end is not None and end <= now:
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


# ------------------------------------------------------------------------------------------------- heartbeat
def parse_heartbeat(
    payload: bytes,
    *,
    grid_keys: Sequence[Ed25519PublicKey],
    site_id: str,
    now: float,
    max_age_s: float,
    max_skew_s: float,
    newest: float | None,
) -> float | str:
    """The heartbeat's issue time when it is authentic, for this site, fresh and newer than `newest` (the last
    one accepted); otherwise why it is ignored. An unsigned, old or replayed heartbeat must not hold off (or release)
    the fail-safe. Never raises."""
    try:
        raw = load_json(payload)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(raw, dict):
        return "not a JSON object"
    try:
        beat = HeartbeatRequest.model_validate(raw)
    except Exception as exc:  # ValidationError, or anything a validator raised
        return f"not a signed heartbeat ({signing.COMMAND_FORMAT}: site, verb, issued_at, signature): {str(exc)[:200]}"
    if beat.site != site_id:
        return f"for site {beat.site!r}, not {site_id!r}"
    if not grid_keys or not signing.verify_command(raw, grid_keys):
        return "the signature does not match any configured grid key"
    age = now - beat.issued_at
    if age > max_age_s:
        return f"issued {age:.0f} s ago (older than {max_age_s:.0f} s)"
    if -age > max_skew_s:
        return f"issued {-age:.0f} s in the future"
    if newest is not None and beat.issued_at <= newest:
        return "not newer than the last accepted heartbeat (a replay)"
    return beat.issued_at
