"""Wall-clock steps against the real controller (issue 11, finding 4): the command path in-process on a real SQLite
store, on a clock whose wall reading the test steps back 30 s and forward or back an hour while its monotonic
reading runs on. Elapsed-time rules keep real elapsed time, a bound dispatch stays bound, and the step is alarmed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.config import AgentConfig
from hashflex.agent.protocol import Channel
from hashflex.agent.runtime.controller import Controller
from hashflex.agent.runtime.service import CommandService
from hashflex.contract.reply import Reply
from tests.agent_harness import iso, sign_for
from tests.runtime_support import grid_config, start_parts, stop_parts

T0 = 1_760_000_000.0
SITE = "clock"
GRID = Ed25519PrivateKey.generate()


class SteppingClock:
    """A wall reading the test can step, and a monotonic reading that only runs forward with `advance`."""

    scale = 1.0

    def __init__(self, wall: float) -> None:
        self.wall, self.mono = wall, 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    def to_wall(self, seconds: float) -> float:
        return seconds

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.wall += seconds


@dataclass
class Runtime:
    clock: SteppingClock
    store: Any
    controller: Controller
    service: CommandService
    task: asyncio.Task[None]

    async def dispatch(self, doc: Mapping[str, Any]) -> Reply:
        signed = sign_for(GRID, doc, site=SITE, verb="dispatch", issued_at=self.clock.wall)
        return await self.service.handle("dispatch", json.dumps(signed).encode(), Channel.MQTT)

    async def tick(self) -> dict[str, Any]:
        self.controller.trigger()
        await asyncio.sleep(0.3)  # past the minimum gap between early ticks
        return self.controller.publisher.current(self.controller)


def make_config(tmp_path: Path, **extra: Any) -> AgentConfig:
    return grid_config(tmp_path, SITE, GRID, **extra)


async def start_runtime(cfg: AgentConfig, clock: SteppingClock, *, grid_link: bool = False) -> Runtime:
    p = await start_parts(cfg, clock, GRID, grid_link=grid_link)
    return Runtime(clock, p.store, p.controller, p.service, p.task)


async def stop_runtime(rt: Runtime) -> None:
    await stop_parts(rt.controller, rt.task, rt.store)


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = await start_runtime(make_config(tmp_path), SteppingClock(T0))
    yield rt
    await stop_runtime(rt)


async def test_a_backward_step_never_unbinds_a_dispatch_started_at_receipt(runtime: Runtime) -> None:
    reply = await runtime.dispatch({"id": "d-now", "target_kw": 400})  # no start: it starts at receipt
    assert reply.is_ok, reply
    assert (await runtime.tick())["target_kw"] == 400
    runtime.clock.advance(1.0)
    runtime.clock.step(-30.0)
    for _ in range(3):
        status = await runtime.tick()
        assert status["target_kw"] == 400, status["target_reason"]
        runtime.clock.advance(5.0)
    assert "clock_step" in runtime.controller.alarms
    assert any(r.kind == "alarm" and r.data["key"] == "clock_step" for r in runtime.store.audit_records())


async def test_a_forward_step_of_an_hour_never_unbinds_a_dispatch(runtime: Runtime) -> None:
    reply = await runtime.dispatch({"id": "d-30m", "target_kw": 300, "end": iso(T0 + 1800)})
    assert reply.is_ok, reply
    runtime.clock.advance(60.0)
    runtime.clock.step(3600.0)
    status = await runtime.tick()
    assert status["target_kw"] == 300
    assert runtime.controller.book.records["d-30m"].open
    assert "clock_step" in runtime.controller.alarms
    # it ends when its 30 minutes have passed on the agent's time
    runtime.clock.advance(1800.0)
    assert (await runtime.tick())["target_kw"] == 1000


@pytest.mark.parametrize("step_s", [-3600.0, 3600.0])
async def test_heartbeat_loss_is_detected_after_its_timeout_whatever_the_wall_does(
    tmp_path: Path, step_s: float
) -> None:
    cfg = make_config(
        tmp_path, failsafe={"enabled": True, "heartbeat_timeout_s": 180, "hold_at_start": False, "level": 250}
    )
    rt = await start_runtime(cfg, SteppingClock(T0), grid_link=True)
    try:
        rt.controller.heartbeat(b"{}")
        rt.clock.advance(10.0)
        rt.clock.step(step_s)
        status = await rt.tick()
        assert status["target_kw"] == 1000  # a step is not a heartbeat loss
        rt.clock.advance(100.0)
        assert (await rt.tick())["target_kw"] == 1000
        rt.clock.advance(80.0)  # 190 s without a heartbeat
        assert (await rt.tick())["target_kw"] == 250
    finally:
        await stop_runtime(rt)


async def test_a_wall_that_went_back_while_the_agent_was_down_unbinds_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    clock = SteppingClock(T0)
    rt = await start_runtime(cfg, clock)
    assert (await rt.dispatch({"id": "d-held", "target_kw": 450})).is_ok
    assert (await rt.tick())["target_kw"] == 450
    await stop_runtime(rt)
    clock.advance(5.0)
    clock.step(-60.0)  # restarted on a clock a minute behind
    rt = await start_runtime(cfg, clock)
    try:
        assert (await rt.tick())["target_kw"] == 450
        assert "clock_step" in rt.controller.alarms
    finally:
        await stop_runtime(rt)
