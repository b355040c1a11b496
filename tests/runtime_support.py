"""The command path in-process, shared by the runtime tests: a config with a grid key and no MQTT, and the real
CommandService → Controller (the one writer) → SQLite store, over an empty fleet through the real driver, on a clock
the test moves. Each test file keeps its own `Runtime` with the verbs it needs; this is what they all build."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.agent.config import AgentConfig
from hashflex.agent.io.store import Store
from hashflex.agent.runtime.actuator import Actuator
from hashflex.agent.runtime.clock import Clock
from hashflex.agent.runtime.controller import Controller
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.fleet import Fleet, driver_from_config
from hashflex.agent.runtime.readout import SiteReader
from hashflex.agent.runtime.service import CommandService


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
    ctl = Controller(cfg, fleet=fleet, store=store, actuator=actuator, clock=clock, events=events, grid_link=grid_link)
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
