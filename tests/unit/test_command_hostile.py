"""The command gate under hostile input (issue 12, findings 3, 7, 8, 11): nothing a sender can put in a payload makes
`parse_request` raise, no non-finite or absurd number gets through, and a signature is only good for the site, the
verb and the id it was made for."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashflex.agent import commands
from hashflex.agent.commands import Command, Repeat, parse_request
from hashflex.agent.config import DispatchRules
from hashflex.agent.protocol import Channel
from hashflex.contract import signing
from hashflex.contract.reply import BAD_JSON, BAD_REQUEST, BAD_SIGNATURE, OUT_OF_RANGE, Reply
from hashflex.contract.requests import DispatchRequest

NOW = 1_750_000_000.0
SITE = "lhr-07"
RULES = DispatchRules(max_age_s=300, max_skew_s=30)
GRID = Ed25519PrivateKey.generate()
OPERATOR = Ed25519PrivateKey.generate()
# what a refusal of malformed input may say; never internal, never an exception
MALFORMED = {BAD_JSON, BAD_REQUEST, OUT_OF_RANGE}
ANY_REFUSAL = MALFORMED | {
    "too_large",
    "unknown_verb",
    "unsigned",
    "bad_signature",
    "disabled",
    "expired",
    "future",
    "wrong_scope",
    "retained",
}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse(verb: str, payload: bytes | Any, channel: Channel = Channel.MQTT) -> Command | Repeat | Reply:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_request(
        verb,
        raw,
        channel,
        grid_keys=[GRID.public_key()],
        operator_keys=[OPERATOR.public_key()],
        now=NOW,
        rules=RULES,
        max_bytes=65_536,
        cap_kw=2000.0,
        site_id=SITE,
    )


def grid_signed(
    doc: dict[str, Any], verb: str = "dispatch", *, site: str = SITE, key: Ed25519PrivateKey = GRID
) -> dict[str, Any]:
    return signing.sign_command({"id": "d-1", "issued_at": iso(NOW - 1), "site": site, "verb": verb, **doc}, key)


def code(result: Command | Repeat | Reply) -> str | None:
    assert isinstance(result, Reply), f"expected a refusal, got {result!r}"
    assert result.status == "error"
    assert result.error_message
    return result.error_code


def signed_bytes(doc: dict[str, Any], number_text: str, field: str) -> bytes:
    """A signed dispatch whose `field` holds the literal JSON `number_text` (a placeholder swapped in after)."""
    text = json.dumps(grid_signed({**doc, field: "@@"}))
    return text.replace('"@@"', number_text).encode()


# ------------------------------------------------------------------------------------- finding 7: parsing
@pytest.mark.parametrize(
    ("what", "payload"),
    [
        ("a 401-digit integer", b'{"id": "x", "target_kw": 1' + b"0" * 400 + b"}"),
        ("beyond Python's int-digit limit", b'{"id": "x", "target_kw": ' + b"9" * 5000 + b"}"),
        ("deep nesting", b'{"id": "x", "target_kw": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
        ("deep nesting, unbalanced", b"[" * 60_000),
        ("a float that overflows", b'{"id": "x", "target_kw": 1e400}'),
        ("NaN", b'{"id": "x", "target_kw": NaN}'),
        ("Infinity", b'{"id": "x", "ramp_kw_per_min": Infinity, "target_kw": 1}'),
        ("-Infinity", b'{"id": "x", "priority": -Infinity, "target_kw": 1}'),
        ("duplicate keys", b'{"id": "x", "target_kw": 1, "target_kw": 2000}'),
        ("a lone surrogate", b'{"id": "\\ud800", "target_kw": 1}'),
    ],
)
@pytest.mark.parametrize("channel", [Channel.MQTT, Channel.LOCAL])
def test_malformed_json_is_bad_json_and_never_raises(what: str, payload: bytes, channel: Channel) -> None:
    result = parse("dispatch", payload, channel)
    assert code(result) in (BAD_JSON, BAD_REQUEST, "unsigned"), what


def test_a_huge_integer_in_a_signed_dispatch_is_refused_not_raised() -> None:
    payload = signed_bytes({"target_kw": 5}, "1" + "0" * 400, "rev")
    assert code(parse("dispatch", payload)) == BAD_JSON


def test_ramp_1e400_is_refused() -> None:
    # json.loads reads 1e400 as inf; the old gate took it as a valid ramp and the agent crashed storing it
    payload = signed_bytes({"target_kw": 5}, "1e400", "ramp_kw_per_min")
    assert code(parse("dispatch", payload)) == BAD_JSON


@pytest.mark.parametrize("text", ['"inf"', '"nan"', '"-inf"', '"Infinity"'])
def test_non_finite_strings_are_refused_by_float_fields(text: str) -> None:
    payload = signed_bytes({"target_kw": 5}, text, "ramp_kw_per_min")
    assert code(parse("dispatch", payload)) in MALFORMED


def test_a_huge_but_finite_ramp_is_out_of_range() -> None:
    assert code(parse("dispatch", grid_signed({"target_kw": 5, "ramp_kw_per_min": 1e300}))) == OUT_OF_RANGE


# ------------------------------------------------------------------------------------- finding 3: bounds
@pytest.mark.parametrize(
    "end",
    [
        (NOW + 3600) * 1000,  # epoch milliseconds: year 57742
        (NOW + 3600) * 1_000_000,
        1e300,
        "9999-12-31T23:59:59Z",
        iso(NOW + 3 * 365 * 86400),  # a sane calendar date, but years ahead
        -5,
        "1969-12-31T00:00:00Z",
    ],
)
def test_timestamps_outside_a_sane_window_are_out_of_range(end: Any) -> None:
    assert code(parse("dispatch", grid_signed({"target_kw": 5, "end": end}))) == OUT_OF_RANGE


def test_issued_at_in_epoch_milliseconds_is_out_of_range() -> None:
    assert code(parse("dispatch", grid_signed({"target_kw": 5, "issued_at": NOW * 1000}))) == OUT_OF_RANGE


@pytest.mark.parametrize("for_s", ["99999999999d", 1e300, "400d", 10**17])
def test_override_durations_are_bounded(for_s: Any) -> None:
    assert code(parse("curtail", {"to_kw": 5, "for_s": for_s}, Channel.LOCAL)) == OUT_OF_RANGE


def test_sane_values_still_pass() -> None:
    cmd = parse("dispatch", grid_signed({"target_kw": 5, "end": iso(NOW + 86400), "ramp_kw_per_min": 250}))
    assert isinstance(cmd, Command)
    assert isinstance(cmd.request, DispatchRequest)
    assert isinstance(parse("curtail", {"to_kw": 5, "for_s": "30d"}, Channel.LOCAL), Command)


# ------------------------------------------------------------------------------------- Hypothesis: never raises
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**450)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
# number literals of every size: a few digits to far past float range and Python's int-digit limit for json
NUMBERS = st.builds(
    lambda sign, digits, frac, exp: f"{sign}1{'0' * digits}{frac}{exp}",
    st.sampled_from(["", "-"]),
    st.integers(0, 5000),
    st.sampled_from(["", ".5"]),
    st.sampled_from(["", "e400", "e-400", "e308", "e10", "E+5", "e0"]),
)
JSONISH = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "id",
        "issued_at",
        "target_kw",
        "curtail_kw",
        "start",
        "end",
        "ramp_kw_per_min",
        "priority",
        "rev",
        "dispatch_id",
        "cap_kw",
        "to_kw",
        "by_kw",
        "for_s",
        "site",
        "verb",
        "signature",
        "limit",
        "state",
        "sort",
        "all",
    ]
)
VERBS = st.sampled_from([*sorted(commands.REQUESTS), "launch", ""])


def _check(result: Command | Repeat | Reply) -> None:
    if isinstance(result, Reply):
        assert result.status == "error", result
        assert result.error_code in ANY_REFUSAL, result
        result.to_json()  # and the reply can be sent
    else:
        assert isinstance(result, Command)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    verb=VERBS, doc=st.dictionaries(FIELDS, JSONISH, max_size=8), channel=st.sampled_from([Channel.MQTT, Channel.LOCAL])
)
def test_arbitrary_documents_never_raise(verb: str, doc: dict[str, Any], channel: Channel) -> None:
    payload = json.dumps(doc, allow_nan=True).encode()  # NaN/Infinity literals too
    _check(parse(verb, payload, channel))


@settings(max_examples=400, deadline=None)
@given(verb=VERBS, payload=st.binary(max_size=300), channel=st.sampled_from([Channel.MQTT, Channel.LOCAL]))
def test_arbitrary_bytes_never_raise(verb: str, payload: bytes, channel: Channel) -> None:
    _check(parse(verb, payload, channel))


@settings(max_examples=200, deadline=None)
@given(number=NUMBERS, field=st.sampled_from(["target_kw", "ramp_kw_per_min", "rev", "end", "start", "issued_at"]))
def test_any_number_in_any_signed_field_never_raises(number: str, field: str) -> None:
    result = parse("dispatch", signed_bytes({"target_kw": 5}, number, field))
    _check(result)
    if isinstance(result, Command):  # whatever got through is finite and sane
        req = result.request
        assert isinstance(req, DispatchRequest)
        for value in (req.target_kw, req.ramp_kw_per_min, req.start, req.end, req.issued_at):
            assert value is None or abs(value) < 1e16


# ------------------------------------------------------------------------------------- finding 8: signed scope
def test_a_signature_covers_site_and_verb() -> None:
    assert isinstance(parse("dispatch", grid_signed({"target_kw": 5})), Command)
    assert isinstance(parse("cancel", grid_signed({"id": "c-1", "dispatch_id": "d-1"}, "cancel")), Command)


def test_a_command_signed_for_another_site_is_refused() -> None:
    other = grid_signed({"id": "c-1", "dispatch_id": "d-1"}, "cancel", site="ams-01")
    assert code(parse("cancel", other)) == commands.WRONG_SCOPE


def test_a_command_signed_for_another_verb_is_refused() -> None:
    as_dispatch = grid_signed({"id": "x-1", "target_kw": 5})
    assert code(parse("cap", as_dispatch)) == commands.WRONG_SCOPE
    cap = grid_signed({"id": "x-2", "cap_kw": 5}, "cap")
    assert code(parse("dispatch", cap)) == commands.WRONG_SCOPE


@pytest.mark.parametrize("drop", ["site", "verb", "id"])
def test_signed_commands_must_carry_site_verb_and_id(drop: str) -> None:
    doc = {"id": "c-9", "issued_at": iso(NOW), "site": SITE, "verb": "cap", "cap_kw": 5}
    del doc[drop]
    assert code(parse("cap", signing.sign_command(doc, GRID))) == BAD_REQUEST


def test_the_scope_cannot_be_changed_after_signing() -> None:
    doc = grid_signed({"id": "c-1", "dispatch_id": "d-1"}, "cancel", site="ams-01")
    assert code(parse("cancel", {**doc, "site": SITE})) == BAD_SIGNATURE


def test_a_v1_signature_is_not_accepted() -> None:
    """The old format (no domain prefix) over the same fields: refused, so old captures cannot be replayed."""
    doc = {"id": "d-1", "issued_at": iso(NOW), "site": SITE, "verb": "dispatch", "target_kw": 5}
    assert code(parse("dispatch", signing.sign(doc, GRID))) == BAD_SIGNATURE


# ------------------------------------------------------------------------------------- finding 11: namespaces
def test_operator_and_grid_ids_are_separate_namespaces() -> None:
    local = parse("curtail", {"id": "ev-1", "to_kw": 5}, Channel.LOCAL)
    grid = parse("dispatch", grid_signed({"id": "ev-1", "target_kw": 5}))
    assert isinstance(local, Command)
    assert isinstance(grid, Command)
    assert local.idempotency_key != grid.idempotency_key
    local_cap = parse("cap", {"id": "c", "cap_kw": 5}, Channel.LOCAL)
    grid_cap = parse("cap", grid_signed({"id": "c", "cap_kw": 5}, "cap"))
    assert isinstance(local_cap, Command)
    assert isinstance(grid_cap, Command)
    assert local_cap.idempotency_key != grid_cap.idempotency_key


@pytest.mark.parametrize("dispatch_id", ["op:maintenance", "safe-start"])
def test_grid_ids_cannot_name_the_sites_own_overrides(dispatch_id: str) -> None:
    assert code(parse("dispatch", grid_signed({"id": dispatch_id, "target_kw": 800}))) == BAD_REQUEST
    cancel = grid_signed({"id": "c-1", "dispatch_id": dispatch_id}, "cancel")
    assert code(parse("cancel", cancel)) == BAD_REQUEST


# ------------------------------------------------------------------------------------- heartbeats
def beat(issued: float, *, site: str = SITE, key: Ed25519PrivateKey = GRID, **extra: Any) -> bytes:
    doc = {"site": site, "verb": "heartbeat", "issued_at": iso(issued), "seq": 1, **extra}
    return json.dumps(signing.sign_command(doc, key)).encode()


def check_beat(payload: bytes, newest: float | None = None) -> float | str:
    return commands.parse_heartbeat(
        payload, grid_keys=[GRID.public_key()], site_id=SITE, now=NOW, max_age_s=60, max_skew_s=30, newest=newest
    )


def test_only_signed_fresh_newer_heartbeats_for_this_site_count() -> None:
    assert check_beat(beat(NOW - 1)) == pytest.approx(NOW - 1)
    refused = [
        b'{"ts": "2025-01-01T00:00:00Z", "seq": 1}',  # the old anonymous heartbeat
        beat(NOW - 1, site="ams-01"),
        beat(NOW - 1, key=OPERATOR),
        beat(NOW - 120),  # stale
        beat(NOW + 120),  # future
        b"[" * 50_000,
        b"\xff\xfe",
    ]
    for payload in refused:
        assert isinstance(check_beat(payload), str), payload[:60]
    assert isinstance(check_beat(beat(NOW - 1), newest=NOW - 1), str)  # a replay of the last one


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=300)
    | st.dictionaries(FIELDS, JSONISH, max_size=6).map(lambda d: json.dumps(d, allow_nan=True).encode())
)
def test_arbitrary_heartbeats_never_raise(payload: bytes) -> None:
    assert isinstance(check_beat(payload), str)  # nothing unsigned is ever taken for a heartbeat
