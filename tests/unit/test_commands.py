"""The command gate: every class of bad input gets a clear error code and message; good input a typed command."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.commands import REQUEST_DIGEST, Command, Repeat, answer_repeat, parse_request, request_digest
from hashflex.agent.config import DispatchRules
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
    TOO_LARGE,
    UNKNOWN_VERB,
    UNSIGNED,
    Reply,
)
from hashflex.contract.requests import (
    CancelRequest,
    CapRequest,
    CurtailRequest,
    DispatchRequest,
    MinersRequest,
    parse_timestamp,
)

NOW = 1_750_000_000.0
CAP_KW = 2000.0
RULES = DispatchRules(max_age_s=300, max_skew_s=30)
GRID = Ed25519PrivateKey.generate()
OPERATOR = Ed25519PrivateKey.generate()
SITE = "test-site"
KEY = "grid:dispatch:d-1"  # the idempotency key of dispatch d-1
STRANGER = Ed25519PrivateKey.generate()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse(
    verb: str,
    doc: Any,
    channel: Channel = Channel.MQTT,
    *,
    operator_keys: bool = True,
    retained: bool = False,
    raw: bytes | None = None,
) -> Command | Reply:
    payload = raw if raw is not None else json.dumps(doc).encode()
    return parse_request(
        verb,
        payload,
        channel,
        grid_keys=[GRID.public_key()],
        operator_keys=[OPERATOR.public_key()] if operator_keys else [],
        now=NOW,
        rules=RULES,
        max_bytes=4096,
        cap_kw=CAP_KW,
        site_id=SITE,
        retained=retained,
    )


def dispatch_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "d-1", "issued_at": iso(NOW - 2), "target_kw": 1200}
    doc.update(over)
    return doc


def signed(doc: dict[str, Any], key: Ed25519PrivateKey = GRID, verb: str | None = None) -> dict[str, Any]:
    """hashflex-sig-v2 for this site; the verb is what the fields say unless given."""
    if verb is None:
        verb = next(
            (
                v
                for f, v in (
                    ("dispatch_id", "cancel"),
                    ("cap_kw", "cap"),
                    ("to_kw", "curtail"),
                    ("by_kw", "curtail"),
                    ("target_kw", "dispatch"),
                    ("curtail_kw", "dispatch"),
                )
                if f in doc
            ),
            "resume",
        )
    return signing.sign_command({"site": SITE, "verb": verb, **doc}, key)


def error(result: Command | Reply) -> tuple[str, str]:
    assert isinstance(result, Reply), f"expected an error reply, got {result!r}"
    assert result.status == "error"
    assert result.error_code is not None
    assert result.error_message
    return result.error_code, result.error_message


# ------------------------------------------------------------------------------------------------ good input
def test_signed_dispatch_parses_to_typed_command_with_epoch_times() -> None:
    doc = signed(dispatch_doc(start=iso(NOW), end=iso(NOW + 3600), ramp_kw_per_min=50, rev=2))
    cmd = parse("dispatch", doc)
    assert isinstance(cmd, Command)
    req = cmd.request
    assert isinstance(req, DispatchRequest)
    assert req.target_kw == 1200.0
    assert req.start == pytest.approx(NOW)
    assert req.end == pytest.approx(NOW + 3600)
    assert req.issued_at == pytest.approx(NOW - 2)
    assert cmd.idempotency_key == "grid:dispatch:d-1#rev2"  # namespaced by source and verb
    assert cmd.mutating


def test_dispatch_accepts_curtail_kw_and_unit_strings() -> None:
    cmd = parse("dispatch", signed({"id": "d-2", "issued_at": iso(NOW), "curtail_kw": "0.5MW"}))
    assert isinstance(cmd, Command)
    assert isinstance(cmd.request, DispatchRequest)
    assert cmd.request.curtail_kw == 500.0
    assert cmd.idempotency_key == "grid:dispatch:d-2"


def test_key_order_and_spacing_do_not_matter_for_the_signature() -> None:
    doc = signed(dispatch_doc())
    payload = json.dumps(dict(reversed(list(doc.items()))), indent=3).encode()
    assert isinstance(parse("dispatch", None, raw=payload), Command)


def test_local_operator_commands_need_no_signature() -> None:
    cmd = parse("curtail", {"to_kw": "1.5MW", "for_s": "2h"}, Channel.LOCAL)
    assert isinstance(cmd, Command)
    assert isinstance(cmd.request, CurtailRequest)
    assert cmd.request.to_kw == 1500.0
    assert cmd.request.for_s == 7200.0
    assert isinstance(parse("resume", {}, Channel.LOCAL), Command)
    cap = parse("cap", {"cap_kw": 1800}, Channel.LOCAL)
    assert isinstance(cap, Command)
    assert isinstance(cap.request, CapRequest)


def test_operator_commands_over_mqtt_with_an_operator_signature() -> None:
    doc = signed({"id": "op-1", "issued_at": iso(NOW), "by_kw": 300}, OPERATOR)
    cmd = parse("curtail", doc)
    assert isinstance(cmd, Command)


def test_signed_cap_and_cancel_over_mqtt() -> None:
    assert isinstance(parse("cap", signed({"id": "c-1", "issued_at": iso(NOW), "cap_kw": 1500})), Command)
    cancel = parse("cancel", signed({"id": "x-1", "issued_at": iso(NOW), "dispatch_id": "d-1"}))
    assert isinstance(cancel, Command)
    assert isinstance(cancel.request, CancelRequest)


def test_read_verbs_are_open_and_typed() -> None:
    for verb in ("ping", "status", "dispatches", "events"):
        assert isinstance(parse(verb, {}), Command), verb
    miners = parse("miners", {"state": "sleeping", "sort": "power", "desc": True, "limit": 5})
    assert isinstance(miners, Command)
    assert isinstance(miners.request, MinersRequest)
    assert miners.idempotency_key is None
    assert isinstance(parse("ping", None, raw=b""), Command)


def test_timestamps_parse_iso_with_zone_and_epoch_numbers() -> None:
    assert parse_timestamp("2025-01-01T00:00:00Z") == 1735689600.0
    assert parse_timestamp("2025-01-01T05:00:00+05:00") == 1735689600.0
    assert parse_timestamp(1735689600) == 1735689600.0
    with pytest.raises(ValueError, match="time zone"):
        parse_timestamp("2025-01-01T00:00:00")


# ------------------------------------------------------------------------------------------------- bad input
def test_oversized_payload_is_refused() -> None:
    code, msg = error(parse("dispatch", None, raw=b"{" + b" " * 5000 + b"}"))
    assert code == TOO_LARGE
    assert "4096" in msg


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"42"])
def test_malformed_json_is_refused(raw: bytes) -> None:
    code, _ = error(parse("dispatch", None, raw=raw))
    assert code == BAD_JSON


def test_unknown_verb_lists_the_known_ones() -> None:
    code, msg = error(parse("explode", {"id": "e"}))
    assert code == UNKNOWN_VERB
    assert "dispatch" in msg
    assert "explode" in msg


def test_retained_command_is_refused() -> None:
    result = parse("dispatch", signed(dispatch_doc()), retained=True)
    code, msg = error(result)
    assert code == RETAINED
    assert "retain" in msg
    assert isinstance(result, Reply)
    assert result.id == "d-1"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"target_kw": "lots"}, "target_kw"),
        ({"target_kw": True}, "target_kw"),
        ({"issued_at": "yesterday"}, "issued_at"),
        ({"rev": "high"}, "rev"),
        ({"priority": 0}, "unknown field"),  # retired in contract 1.0: it never had an effect
        ({"colour": "red"}, "unknown field"),
        ({"id": ""}, "id"),
        ({"id": 7}, "id"),
        ({"curtail_kw": 100}, "exactly one"),
    ],
)
def test_wrong_types_and_shapes_are_refused(over: dict[str, Any], needle: str) -> None:
    code, msg = error(parse("dispatch", signed(dispatch_doc(**over))))
    assert code == BAD_REQUEST
    assert needle in msg


def test_missing_fields_are_named() -> None:
    code, msg = error(parse("dispatch", {"target_kw": 10}))
    assert code == BAD_REQUEST
    assert "id: required" in msg
    assert "issued_at: required" in msg


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"target_kw": -5}, "negative"),
        ({"start": iso(NOW + 100), "end": iso(NOW + 50)}, "end must be after start"),
        ({"ramp_kw_per_min": 0}, "ramp_kw_per_min"),
        ({"ramp_kw_per_min": -3}, "ramp_kw_per_min"),
    ],
)
def test_out_of_range_values_are_refused(over: dict[str, Any], needle: str) -> None:
    code, msg = error(parse("dispatch", signed(dispatch_doc(**over))))
    assert code == OUT_OF_RANGE
    assert needle in msg


def test_target_above_the_cap_is_refused() -> None:
    code, msg = error(parse("dispatch", signed(dispatch_doc(target_kw=CAP_KW + 1))))
    assert code == OUT_OF_RANGE
    assert "above the site cap" in msg
    code, _ = error(parse("cap", {"cap_kw": "2.5MW"}, Channel.LOCAL))
    assert code == OUT_OF_RANGE
    code, _ = error(parse("curtail", {"to_kw": 5000}, Channel.LOCAL))
    assert code == OUT_OF_RANGE
    code, _ = error(parse("preview", {"target_kw": 5000}))
    assert code == OUT_OF_RANGE


def test_unsigned_grid_commands_are_refused_on_every_channel() -> None:
    for channel in (Channel.MQTT, Channel.LOCAL):
        code, msg = error(parse("dispatch", dispatch_doc(), channel))
        assert code == UNSIGNED
        assert "hashflex sign" in msg
    code, _ = error(parse("cancel", {"id": "x", "issued_at": iso(NOW), "dispatch_id": "d"}, Channel.LOCAL))
    assert code == UNSIGNED
    code, _ = error(parse("cap", {"id": "c", "issued_at": iso(NOW), "cap_kw": 10}))
    assert code == UNSIGNED


def test_bad_signatures_are_refused() -> None:
    tampered = signed(dispatch_doc())
    tampered["target_kw"] = 1900
    code, msg = error(parse("dispatch", tampered))
    assert code == BAD_SIGNATURE
    assert "changed after signing" in msg
    code, _ = error(parse("dispatch", signed(dispatch_doc(), STRANGER)))
    assert code == BAD_SIGNATURE
    code, _ = error(parse("dispatch", {**signed(dispatch_doc()), "signature": "!!not base64!!"}))
    assert code == BAD_SIGNATURE
    # an operator key cannot sign a grid command
    code, _ = error(parse("dispatch", signed(dispatch_doc(), OPERATOR)))
    assert code == BAD_SIGNATURE


def test_operator_commands_over_mqtt_are_disabled_without_operator_keys() -> None:
    code, msg = error(parse("curtail", {"to_kw": 100}, operator_keys=False))
    assert code == DISABLED
    assert "local CLI" in msg


def test_operator_commands_over_mqtt_need_an_operator_signature() -> None:
    code, _ = error(parse("resume", {"id": "r", "issued_at": iso(NOW)}))
    assert code == UNSIGNED
    code, _ = error(parse("resume", signed({"id": "r", "issued_at": iso(NOW)}, STRANGER)))
    assert code == BAD_SIGNATURE


def test_a_bad_signature_on_a_local_command_is_not_ignored() -> None:
    code, _ = error(parse("curtail", {"to_kw": 100, "signature": "AAAA"}, Channel.LOCAL))
    assert code == BAD_SIGNATURE


def test_stale_and_future_commands_are_refused() -> None:
    code, msg = error(parse("dispatch", signed(dispatch_doc(issued_at=iso(NOW - 301)))))
    assert code == EXPIRED
    assert "301 s ago" in msg
    code, msg = error(parse("dispatch", signed(dispatch_doc(issued_at=iso(NOW + 31)))))
    assert code == FUTURE
    assert "clock" in msg
    # inside the windows: fine
    assert isinstance(parse("dispatch", signed(dispatch_doc(issued_at=iso(NOW - 299)))), Command)
    assert isinstance(parse("dispatch", signed(dispatch_doc(issued_at=iso(NOW + 29)))), Command)


def test_dispatch_whose_window_is_over_is_refused_as_expired() -> None:
    code, msg = error(parse("dispatch", signed(dispatch_doc(start=iso(NOW - 200), end=iso(NOW - 1)))))
    assert code == EXPIRED
    assert "already over" in msg


def test_a_window_over_on_the_agents_clock_but_not_the_senders_is_accepted() -> None:
    # the agent's clock is 60 s ahead of the grid's (a restart after a wall step): the grid issued this at its now
    # with 30 s to run; on the agent's clock the end passed 30 s ago, on the grid's it has 30 s left
    sender_now = NOW - 60
    doc = dispatch_doc(issued_at=iso(sender_now), end=iso(sender_now + 30))
    assert isinstance(parse("dispatch", signed(doc)), Command)
    # over on both clocks: refused
    code, _ = error(parse("dispatch", signed(dispatch_doc(issued_at=iso(sender_now), end=iso(sender_now - 1)))))
    assert code == EXPIRED


def test_signature_is_checked_before_the_clock() -> None:
    # an attacker cannot learn anything about freshness rules from an unsigned message
    code, _ = error(parse("dispatch", dispatch_doc(issued_at=iso(NOW - 10_000))))
    assert code == UNSIGNED


def test_error_reply_echoes_the_request_id() -> None:
    result = parse("dispatch", {"id": "abc", "target_kw": -1})
    assert isinstance(result, Reply)
    assert result.id == "abc"
    wire = result.to_dict()
    assert wire["status"] == "error"
    assert wire["error"]["code"] == BAD_REQUEST


def test_an_authentic_repeat_gets_its_stored_reply_however_old() -> None:
    doc = signed(dispatch_doc(issued_at=iso(NOW - 10_000)))  # far beyond max_age
    stored = {"id": "d-1", "status": "ok", "data": {"dispatch": {"id": "d-1"}}}
    result = parse_request(
        "dispatch",
        json.dumps(doc).encode(),
        Channel.MQTT,
        grid_keys=[GRID.public_key()],
        operator_keys=[],
        now=NOW,
        rules=RULES,
        max_bytes=4096,
        cap_kw=CAP_KW,
        site_id=SITE,
        stored_reply={KEY: stored}.get,
    )
    assert isinstance(result, Repeat)
    assert result.reply.to_dict() == stored
    # ...but only an authentic one: a forged repeat is refused before the store is asked
    forged = {**doc, "target_kw": 1}
    result = parse_request(
        "dispatch",
        json.dumps(forged).encode(),
        Channel.MQTT,
        grid_keys=[GRID.public_key()],
        operator_keys=[],
        now=NOW,
        rules=RULES,
        max_bytes=4096,
        cap_kw=CAP_KW,
        site_id=SITE,
        stored_reply={KEY: stored}.get,
    )
    code, _ = error(result)
    assert code == BAD_SIGNATURE


def test_an_id_reused_for_other_content_is_a_conflict_not_the_first_ok() -> None:
    first = DispatchRequest.model_validate(dispatch_doc())
    stored = {"id": "d-1", "status": "ok", "data": {}, REQUEST_DIGEST: request_digest(first)}

    def send(doc: dict[str, Any]) -> Command | Repeat | Reply:
        return parse_request(
            "dispatch",
            json.dumps(signed(doc)).encode(),
            Channel.MQTT,
            grid_keys=[GRID.public_key()],
            operator_keys=[],
            now=NOW,
            rules=RULES,
            max_bytes=4096,
            cap_kw=CAP_KW,
            site_id=SITE,
            stored_reply={KEY: stored}.get,
        )

    # the same request signed again later (a retry) is a repeat...
    assert isinstance(send(dispatch_doc(issued_at=iso(NOW - 1))), Repeat)
    # ...the same id asking for something else is refused, and says what to do
    refused = send(dispatch_doc(target_kw=5))
    assert isinstance(refused, Reply)
    code, message = error(refused)
    assert code == CONFLICT
    assert "new id" in message


def test_curtail_add_is_optional_and_leaves_older_digests_as_they_were() -> None:
    """Issue 16 item 7: `add` is a new optional field of `curtail`. Without it the request is what it always was, down
    to its digest: a retry of a curtail stored before `add` existed is still a repeat, not a conflict."""
    plain = parse("curtail", {"id": "o-1", "to_kw": 500}, Channel.LOCAL)
    added = parse("curtail", {"id": "o-1", "to_kw": 500, "add": True}, Channel.LOCAL)
    assert isinstance(plain, Command)
    assert isinstance(added, Command)
    assert isinstance(plain.request, CurtailRequest)
    assert isinstance(added.request, CurtailRequest)
    assert plain.request.add is False
    assert added.request.add is True
    # the digest as it was computed before the field existed (every field but issued_at and the signature)
    before = json.dumps(
        {"by_kw": None, "for_s": None, "id": "o-1", "to_kw": 500.0}, sort_keys=True, separators=(",", ":")
    )
    assert plain.digest == hashlib.sha256(before.encode()).hexdigest()
    assert added.digest != plain.digest  # asking to add is another request
    code, message = error(parse("curtail", {"id": "o-2", "to_kw": 500, "add": "maybe"}, Channel.LOCAL))
    assert code == BAD_REQUEST
    assert "add" in message


def test_a_dispatch_stored_before_priority_was_retired_keeps_its_digest() -> None:
    """`priority` (accepted, never used) left the dispatch request in contract 1.0. A dispatch answered before keeps
    its stored digest: a grid retrying it after the upgrade gets its stored reply, not a conflict. The digest below
    is the one the agent computed before the change (commit b03e2fa) for this very request."""
    request = DispatchRequest.model_validate(
        {"id": "d-7", "issued_at": 1750000000, "target_kw": 400, "end": 1750003600}
    )
    assert request_digest(request) == "645a22e0dc7be8cec7cf63b4b4dcda4b4bb2b2ab15eeb80d217ebbe680964bcb"
    stored = {"id": "d-7", "status": "ok", "data": {}, REQUEST_DIGEST: request_digest(request)}
    assert isinstance(answer_repeat(request, stored), Repeat)
