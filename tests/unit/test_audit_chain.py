"""The hash chain as pure functions: every kind of damage is found, and named at the right record."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hashflex.agent.core.audit import (
    GENESIS_HASH,
    Anchor,
    AuditRecord,
    make_record,
    record_hash,
    verify_chain,
)


def chain(n: int, start: Anchor | None = None) -> list[AuditRecord]:
    anchor = start or Anchor()
    seq, prev = anchor.seq, anchor.hash
    out = []
    for i in range(n):
        rec = make_record(seq, prev, 1_700_000_000.0 + i, "command", {"id": f"c{i}", "verdict": "ok", "kw": i * 1.5})
        out.append(rec)
        seq, prev = rec.seq, rec.hash
    return out


def test_a_whole_chain_verifies() -> None:
    records = chain(20)
    result = verify_chain(records, expected_last_seq=20)
    assert result.ok
    assert (result.records, result.first_seq, result.last_seq) == (20, 1, 20)
    assert result.head_hash == records[-1].hash
    assert records[0].prev_hash == GENESIS_HASH


def test_the_hash_covers_every_field() -> None:
    base = record_hash(GENESIS_HASH, 1, 10.0, "command", {"a": 1})
    assert record_hash("1" * 64, 1, 10.0, "command", {"a": 1}) != base
    assert record_hash(GENESIS_HASH, 2, 10.0, "command", {"a": 1}) != base
    assert record_hash(GENESIS_HASH, 1, 10.5, "command", {"a": 1}) != base
    assert record_hash(GENESIS_HASH, 1, 10.0, "alarm", {"a": 1}) != base
    assert record_hash(GENESIS_HASH, 1, 10.0, "command", {"a": 2}) != base
    # key order does not matter: the form is canonical
    assert record_hash(GENESIS_HASH, 1, 10.0, "command", {"b": 2, "a": 1}) == record_hash(
        GENESIS_HASH, 1, 10.0, "command", {"a": 1, "b": 2}
    )


def test_a_tampered_record_is_named() -> None:
    records = chain(10)
    records[4] = dataclasses.replace(records[4], data={**records[4].data, "verdict": "refused"})
    result = verify_chain(records)
    assert not result.ok
    assert result.broken_seq == 5
    assert result.reason is not None
    assert "altered" in result.reason
    assert result.last_seq == 4


def test_a_tampered_record_with_a_recomputed_hash_breaks_the_next_link() -> None:
    records = chain(10)
    r = records[4]
    forged_data = {**r.data, "verdict": "refused"}
    records[4] = dataclasses.replace(
        r, data=forged_data, hash=record_hash(r.prev_hash, r.seq, r.ts, r.kind, forged_data)
    )
    result = verify_chain(records)
    assert not result.ok
    assert result.broken_seq == 6
    assert result.reason is not None
    assert "does not link" in result.reason


def test_a_deleted_record_is_named() -> None:
    records = chain(10)
    del records[6]
    result = verify_chain(records)
    assert not result.ok
    assert result.broken_seq == 7
    assert result.reason is not None
    assert "missing" in result.reason


def test_two_swapped_records_are_found() -> None:
    records = chain(10)
    records[3], records[4] = records[4], records[3]
    result = verify_chain(records)
    assert not result.ok
    assert result.broken_seq == 4


def test_swapped_contents_under_the_original_numbers_are_found() -> None:
    records = chain(10)
    a, b = records[3], records[4]
    records[3] = dataclasses.replace(b, seq=a.seq)
    records[4] = dataclasses.replace(a, seq=b.seq)
    result = verify_chain(records)
    assert not result.ok
    assert result.broken_seq == 4


def test_a_cut_tail_is_found_against_the_recorded_head() -> None:
    records = chain(10)
    assert verify_chain(records[:7]).ok  # without the head, a shorter chain looks whole
    result = verify_chain(records[:7], expected_last_seq=10)
    assert not result.ok
    assert result.broken_seq == 8
    assert result.reason is not None
    assert "8..10 missing" in result.reason


def test_a_chain_continues_from_a_prune_anchor() -> None:
    full = chain(10)
    anchor = Anchor(full[5].seq, full[5].hash)
    assert verify_chain(full[6:], anchor, expected_last_seq=10).ok
    assert not verify_chain(full[6:]).ok  # without the anchor it does not start at genesis


@pytest.mark.parametrize(
    ("kind", "ts", "data", "message"),
    [
        ("made_up", 1.0, {}, "unknown audit kind"),
        ("command", float("nan"), {}, "finite"),
        ("command", True, {}, "finite"),
        ("command", 1.0, {"x": float("inf")}, "not plain JSON"),
        ("command", 1.0, {"x": object()}, "not plain JSON"),
        ("command", 1.0, ["not", "a", "mapping"], "mapping"),
    ],
)
def test_bad_records_are_refused(kind: str, ts: float, data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_record(0, GENESIS_HASH, ts, kind, data)  # type: ignore[arg-type]


def test_data_is_stored_as_plain_json() -> None:
    rec = make_record(0, GENESIS_HASH, 5, "actions", {"ips": ("a", "b"), "n": 2})
    assert rec.data == {"ips": ["a", "b"], "n": 2}
    assert rec.ts == 5.0
    assert isinstance(rec.ts, float)


@given(
    n=st.integers(min_value=2, max_value=25),
    pos=st.integers(min_value=0, max_value=24),
    field=st.sampled_from(["seq", "ts", "kind", "data", "prev_hash", "hash"]),
)
def test_any_single_change_anywhere_is_detected(n: int, pos: int, field: str) -> None:
    records = chain(n)
    pos %= n
    r = records[pos]
    changed: dict[str, Any] = {
        "seq": r.seq + 100,
        "ts": r.ts + 0.001,
        "kind": "alarm",
        "data": {**r.data, "extra": 1},
        "prev_hash": "f" * 64,
        "hash": "e" * 64,
    }
    records[pos] = dataclasses.replace(r, **{field: changed[field]})
    result = verify_chain(records, expected_last_seq=n)
    assert not result.ok
    assert result.broken_seq is not None
    assert result.broken_seq <= pos + 2
