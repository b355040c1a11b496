"""The coordinator's audit chain: what a program step records (pure), and the chain on a real 3-node NATS cluster
(JetStream stream, compare-and-set appends): appended and verified, a tampered record named, a deposed writer's
append refused without forking the chain, deletes refused by the stream."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from hashflex.agent.core.audit import GENESIS_HASH
from hashflex.coordinator.audit import (
    ChainConflict,
    CoordinatorKind,
    Tracker,
    export_files,
    next_record,
    record_from_dict,
    step_events,
    verify_stored,
)
from hashflex.coordinator.program import ProgramState, step
from hashflex.coordinator.store import JetStreamAuditLog
from tests.coordinator.support import MW, PROGRAM, RULES, T0, Fabric, accept, ack_all
from tests.nats_cluster import NatsCluster

pytestmark = pytest.mark.timeout(60)


def chain(n: int) -> list[tuple[int, dict[str, Any] | None]]:
    seq, head = 0, GENESIS_HASH
    out: list[tuple[int, dict[str, Any] | None]] = []
    for i in range(n):
        record = next_record(seq, head, T0 + i, "program_command", {"verb": "hold", "outcome": "accepted", "i": i})
        seq, head = record.seq, record.hash
        out.append((record.seq, record.to_dict()))
    return out


# ----------------------------------------------------------------------------------------------- pure


def test_a_chain_verifies_and_every_kind_of_damage_is_named_at_its_record() -> None:
    good = chain(5)
    result = verify_stored(good, expected_last_seq=5)
    assert (result.ok, result.records, result.first_seq, result.last_seq) == (True, 5, 1, 5)
    # a record's content changed after it was written
    altered = [(s, dict(d or {})) for s, d in good]
    altered[2][1]["data"] = {**altered[2][1]["data"], "outcome": "refused"}
    bad = verify_stored(altered, expected_last_seq=5)
    assert (bad.ok, bad.broken_seq, bad.records) == (False, 3, 2)
    assert "altered" in (bad.reason or "")
    # the tail cut (the stream says 5, 4 are there), a message that is not a record, a record in another's place
    assert verify_stored(good[:4], expected_last_seq=5).broken_seq == 5
    assert verify_stored([*good[:1], (2, None)], expected_last_seq=2).reason == (
        "message 2 of the stream is not an audit record"
    )
    assert "holds record 3" in (verify_stored([good[0], (2, good[2][1])], expected_last_seq=2).reason or "")
    # the agent's hash: a record rebuilt from its stored form hashes the same
    assert record_from_dict(good[4][1] or {}).hash == (good[4][1] or {})["hash"]
    with pytest.raises(ValueError, match="unknown coordinator audit kind"):
        next_record(0, GENESIS_HASH, T0, "target_change", {})


def test_a_program_step_records_its_allocation_a_redispatch_and_the_compliance_when_it_ends() -> None:
    fab = Fabric.make()
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "eve", "target_kw": "40MW", "end": T0 + 600},
        now=T0,
        present_w=fab.present(),
    )
    # first step: the hold allocated across a, b, c (reasons per site); not a re-dispatch (nothing failed before)
    first = step(state, fab.configs, fab.views, now=T0 + 1, rules=RULES)
    events, tracker = step_events(state, first, Tracker(), now=T0 + 1)
    assert [k for k, _ in events] == ["allocation"]
    alloc = events[0][1]
    assert alloc["dispatch"] == "eve"
    assert alloc["level_w"] == 40 * MW
    assert {s["site"] for s in alloc["sites"]} == {"a", "b", "c"}
    assert all(s["reason"] and s["changed"] for s in alloc["sites"])
    # the same picture again, every share acknowledged: nothing new to record
    state = ack_all(first.state, first)
    fab.obey(first)
    second = step(state, fab.configs, fab.views, now=T0 + 2, rules=RULES)
    events, tracker = step_events(state, second, tracker, now=T0 + 2)
    assert events == []
    # site c goes offline (its last will): a re-dispatch naming it, and the others' new shares
    fab.set("c", online=False)
    third = step(second.state, fab.configs, fab.views, now=T0 + 3, rules=RULES)
    events, tracker = step_events(second.state, third, tracker, now=T0 + 3)
    assert [k for k, _ in events] == ["redispatch", "allocation"]
    redispatch = events[0][1]
    assert [f["site"] for f in redispatch["failed"]] == ["c"]
    assert redispatch["failed"][0]["failure"] == "offline"
    assert redispatch["failed"][0]["counted_w"] >= 30 * MW
    # the hold's window ends: its compliance, with when every site had its share
    end = step(third.state, fab.configs, fab.views, now=T0 + 601, rules=RULES)
    events, tracker = step_events(third.state, end, tracker, now=T0 + 601)
    (kind, data), *_ = events
    assert kind == "compliance"
    assert (data["dispatch"], data["end"], data["accepted_at"], data["ended_at"]) == ("eve", "expired", T0, T0 + 601)
    assert data["time_to_all_ok_s"] == pytest.approx(2.0)
    assert tracker.compliance == {}


def test_an_export_carries_the_records_and_the_compliance_with_file_digests() -> None:
    records = [record_from_dict(d or {}) for _, d in chain(2)]
    ((name, body),) = export_files(records, {"program": PROGRAM}, "json").items()
    doc = json.loads(body)
    assert (name, doc["format"], doc["program"], len(doc["records"])) == (
        "hashflex-program-export.json",
        "hashflex-program-export/1",
        PROGRAM,
        2,
    )
    files = export_files(records, {"program": PROGRAM}, "csv")
    assert sorted(files) == ["audit.csv", "compliance.csv", "manifest.json"]
    assert files["audit.csv"].decode().splitlines()[0] == "seq,ts,time_utc,kind,data,prev_hash,hash"
    assert set(json.loads(files["manifest.json"])["files"]) == {"audit.csv", "compliance.csv"}


# --------------------------------------------------------------------------------- on a real NATS cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield nodes
    nodes.stop()


@pytest.fixture
async def nc(cluster: NatsCluster) -> AsyncIterator[NatsClient]:
    client = await nats.connect(servers=cluster.urls)
    yield client
    await client.close()


async def stored(log: JetStreamAuditLog) -> list[tuple[int, dict[str, Any] | None]]:
    return [item async for item in log.records()]


async def test_appended_records_verify_and_a_deposed_writer_cannot_fork_the_chain(nc: NatsClient) -> None:
    stream = f"audit_{uuid.uuid4().hex[:8]}"
    leader = JetStreamAuditLog(nc.jetstream(), stream, replicas=3)
    for i in range(3):
        record = await leader.append(T0 + i, CoordinatorKind.PROGRAM_COMMAND, {"i": i})
        assert record.seq == i + 1
    # a second instance (the new leader after a failover) opens the chain at its head and appends
    follower = JetStreamAuditLog(nc.jetstream(), stream, replicas=3)
    assert (await follower.head())[0] == 3
    await follower.append(T0 + 10, CoordinatorKind.LEADING, {"holder": "b"})
    # the deposed leader still believes the head is record 3: its append is refused, nothing is written
    with pytest.raises(ChainConflict):
        await leader.append(T0 + 11, CoordinatorKind.ALLOCATION, {"from": "the deposed leader"})
    items = await stored(leader)
    assert [s for s, _ in items] == [1, 2, 3, 4]
    assert (items[3][1] or {})["data"] == {"holder": "b"}
    assert verify_stored(items, expected_last_seq=4).ok
    # once it has re-read the head (the service does this while it still leads) it appends after record 4
    head = await follower.head()
    record = await leader.append(T0 + 12, CoordinatorKind.ALLOCATION, {"i": 5})
    assert (record.seq, record.prev_hash) == (5, head[1])
    assert verify_stored(await stored(follower), expected_last_seq=5).ok
    # append-only: the stream refuses deleting a record
    with pytest.raises(nats.js.errors.APIError):
        await nc.jetstream().delete_msg(stream, 2)


async def test_a_record_forged_into_the_stream_is_named_by_verify(nc: NatsClient) -> None:
    stream = f"audit_{uuid.uuid4().hex[:8]}"
    log = JetStreamAuditLog(nc.jetstream(), stream, replicas=3)
    first = await log.append(T0, CoordinatorKind.PROGRAM_COMMAND, {"verb": "hold", "outcome": "accepted"})
    # someone with publish rights writes record 2 with a made-up hash (JetStream takes it: it is just a message)
    forged = {**next_record(first.seq, first.hash, T0 + 1, "allocation", {"level_w": 1.0}).to_dict(), "hash": "f" * 64}
    await nc.jetstream().publish(log.subject, json.dumps(forged).encode(), stream=stream)
    result = verify_stored(await stored(log), expected_last_seq=await log.last_seq())
    assert (result.ok, result.broken_seq, result.records) == (False, 2, 1)
    assert "record 2 (allocation) was altered" in (result.reason or "")


def test_a_cancelled_and_a_revised_dispatch_each_get_their_compliance_record() -> None:
    fab = Fabric.make()
    hold = {"id": "eve", "target_kw": "40MW", "end": T0 + 600}
    state = accept(ProgramState(PROGRAM), "hold", hold, now=T0, present_w=fab.present())
    result = step(state, fab.configs, fab.views, now=T0 + 1, rules=RULES)
    _, tracker = step_events(state, result, Tracker(), now=T0 + 1)
    # revised (rev 1, a lower level): the old revision's record, and the new one tracked from here
    state = accept(result.state, "hold", {**hold, "target_kw": "35MW", "rev": 1}, now=T0 + 2, present_w=fab.present())
    result = step(state, fab.configs, fab.views, now=T0 + 3, rules=RULES)
    events, tracker = step_events(state, result, tracker, now=T0 + 3)
    assert [(k, d.get("end")) for k, d in events] == [("compliance", "revised"), ("allocation", None)]
    assert (events[0][1]["rev"], events[0][1]["level_w"]) == (0, 40 * MW)
    # cancelled before its end
    state = accept(result.state, "cancel", {"id": "c1", "dispatch_id": "eve"}, now=T0 + 4, present_w=fab.present())
    result = step(state, fab.configs, fab.views, now=T0 + 5, rules=RULES)
    events, tracker = step_events(state, result, tracker, now=T0 + 5)
    assert [(k, d["end"], d["rev"]) for k, d in events] == [("compliance", "cancelled", 1)]
