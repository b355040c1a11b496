"""The command path in-process, shared by the runtime tests: a config with a grid key and no MQTT, and the real
CommandService → Controller (the one writer) → SQLite store, over an empty fleet through the real driver, on a clock
the test moves. A test file may keep its own `Runtime` with the verbs it needs; `Runtime` below is the service tests'
one (site "svc" trusting GRID, from T0), shared by test_runtime_service.py and the command-path files beside it."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.config import AgentConfig
from hashflex.agent.io.store import Store
from hashflex.agent.protocol import Channel
from hashflex.agent.runtime.actuator import Actuator
from hashflex.agent.runtime.assembly import build_controller
from hashflex.agent.runtime.clock import Clock
from hashflex.agent.runtime.controller import Controller
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.fleet import Fleet, driver_from_config
from hashflex.agent.runtime.readout import SiteReader
from hashflex.agent.runtime.service import CommandService
from hashflex.contract.reply import Reply
from tests.agent_harness import guess_verb, sign_for


class ManualClock:
    """Site time that moves only when the test says so."""

    scale = 1.0

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)

    def to_wall(self, seconds: float) -> float:
        return seconds


def grid_config(tmp_path: Path, site_id: str, grid: Ed25519PrivateKey, **extra: Any) -> AgentConfig:
    """A site of 1,000 kW that trusts `grid`, no MQTT, no fail-safe, no debounce, its state under tmp_path."""
    pub = tmp_path / "grid.pub"
    pub.write_bytes(
        grid.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return AgentConfig.model_validate(
        {
            "site": {"id": site_id, "cap_kw": 1000},
            "mqtt": {"enabled": False},
            "grid": {"public_keys": [str(pub)]},
            "state_dir": str(tmp_path / "state"),
            "failsafe": {"enabled": False},
            "dispatch": {"debounce_s": 0},
            **extra,
        }
    )


@dataclass
class Parts:
    store: Any
    controller: Controller
    service: CommandService
    events: EventLog
    task: asyncio.Task[None]


async def start_parts(
    cfg: AgentConfig, clock: Clock, grid: Ed25519PrivateKey, *, grid_link: bool = False, safe_start: str | None = None
) -> Parts:
    """Open the store, sweep the (empty) fleet once, restore and start the control loop."""
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    store = Store.open(cfg.db_path)
    fleet = Fleet.from_config(driver_from_config(cfg), cfg.polling, clock=clock.time)
    await fleet.sweep()
    events = EventLog(clock.time)
    actuator = Actuator(fleet.handle, concurrency=4, command_timeout_s=1.0)
    ctl = build_controller(
        cfg, fleet=fleet, store=store, actuator=actuator, clock=clock, events=events, grid_link=grid_link
    )
    ctl.restore(safe_start=safe_start)
    service = CommandService(
        cfg,
        ctl,
        events,
        reader=SiteReader(ctl, ctl.publisher),
        store=store,
        clock=clock,
        grid_keys=[grid.public_key()],
        operator_keys=[],
    )
    return Parts(store, ctl, service, events, asyncio.create_task(ctl.run()))


async def stop_parts(controller: Controller, task: asyncio.Task[None], store: Any) -> None:
    controller.stop()
    await asyncio.wait_for(task, 5)
    store.close()


# ------------------------------------------------------------------------------------- the service tests' runtime
T0 = 1_760_000_000.0
GRID = Ed25519PrivateKey.generate()


@dataclass
class Runtime:
    clock: ManualClock
    store: Any
    controller: Controller
    service: CommandService
    events: EventLog
    task: asyncio.Task[None]

    async def send(
        self,
        verb: str,
        doc: dict[str, Any] | None,
        channel: Channel = Channel.LOCAL,
        *,
        raw: bytes | None = None,
        retained: bool = False,
    ) -> Reply:
        payload = raw if raw is not None else json.dumps(doc or {}).encode()
        return await self.service.handle(verb, payload, channel, retained=retained)

    def signed(self, doc: dict[str, Any], verb: str | None = None) -> dict[str, Any]:
        """Grid-signed (hashflex-sig-v2) for this site, issued now."""
        return sign_for(GRID, doc, site="svc", verb=verb or guess_verb(doc), issued_at=self.clock.t)

    def audit_kinds(self) -> list[str]:
        return [r.kind for r in self.store.audit_records()]


def make_config(tmp_path: Path) -> AgentConfig:
    return grid_config(tmp_path, "svc", GRID)


async def start_runtime(cfg: AgentConfig, clock: ManualClock, *, safe_start: str | None = None) -> Runtime:
    p = await start_parts(cfg, clock, GRID, safe_start=safe_start)
    return Runtime(clock, p.store, p.controller, p.service, p.events, p.task)


async def stop_runtime(rt: Runtime) -> None:
    await stop_parts(rt.controller, rt.task, rt.store)
