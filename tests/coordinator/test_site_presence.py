"""Whether a site can be counted on, from what the fabric delivers about it.

MQTT orders one publisher's messages on one connection, not across a reconnect, a QoS 1 redelivery or a cluster
node's copy of the retained messages: after a site's last will, the coordinator may still be handed its old
retained "online" and its last flexibility document (seen in CI on the 3-node NATS cluster: a site killed with
kill -9 was counted back 3 s later at its old share, and the others' new shares were taken back).
"""

from __future__ import annotations

import json

from hashflex.contract.flex import Flexibility
from hashflex.coordinator.fabric import MqttFabric
from hashflex.coordinator.program import ProgramState
from hashflex.coordinator.service import Coordinator, CoordinatorConfig
from tests.broker import HOST, free_port
from tests.coordinator.support import COORD, GRID, MW, PROGRAM, T0, Fabric, flex


class _NoStore:
    async def load(self) -> ProgramState | None:
        return None

    async def save(self, state: ProgramState) -> None:
        raise AssertionError("nothing is decided here")


def _coordinator() -> Coordinator:
    fab = Fabric.make()
    cfg = CoordinatorConfig(
        program_id=PROGRAM, sites=tuple(fab.configs), grid_keys=(GRID.public_key(),), signing_key=COORD
    )
    return Coordinator(cfg, MqttFabric([(HOST, free_port())], "presence"), _NoStore(), lambda: False, clock=lambda: T0)


def _doc(at: float, present: float = 9 * MW) -> bytes:
    f: Flexibility = flex("a", cap=10 * MW, present=present, floors=(5 * MW, 2 * MW, 0.5 * MW), at=at, ths_per_mw=30.0)
    return json.dumps(f.to_dict()).encode()


async def test_a_lost_site_is_back_only_with_flexibility_newer_than_its_loss() -> None:
    coord = _coordinator()
    await coord.on_message("hashflex/a/availability", b"online", retained=True)
    await coord.on_message("hashflex/a/flex", _doc(T0), retained=True)
    assert coord.views()["a"].online
    await coord.on_message("hashflex/a/availability", b"offline")  # its last will
    assert not coord.views()["a"].online
    # a node's stale retained copy or a redelivery, from before the loss: still lost
    await coord.on_message("hashflex/a/availability", b"online", retained=True)
    await coord.on_message("hashflex/a/flex", _doc(T0), retained=True)
    await coord.on_message("hashflex/a/flex", _doc(T0 - 5.0))
    assert not coord.views()["a"].online
    # the agent back: its first document computed after the loss
    await coord.on_message("hashflex/a/flex", _doc(T0 + 30.0))
    assert coord.views()["a"].online


async def test_an_older_flexibility_document_never_replaces_a_newer_one() -> None:
    coord = _coordinator()
    await coord.on_message("hashflex/a/availability", b"online")
    await coord.on_message("hashflex/a/flex", _doc(T0 + 10.0, present=4 * MW))
    await coord.on_message("hashflex/a/flex", _doc(T0, present=9 * MW))  # delivered late
    view = coord.views()["a"]
    assert view.flex is not None
    assert view.flex.at == T0 + 10.0
    assert view.present_w == 4 * MW


async def test_a_site_never_lost_is_online_as_soon_as_it_says_so() -> None:
    coord = _coordinator()
    await coord.on_message("hashflex/a/availability", b"online")
    assert coord.views()["a"].online  # (its flexibility decides the rest: `program.failure_of`)
