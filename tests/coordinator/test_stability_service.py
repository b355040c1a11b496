"""Only the leader writes the program state (#15), on a real JetStream (one nats-server node) with real leases.

Every coordinator instance hears the sites' replies. A follower, or a deposed leader still holding the last step of
its term, that recorded an acknowledgement would write over the leader's state: refused (a compare-and-set on the
revision), then, with the revision forgotten, a `create` over the existing key, refused again, a traceback per reply.
It must leave the state alone; and a store that lost a race writes nothing more until it has read the state again.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from hashflex.contract.reply import Reply
from hashflex.coordinator.fabric import MqttFabric
from hashflex.coordinator.lease import Lease, LeaseConfig
from hashflex.coordinator.program import ProgramState, StateConflict, step
from hashflex.coordinator.service import Coordinator, CoordinatorConfig
from hashflex.coordinator.store import JetStreamProgramStore
from tests.broker import HOST, free_port
from tests.coordinator.support import COORD, GRID, PROGRAM, T0, Fabric, accept
from tests.nats_cluster import nats_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nats_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = nats_server(tmp_path, port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def js(nats_port: int) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(f"nats://{HOST}:{nats_port}")
    yield nc.jetstream()
    await nc.close()


def _store(js: JetStreamContext, bucket: str) -> JetStreamProgramStore:
    return JetStreamProgramStore(js, PROGRAM, bucket=bucket, replicas=1)


async def test_a_follower_leaves_the_state_alone_on_site_replies(js: JetStreamContext) -> None:
    bucket = f"state_{uuid.uuid4().hex[:8]}"
    lease_cfg = LeaseConfig(bucket=f"lease_{uuid.uuid4().hex[:8]}", ttl_s=30.0, replicas=1)
    leader_lease, follower_lease = Lease(js, "new-leader", lease_cfg), Lease(js, "old-leader", lease_cfg)
    assert await leader_lease.step()
    assert not await follower_lease.step()
    fab = Fabric.make()
    cfg = CoordinatorConfig(
        program_id=PROGRAM, sites=tuple(fab.configs), grid_keys=(GRID.public_key(),), signing_key=COORD
    )
    # an unconnected fabric: whatever a follower publishes fails loudly
    old = Coordinator(
        cfg, MqttFabric([(HOST, free_port())], "old-leader"), _store(js, bucket), lambda: follower_lease.is_leader
    )
    # the old leader's term: a hold stepped, its shares written and sent (what `tick` leaves behind)
    state = accept(
        ProgramState(PROGRAM),
        "hold",
        {"id": "h1", "target_kw": 40_000, "end": T0 + 3600},
        now=T0,
        present_w=fab.present(),
    )
    result = step(state, fab.configs, fab.views, now=T0)
    await old.store.save(result.state)
    old.state, old.last, old._loaded = result.state, result, True
    # the new leader reads the state and writes its own (another revision of the program state)
    new_store = _store(js, bucket)
    loaded = await new_store.load()
    assert loaded == result.state
    theirs = replace(loaded, revision=loaded.revision + 5)
    await new_store.save(theirs)
    # every site answers the shares it was sent; the old leader hears the replies too
    for cmd in result.commands:
        reply = Reply.ok(cmd.doc["id"], {"dispatch": {"rev": cmd.rev}})
        await old.on_message(f"hashflex/{cmd.site_id}/reply/{cmd.verb}", reply.to_json())
    assert await _store(js, bucket).load() == theirs  # untouched
    assert old.state == result.state  # nothing recorded either: the leader records the acknowledgements
    # and the new leader's next write is not refused: nobody wrote behind its back
    await new_store.save(replace(theirs, revision=theirs.revision + 1))


async def test_a_store_that_lost_a_race_writes_nothing_until_it_reads_again(js: JetStreamContext) -> None:
    bucket = f"state_{uuid.uuid4().hex[:8]}"
    mine, theirs = _store(js, bucket), _store(js, bucket)
    await mine.save(ProgramState(PROGRAM, revision=1))
    await theirs.load()
    await theirs.save(ProgramState(PROGRAM, revision=2))
    for _ in range(2):  # the refused update, then no `create` over the key: both are StateConflict
        with pytest.raises(StateConflict):
            await mine.save(ProgramState(PROGRAM, revision=3))
    assert await _store(js, bucket).load() == ProgramState(PROGRAM, revision=2)
    assert await mine.load() == ProgramState(PROGRAM, revision=2)
    await mine.save(ProgramState(PROGRAM, revision=3))  # read again: it may write
    assert await _store(js, bucket).load() == ProgramState(PROGRAM, revision=3)
