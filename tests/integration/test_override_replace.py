"""Operator overrides replace each other (issue 16 item 7): a new `curtail` ends the operator's earlier override
unless it asks to be added, on the real command path (CommandService → Controller → SQLite store), in-process with
a clock the test moves (the harness of test_runtime_service.py, in tests/runtime_support.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.runtime_support import T0, ManualClock, make_config, start_runtime, stop_runtime


async def test_a_new_curtail_replaces_the_previous_override_unless_added(tmp_path: Path) -> None:
    rt = await start_runtime(make_config(tmp_path), ManualClock(T0))
    try:
        ctl = rt.controller
        assert (await rt.send("curtail", {"id": "o1", "to_kw": 600})).is_ok
        rt.clock.t += 10
        second = await rt.send("curtail", {"id": "o2", "to_kw": 800})
        assert second.is_ok, second
        assert second.data["replaced"] == ["op:o1"]
        # before: both stayed in force and the lower (600 kW) bound while the operator had asked for 800 kW
        assert {i for i, r in ctl.book.records.items() if r.open} == {"op:o2"}
        first = next(d for d in ctl.book.docs(True) if d["id"] == "op:o1")
        assert (first["status"], first["close_reason"]) == ("cancelled", "replaced by op:o2")
        await asyncio.sleep(0.3)  # the early tick
        ctl.trigger()
        await asyncio.sleep(0.3)
        assert ctl.publisher.current(ctl)["target_kw"] == 800
        # asked to add: held beside it, the lowest binds, nothing replaced
        rt.clock.t += 10
        third = await rt.send("curtail", {"id": "o3", "to_kw": 700, "add": True})
        assert third.is_ok, third
        assert third.data["replaced"] == []
        assert {i for i, r in ctl.book.records.items() if r.open} == {"op:o2", "op:o3"}
        await asyncio.sleep(0.3)
        ctl.trigger()
        await asyncio.sleep(0.3)
        assert ctl.publisher.current(ctl)["target_kw"] == 700
        # a repeat of o2 (the CLI retrying) gets its stored reply and replaces nothing again
        again = await rt.send("curtail", {"id": "o2", "to_kw": 800})
        assert again.to_dict() == second.to_dict()
        assert {i for i, r in ctl.book.records.items() if r.open} == {"op:o2", "op:o3"}
        # audited: each command as asked (with `add` where given), the replaced override's close with its reason
        commands = [r.data for r in rt.store.audit_records() if r.kind == "command" and r.data["verb"] == "curtail"]
        assert [c["request"].get("add") for c in commands] == [False, False, True]
        closes = [r.data for r in rt.store.audit_records() if r.kind == "compliance" and r.data["id"] == "op:o1"]
        assert [(c["status"], c["reason"]) for c in closes] == [("cancelled", "replaced by op:o2")]
        # the store has it too: a restart keeps o1 closed
        stored = {r.dispatch.id: r.status for r in rt.store.load_dispatches(active_only=False)}
        assert stored["op:o1"] == "cancelled"
    finally:
        await stop_runtime(rt)


async def test_a_curtail_does_not_replace_the_safe_start(tmp_path: Path) -> None:
    """The safe start (a corrupt store) is held until an operator resumes: a curtail is not that resume."""
    rt = await start_runtime(make_config(tmp_path), ManualClock(T0), safe_start="the state store was unreadable")
    try:
        reply = await rt.send("curtail", {"id": "o1", "to_kw": 900})
        assert reply.is_ok, reply
        assert reply.data["replaced"] == []
        assert {i for i, r in rt.controller.book.records.items() if r.open} == {"safe-start", "op:o1"}
    finally:
        await stop_runtime(rt)
