"""The wire contract (hashflex.contract) against what the agent really sends: the status document a running controller
builds has exactly the fields `StatusDoc` names (and its sections theirs), a dispatch document has `DispatchDoc`'s,
the verb sets are one partition of the request models, and the flexibility document reads back as it was written."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, get_type_hints

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.core.model import MinerState, Source
from hashflex.agent.protocol import Channel
from hashflex.contract import VERSION, vocabulary
from hashflex.contract.flex import FLEX_SCHEMA, FlexDoc, Flexibility, LossPoint, Reach, parse_flex
from hashflex.contract.requests import MUTATING_VERBS, READ_VERBS, REQUESTS, SIGNED_VERBS, VERBS
from hashflex.contract.status import DispatchDoc, EnergyDoc, FailsafeDoc, PlanDoc, StatusDoc, SweepDoc, TickDoc
from hashflex.contract.topics import ProgramTopics, Topics
from tests.agent_harness import sign_for
from tests.runtime_support import ManualClock, grid_config, start_parts, stop_parts

T0 = 1_760_000_000.0
SITE = "contract"
GRID = Ed25519PrivateKey.generate()


def _keys(doc: object) -> set[str]:
    assert isinstance(doc, dict), doc
    return set(doc)


def _fields(typed: Any) -> set[str]:
    return set(typed.__required_keys__) | set(typed.__optional_keys__)


async def test_the_status_document_has_the_fields_the_contract_names(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    p = await start_parts(grid_config(tmp_path, SITE, GRID), clock, GRID)
    try:
        doc = sign_for(GRID, {"id": "d-1", "target_kw": 400}, site=SITE, verb="dispatch", issued_at=T0)
        reply = await p.service.handle("dispatch", json.dumps(doc).encode(), Channel.MQTT)
        assert reply.is_ok, reply
        assert _keys(reply.data["dispatch"]) == _fields(DispatchDoc)
        p.controller.trigger()
        await asyncio.sleep(0.3)
        status = p.controller.publisher.current(p.controller)
    finally:
        await stop_parts(p.controller, p.task, p.store)
    assert _keys(status) == set(StatusDoc.__required_keys__)  # no facility configured: its key is left out
    assert _keys(status["failsafe"]) == _fields(FailsafeDoc)
    assert _keys(status["tick"]) == _fields(TickDoc)
    assert _keys(status["sweep"]) == _fields(SweepDoc)
    assert _keys(status["energy"]) == _fields(EnergyDoc)
    assert status["plan"] is not None
    assert _keys(status["plan"]) == _fields(PlanDoc)
    assert [_keys(d) for d in status["dispatches"]] == [_fields(DispatchDoc)]
    assert set(status["miners"]) == {*vocabulary.MINER_STATES, "unidentified", "total"}
    assert status["target_source"] in vocabulary.TARGET_SOURCES


def test_the_verbs_are_one_partition_of_the_request_models() -> None:
    assert set(VERBS) == set(REQUESTS)
    assert set(VERBS) == READ_VERBS | MUTATING_VERBS
    assert not READ_VERBS & MUTATING_VERBS
    assert {"ping", "status", "miners", "preview", "dispatches", "events"} == READ_VERBS
    assert SIGNED_VERBS == ("dispatch", "cancel", "cap", "curtail", "resume", "heartbeat")


def test_the_core_names_are_the_contract_names() -> None:
    # one definition: the core's model re-exports the contract's vocabulary, it does not copy it
    assert MinerState is vocabulary.MinerState
    assert Source is vocabulary.Source
    assert VERSION.split(".")[0] == "1"


def test_topics_of_a_site_and_of_a_program() -> None:
    site = Topics.of_site("hashflex", "lhr-07")
    assert site.command("dispatch") == "hashflex/lhr-07/cmd/dispatch"
    assert site.verb_of("hashflex/lhr-07/cmd/dispatch") == "dispatch"
    assert site.verb_of("hashflex/lhr-07/reply/dispatch") is None
    every = Topics.of_site("hashflex", "+")
    assert (every.flex, every.reply("+")) == ("hashflex/+/flex", "hashflex/+/reply/+")
    program = ProgramTopics("hashflex", "p1")
    assert (program.commands, program.state, program.reply("hold")) == (
        "hashflex/program/p1/cmd/+",
        "hashflex/program/p1/state",
        "hashflex/program/p1/reply/hold",
    )


def test_the_flex_document_reads_back_as_written_with_the_documented_fields() -> None:
    flex = Flexibility(
        site_id="s",
        at=T0,
        present_w=5000.0,
        metered=True,
        reach=(Reach(0.0, 4000.0), Reach(60.0, 1000.0)),
        most_w=9000.0,
        cap_w=10000.0,
        fleet_max_w=9000.0,
        target_w=8000.0,
        ramp_up_w_per_s=None,
        ramp_down_w_per_s=None,
        wake_max_per_interval=4,
        wake_interval_s=10.0,
        min_on_s=60.0,
        min_off_s=60.0,
        ths_at_cap=300.0,
        ths_now=250.0,
        loss=(LossPoint(0.1, 1000.0, 20.0), LossPoint(0.5, 5000.0, 150.0)),
        failsafe_active=False,
        failsafe_reason="",
        failsafe_level_w=None,
        readings_at=T0 - 2,
        readings_age_s=2.0,
        stale=False,
        miners=10,
        unreachable=1,
    )
    doc = flex.to_dict()
    assert doc["schema"] == FLEX_SCHEMA
    assert set(doc) == set(get_type_hints(FlexDoc))
    assert parse_flex(json.loads(json.dumps(doc))) == flex
