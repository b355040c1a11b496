"""Run-time caps by source (issue 12, finding 9): the grid's cap (signed, MQTT) and the operator's (local socket) are
separate inputs, the lower binds, and lifting the grid's cap locally is an explicit, audited act. Both persist.

In-process command path on a real SQLite store (CommandService → Controller → store), under a clock the test moves;
no miners (an empty fleet through the real driver): this is about what the agent decides and remembers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hashflex.agent.io.control_socket import ControlServer
from hashflex.agent.io.store import Store
from hashflex.agent.protocol import Channel
from hashflex.contract.reply import Reply
from tests.runtime_support import T0, ManualClock, Runtime, make_config, start_runtime, stop_runtime

HASHFLEX = str(Path(sys.executable).parent / "hashflex")


async def grid_cap(rt: Runtime, cap_kw: float, cid: str, **extra: Any) -> Reply:
    rt.clock.t += 1.0  # each grid command newer than the last
    return await rt.send("cap", rt.signed({"id": cid, "cap_kw": cap_kw, **extra}, "cap"), Channel.MQTT)


async def local_cap(rt: Runtime, cap_kw: float, cid: str, **extra: Any) -> Reply:
    rt.clock.t += 1.0
    return await rt.send("cap", {"id": cid, "cap_kw": cap_kw, **extra})


async def target(rt: Runtime) -> dict[str, Any]:
    rt.controller.trigger()
    await asyncio.sleep(0.3)
    return rt.controller.publisher.current(rt.controller)


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = await start_runtime(make_config(tmp_path), ManualClock(T0))
    yield rt
    await stop_runtime(rt)


async def test_a_local_cap_never_lifts_the_grids_cap(runtime: Runtime) -> None:
    grid = await grid_cap(runtime, 400, "g-cap")
    assert grid.is_ok, grid
    assert grid.data["cap_kw"] == 400
    local = await local_cap(runtime, 1000, "op-cap")  # `hashflex cap 1000kW`
    assert local.is_ok, local
    assert local.data["cap_kw"] == 400
    assert local.data["grid_cap_kw"] == 400
    status = await target(runtime)
    assert (status["cap_kw"], status["target_kw"]) == (400, 400)
    # a lower operator cap binds under the grid's; the grid raising its own cap leaves the operator's in force
    assert (await local_cap(runtime, 300, "op-cap-2")).data["cap_kw"] == 300
    assert (await grid_cap(runtime, 900, "g-cap-2")).data["cap_kw"] == 300
    assert (await target(runtime))["target_kw"] == 300


async def test_lifting_the_grids_cap_locally_is_explicit_and_audited(runtime: Runtime) -> None:
    assert (await grid_cap(runtime, 400, "g-cap")).is_ok
    lifted = await local_cap(runtime, 800, "op-lift", lift_grid_cap=True)
    assert lifted.is_ok, lifted
    assert (lifted.data["cap_kw"], lifted.data["grid_cap_kw"], lifted.data["lifted_grid_cap_kw"]) == (800, None, 400)
    assert (await target(runtime))["target_kw"] == 800
    audit = [r.data for r in runtime.store.audit_records() if r.kind == "cap_change"]
    assert audit[-1]["lifted_grid_cap_kw"] == 400
    assert audit[-1]["source"] == "operator"
    # the flag is the operator's, on the site's own socket: the grid sets its own cap and cannot "lift" it
    refused = await grid_cap(runtime, 500, "g-lift", lift_grid_cap=True)
    assert refused.error_code == "bad_request"
    assert runtime.controller.caps.grid_kw is None


async def test_both_caps_persist_across_a_restart(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = ManualClock(T0)
    rt = await start_runtime(cfg, clock)
    assert (await grid_cap(rt, 400, "g-cap")).is_ok
    assert (await local_cap(rt, 600, "op-cap")).is_ok
    await stop_runtime(rt)
    rt = await start_runtime(cfg, clock)
    try:
        assert (rt.controller.caps.grid_kw, rt.controller.caps.operator_kw) == (400, 600)
        assert (await local_cap(rt, 1000, "op-cap-up")).data["cap_kw"] == 400  # still not lifted after a restart
    finally:
        await stop_runtime(rt)


async def test_a_cap_stored_before_caps_had_sources_is_kept_as_the_grids(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    with Store.open(cfg.db_path) as store:
        store.set_state("runtime_cap_kw", 450.0, T0)
    rt = await start_runtime(cfg, ManualClock(T0))
    try:
        assert rt.controller.caps.effective_kw() == 450
        assert (await local_cap(rt, 1000, "op-cap")).data["cap_kw"] == 450
    finally:
        await stop_runtime(rt)


async def test_the_cli_lifts_the_grids_cap_only_with_its_flag(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="hf-caps-", dir="/tmp"))  # a short path: unix socket paths are short
    try:
        cfg = make_config(tmp_path)
        socket = folder / "ctl.sock"
        config = folder / "site.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "site": {"id": cfg.site.id, "cap_kw": 1000},
                    "mqtt": {"enabled": False},
                    "state_dir": str(folder / "state"),
                    "control_socket": {"path": str(socket)},
                }
            )
        )
        rt = await start_runtime(cfg, ManualClock(time.time()))  # the CLI stamps commands with the wall clock
        try:
            async with ControlServer(socket, rt.service):
                assert (await grid_cap(rt, 400, "g-cap")).is_ok

                async def cli(*args: str) -> dict[str, Any]:
                    proc = await asyncio.create_subprocess_exec(
                        HASHFLEX,
                        "cap",
                        *args,
                        "--config",
                        str(config),
                        "--json",
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                    out, err = await proc.communicate()
                    assert proc.returncode == 0, err.decode()
                    doc: dict[str, Any] = json.loads(out)
                    return doc

                plain = await cli("1000kW")
                assert (plain["cap_kw"], plain["grid_cap_kw"]) == (400, 400)
                assert await cli() == {"cap_kw": 400, "licensed_cap_kw": 1000, "grid_cap_kw": 400}
                lifted = await cli("1000kW", "--lift-grid-cap")
                assert (lifted["cap_kw"], lifted["grid_cap_kw"], lifted["lifted_grid_cap_kw"]) == (1000, None, 400)
                shown = await cli()
                assert shown == {"cap_kw": 1000, "licensed_cap_kw": 1000}  # no run-time cap is set
        finally:
            await stop_runtime(rt)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
