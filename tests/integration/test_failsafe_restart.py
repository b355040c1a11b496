"""The fail-safe across a restart, end to end (issue 16, item 1): `hashflex run` (a subprocess) on a simulated site,
a real Mosquitto, and the grid side sending signed heartbeats. An agent restarted within the heartbeat timeout of a
healthy link carries on uncurtailed; one whose link was lost before the stop starts in fail-safe, and says what
releases it. What is checked is the simulator's ground truth, the agent's status and its retained …/state.

Loopback range of this file: 127.146.0.0 – 127.146.255.255.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_harness import AgentProcess, iso, sign_for
from tests.broker import Mosquitto
from tests.integration.site_support import K, Site, running_site
from tests.mqtt_support import wait_until

pytestmark = pytest.mark.timeout(300)

TIMEOUT_S = 200.0  # the heartbeat timeout, site seconds: twenty on the wall (a restart takes a few)
LEVEL_SHARE = 0.3  # the fail-safe level, of the site's full draw


class Heartbeats:
    """The grid side's heartbeat, every 0.3 wall seconds while `on` (signed for the site, verb heartbeat)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.on = True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Heartbeats]:
        task = asyncio.create_task(self._beat())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _beat(self) -> None:
        seq = 0
        while True:
            if self.on:
                seq += 1
                site = self.site
                beat = sign_for(
                    site.files.grid_key, {"seq": seq}, site=site.site_id, verb="heartbeat", issued_at=site.agent.now()
                )
                await site.grid.publish(f"{site.root}/heartbeat", beat)
            await asyncio.sleep(0.3)


async def restart(site: Site) -> None:
    """Stop the agent (SIGTERM) and start it again on the same timeline (clock origin), same state dir."""
    origin = site.agent.time_origin
    await asyncio.to_thread(site.agent.stop)
    site.agent = await asyncio.to_thread(AgentProcess.start, site.files, time_scale=K, time_origin=origin)


async def min_kw_over(site: Site, wall_s: float) -> float:
    """The lowest site power the simulator shows over `wall_s` wall seconds."""
    lowest = await site.kw()
    for _ in range(int(wall_s / 0.25)):
        await asyncio.sleep(0.25)
        lowest = min(lowest, await site.kw())
    return lowest


def failsafe_overrides(full_kw: float) -> dict[str, Any]:
    return {
        "failsafe": {
            "enabled": True,
            "level": round(full_kw * LEVEL_SHARE, 1),
            "hold_at_start": True,
            "heartbeat_timeout_s": TIMEOUT_S,
            "release_after_s": 3600,
        }
    }


async def test_restart_within_the_heartbeat_timeout_of_a_healthy_link_does_not_curtail_the_site(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with running_site(
        tmp_path, mosquitto, base_ip="127.146.0.1", miners=20, overrides=failsafe_overrides
    ) as site:
        full = site.full_kw
        level = round(full * LEVEL_SHARE, 1)
        # a first start holds the fail-safe level until the grid is heard [LPC-901/1], and says what releases it
        state = await site.wait_state(lambda s: s["failsafe"]["active"])
        assert (state["failsafe"]["reason"], state["failsafe"]["released_by"]) == ("startup", "heartbeat")
        async with Heartbeats(site).running() as beats:
            await site.wait_state(lambda s: s["failsafe"]["released_by"] == "grid_command")
            releases_at = site.state()["failsafe"]["releases_at"]
            assert releases_at is not None  # heard: the release window (an hour here) runs
            d1 = round(full * 0.9, 1)
            await site.ok("dispatch", site.signed({"id": "r-1", "target_kw": d1, "end": iso(site.agent.now() + 7200)}))
            await site.event("failsafe_exited")
            await site.wait_kw(lambda kw: kw > d1 * 0.8, 40, f"up at the dispatch's {d1} kW")

            # restarted with the link healthy, within the timeout: no fail-safe, the site stays where it was
            await restart(site)
            status = await site.status()
            assert status["failsafe"]["active"] is False, status["failsafe"]
            assert (status["failsafe"]["released_by"], status["target_source"]) == (None, "grid")
            assert await min_kw_over(site, 5.0) > d1 * 0.75, "the restart curtailed the site"
            assert not list(site.agent.log_events("failsafe_entered"))

            # the heartbeat stops: the fail-safe comes, on the timeout counted from the last beat
            beats.on = False
            await site.event("failsafe_entered", within=TIMEOUT_S / K + 15)
            await site.wait_kw(lambda kw: kw <= level * 1.02, 20, f"at the fail-safe level {level} kW")
            # restarted after the link was lost (the grid beats again, no fresh command): held at the level from
            # the start, and the state says a grid command releases it, or the release window
            beats.on = True
            await restart(site)
            status = await site.status()
            assert (status["failsafe"]["active"], status["failsafe"]["reason"]) == (True, "startup")
            assert status["target_source"] == "failsafe"
            await wait_until(
                lambda: (
                    site.state()["failsafe"].get("reason") == "startup"
                    and site.state()["failsafe"].get("released_by") == "grid_command"
                ),
                15,
                "the new run's state, the grid heard",
            )
            assert site.state()["failsafe"]["releases_at"] is not None
            assert (await site.retained_state())["failsafe"]["active"] is True
            assert await site.kw() <= level * 1.02
