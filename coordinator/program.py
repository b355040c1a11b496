"""The program core: grid program commands in, site dispatches out, delivery followed. Pure: no I/O, no clock
(`now` is passed in), no logging; the service (coordinator/service.py) receives, signs, sends, stores and logs.

Program commands (grid → coordinator), on `hashflex/program/<program>/cmd/<verb>`, signed with a grid key the
coordinator trusts in the agent's format (`contract.signing`, `hashflex-sig-v2`), the scope being the program
instead of the site: every command carries `program`, `verb`, `id` and `issued_at` under the signature.
- `hold`:   hold the program at or under `target_kw` from `start` (default: at once) to `end`, optionally ramped down
            at `ramp_kw_per_min` from what the sites drew at acceptance; `rev` revises a hold of the same `id`.
- `shed`:   shed `shed_kw` from now: held at (Σ present power at acceptance − shed_kw) until `end` (or a cancel).
- `cancel`: end the hold or shed `dispatch_id`.
- `cap`:    the program cap: Σ at or under `cap_kw` at all times, until a newer cap.
The gate (`parse_program_command`) reuses the agent's parsing (strict JSON, finite numbers, bounded timestamps and
ids, units such as "1400MW") and refusal codes, so a grid sends the program what it sends a site. Replays: the newest
`issued_at` per verb is kept, and an older or equal one is refused as stale, unless it is a repeat of a command
already answered (same id, same content): then it gets the same answer and nothing changes.

Site dispatches (coordinator → agent) are the agent's own `dispatch` and `cancel` requests. A program dispatch
`D` of program `P` becomes, at every site, the dispatch `P.D` (a cap: `P.cap`), revised with the agent's `rev`: a
site's rev goes up by one each time its own target changes, and the state (replicated) holds it, so a retry and a
new leader after a failover send the same (id, rev, content), which the agent answers as a repeat: nothing is
applied twice. A cancel is `P.D:cancel`.

Delivery: a site that is offline (its last will), whose flexibility is stale (not refreshed for `stale_after_s`,
or its own readings stale), or that has not met its share by the time it promised (the allocation's horizon plus a
grace) is counted at its worst case (its cap, or its last present power if higher) and the others share the rest
of the program target at once (`allocation.allocate`). When it is back, the allocation is evened out again, but a
site's target rises only into room left under the program target by what the others may still draw (their present
power or their new target, whichever is higher), so Σ stays under the target while the others come down. What
cannot be met is said, with the number: `DispatchReport.unmet_w` and an alarm.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hashflex.contract import signing
from hashflex.contract.flex import Flexibility
from hashflex.contract.reply import (
    BAD_JSON,
    BAD_REQUEST,
    BAD_SIGNATURE,
    CONFLICT,
    EXPIRED,
    FUTURE,
    OUT_OF_RANGE,
    STALE,
    STALE_REVISION,
    TOO_LARGE,
    UNKNOWN_DISPATCH,
    UNKNOWN_VERB,
    UNSIGNED,
    WRONG_SCOPE,
    Reply,
)
from hashflex.contract.requests import MAX_AHEAD_S, MAX_RAMP_KW_PER_MIN, PowerKw, Timestamp, load_json
from hashflex.coordinator.allocation import (
    Allocation,
    CurvePoint,
    Hold,
    Reach,
    SiteFlex,
    SiteLimits,
    allocate,
    hashrate_lost,
)

PROGRAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_DISPATCH_ID_LEN = 64  # the site dispatch id `<program>.<id>:cancel` stays within the agent's 128
MAX_PAYLOAD_BYTES = 16_384
MAX_ANSWERED = 256  # answered commands kept for repeats (oldest first out): a repeat matters only while it is
# fresh (GateRules.max_age_s), and the whole state is one JetStream value; older replays are stale by issue time
MAX_ACTIVE = 64  # program dispatches held at once
CAP_ID = "cap"  # the program cap's site dispatch is `<program>.cap`


# --------------------------------------------------------------------------------------------- requests

# the agent's id alphabet, shorter: `<program>.<id>:cancel` must fit the agent's 128 characters
DispatchId = Annotated[str, Field(min_length=1, max_length=MAX_DISPATCH_ID_LEN, pattern=r"^[A-Za-z0-9_.:@/+-]+$")]
Verb = Literal["hold", "shed", "cancel", "cap"]


class ProgramRequest(BaseModel):
    """Every program command is signed and carries its id and issue time; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)
    verb: ClassVar[Verb]
    id: DispatchId
    issued_at: Timestamp
    signature: str = Field(min_length=1, max_length=512)


class HoldRequest(ProgramRequest):
    """Hold the program at or under `target_kw` over [start, end), optionally ramped down."""

    verb: ClassVar[Verb] = "hold"
    target_kw: PowerKw
    start: Timestamp | None = None
    end: Timestamp
    ramp_kw_per_min: float | None = Field(None, gt=0, le=MAX_RAMP_KW_PER_MIN)
    rev: int = Field(0, ge=0, le=2**31)

    @model_validator(mode="after")
    def _window(self) -> HoldRequest:
        if self.start is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class ShedRequest(ProgramRequest):
    """Shed `shed_kw` from now (from Σ present power at acceptance) until `end`, or until cancelled."""

    verb: ClassVar[Verb] = "shed"
    shed_kw: PowerKw
    end: Timestamp | None = None
    rev: int = Field(0, ge=0, le=2**31)

    @model_validator(mode="after")
    def _positive(self) -> ShedRequest:
        if not self.shed_kw > 0:
            raise ValueError("shed_kw must be > 0")
        return self


class CancelRequest(ProgramRequest):
    verb: ClassVar[Verb] = "cancel"
    dispatch_id: DispatchId


class CapRequest(ProgramRequest):
    """The program cap: Σ at or under `cap_kw` at all times (a newer cap replaces it)."""

    verb: ClassVar[Verb] = "cap"
    cap_kw: PowerKw


REQUESTS: dict[str, type[ProgramRequest]] = {
    cls.verb: cls for cls in (HoldRequest, ShedRequest, CancelRequest, CapRequest)
}
SCOPE_FIELDS = ("program", "verb")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A program command refused: nothing changed. `code` is one of the agent's error codes."""

    id: str | None
    code: str
    message: str

    @property
    def reply(self) -> Reply:
        return Reply.error(self.id, self.code, self.message)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A program command that passed every check, ready for `apply`."""

    request: ProgramRequest
    raw: Mapping[str, Any]

    @property
    def key(self) -> str:
        return answer_key(self.request)


@dataclass(frozen=True, slots=True)
class Repeat:
    """An authentic command already answered (same id, same content): answer it the same way, change nothing."""

    request: ProgramRequest
    reply: Reply


def answer_key(request: ProgramRequest) -> str:
    rev = getattr(request, "rev", 0)
    return f"{request.verb}:{request.id}#rev{rev}" if rev else f"{request.verb}:{request.id}"


def digest(request: ProgramRequest) -> str:
    """What a command asks for (without its issue time and signature: a retry signed again is the same command)."""
    body = request.model_dump(mode="json", exclude={"issued_at", "signature"})
    return hashlib.sha256(signing.canonical_bytes({"verb": request.verb, **body})).hexdigest()


# ------------------------------------------------------------------------------------------------ state


@dataclass(frozen=True, slots=True)
class ProgramDispatch:
    """An accepted hold, shed or cap, as the program holds it (absolute levels, W)."""

    id: str
    kind: Verb  # hold, shed or cap
    rev: int
    target_w: float  # the level held (a shed: Σ present at acceptance − shed)
    start: float
    end: float | None
    ramp_w_per_s: float | None  # a hold's ramp, from `from_w` at `start`
    from_w: float  # Σ present power at acceptance (where a ramp starts)
    issued_at: float
    accepted_at: float

    def level_w(self, now: float) -> float | None:
        """The program level this dispatch asks for at `now` (None: not in force)."""
        if now < self.start or (self.end is not None and now >= self.end):
            return None
        if self.ramp_w_per_s is None:
            return self.target_w
        return max(self.target_w, self.from_w - self.ramp_w_per_s * (now - self.start))

    def reached_at(self) -> float:
        """When its final level is due (a ramp's end, else its start)."""
        if self.ramp_w_per_s is None or self.from_w <= self.target_w:
            return self.start
        return self.start + (self.from_w - self.target_w) / self.ramp_w_per_s

    @property
    def site_dispatch_id(self) -> str:
        return CAP_ID if self.kind == "cap" else self.id


@dataclass(frozen=True, slots=True)
class Assignment:
    """One site's share of one program dispatch, as last sent (rev counts the site's own target changes)."""

    site_id: str
    target_w: float
    rev: int
    decided_at: float
    promised_by: float  # when it must be at or under target_w (the allocation's horizon plus the grace)
    ramp_kw_per_min: float | None = None  # its part of a ramped hold's ramp
    program_rev: int = 0  # the program dispatch's rev it was made for (a revised window or level: a new share)
    acked: bool = False  # the site answered ok (or as a repeat) to this rev
    cancelled: bool = False  # the program dispatch ended early: a cancel goes to the site


@dataclass(frozen=True, slots=True)
class Answer:
    digest: str
    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProgramState:
    """Everything the program holds (replicated in JetStream by the service). Replaced, never mutated."""

    program_id: str
    revision: int = 0  # bumped by every change
    dispatches: Mapping[str, ProgramDispatch] = field(default_factory=dict)
    newest_issued: Mapping[str, float] = field(default_factory=dict)  # verb → newest issued_at applied
    answered: Mapping[str, Answer] = field(default_factory=dict)  # answer_key → digest and reply
    assignments: Mapping[str, Mapping[str, Assignment]] = field(default_factory=dict)  # dispatch id → site → share

    def to_dict(self) -> dict[str, Any]:
        return {
            "program": self.program_id,
            "revision": self.revision,
            "dispatches": {k: _dc_dict(d) for k, d in self.dispatches.items()},
            "newest_issued": dict(self.newest_issued),
            "answered": {k: {"digest": a.digest, "reply": a.reply} for k, a in self.answered.items()},
            "assignments": {k: {s: _dc_dict(a) for s, a in v.items()} for k, v in self.assignments.items()},
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ProgramState:
        return cls(
            program_id=str(raw["program"]),
            revision=int(raw["revision"]),
            dispatches={k: ProgramDispatch(**d) for k, d in raw["dispatches"].items()},
            newest_issued={k: float(v) for k, v in raw["newest_issued"].items()},
            answered={k: Answer(a["digest"], a["reply"]) for k, a in raw["answered"].items()},
            assignments={k: {s: Assignment(**a) for s, a in v.items()} for k, v in raw["assignments"].items()},
        )


class StateConflict(RuntimeError):
    """Someone else wrote the program state since this instance read it: it must reload before it acts. Raised by
    the service's store port (`coordinator.store` for JetStream); defined here, with the state, so that the service
    can handle it without importing the store's client library."""


def _dc_dict(obj: ProgramDispatch | Assignment) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


# ------------------------------------------------------------------------------------------------- gate


@dataclass(frozen=True, slots=True)
class GateRules:
    max_age_s: float = 300.0  # the agent's dispatch.max_age_s
    max_skew_s: float = 30.0
    max_bytes: int = MAX_PAYLOAD_BYTES


def parse_program_command(
    verb: str,
    payload: bytes,
    *,
    state: ProgramState,
    grid_keys: Sequence[Ed25519PublicKey],
    now: float,
    program_max_w: float,
    rules: GateRules = GateRules(),
) -> Accepted | Repeat | Refusal:
    """An `Accepted` command for `apply`, a `Repeat` of one answered before, or a `Refusal` saying why.

    Order (the first failure wins): size → JSON → object → verb → scope (program, verb) → schema → signature →
    repeat → freshness → replay (newest issued_at per verb) → ranges (program_max_w: Σ of the sites' caps, a
    window not over, a known dispatch to cancel, a revision above the one held). Never raises."""
    if len(payload) > rules.max_bytes:
        return Refusal(None, TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {rules.max_bytes}")
    try:
        raw = load_json(payload)
    except ValueError as exc:
        return Refusal(None, BAD_JSON, f"payload is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        return Refusal(None, BAD_JSON, f"payload must be a JSON object, got {type(raw).__name__}")
    rid = raw.get("id") if isinstance(raw.get("id"), str) and len(raw["id"]) <= MAX_DISPATCH_ID_LEN else None
    model = REQUESTS.get(verb)
    if model is None:
        return Refusal(rid, UNKNOWN_VERB, f"unknown program verb {verb[:32]!r}; known: {', '.join(sorted(REQUESTS))}")
    program, named = raw.get("program"), raw.get("verb")
    if program is None or named is None:
        return Refusal(rid, BAD_REQUEST, "a program command must carry program and verb (under its signature)")
    if program != state.program_id:
        return Refusal(rid, WRONG_SCOPE, f"this command is for program {str(program)[:40]!r}, not {state.program_id!r}")
    if named != verb:
        return Refusal(rid, WRONG_SCOPE, f"this command is a {str(named)[:32]!r} command, sent as {verb!r}")
    if raw.get("signature") is None:
        return Refusal(
            rid, UNSIGNED, f"{verb!r} must be signed by a grid key (field 'signature', {signing.COMMAND_FORMAT})"
        )
    try:
        request = model.model_validate({k: v for k, v in raw.items() if k not in SCOPE_FIELDS})
    except ValidationError as exc:
        return Refusal(rid, *_schema_error(verb, exc))
    except Exception as exc:  # a validator that raised something else: still the sender's input
        return Refusal(rid, BAD_REQUEST, f"bad {verb!r} command: {type(exc).__name__}")
    if not grid_keys:
        return Refusal(rid, UNSIGNED, "no grid public key is configured: program commands cannot be checked")
    if not signing.verify_command(raw, grid_keys):
        return Refusal(rid, BAD_SIGNATURE, f"{verb!r}: the signature does not match any configured grid key")
    stored = state.answered.get(answer_key(request))
    if stored is not None:
        if stored.digest == digest(request):
            return Repeat(request, Reply.from_dict(stored.reply))
        return Refusal(rid, CONFLICT, f"id {request.id!r} was already used for a different {verb!r} command")
    age = now - request.issued_at
    if age > rules.max_age_s:
        return Refusal(rid, EXPIRED, f"issued {age:.0f} s ago; older than {rules.max_age_s:.0f} s is refused")
    if -age > rules.max_skew_s:
        return Refusal(rid, FUTURE, f"issued {-age:.0f} s in the future; more than {rules.max_skew_s:.0f} s is refused")
    newest = state.newest_issued.get(verb)
    if newest is not None and request.issued_at <= newest:
        return Refusal(rid, STALE, f"not newer than the last {verb!r} applied (a replay or a late command)")
    refusal = _ranges(request, state, now, program_max_w)
    return Accepted(request, raw) if refusal is None else Refusal(rid, *refusal)


def _schema_error(verb: str, exc: ValidationError) -> tuple[str, str]:
    parts, ranges = [], 0
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])[:64]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown field (fields of {verb!r}: {', '.join(sorted(REQUESTS[verb].model_fields))})")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required field is missing")
        else:
            if any(w in msg for w in ("greater than", "less than", "negative", "after start", "must be > 0")):
                ranges += 1
            parts.append(f"{loc}: {msg}" if loc else msg)
    return (OUT_OF_RANGE if ranges == len(parts) else BAD_REQUEST), f"bad {verb!r} command: " + "; ".join(parts)


def _ranges(request: ProgramRequest, state: ProgramState, now: float, program_max_w: float) -> tuple[str, str] | None:
    top_kw = program_max_w / 1000.0
    if isinstance(request, HoldRequest):
        if request.target_kw > top_kw:
            return OUT_OF_RANGE, f"target_kw {request.target_kw:g} is above the program's {top_kw:g} kW (Σ site caps)"
        if request.end <= now:
            return EXPIRED, "the hold's window is already over (end is in the past)"
        for name, ts in (("start", request.start), ("end", request.end)):
            if ts is not None and ts > now + MAX_AHEAD_S:
                return OUT_OF_RANGE, f"{name} is more than {MAX_AHEAD_S / 86400:.0f} days ahead"
        held = state.dispatches.get(request.id)
        if held is not None and (held.kind != "hold" or request.rev <= held.rev):
            return STALE_REVISION, f"dispatch {request.id!r} is held at rev {held.rev}: a revision needs a higher rev"
    elif isinstance(request, ShedRequest):
        if request.shed_kw > top_kw:
            return OUT_OF_RANGE, f"shed_kw {request.shed_kw:g} is above the program's {top_kw:g} kW (Σ site caps)"
        if request.end is not None and request.end <= now:
            return EXPIRED, "the shed's end is in the past"
        if request.end is not None and request.end > now + MAX_AHEAD_S:
            return OUT_OF_RANGE, f"end is more than {MAX_AHEAD_S / 86400:.0f} days ahead"
        held = state.dispatches.get(request.id)
        if held is not None and (held.kind != "shed" or request.rev <= held.rev):
            return STALE_REVISION, f"dispatch {request.id!r} is held at rev {held.rev}: a revision needs a higher rev"
    elif isinstance(request, CancelRequest):
        held = state.dispatches.get(request.dispatch_id)
        if held is None or held.kind == "cap":
            return UNKNOWN_DISPATCH, f"no hold or shed {request.dispatch_id!r} is in force"
    elif isinstance(request, CapRequest) and request.cap_kw > top_kw:
        return OUT_OF_RANGE, f"cap_kw {request.cap_kw:g} is above the program's {top_kw:g} kW (Σ site caps)"
    active = sum(1 for d in state.dispatches.values() if d.kind != "cap")
    if isinstance(request, HoldRequest | ShedRequest) and request.id not in state.dispatches and active >= MAX_ACTIVE:
        return OUT_OF_RANGE, f"at most {MAX_ACTIVE} holds and sheds at once; cancel one first"
    if request.id == CAP_ID and not isinstance(request, CapRequest):
        return BAD_REQUEST, f"id {CAP_ID!r} is the program cap's own; use another id"
    return None


def apply(state: ProgramState, accepted: Accepted, *, now: float, present_w: float) -> tuple[ProgramState, Reply]:
    """The state with `accepted` in force, and the reply (also stored for repeats). `present_w`: Σ the sites'
    present power (a shed is taken from it; a ramp starts from it)."""
    if not math.isfinite(present_w) or present_w < 0:
        raise ValueError(f"present_w must be a finite number ≥ 0, got {present_w!r}")
    req = accepted.request
    dispatches = dict(state.dispatches)
    assignments = dict(state.assignments)
    data: dict[str, Any] = {"program": state.program_id, "verb": req.verb}
    if isinstance(req, HoldRequest):
        ramp = None if req.ramp_kw_per_min is None else req.ramp_kw_per_min * 1000.0 / 60.0
        start = now if req.start is None else req.start
        dispatches[req.id] = ProgramDispatch(
            req.id, "hold", req.rev, req.target_kw * 1000.0, start, req.end, ramp, present_w, req.issued_at, now
        )
        data.update(dispatch_id=req.id, rev=req.rev, target_kw=req.target_kw)
    elif isinstance(req, ShedRequest):
        level = max(0.0, present_w - req.shed_kw * 1000.0)
        dispatches[req.id] = ProgramDispatch(
            req.id, "shed", req.rev, level, now, req.end, None, present_w, req.issued_at, now
        )
        data.update(dispatch_id=req.id, rev=req.rev, target_kw=level / 1000.0, baseline_kw=present_w / 1000.0)
    elif isinstance(req, CancelRequest):
        dispatches.pop(req.dispatch_id, None)
        held = assignments.get(req.dispatch_id, {})
        # the sites keep their shares until the cancel reaches them: marked, and sent by the service
        assignments[req.dispatch_id] = {
            s: replace(a, cancelled=True, acked=False, decided_at=now) for s, a in held.items()
        }
        data.update(dispatch_id=req.dispatch_id)
    elif isinstance(req, CapRequest):
        previous = dispatches.get(CAP_ID)
        dispatches[CAP_ID] = ProgramDispatch(
            CAP_ID,
            "cap",
            0 if previous is None else previous.rev + 1,
            req.cap_kw * 1000.0,
            now,
            None,
            None,
            present_w,
            req.issued_at,
            now,
        )
        data.update(cap_kw=req.cap_kw)
    reply = Reply.ok(req.id, data)
    answered = dict(state.answered)
    answered[accepted.key] = Answer(digest(req), reply.to_dict())
    while len(answered) > MAX_ANSWERED:
        del answered[next(iter(answered))]
    newest = {**state.newest_issued, req.verb: req.issued_at}
    new = replace(
        state,
        revision=state.revision + 1,
        dispatches=dispatches,
        newest_issued=newest,
        answered=answered,
        assignments=assignments,
    )
    return new, reply


# --------------------------------------------------------------------------------------------- the sites


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """A site of the program, from the coordinator's config."""

    site_id: str
    cap_w: float  # its licensed cap: its worst case before any flexibility is heard
    limits: SiteLimits = field(default_factory=SiteLimits)


@dataclass(frozen=True, slots=True)
class SiteView:
    """What the coordinator knows of a site now (built by the service from the fabric)."""

    site_id: str
    online: bool  # its availability topic says "online"
    flex: Flexibility | None  # its latest flexibility document
    flex_received_at: float | None  # when the coordinator received it (its own clock)
    present_w: float | None  # its latest present power (state or flex), metered where it has a meter


@dataclass(frozen=True, slots=True)
class ProgramRules:
    stale_after_s: float = 90.0  # no flexibility for this long: stale (three of the agents' 30-s refreshes)
    min_horizon_s: float = 60.0  # the least time a site is given to reach a new share
    grace_s: float = 30.0  # added to the horizon before a share not met counts as a failure
    tolerance_share: float = 0.02  # a share is met within this share of the site's cap …
    min_tolerance_w: float = 5000.0  # … and at least this many W (meter noise, the agents' own tolerance)
    retarget_w: float = 10_000.0  # a rise smaller than this is not worth a new revision
    # shares that still meet the level are re-allocated only when that keeps at least this share of the hashrate they
    # lose: the sites' loss curves and floors move with the shares themselves (a site told to sleep a miner publishes
    # another curve), and re-deciding on every such move swapped whole shares between near-equal sites every step
    rebalance_gain: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "stale_after_s",
            "min_horizon_s",
            "grace_s",
            "tolerance_share",
            "min_tolerance_w",
            "retarget_w",
            "rebalance_gain",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"program rules: {name} must be a finite number ≥ 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class SiteReport:
    site_id: str
    target_w: float | None  # its share (None: not dispatched: excluded, or counted at its worst case unsent)
    counted_w: float  # what Σ counts it at
    present_w: float | None
    failure: str | None  # offline, stale, no_flexibility, not_met; None: delivering
    reason: str  # the allocation's reason or the failure's explanation
    rev: int | None


@dataclass(frozen=True, slots=True)
class DispatchReport:
    dispatch_id: str
    kind: str
    level_w: float  # the level the shares are for (a ramped hold's final level)
    level_now_w: float | None  # the level it asks for now (on its ramp; None: not started, or over)
    allocated_w: float  # Σ what the sites are counted at
    unmet_w: float  # by how much the program cannot be met now (0: met)
    sites: tuple[SiteReport, ...]
    lost_ths: float
    alarm: str | None


@dataclass(frozen=True, slots=True)
class SiteCommand:
    """A site dispatch (or cancel) to sign and send; `doc` is unsigned and carries site, verb, id and rev."""

    site_id: str
    verb: Literal["dispatch", "cancel"]
    dispatch_id: str  # the program dispatch's id
    rev: int
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepResult:
    state: ProgramState
    reports: tuple[DispatchReport, ...]
    commands: tuple[SiteCommand, ...]  # every share not yet acknowledged (re-sent until it is: idempotent)
    alarms: tuple[str, ...]


def worst_case_w(cfg: SiteConfig, view: SiteView | None) -> float:
    """What a site that cannot be counted on is counted at: its cap, or its last present power if higher."""
    cap = cfg.cap_w if view is None or view.flex is None else max(cfg.cap_w, view.flex.cap_w)
    present = None if view is None else view.present_w
    return max(cap, present or 0.0)


def failure_of(
    cfg: SiteConfig, view: SiteView | None, held: Assignment | None, now: float, rules: ProgramRules
) -> tuple[str, str] | None:
    """(failure, why) when the site must be counted at its worst case; None when it can be counted on."""
    if view is None or not view.online:
        return "offline", "its availability is offline (last will) or was never heard"
    if view.flex is None or view.flex_received_at is None:
        return "no_flexibility", "no flexibility document heard from it"
    age = now - view.flex_received_at
    if age > rules.stale_after_s:
        return "stale", f"its flexibility is {age:.0f} s old (stale after {rules.stale_after_s:.0f} s)"
    if view.flex.stale:
        return "stale", "it reports its own readings stale"
    if held is not None and not held.cancelled and now > held.promised_by and view.present_w is not None:
        tolerance = max(rules.min_tolerance_w, rules.tolerance_share * cfg.cap_w)
        if view.present_w > held.target_w + tolerance:
            return "not_met", (
                f"at {view.present_w / 1e6:.3f} MW, above its share {held.target_w / 1e6:.3f} MW "
                f"past the time it promised"
            )
    return None


def _site_flex(cfg: SiteConfig, view: SiteView) -> SiteFlex:
    """The allocation's picture of a healthy site: its range from its reach to the most it may draw, and its loss
    curve moved from below its cap to below that most (the two differ when its fleet cannot fill its cap)."""
    flex = view.flex
    assert flex is not None
    present = flex.present_w if view.present_w is None else view.present_w
    most = max(flex.most_w, present)
    offset = flex.cap_w - most  # > 0: the curve's first `offset` W of shed are below what it can draw anyway
    xs = [0.0, *(p.shed_w for p in flex.loss)]
    ys = [0.0, *(p.lost_ths for p in flex.loss)]

    def lost_at(depth: float) -> float:
        if depth <= 0:
            return 0.0
        for k in range(1, len(xs)):
            if depth <= xs[k]:
                return ys[k - 1] + (ys[k] - ys[k - 1]) * (depth - xs[k - 1]) / (xs[k] - xs[k - 1])
        return ys[-1]

    base = lost_at(offset)
    curve = [CurvePoint(x - offset, max(0.0, y - base)) for x, y in zip(xs[1:], ys[1:], strict=True) if x > offset]
    if offset < 0:  # it draws above its cap: that much is shed at no hashrate cost first
        curve.insert(0, CurvePoint(-offset, 0.0))
    if not curve:  # nothing published below its most: shedding is priced at the steepest point known
        curve = [CurvePoint(max(most, 1.0), ys[-1] or 1.0)]
    reach = tuple(Reach(r.within_s, r.floor_w) for r in flex.reach)
    return SiteFlex(cfg.site_id, present, most, reach, tuple(curve), cfg.limits)


def _fixed(cfg: SiteConfig, counted: float) -> SiteFlex:
    """A site counted at `counted` and not dispatched (failing, or excluded without a picture)."""
    return SiteFlex(
        cfg.site_id, counted, counted, (), (CurvePoint(1.0, 0.0),), SiteLimits(excluded=True, excluded_hold=Hold.CAP)
    )


def step(
    state: ProgramState,
    sites: Sequence[SiteConfig],
    views: Mapping[str, SiteView],
    *,
    now: float,
    rules: ProgramRules = ProgramRules(),
) -> StepResult:
    """Allocate every program dispatch in force across the sites, revise the shares that changed, and list what to
    send. Ended dispatches are dropped; a cancelled one's sites are sent a cancel until they acknowledge it."""
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
    dispatches = {k: d for k, d in state.dispatches.items() if d.end is None or now < d.end}
    assignments = {k: dict(v) for k, v in state.assignments.items() if k in dispatches or _cancelling(v)}
    reports: list[DispatchReport] = []
    alarms: list[str] = []
    for d in sorted(dispatches.values(), key=lambda x: (x.start, x.id)):
        # shares are for the final level (a ramped hold: each site ramps its own part, `_site_ramps`), sent ahead of
        # a start still to come; allocating the ramp's level every step would revise every site every step
        held = assignments.get(d.id, {})
        report, shares = _allocate_one(d, level=d.target_w, sites=sites, views=views, held=held, now=now, rules=rules)
        assignments[d.id] = shares
        reports.append(report)
        if report.alarm:
            alarms.append(report.alarm)
    changed = dispatches != dict(state.dispatches) or assignments != {k: dict(v) for k, v in state.assignments.items()}
    new_state = replace(
        state, revision=state.revision + (1 if changed else 0), dispatches=dispatches, assignments=assignments
    )
    return StepResult(new_state, tuple(reports), tuple(pending_commands(new_state, now)), tuple(alarms))


def _cancelling(shares: Mapping[str, Assignment]) -> bool:
    return any(a.cancelled and not a.acked for a in shares.values())


def _allocate_one(
    d: ProgramDispatch,
    *,
    level: float,
    sites: Sequence[SiteConfig],
    views: Mapping[str, SiteView],
    held: Mapping[str, Assignment],
    now: float,
    rules: ProgramRules,
) -> tuple[DispatchReport, dict[str, Assignment]]:
    horizon = max(rules.min_horizon_s, d.reached_at() - now)
    flexes: list[SiteFlex] = []
    failures: dict[str, tuple[str, str]] = {}
    for cfg in sites:
        view = views.get(cfg.site_id)
        failure = failure_of(cfg, view, held.get(cfg.site_id), now, rules)
        if failure is not None:
            failures[cfg.site_id] = failure
            flexes.append(_fixed(cfg, worst_case_w(cfg, view)))
        else:
            assert view is not None
            flexes.append(_site_flex(cfg, view))
    alloc = allocate(flexes, level, horizon_s=horizon)
    current = {sid: a for sid, a in held.items() if a.program_rev == d.rev}  # shares of an older rev: all new
    kept = _keep_held(alloc, flexes=flexes, held=current, level=level, horizon=horizon, rules=rules)
    if kept is not None:
        chosen = kept
    else:
        targets = _limit_rises(alloc, flexes=flexes, held=held, failures=failures, views=views, level=level)
        chosen = _damp(alloc, flexes=flexes, targets=targets, held=current, level=level, rules=rules)
    ramps = _site_ramps(d, chosen, flexes)
    shares: dict[str, Assignment] = {}
    site_reports: list[SiteReport] = []
    counted: list[float] = []
    for cfg, site in zip(sites, alloc.sites, strict=True):
        view = views.get(cfg.site_id)
        old = held.get(cfg.site_id)
        failure = failures.get(cfg.site_id)
        target = chosen.get(cfg.site_id)
        if target is not None:
            if old is None or old.cancelled or target != old.target_w or old.program_rev != d.rev:
                rev = 0 if old is None else old.rev + 1
                ramp = ramps.get(cfg.site_id)
                old = Assignment(cfg.site_id, target, rev, now, now + horizon + rules.grace_s, ramp, d.rev)
            shares[cfg.site_id] = old
        elif old is not None:
            shares[cfg.site_id] = old  # a failing site keeps its share: it holds it when it is back
        share = shares.get(cfg.site_id)
        counted.append(target if target is not None else site.target_w)
        site_reports.append(
            SiteReport(
                cfg.site_id,
                None if share is None else share.target_w,
                counted[-1],
                None if view is None else view.present_w,
                None if failure is None else failure[0],
                site.detail if failure is None else failure[1],
                None if share is None else share.rev,
            )
        )
    total = math.fsum(counted)
    unmet = max(0.0, total - level)
    alarm = None
    if unmet > 0:
        alarm = (
            f"program dispatch {d.id!r} cannot be met by {unmet:.0f} W: the sites can be counted at no less than "
            f"{total / 1e6:.3f} MW against {level / 1e6:.3f} MW"
        )
    report = DispatchReport(
        d.id, d.kind, level, d.level_w(now), total, unmet, tuple(site_reports), alloc.lost_ths, alarm
    )
    return report, shares


def _site_ramps(d: ProgramDispatch, targets: Mapping[str, float], flexes: Sequence[SiteFlex]) -> dict[str, float]:
    """A ramped hold's ramp split over the sites by their part of the descent (from their present power to their
    share), so the sum of the sites' ramped paths is the program's: Σ present − rate × t."""
    if d.ramp_w_per_s is None:
        return {}
    drops = {f.site_id: max(0.0, f.present_w - targets[f.site_id]) for f in flexes if not f.limits.excluded}
    total = math.fsum(drops.values())
    if total <= 0.0:
        return {}
    rate_kw_per_min = d.ramp_w_per_s * 60.0 / 1000.0
    return {sid: rate_kw_per_min * drop / total for sid, drop in drops.items() if drop > 0.0}


def _keep_held(
    alloc: Allocation,
    *,
    flexes: Sequence[SiteFlex],
    held: Mapping[str, Assignment],
    level: float,
    horizon: float,
    rules: ProgramRules,
) -> dict[str, float] | None:
    """The shares held (this program rev), when they still do the job; None when the allocation must be re-decided.

    Why: the allocation's inputs are not independent of its output. A site that takes its share sleeps or wakes
    whole miners, and its next flexibility document has another loss curve (the planner's hashrate at each depth
    depends on which miners are on) and other floors (min-on and min-off clocks). Near-equal sites then trade places
    in the water-filling order at every refresh, and allocating afresh every step swapped whole shares between two
    of them every step (4.1 → 0.06 → 4.1 kW against 3.0 → 6.0 → 3.0 kW), far above `retarget_w`, which damps one
    site's drift but not a swap. So the decision has its hysteresis: the held shares stay while they are feasible
    (every dispatched site has one, none below what that site can reach in the horizon by more than its tolerance,
    Σ with the failing and excluded sites' counts within the level, or, when the level cannot be met, within
    `retarget_w` of what the allocation itself reaches) and the new allocation would keep less than
    `rules.rebalance_gain` of the hashrate they lose. A site failing, back, or new, a level or rev changed: the
    held shares are not feasible, or not there, and the allocation is re-decided at once. Unchanged inputs give the
    same answer (a fixed point)."""
    shares: dict[str, float] = {}
    counted: list[float] = []
    lost_held: list[float] = []
    lost_new: list[float] = []
    for flex, site in zip(flexes, alloc.sites, strict=True):
        if flex.limits.excluded:  # excluded, or failing: counted as the allocation counts it, the same either way
            counted.append(site.target_w)
            continue
        old = held.get(flex.site_id)
        if old is None or old.cancelled:
            return None
        tolerance = max(rules.min_tolerance_w, rules.tolerance_share * flex.cap_w)
        if old.target_w < site.floor_w - tolerance:
            return None
        shares[flex.site_id] = old.target_w
        counted.append(old.target_w)
        lost_held.append(hashrate_lost(flex, old.target_w, horizon_s=horizon))
        lost_new.append(site.lost_ths)
    # an unmet level: every site near its floor, and floors move a little with each refresh; a new Σ is worth
    # sending when it comes down by `retarget_w`, the change a site's own share must make to be worth a revision
    if math.fsum(counted) > (level if alloc.met else alloc.total_w + rules.retarget_w):
        return None
    held_loss, new_loss = math.fsum(lost_held), math.fsum(lost_new)
    if held_loss - new_loss > rules.rebalance_gain * held_loss:
        return None
    return shares


def _damp(
    alloc: Allocation,
    *,
    flexes: Sequence[SiteFlex],
    targets: Mapping[str, float],
    held: Mapping[str, Assignment],
    level: float,
    rules: ProgramRules,
) -> dict[str, float]:
    """The share each dispatched site gets: its new target, or the one it holds when they differ by less than
    `rules.retarget_w` (the sites' readings move a little every refresh, and a revision per site per step would
    flood them). When keeping the held shares would put Σ over the level (and the new targets do not), every
    decrease is sent after all. Targets are whole watts, rounded down (what goes on the wire)."""
    chosen: dict[str, float] = {}
    fixed: list[float] = []
    for flex, site in zip(flexes, alloc.sites, strict=True):
        sid = site.site_id
        if flex.limits.excluded:
            fixed.append(site.target_w)
            continue
        new = float(math.floor(targets[sid]))
        old = held.get(sid)
        keep = old is not None and not old.cancelled and abs(new - old.target_w) < rules.retarget_w
        chosen[sid] = old.target_w if keep and old is not None else new
    if math.fsum([*fixed, *chosen.values()]) > level:
        for sid, value in chosen.items():
            chosen[sid] = min(value, float(math.floor(targets[sid])))
    return chosen


def _limit_rises(
    alloc: Allocation,
    *,
    flexes: Sequence[SiteFlex],
    held: Mapping[str, Assignment],
    failures: Mapping[str, tuple[str, str]],
    views: Mapping[str, SiteView],
    level: float,
) -> dict[str, float]:
    """The allocation's targets, with rises above a site's present share held to the room the others leave.

    A site whose share goes down may still draw up to its present power until it gets there; a site whose share
    goes up would draw more at once. So each site is counted at the most it may draw meanwhile (failing and excluded
    sites as allocated; a lowered one at max(present, its new share); a raised one at its old share), and the rises
    share what is left under the level, in the allocation's order. Sites new to this dispatch count at their cap as
    their "old share": before their first share nothing held them under it."""
    targets = {s.site_id: s.target_w for s in alloc.sites}
    counted: dict[str, float] = {}
    rising: list[tuple[str, float]] = []
    for flex, site in zip(flexes, alloc.sites, strict=True):
        sid = site.site_id
        old = held.get(sid)
        if flex.limits.excluded or sid in failures:
            counted[sid] = site.target_w
            continue
        before = flex.cap_w if old is None or old.cancelled else old.target_w
        if site.target_w > before:
            counted[sid] = before
            rising.append((sid, site.target_w - before))
        else:
            view = views.get(sid)
            present = None if view is None else view.present_w
            counted[sid] = max(site.target_w, min(present if present is not None else before, before))
    room = level - math.fsum(counted.values())
    for sid, want in rising:
        give = max(0.0, min(want, room))
        targets[sid] = counted[sid] + give
        room -= give
    return targets


def pending_commands(state: ProgramState, now: float, *, fresh_s: float = 120.0) -> list[SiteCommand]:
    """Every share (and cancel) not yet acknowledged, as the site request to sign and send. The content is a pure
    function of the state: a retry, or a new leader, sends exactly what was sent before (the agent answers a repeat
    of an (id, rev) it has with its stored reply). Only the issue time moves: a share decided more than `fresh_s`
    ago is re-issued at `now`, or an agent that was away longer than its dispatch.max_age_s would refuse it as
    expired for ever (its repeat check ignores the issue time, so that is still the same request)."""
    out: list[SiteCommand] = []
    for did, shares in sorted(state.assignments.items()):
        d = state.dispatches.get(did)
        sd_id = f"{state.program_id}.{CAP_ID if d is not None and d.kind == 'cap' else did}"
        for sid, a in sorted(shares.items()):
            if a.acked:
                continue
            if a.cancelled or d is None:
                doc: dict[str, Any] = {
                    "id": f"{sd_id}:cancel",
                    "site": sid,
                    "verb": "cancel",
                    "dispatch_id": sd_id,
                    "issued_at": _issued(a, now, fresh_s),
                }
                out.append(SiteCommand(sid, "cancel", did, a.rev, doc))
                continue
            doc = {
                "id": sd_id,
                "site": sid,
                "verb": "dispatch",
                "rev": a.rev,
                "issued_at": _issued(a, now, fresh_s),
                "target_kw": math.floor(a.target_w) / 1000.0,
                "start": _whole(d.start),
            }
            if d.end is not None:
                doc["end"] = _whole(d.end)
            if a.ramp_kw_per_min is not None:
                doc["ramp_kw_per_min"] = a.ramp_kw_per_min
            out.append(SiteCommand(sid, "dispatch", did, a.rev, doc))
    return out


def _issued(a: Assignment, now: float, fresh_s: float) -> int:
    return _whole(a.decided_at if now - a.decided_at <= fresh_s else now)


def _whole(ts: float) -> int:
    """Epoch seconds as an integer (the signing format renders integers the same everywhere)."""
    return math.floor(ts)


def acknowledge(state: ProgramState, site_id: str, command: SiteCommand, reply: Reply) -> ProgramState:
    """The site answered `command`: an ok (or a repeat's stored ok) marks that rev delivered; an error leaves it
    pending (re-sent). A reply to an older rev than the one held changes nothing."""
    shares = state.assignments.get(command.dispatch_id)
    held = None if shares is None else shares.get(site_id)
    if held is None or held.rev != command.rev or held.acked:
        return state
    if command.verb == "cancel" and not held.cancelled:
        return state
    ok = reply.is_ok or reply.error_code in ("unknown_dispatch",)  # a cancel of one that already ended is done
    if not ok:
        return state
    assert shares is not None
    new_shares = {**shares, site_id: replace(held, acked=True)}
    return replace(
        state, revision=state.revision + 1, assignments={**state.assignments, command.dispatch_id: new_shares}
    )
