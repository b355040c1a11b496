"""The flexibility document from a running controller (agent/runtime/flex_publish.py): a real simulated site over
TCP, the agent's real controller in-process, and the status sink that publishes the document when it is due."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hashflex.agent.config import load_config
from hashflex.agent.core.flexibility import FlexPublishPolicy
from hashflex.agent.protocol import Channel
from hashflex.agent.runtime.clock import WallClock
from hashflex.agent.runtime.fleet import Fleet
from hashflex.agent.runtime.flex_publish import FlexSink, site_flexibility
from hashflex.contract.flex import FLEX_SCHEMA, parse_flex
from hashflex.sim.testing import SimProcess
from tests.agent_harness import sign_for, write_agent_config
from tests.runtime_support import start_parts, stop_parts

MINERS = 12


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    site = SimProcess(MINERS, base_ip="127.36.0.1", seed=7).start()
    yield site
    site.stop()


async def _until(predicate: Any, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_the_sink_publishes_the_sites_flexibility_when_due(tmp_path: Path, sim: SimProcess) -> None:
    files = write_agent_config(tmp_path, sim.ips, cap_kw=60.0, site_id="flex-site")
    cfg = load_config(files.path)
    clock = WallClock()
    parts = await start_parts(cfg, clock, files.grid_key)
    fleet = parts.controller.fleet
    assert isinstance(fleet, Fleet)
    await fleet.discover(sim.ips)

    async def sweeps() -> None:  # the app's sweep loop, reduced: a fresh picture every half second
        while True:
            parts.controller.on_snapshot(await fleet.sweep())
            await asyncio.sleep(0.5)

    sweeper = asyncio.create_task(sweeps())
    sent: list[Mapping[str, Any]] = []
    sink = FlexSink(parts.controller, sent.append, policy=FlexPublishPolicy(refresh_s=2.0), compute_every_s=0.5)
    parts.controller.publisher.add_sink(sink)
    try:
        await _until(lambda: bool(sent) and sent[-1]["miners"]["total"] == MINERS, 20.0)
        doc = json.loads(json.dumps(sent[-1], allow_nan=False))  # what goes on the wire: plain JSON
        assert doc["schema"] == FLEX_SCHEMA
        flex = parse_flex(doc)
        assert flex.site_id == "flex-site"
        assert flex.miners == MINERS
        assert flex.cap_w == 60_000.0
        assert flex.reach[0].floor_w <= flex.present_w <= flex.most_w
        assert flex.loss[-1].lost_ths > 0.0  # shedding the whole cap costs hashrate
        assert flex.readings_age_s is not None
        assert not flex.stale
        # a grid dispatch lowers the target: the document follows at once (not only at the next refresh)
        before = len(sent)
        doc_in = sign_for(
            files.grid_key,
            {"id": "d1", "target_kw": 20, "rev": 0},
            site="flex-site",
            verb="dispatch",
            issued_at=clock.time(),
        )
        reply = await parts.service.handle("dispatch", json.dumps(doc_in).encode(), Channel.MQTT)
        assert reply.is_ok, reply
        await _until(lambda: len(sent) > before and sent[-1]["target_w"] == 20_000.0, 10.0)
        # and it is republished at least every refresh_s, changed or not
        count = len(sent)
        await _until(lambda: len(sent) > count, 2.0 * 2 + 2.0)
        direct = site_flexibility(parts.controller)
        assert direct.target_w == 20_000.0
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await stop_parts(parts.controller, parts.task, parts.store)
