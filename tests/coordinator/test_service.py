"""The coordinator service end to end: three real agents (each its own address range of one simulated site process)
on a real Mosquitto fabric publish their flexibility; the coordinator (leader by a real lease on a 3-node NATS
cluster, its state in JetStream) takes a signed program hold from the grid and every site takes its share, once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hashflex.contract.signing import sign_command
from hashflex.coordinator.store import JetStreamProgramStore
from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentProcess, write_agent_config
from tests.broker import HOST, Mosquitto
from tests.coordinator.fleet import Instance, Program
from tests.coordinator.fleet import start_instance as start_fleet_instance
from tests.coordinator.fleet import until as _until
from tests.nats_cluster import NatsCluster

PROGRAM = f"prog-{uuid.uuid4().hex[:6]}"
SITES = ("east", "north", "west")
PER_SITE = 4
GRID = Ed25519PrivateKey.generate()
COORD = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield nodes
    nodes.stop()


@pytest.mark.parametrize("fabric", ["mosquitto", "nats"])
async def test_a_program_hold_reaches_every_site_once(
    fabric: str, tmp_path: Path, mosquitto: Mosquitto, cluster: NatsCluster
) -> None:
    with SimProcess(PER_SITE * len(SITES), base_ip="127.38.0.1", seed=11) as sim:
        # the fabric: the single-site default (Mosquitto), or the 3-node NATS cluster's MQTT listeners
        global PROGRAM  # noqa: PLW0603  # one program per run: its lease, state bucket and site ids are its own
        PROGRAM = f"prog-{uuid.uuid4().hex[:6]}"
        ports = [mosquitto.plain_port] if fabric == "mosquitto" else cluster.mqtt_ports
        ranges = {sid: sim.ips[i * PER_SITE : (i + 1) * PER_SITE] for i, sid in enumerate(SITES)}
        agents: dict[str, AgentProcess] = {}
        try:
            for sid, ips in ranges.items():
                files = write_agent_config(
                    tmp_path / sid,
                    ips,
                    cap_kw=15.0,
                    site_id=f"{PROGRAM}-{sid}",
                    grid_key=COORD,
                    overrides={"mqtt": {"enabled": True, "host": HOST, "port": ports[0]}},
                )
                agents[sid] = AgentProcess.start(files)
            await _run_coordinator(agents, ports, cluster)
        finally:
            for agent in agents.values():
                agent.stop()


async def start_instance(name: str, ports: list[int], cluster: NatsCluster) -> Instance:
    """One coordinator instance of this run's program (tests/coordinator/fleet.py), through `ports` in turn."""
    program = Program(PROGRAM, SITES, 15_000.0, GRID, COORD)
    return await start_fleet_instance(name, program, [(HOST, port) for port in ports], cluster)


async def _run_coordinator(agents: dict[str, AgentProcess], ports: list[int], cluster: NatsCluster) -> None:
    first = await start_instance("coordinator-1", ports, cluster)
    instances = [first]
    lease, coord, nc = first.lease, first.coord, first.nc
    js = nc.jetstream()
    try:
        await _until(lambda: lease.is_leader, 10, "the lease")
        second = await start_instance("coordinator-2", ports, cluster)  # a follower: reads, does not act
        instances.append(second)
        # every site's retained flexibility is read before anything is decided
        await _until(
            lambda: all(s.flex_at is not None and s.online for s in coord.sites.values()),
            40,
            "every site's flexibility",
        )
        present = math.fsum(s.flex_doc.present_w for s in coord.sites.values())
        target_kw = math.floor(present * 0.6) / 1000.0
        replies: list[dict[str, Any]] = []
        async with aiomqtt.Client(HOST, ports[-1], identifier=f"grid-{PROGRAM}") as grid:
            await grid.subscribe(f"hashflex/program/{PROGRAM}/reply/+", qos=1)
            hold = sign_command(
                {
                    "program": PROGRAM,
                    "verb": "hold",
                    "id": "evening",
                    "issued_at": int(time.time()),
                    "target_kw": target_kw,
                    "end": int(time.time()) + 3600,
                },
                GRID,
            )
            await grid.publish(f"hashflex/program/{PROGRAM}/cmd/hold", json.dumps(hold).encode(), qos=1)
            async with asyncio.timeout(10):
                async for msg in grid.messages:
                    replies.append(json.loads(bytes(msg.payload)))
                    break
            assert replies[0]["status"] == "ok", replies
            # the same command again (a grid retry): the same answer, nothing new
            await grid.publish(f"hashflex/program/{PROGRAM}/cmd/hold", json.dumps(hold).encode(), qos=1)
            async with asyncio.timeout(10):
                async for msg in grid.messages:
                    replies.append(json.loads(bytes(msg.payload)))
                    break
            assert replies[1] == replies[0]

        # every site acknowledges its share, and holds it as a dispatch of its own
        def acked() -> bool:
            shares = coord.state.assignments.get("evening", {})
            return len(shares) == len(SITES) and all(a.acked for a in shares.values())

        await _until(acked, 20, "every site's ok")
        shares = coord.state.assignments["evening"]
        assert math.fsum(a.target_w for a in shares.values()) <= target_kw * 1000.0
        for sid, agent in agents.items():
            docs = agent.ok("dispatches")["dispatches"]
            mine = [d for d in docs if d["id"] == f"{PROGRAM}.evening"]
            assert len(mine) == 1, docs
            assert mine[0]["rev"] == shares[f"{PROGRAM}-{sid}"].rev  # 0, or a later one as the sites' flexibility moved
            assert mine[0]["target_kw"] == pytest.approx(shares[f"{PROGRAM}-{sid}"].target_w / 1000.0, abs=0.001)
        # the state is in JetStream: a new instance would read it back
        stored = await JetStreamProgramStore(js, PROGRAM, bucket=f"state_{PROGRAM}".replace("-", "_")).load()
        assert stored is not None
        assert stored.assignments["evening"] == shares
        # a site killed (kill -9) mid-dispatch: its last will; it is counted at its cap and the others take its
        # shortfall at once (a new revision each), acknowledged by them
        # (the shares may have been revised already, as the sites' flexibility moves while they shed: the revisions
        # after the kill are judged against those before it, not by number)
        revs_before = {sid: coord.state.assignments["evening"][f"{PROGRAM}-{sid}"].rev for sid in ("north", "west")}
        agents["east"].proc.kill()
        killed_at = time.monotonic()
        east = f"{PROGRAM}-east"

        def redispatched() -> bool:
            # east's shortfall moved: a new revision for at least one of the others (water-filling may put all of
            # it on one site, the other staying at the floor it can reach), every share of theirs acknowledged
            held = coord.state.assignments.get("evening", {})
            others = [held[f"{PROGRAM}-{sid}"] for sid in ("north", "west")]
            moved = any(a.rev > revs_before[a.site_id.removeprefix(f"{PROGRAM}-")] for a in others)
            return moved and all(a.acked for a in others)

        await _until(redispatched, 15, "the others' new shares")
        took = time.monotonic() - killed_at
        assert coord.last is not None
        report = coord.last.reports[0]
        by_site = {s.site_id: s for s in report.sites}
        assert by_site[east].failure == "offline"
        assert by_site[east].counted_w == 15_000.0
        assert report.allocated_w <= target_kw * 1000.0
        assert took <= 5.0, f"re-dispatch {took:.1f} s after the kill"
        for sid in ("north", "west"):
            mine = [d for d in agents[sid].ok("dispatches")["dispatches"] if d["id"] == f"{PROGRAM}.evening"]
            held = coord.state.assignments["evening"][f"{PROGRAM}-{sid}"]
            assert mine[0]["rev"] == held.rev
            share = held.target_w
            assert mine[0]["target_kw"] == pytest.approx(share / 1000.0, abs=0.001)
        print(f"re-dispatch acknowledged {took:.2f} s after kill -9")
        # the leader crashes: the follower takes the lease when it ages out, reads the state from JetStream and
        # carries on; it sends nothing again (every share is acknowledged) and answers the grid's next command
        await first.kill()
        # what it held when it died (taken after the kill: until its tasks stop it may still revise a share as the
        # sites' flexibility moves; a snapshot taken before the kill missed such a revision, CI 2026-12-04)
        before = {k: dict(v) for k, v in coord.state.assignments.items()}
        instances.remove(first)
        lost_at = time.monotonic()
        await _until(lambda: second.coord.last is not None, 15, "the follower acting")
        took_over = time.monotonic() - lost_at
        held_after = second.coord.state.assignments
        assert held_after.keys() == before.keys()
        for did, shares in before.items():
            for sid, share in shares.items():
                # as the leader left it (read back from JetStream), or revised since by the follower itself as the
                # sites' flexibility moved while it took over: a later revision, never an older one (CI 2026-12-04,
                # a two-core soak beside: west's share revised 3.5 s after the other sites')
                assert held_after[did][sid] == share or held_after[did][sid].rev > share.rev, (sid, share)
        assert second.coord.last is not None
        if held_after == before:
            assert second.coord.last.commands == ()  # nothing to send twice
        else:  # what it revised goes out once and is acknowledged
            live = [f"{PROGRAM}-{sid}" for sid in ("north", "west")]
            await _until(
                lambda: all(second.coord.state.assignments["evening"][k].acked for k in live),
                15,
                "the follower's revisions",
            )
        print(f"follower acting {took_over:.2f} s after the leader's crash")
        async with aiomqtt.Client(HOST, ports[-1], identifier=f"grid2-{PROGRAM}") as grid:
            await grid.subscribe(f"hashflex/program/{PROGRAM}/reply/+", qos=1)
            cancel = sign_command(
                {
                    "program": PROGRAM,
                    "verb": "cancel",
                    "id": "end-evening",
                    "issued_at": int(time.time()),
                    "dispatch_id": "evening",
                },
                GRID,
            )
            await grid.publish(f"hashflex/program/{PROGRAM}/cmd/cancel", json.dumps(cancel).encode(), qos=1)
            async with asyncio.timeout(10):
                async for msg in grid.messages:
                    answer = json.loads(bytes(msg.payload))
                    break
        assert answer["status"] == "ok", answer

        def cancelled() -> bool:  # east is dead: its cancel waits for it (it is re-sent when it is back)
            held = second.coord.state.assignments.get("evening", {})
            live = [held.get(f"{PROGRAM}-{sid}") for sid in ("north", "west")]
            return all(a is not None and a.cancelled and a.acked for a in live)

        await _until(cancelled, 15, "the live sites' cancels acknowledged")
        for sid in ("north", "west"):
            mine = [d for d in agents[sid].ok("dispatches")["dispatches"] if d["id"] == f"{PROGRAM}.evening"]
            assert mine == [], mine  # open dispatches only: it ended
    finally:
        for inst in instances:
            with contextlib.suppress(Exception):
                await inst.lease.release()
            await inst.kill()
