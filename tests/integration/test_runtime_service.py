"""The command path in-process, on a real SQLite store: CommandService → Controller (the one writer) → store.

No miners here (an empty fleet through the real driver): these tests are about what the agent decides and
remembers — acceptance, idempotency, audit, events, restart and expiry — under a clock the test moves. The
same path against a simulated site over TCP is in test_runtime.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hashflex.agent.protocol import Channel
from tests.agent_harness import iso
from tests.runtime_support import T0, ManualClock, Runtime, make_config, start_runtime, stop_runtime


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = await start_runtime(make_config(tmp_path), ManualClock(T0))
    yield rt
    await stop_runtime(rt)


async def test_dispatch_is_persisted_before_ok_and_binds(runtime: Runtime) -> None:
    reply = await runtime.send("dispatch", runtime.signed({"id": "d1", "target_kw": 600, "end": iso(T0 + 600)}))
    assert reply.is_ok, reply
    assert reply.data["dispatch"]["level_kw"] == 600
    # durable before the reply: the store has the dispatch and the reply
    stored = [r.dispatch for r in runtime.store.load_dispatches(active_only=True)]
    assert [d.id for d in stored] == ["d1"]
    assert runtime.store.get_reply("grid:dispatch:d1")["status"] == "ok"
    await asyncio.sleep(0.3)  # the early tick
    status = runtime.controller.publisher.current(runtime.controller)
    assert status["target_kw"] == 600
    assert status["target_source"] == "grid"
    assert "command" in runtime.audit_kinds()
    types = [e["type"] for e in runtime.events.recent()]
    assert types.index("received") < types.index("accepted") < types.index("target_changed", types.index("accepted"))
    assert "commands_sent" in types
    assert "target_reached" in types  # an empty fleet draws nothing: met at once


async def test_repeat_gets_the_stored_reply_even_after_cancel(runtime: Runtime) -> None:
    doc = runtime.signed({"id": "d2", "target_kw": 500})
    first = await runtime.send("dispatch", doc, Channel.MQTT)
    cancel = await runtime.send("cancel", runtime.signed({"id": "c2", "dispatch_id": "d2"}), Channel.MQTT)
    assert cancel.is_ok
    assert cancel.data["status"] == "cancelled"
    again = await runtime.send("dispatch", doc, Channel.MQTT)
    assert again.to_dict() == first.to_dict()
    assert runtime.controller.book.records["d2"].status == "cancelled"
    # a new revision of a cancelled dispatch is refused, not revived
    rev = await runtime.send("dispatch", runtime.signed({"id": "d2", "target_kw": 400, "rev": 1}), Channel.MQTT)
    assert rev.error_code == "conflict"
    # cancel is idempotent too
    assert (await runtime.send("cancel", runtime.signed({"id": "c2", "dispatch_id": "d2"}))).to_dict() == (
        cancel.to_dict()
    )


async def test_higher_revision_replaces_lower_is_refused(runtime: Runtime) -> None:
    assert (await runtime.send("dispatch", runtime.signed({"id": "d3", "target_kw": 700, "rev": 2}))).is_ok
    up = await runtime.send("dispatch", runtime.signed({"id": "d3", "target_kw": 300, "rev": 3}))
    assert up.is_ok
    assert runtime.controller.book.records["d3"].dispatch.target_kw == 300
    down = await runtime.send("dispatch", runtime.signed({"id": "d3", "target_kw": 900, "rev": 1}))
    assert down.error_code == "stale_revision"
    assert runtime.controller.book.records["d3"].dispatch.target_kw == 300


async def test_refusals_are_audited_and_change_nothing(runtime: Runtime) -> None:
    before = (dict(runtime.controller.book.records), runtime.controller.caps.runtime_kw)
    refused = [
        await runtime.send("dispatch", {"id": "x", "issued_at": iso(T0), "target_kw": 5}),
        await runtime.send("dispatch", None, raw=b"{oops"),
        await runtime.send("cap", {"cap_kw": 5000}),
        await runtime.send("curtail", {"to_kw": 100}, Channel.MQTT),
        await runtime.send("dispatch", runtime.signed({"id": "y", "target_kw": 5}), Channel.MQTT, retained=True),
    ]
    assert [r.error_code for r in refused] == ["unsigned", "bad_json", "out_of_range", "disabled", "retained"]
    assert (dict(runtime.controller.book.records), runtime.controller.caps.runtime_kw) == before
    assert [e["type"] for e in runtime.events.recent()].count("rejected") == len(refused)
    # audited as counts per channel and code, one record per interval (not one per refusal)
    assert runtime.audit_kinds().count("command") == 0
    runtime.service.refusals.flush()
    records = [r.data for r in runtime.store.audit_records() if r.kind == "command"]
    assert len(records) == 1
    assert records[0]["by_channel"] == {
        "local": {"bad_json": 1, "out_of_range": 1, "unsigned": 1},
        "mqtt": {"disabled": 1, "retained": 1},
    }
    assert records[0]["refusals"] == len(refused)
    assert runtime.store.get_reply("grid:dispatch:x") is None  # refused before parsing succeeded: nothing stored


async def test_operator_override_cap_and_resume(runtime: Runtime) -> None:
    cap = await runtime.send("cap", {"cap_kw": "0.8MW"})
    assert cap.data["cap_kw"] == 800
    cur = await runtime.send("curtail", {"id": "o1", "by_kw": 0, "for_s": "1h"})
    assert cur.is_ok
    resume = await runtime.send("resume", {})
    assert resume.data["cancelled"] == ["op:o1"]  # operator overrides have their own id namespace
    await asyncio.sleep(0.3)
    assert runtime.controller.publisher.current(runtime.controller)["cap_kw"] == 800
    assert "cap_change" in runtime.audit_kinds()


async def test_restart_restores_state_and_closes_what_ended_while_down(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = ManualClock(T0)
    rt = await start_runtime(cfg, clock)
    assert (await rt.send("dispatch", rt.signed({"id": "long", "target_kw": 500, "end": iso(T0 + 3600)}))).is_ok
    short_doc = rt.signed({"id": "short", "target_kw": 400, "end": iso(T0 + 60)})
    short_reply = await rt.send("dispatch", short_doc, Channel.MQTT)
    assert short_reply.is_ok
    assert (await rt.send("curtail", {"id": "op", "to_kw": 450})).is_ok
    assert (await rt.send("cap", {"cap_kw": 900})).is_ok
    await stop_runtime(rt)

    clock.t = T0 + 120  # two minutes down: "short" ended meanwhile
    rt = await start_runtime(cfg, clock)
    try:
        ctl = rt.controller
        assert ctl.caps.runtime_kw == 900
        assert {i for i, r in ctl.book.records.items() if r.open} == {"long", "op:op"}
        short = next(doc for doc in ctl.book.docs(True) if doc["id"] == "short")
        assert short["status"] == "expired"
        assert short["close_reason"] == "expired while the agent was down"
        await asyncio.sleep(0.3)
        ctl.trigger()
        await asyncio.sleep(0.3)
        assert ctl.publisher.current(ctl)["target_kw"] == 450
        # an authentic repeat of an id answered before the restart gets the stored reply, even though its
        # window is over now; a forged one is refused before the store is asked
        clock.t = T0 + 7200
        again = await rt.send("dispatch", short_doc, Channel.MQTT)
        assert again.to_dict() == short_reply.to_dict()
        forged = await rt.send("dispatch", {**short_doc, "target_kw": 1}, Channel.MQTT)
        assert forged.error_code == "bad_signature"
        assert next(d for d in ctl.book.docs(True) if d["id"] == "short")["status"] == "expired"
    finally:
        await stop_runtime(rt)


async def test_status_right_after_a_command_shows_what_it_changed(tmp_path: Path) -> None:
    """The STATUS DOC is built per tick, but a client that resumes and asks for status at once must not see the
    override it just ended (CI saw the safe-start alarm after `resume` on a loaded machine)."""
    rt = await start_runtime(make_config(tmp_path), ManualClock(T0), safe_start="the state store was unreadable")
    try:
        await asyncio.sleep(0.3)  # the first tick has built the doc
        assert any(a["key"] == "safe_start" for a in rt.controller.publisher.current(rt.controller)["alarms"])
        resume = await rt.send("resume", {})
        assert resume.data["cancelled"] == ["safe-start"]
        after = rt.controller.publisher.current(rt.controller)  # no tick between the reply and this read
        assert not any(a["key"] == "safe_start" for a in after["alarms"])
        assert after["dispatches"] == []
        assert (await rt.send("curtail", {"id": "o2", "to_kw": 300})).is_ok
        assert [d["id"] for d in rt.controller.publisher.current(rt.controller)["dispatches"]] == ["op:o2"]
    finally:
        await stop_runtime(rt)
