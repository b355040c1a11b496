"""The command path in-process on a real SQLite store, under hostile input (issue 12, findings 3, 5, 7, 8, 10, 11):
refusals are counted, not written one by one; nothing absurd reaches the controller; a stale or replayed signed
command cannot undo a newer one, even after a restart; grid and operator ids never meet; only signed heartbeats
reach the fail-safe."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from hashflex.agent.protocol import Channel
from hashflex.contract import signing
from tests.agent_harness import iso, sign_for
from tests.runtime_support import (
    GRID,
    T0,
    ManualClock,
    Runtime,
    make_config,
    start_runtime,
    stop_runtime,
)

pytestmark = pytest.mark.timeout(120)
SITE = "svc"


def db_bytes(rt: Runtime) -> int:
    path = rt.controller.cfg.db_path
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if os.path.exists(p))


def command_records(rt: Runtime) -> list[dict[str, Any]]:
    return [r.data for r in rt.store.audit_records() if r.kind == "command"]


@pytest.fixture
async def rt(tmp_path: Path) -> Any:
    runtime = await start_runtime(make_config(tmp_path), ManualClock(T0))
    yield runtime
    await stop_runtime(runtime)


# ------------------------------------------------------------------------------------- finding 5: refusal flood
async def test_a_flood_of_refused_commands_is_counted_not_written_one_by_one(rt: Runtime) -> None:
    before = db_bytes(rt)
    pad = "x" * 2000
    for i in range(2000):
        doc = {"id": f"flood-{i}", "issued_at": iso(T0), "target_kw": 5, "note": pad}
        reply = await rt.send("dispatch", doc, Channel.MQTT)
        assert reply.error_code in ("unsigned", "bad_request")
    assert command_records(rt) == []  # nothing written per refusal
    rt.service.refusals.flush()
    records = command_records(rt)
    assert len(records) == 1
    assert records[0]["refusals"] == 2000
    assert sum(records[0]["by_channel"]["mqtt"].values()) == 2000
    assert len(records[0]["sample"]) <= 8
    assert all("document" not in s for s in records[0]["sample"])  # digests, not the documents
    growth = db_bytes(rt) - before
    assert growth < 256 * 1024, f"the store grew {growth} bytes for 2,000 refusals"


async def test_refusals_that_used_to_raise_are_answered_and_counted(rt: Runtime) -> None:
    payloads = [
        b'{"id": "a", "target_kw": 1' + b"0" * 400 + b"}",
        b'{"id": "b", "target_kw": ' + b"9" * 5000 + b"}",
        b'{"id": "c", "target_kw": 1, "ramp_kw_per_min": 1e400}',
        b"[" * 30_000 + b"]" * 30_000,
    ]
    for payload in payloads:
        for channel in (Channel.MQTT, Channel.LOCAL):
            reply = await rt.send("dispatch", None, channel, raw=payload)
            assert reply.error_code in ("bad_json", "bad_request"), reply
    rt.service.refusals.flush()
    (record,) = command_records(rt)
    assert record["refusals"] == 2 * len(payloads)


async def test_a_refusal_with_unstorable_text_does_not_jam_the_audit(rt: Runtime) -> None:
    # a lone surrogate is valid JSON, and no valid UTF-8: the record must still be written (and the next ones too)
    await rt.send("dispatch", None, Channel.MQTT, raw=b'{"id": "\\ud800", "target_kw": 1}')
    await rt.send("dispatch\ud800", None, Channel.LOCAL, raw=b'{"id": "x"}')
    rt.service.refusals.flush()
    assert [r["refusals"] for r in command_records(rt)] == [2]
    assert rt.service.refusals.pending == 0


async def test_the_refusal_record_is_written_when_its_interval_closes(rt: Runtime) -> None:
    await rt.send("dispatch", None, Channel.MQTT, raw=b"{oops")
    rt.clock.t += rt.service.refusals.interval_s + 1
    await rt.send("dispatch", None, Channel.MQTT, raw=b"{oops")  # the next refusal closes the old interval
    assert [r["refusals"] for r in command_records(rt)] == [1]


# ------------------------------------------------------------------------------------- finding 3: absurd values
async def test_absurd_values_are_refused_and_the_controller_keeps_running(rt: Runtime) -> None:
    ms_end = rt.signed({"id": "ms", "target_kw": 5, "end": (T0 + 3600) * 1000})
    assert (await rt.send("dispatch", ms_end, Channel.MQTT)).error_code == "out_of_range"
    text = json.dumps(rt.signed({"id": "ramp", "target_kw": 5, "ramp_kw_per_min": "@@"})).replace('"@@"', "1e400")
    assert (await rt.send("dispatch", None, Channel.MQTT, raw=text.encode())).error_code == "bad_json"
    forever = await rt.send("curtail", {"id": "long", "to_kw": 5, "for_s": "99999999999d"})
    assert forever.error_code == "out_of_range"
    assert rt.controller.book.records == {}
    await asyncio.sleep(0.3)
    assert not rt.task.done()
    assert (await rt.send("dispatch", rt.signed({"id": "sane", "target_kw": 5, "end": iso(T0 + 3600)}))).is_ok


# ------------------------------------------------------------------------------------- finding 8: replay, order
async def test_a_command_signed_for_another_site_is_refused(rt: Runtime) -> None:
    assert (await rt.send("dispatch", rt.signed({"id": "d", "target_kw": 300}), Channel.MQTT)).is_ok
    theirs = sign_for(GRID, {"id": "c", "dispatch_id": "d"}, site="other-site", verb="cancel", issued_at=T0)
    assert (await rt.send("cancel", theirs, Channel.MQTT)).error_code == "wrong_scope"
    as_other_verb = sign_for(GRID, {"id": "c2", "dispatch_id": "d"}, site=SITE, verb="dispatch", issued_at=T0)
    assert (await rt.send("cancel", as_other_verb, Channel.MQTT)).error_code == "wrong_scope"
    assert rt.controller.book.records["d"].open


async def test_a_late_cap_cannot_undo_a_newer_one_even_after_a_restart(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = ManualClock(T0)
    rt = await start_runtime(cfg, clock)
    newer = sign_for(GRID, {"id": "cap-new", "cap_kw": 400}, site=SITE, verb="cap", issued_at=T0 - 10)
    older = sign_for(GRID, {"id": "cap-old", "cap_kw": 1000}, site=SITE, verb="cap", issued_at=T0 - 60)
    try:
        assert (await rt.send("cap", newer, Channel.MQTT)).is_ok
        late = await rt.send("cap", older, Channel.MQTT)
        assert late.error_code == "stale"
        assert rt.controller.caps.effective_kw() == 400
    finally:
        await stop_runtime(rt)
    clock.t = T0 + 30
    rt = await start_runtime(cfg, clock)
    try:
        also_older = sign_for(GRID, {"id": "cap-old-2", "cap_kw": 900}, site=SITE, verb="cap", issued_at=T0 - 20)
        assert (await rt.send("cap", also_older, Channel.MQTT)).error_code == "stale"
        assert rt.controller.caps.effective_kw() == 400
        fresh = sign_for(GRID, {"id": "cap-fresh", "cap_kw": 900}, site=SITE, verb="cap", issued_at=clock.t)
        assert (await rt.send("cap", fresh, Channel.MQTT)).is_ok
    finally:
        await stop_runtime(rt)


async def test_a_late_cancel_cannot_end_a_newer_revision(rt: Runtime) -> None:
    assert (await rt.send("dispatch", rt.signed({"id": "d", "target_kw": 300}), Channel.MQTT)).is_ok
    cancel = sign_for(GRID, {"id": "c", "dispatch_id": "d"}, site=SITE, verb="cancel", issued_at=T0 - 5)
    rt.clock.t += 10
    assert (await rt.send("dispatch", rt.signed({"id": "d", "target_kw": 200, "rev": 1}), Channel.MQTT)).is_ok
    assert (await rt.send("cancel", cancel, Channel.MQTT)).error_code == "stale"
    assert rt.controller.book.records["d"].open


# ------------------------------------------------------------------------------------- finding 11: namespaces
async def test_a_local_override_does_not_block_a_grid_dispatch_with_its_id(rt: Runtime) -> None:
    assert (await rt.send("curtail", {"id": "ev-1", "to_kw": 500})).is_ok
    grid = await rt.send("dispatch", rt.signed({"id": "ev-1", "target_kw": 300}), Channel.MQTT)
    assert grid.is_ok, grid
    assert {i for i, r in rt.controller.book.records.items() if r.open} == {"op:ev-1", "ev-1"}


async def test_a_grid_dispatch_cannot_replace_an_operator_hold(rt: Runtime) -> None:
    assert (await rt.send("curtail", {"id": "maint", "to_kw": 0})).is_ok
    for rev in (0, 1):
        doc = rt.signed({"id": "maint", "target_kw": 800, "rev": rev})
        assert (await rt.send("dispatch", doc, Channel.MQTT)).is_ok  # the grid's own "maint", revised
    hold = rt.controller.book.records["op:maint"]
    assert hold.open
    assert hold.dispatch.target_kw == 0
    await asyncio.sleep(0.3)
    rt.controller.trigger()
    await asyncio.sleep(0.3)
    assert rt.controller.publisher.current(rt.controller)["target_kw"] == 0


# ------------------------------------------------------------------------------------- finding 10: heartbeats
async def test_only_signed_fresh_heartbeats_reach_the_failsafe(rt: Runtime) -> None:
    ctl = rt.controller
    assert ctl.failsafe is not None
    rt.service.heartbeat(json.dumps({"ts": iso(T0), "seq": 1}).encode())  # the old, anonymous kind
    rt.service.heartbeat(b"[" * 40_000)
    other = signing.sign_command({"site": "other", "verb": "heartbeat", "issued_at": iso(T0), "seq": 1}, GRID)
    rt.service.heartbeat(json.dumps(other).encode())
    assert ctl.failsafe.last_heartbeat is None
    beat = json.dumps(
        signing.sign_command({"site": SITE, "verb": "heartbeat", "issued_at": iso(T0), "seq": 2}, GRID)
    ).encode()
    rt.service.heartbeat(beat)
    assert ctl.failsafe.last_heartbeat == T0
    rt.clock.t += 5
    rt.service.heartbeat(beat)  # the same heartbeat again: a replay
    assert ctl.failsafe.last_heartbeat == T0


# ------------------------------------------------------------------------------------- finding 7: the socket
async def test_the_control_socket_answers_hostile_lines_and_keeps_the_connection(rt: Runtime, tmp_path: Path) -> None:
    from hashflex.agent.io.control_socket import ControlServer

    lines = [
        b'{"verb": "dispatch", "payload": {"id": "a", "target_kw": 1' + b"0" * 400 + b"}}",
        b'{"verb": "dispatch", "payload": {"id": "b", "target_kw": ' + b"9" * 5000 + b"}}",
        b'{"verb": "dispatch", "payload": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"verb": "curtail", "payload": {"id": "c", "to_kw": NaN}}',
        b'{"verb": "curtail", "payload": {"id": "d", "to_kw": 1e400}}',
        b'{"verb": "ping", "verb": "curtail", "payload": {}}',
    ]
    async with ControlServer(tmp_path / "ctl.sock", rt.service):
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "ctl.sock"), limit=1 << 22)
        try:
            for line in lines:
                writer.write(line + b"\n")
                await writer.drain()
                answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
                assert answer["status"] == "error", line[:60]
                assert answer["error"]["code"] in ("bad_json", "bad_request"), answer
            writer.write(b'{"verb": "ping", "payload": {"id": "still-there"}}\n')  # the same connection
            await writer.drain()
            assert json.loads(await asyncio.wait_for(reader.readline(), 10))["status"] == "ok"
        finally:
            writer.close()
    assert rt.controller.book.records == {}


def test_the_cli_refuses_an_absurd_override_duration_before_sending_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hashflex",
            "curtail",
            "--to",
            "5kW",
            "--for",
            "99999999999d",
            "--config",
            str(tmp_path / "absent.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "--for: at most 366 days" in done.stderr
