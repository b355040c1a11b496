"""Frequency response (issue 14), end to end: the real agent (`hashflex run`) against the simulated site, its meter
on Modbus TCP, the grid's frequency scripted through the simulator (POST /grid), judged at the simulated meter
(GET /meter) and the miners' own state (GET /truth), never by what the agent says about itself.

In order, on one site: a dip shorter than the stage's for_s sheds nothing; a longer one sheds the stage's kW at the
meter, with every step in the audit chain and the export; with the meter offline during the event and the
frequency back, nothing wakes and the event holds; the meter back, the event restores and the site comes back no
faster than the ramp. On sites of their own: an agent killed during an event and started again holds the shed
(no second trip, nothing woken) until the restore rule is met on its own readings; a stage's own restore rule
(restore_above_hz, restore_after_s) ends its event where the programme's would not.

Clocks: the simulator runs --speed K and the agent --time-scale K; stage times below are site seconds, deadlines
wall seconds. Loopback range of this file: 127.72.0.0/16 (miners from 127.72.0.1, the meter on 127.72.1.250; the
restart test's site 127.72.4.1 and 127.72.5.250, the stage restore test's 127.72.6.1 and 127.72.7.250; the
benchmark 127.72.16.x and 127.72.255.250).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hashflex.agent.io.store import Store
from hashflex.sim.testing import SimProcess
from tests.agent_harness import AgentConfigFiles, AgentProcess, write_agent_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

K = 5.0  # site seconds per wall second
METER = "127.72.1.250:5020"
BELOW_HZ = 49.5
FOR_S = 2.0  # site s: 0.4 s of wall time, about eight fast frequency reads (poll_s 0.05 wall)
SHED_PCT = 30.0
RESTORE_AFTER_S = 10.0  # site s
RAMP_KW_PER_MIN = 12.0
STANDBY_W = 30.0  # the simulator's largest standby draw is under this


def frequency_doc(agent: AgentProcess) -> dict[str, Any]:
    return ((agent.status().get("meter") or {}).get("frequency_response")) or {}


def asleep(sim: SimProcess) -> set[str]:
    return {m["ip"] for m in sim.truth()["miners"] if m["state"] == "sleeping"}


def audit_steps(files_state: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{files_state / 'hashflex.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT data FROM audit WHERE kind = 'frequency' ORDER BY seq").fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, AgentProcess, Path]]:
    folder: Path = tmp_path_factory.mktemp("frequency")
    with SimProcess(
        miners=10,
        mix="luxos:50,whatsminer:50",
        base_ip="127.72.0.1",
        seed=72,
        speed=K,
        extra_args=["--meter", METER, "--meter-config", json.dumps(METER_CFG), "--wake-s", "10"],
    ) as sim:
        files = agent_files(folder, sim)
        with AgentProcess.start(files, time_scale=K) as agent:
            wait_armed(sim, agent)
            yield sim, agent, files.state_dir


METER_CFG = {"noise": 0.001, "update_ms": 50.0, "base_kw": 2.0, "cooling_share": 0.0}


def agent_files(folder: Path, sim: SimProcess, stage: dict[str, Any] | None = None, **section: Any) -> AgentConfigFiles:
    """The agent's config for `sim`: one stage (`stage` adds to it), the programme's restore rule (`section`)."""
    nominal_kw = sum(m["nominal_w"] for m in sim.truth()["miners"]) / 1000.0
    host, port = sim.meter.split(":")
    return write_agent_config(
        folder,
        sim.ips,
        cap_kw=round(2 * nominal_kw, 1),
        time_scale=K,
        overrides={
            "site": {
                "meter": {
                    "host": host,
                    "port": int(port),
                    "map": "sunspec",
                    "poll_s": 0.1,
                    "stale_after_s": 2.0 * K,
                    "frozen_after_s": 60.0 * K,
                    "non_miner_allowance_kw": 3.0,
                    "non_miner_window_s": 4.0 * K,
                }
            },
            "control": {"ramp_up_kw_per_min": RAMP_KW_PER_MIN, "use_power_limits": False},
            "frequency_response": {
                "stages": [{"below_hz": BELOW_HZ, "for_s": FOR_S, "shed": f"{SHED_PCT:g}%", **(stage or {})}],
                "restore_above_hz": 49.9,
                "restore_after_s": RESTORE_AFTER_S,
                "poll_s": 0.05,
                **section,
            },
        },
    )


def wait_armed(sim: SimProcess, agent: AgentProcess) -> None:
    agent.wait_for(lambda: (agent.status().get("meter") or {}).get("fresh"), 20, what="a fresh meter")
    # every miner up and the plan carried out before any dip
    agent.wait_for(lambda: not asleep(sim) and agent.status()["settled_since"], 40, what="all miners up")
    agent.wait_for(lambda: frequency_doc(agent).get("armed", [{}])[0].get("commands"), 10, what="an armed shed list")


def test_a_dip_shorter_than_for_s_sheds_nothing(site: tuple[SimProcess, AgentProcess, Path]) -> None:
    sim, agent, state = site
    sim.grid_event({"event": "dip", "depth_hz": 0.8, "duration_s": 0.4 * FOR_S})  # 49.2 Hz for 0.8 site s
    agent.wait_for(
        lambda: (frequency_doc(agent).get("lowest_hz") or 50.0) < BELOW_HZ, 5, what="the agent reading the dip"
    )
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert not asleep(sim), "a dip shorter than for_s put miners to sleep"
        time.sleep(0.1)
    doc = frequency_doc(agent)
    assert not doc["active"]
    assert doc["events"] == 0
    assert audit_steps(state) == []


def test_a_dip_longer_than_for_s_sheds_the_stage_kw_at_the_meter(site: tuple[SimProcess, AgentProcess, Path]) -> None:
    sim, agent, state = site
    before = [sim.meter_truth() for _ in range(3)]
    it_kw = min(t["it_w"] for t in before) / 1000.0
    site_kw = min(t["power_w"] for t in before) / 1000.0
    shed_kw = SHED_PCT / 100.0 * it_kw
    crossed = time.monotonic()
    sim.grid_event({"event": "step", "hz": 49.3})
    # truth at the meter: the site down by the stage's kW (less the standby draw of the miners slept)
    reached = agent.wait_for(
        lambda: sim.meter_truth()["power_w"] / 1000.0 <= site_kw - shed_kw + 0.5,
        15,
        what="the stage's kW shed at the meter",
    )
    assert reached
    took = time.monotonic() - crossed
    slept = asleep(sim)
    assert 1 <= len(slept) < 10, slept  # the stage, not the site
    doc = frequency_doc(agent)
    assert doc["active"]
    assert doc["stage"] == 0
    # the stage's sleeps went out from the armed list; the ordinary plan under the hold may sleep one more (it
    # counts miners at their worst case and plans control.headroom_pct below the level)
    assert 1 <= doc["slept"] <= len(slept) <= doc["slept"] + 1
    status = agent.status()
    assert status["target_source"] == "frequency"  # arbitration says frequency response holds the site
    assert took < 10.0
    steps = agent.wait_for(
        lambda: (s := audit_steps(state)) and "shed_reached" in [x["step"] for x in s] and s,
        10,
        what="the event's audit records",
    )
    names = [s["step"] for s in steps]
    assert names[:2] == ["tripped", "commands_out"]
    assert "commands_acked" in names
    tripped = steps[0]
    assert tripped["below_hz"] == BELOW_HZ
    assert tripped["hz"] < BELOW_HZ
    assert tripped["first_below_at"] is not None
    assert steps[1]["sent"] == doc["slept"]
    # the shed is held: the ordinary plan does not wake them while the event lasts
    time.sleep(1.0)
    assert asleep(sim) == slept


def test_a_stale_meter_wakes_nothing_and_recovery_restores_under_the_ramp(
    site: tuple[SimProcess, AgentProcess, Path],
) -> None:
    sim, agent, state = site
    slept = asleep(sim)
    assert slept, "the previous test left the stage shed"
    sim.meter_fault("offline")
    agent.wait_for(lambda: not (agent.status().get("meter") or {}).get("fresh"), 10, what="a stale meter")
    sim.grid_event({"event": "nominal"})
    # the frequency is back above the threshold for well over the restore time, but the meter is stale: the event
    # holds and nothing wakes
    end = time.monotonic() + 3 * RESTORE_AFTER_S / K
    while time.monotonic() < end:
        assert slept <= asleep(sim), "a miner woke while the meter was stale"
        time.sleep(0.1)
    assert frequency_doc(agent)["active"]
    assert "restored" not in [s["step"] for s in audit_steps(state)]

    sim.meter_fault("clear")
    restored_at = agent.wait_for(
        lambda: not frequency_doc(agent)["active"] and time.monotonic(),
        10 + 2 * RESTORE_AFTER_S / K,
        what="the event restored",
    )
    samples: list[tuple[float, float]] = []
    deadline = restored_at + 40.0
    while time.monotonic() < deadline and asleep(sim) & slept:
        samples.append((time.monotonic(), sim.meter_truth()["it_w"] / 1000.0))
        time.sleep(0.2)
    assert not asleep(sim) & slept, "the slept miners did not come back"
    # no faster than the ramp: over any stretch, the rise is within the ramp for that time plus one miner (the ramp
    # credit lets the largest miner through whole) and the miners' spread
    largest_kw = max(m["nominal_w"] for m in sim.truth()["miners"]) / 1000.0
    for i, (t0, p0) in enumerate(samples):
        for t2, p2 in samples[i + 1 :]:
            allowed = RAMP_KW_PER_MIN * (t2 - t0) * K / 60.0 + largest_kw + 0.5
            assert p2 - p0 <= allowed, f"rose {p2 - p0:.2f} kW in {t2 - t0:.1f} s, ramp allows {allowed:.2f}"
    first_wake = len(samples)
    assert first_wake >= 2, "the miners all came back at once"
    steps = audit_steps(state)
    restored = [s for s in steps if s["step"] == "restored"]
    assert len(restored) == 1
    assert restored[0]["min_hz"] == pytest.approx(49.3, abs=0.05)
    # the export carries the event's records
    store = Store.open(state / "hashflex.db", create=False)
    try:
        files = store.export(0.0, time.time() + 10 * 86400 * K, "json", now=time.time(), site_id="test-site")
    finally:
        store.close()
    text = b"".join(files.values()).decode()
    assert '"frequency"' in text
    assert "shed_reached" in text


# ------------------------------------------------------------------------------------------------ a restart
def steps_named(state: Path, name: str) -> list[dict[str, Any]]:
    return [s for s in audit_steps(state) if s["step"] == name]


def test_an_event_survives_a_restart_of_the_agent(tmp_path: Path) -> None:
    """The agent killed during an event and started again: the shed is held (nothing wakes, the stage does not
    trip a second time on the frequency still below it, nor is forgotten with the frequency between the stage and
    the restore threshold), and the event restores once the frequency has been back for the restore time."""
    with SimProcess(
        miners=10,
        mix="luxos:50,whatsminer:50",
        base_ip="127.72.4.1",
        seed=74,
        speed=K,
        extra_args=["--meter", "127.72.5.250:5020", "--meter-config", json.dumps(METER_CFG), "--wake-s", "10"],
    ) as sim:
        files = agent_files(tmp_path, sim)
        origin = time.time()  # one timeline for both runs
        with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
            wait_armed(sim, agent)
            sim.grid_event({"event": "step", "hz": 49.3})
            agent.wait_for(lambda: steps_named(files.state_dir, "commands_acked"), 15, what="the stage shed")
            slept = agent.wait_for(lambda: asleep(sim), 15, what="the stage's miners asleep")
            held_kw = frequency_doc(agent)["held_kw"]
            agent.kill()
        assert 1 <= len(slept) < 10
        with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
            agent.wait_for(lambda: (agent.status().get("meter") or {}).get("fresh"), 20, what="a fresh meter")

            def holds(wall_s: float) -> None:
                end = time.monotonic() + wall_s
                while time.monotonic() < end:
                    now_asleep = asleep(sim)
                    assert slept <= now_asleep, "a miner slept by the event woke after the restart"
                    # the ordinary plan under the hold may sleep one more (worst case, headroom), not a second stage
                    assert len(now_asleep) <= len(slept) + 1, "the stage was shed a second time"
                    time.sleep(0.1)

            # the frequency still below the stage: it does not trip again
            holds(3 * FOR_S / K + 2.0)
            assert len(steps_named(files.state_dir, "tripped")) == 1
            doc = frequency_doc(agent)
            assert doc["active"], "the event was forgotten over the restart"
            assert doc["stage"] == 0
            assert doc["held_kw"] == pytest.approx(held_kw, abs=1e-3)
            resumed = steps_named(files.state_dir, "resumed")
            assert len(resumed) == 1
            assert resumed[0]["stage"] == 0
            assert resumed[0]["min_hz"] == pytest.approx(49.3, abs=0.05)

            # between the stage and the restore threshold for longer than the restore time: still held
            sim.grid_event({"event": "step", "hz": 49.7})
            holds(2 * RESTORE_AFTER_S / K)
            assert frequency_doc(agent)["active"]
            # back: the event restores (after the restore time, from the readings of this run) and the miners wake
            back = time.monotonic()
            sim.grid_event({"event": "nominal"})
            agent.wait_for(
                lambda: not frequency_doc(agent)["active"], 10 + 2 * RESTORE_AFTER_S / K, what="the event restored"
            )
            assert time.monotonic() - back >= 0.9 * RESTORE_AFTER_S / K
            agent.wait_for(lambda: not asleep(sim) & slept, 60, what="the slept miners back")
            assert len(steps_named(files.state_dir, "restored")) == 1
            # and a later restart has no event to resume
            agent.stop()
        with AgentProcess.start(files, time_scale=K, time_origin=origin) as agent:
            agent.wait_for(lambda: (agent.status().get("meter") or {}).get("fresh"), 20, what="a fresh meter")
            assert not frequency_doc(agent)["active"]
            assert len(steps_named(files.state_dir, "resumed")) == 1


# ------------------------------------------------------------------------------------------------ a stage's own rule
def test_a_stage_s_own_restore_rule_ends_its_event(tmp_path: Path) -> None:
    """The stage restores above its own 49.7 Hz after its own 4 s, where the programme's rule (49.9 Hz, 10 min)
    would hold the event: judged at the simulated miners."""
    stage_after_s = 4.0
    with SimProcess(
        miners=10,
        mix="luxos:50,whatsminer:50",
        base_ip="127.72.6.1",
        seed=76,
        speed=K,
        extra_args=["--meter", "127.72.7.250:5020", "--meter-config", json.dumps(METER_CFG), "--wake-s", "10"],
    ) as sim:
        files = agent_files(
            tmp_path, sim, stage={"restore_above_hz": 49.7, "restore_after_s": stage_after_s}, restore_after_s=600.0
        )
        with AgentProcess.start(files, time_scale=K) as agent:
            wait_armed(sim, agent)
            sim.grid_event({"event": "step", "hz": 49.3})
            slept = agent.wait_for(
                lambda: steps_named(files.state_dir, "commands_acked") and asleep(sim), 15, what="the stage shed"
            )
            doc = frequency_doc(agent)
            assert (doc["restore_above_hz"], doc["restore_after_s"]) == (49.7, stage_after_s)
            # 49.65: above the stage, below its restore threshold: held well past the stage's restore time
            sim.grid_event({"event": "step", "hz": 49.65})
            time.sleep(3 * stage_after_s / K)
            assert frequency_doc(agent)["active"]
            assert slept <= asleep(sim)
            # 49.8: above the stage's threshold, under the programme's: restored after the stage's time
            back = time.monotonic()
            sim.grid_event({"event": "step", "hz": 49.8})
            agent.wait_for(
                lambda: not frequency_doc(agent)["active"], 10 + 2 * stage_after_s / K, what="the event restored"
            )
            assert time.monotonic() - back >= 0.9 * stage_after_s / K
            agent.wait_for(lambda: not asleep(sim) & slept, 60, what="the slept miners back")
            restored = steps_named(files.state_dir, "restored")
            assert len(restored) == 1
            assert restored[0]["hz"] == pytest.approx(49.8, abs=0.05)


# ------------------------------------------------------------------------------------------------ a held loop
class _Host:
    """Records what the frequency response asks of the controller (the controller itself is tested above)."""

    def __init__(self) -> None:
        self.in_flight: dict[str, Any] = {}
        self.fired: list[tuple[float, int]] = []  # (time.monotonic() when fired, commands)
        self.audits: list[dict[str, Any]] = []
        self.saved: list[dict[str, Any] | None] = []  # the event the store would keep, each write
        self.braces: list[bool] = []

    def fire_shed(self, changes: list[Any], level_kw: float, now: float) -> None:
        self.fired.append((time.monotonic(), len(changes)))

    def audit(self, data: dict[str, Any], now: float) -> None:
        self.audits.append(data)

    def save(self, doc: dict[str, Any] | None, now: float, audits: Any = ()) -> None:
        self.saved.append(doc)
        self.audits.extend(audits)

    def brace(self, on: bool) -> None:
        self.braces.append(on)

    def trigger(self) -> None:
        pass


def test_a_crossing_is_read_and_decided_while_a_tick_holds_the_event_loop(tmp_path: Path) -> None:
    """The frequency register is read on the meter's own thread and the detector steps there: a stage trips while
    the event loop is held by a long synchronous step (a tick at 10,000 miners), and its commands go out on the
    loop once it is free. Ordering only: decided during the hold, fired after it."""
    import asyncio

    from hashflex.agent.config import FrequencyResponseConfig
    from hashflex.agent.core.model import MinerState, MinerView
    from hashflex.agent.runtime.frequency import FrequencyResponse
    from hashflex.drivers.base import Family, OnOff
    from hashflex.drivers.meter_maps import MeterBounds
    from hashflex.drivers.meter_modbus import MeterConfig, ModbusMeter

    with SimProcess(
        miners=2, mix="luxos:1", base_ip="127.72.2.1", seed=3, extra_args=["--meter", "127.72.2.250:5020"]
    ) as sim:
        host, port = sim.meter.split(":")

        async def run() -> None:
            meter = ModbusMeter(
                MeterConfig(
                    host=host, port=int(port), map="sunspec", bounds=MeterBounds(max_w=1e6), poll_s=0.2, hz_poll_s=0.05
                )
            )
            cfg = FrequencyResponseConfig.model_validate(
                {
                    "stages": [{"below_hz": 49.5, "for_s": 0, "shed": "50%"}],
                    "restore_above_hz": 49.9,
                    "restore_after_s": 60,
                }
            )
            rec = _Host()
            fr = FrequencyResponse(
                cfg, rec, rec, trigger=rec.trigger, clock=time.monotonic, meter_fresh=lambda: meter.status().fresh
            )
            meter.on_frequency = fr.on_hz
            meter.start()
            try:
                deadline = time.monotonic() + 20
                while not (meter.status().fresh and fr.last_hz is not None) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # (readings arrive on the meter's thread: no event to wait on)
                assert fr.last_hz is not None, "no frequency reading from the meter's thread"
                views = [
                    MinerView(
                        id=f"10.0.0.{i}",
                        family=Family.LUXOS,
                        capability=OnOff(),
                        nominal_w=3000.0,
                        nominal_ths=100.0,
                        state=MinerState.HASHING,
                        power_w=3000.0,
                        commanded_w=None,
                    )
                    for i in range(4)
                ]
                fr.arm(views, set(), None, time.monotonic())
                # the loop held, as by a long tick: nothing on it runs until the hold ends
                sim.grid_event({"event": "step", "hz": 49.0})
                hold_until = time.monotonic() + 20
                while fr.state.depth == 0 and time.monotonic() < hold_until:
                    time.sleep(0.01)  # noqa: ASYNC251 (the point: a synchronous step holding the loop)
                released = time.monotonic()
                assert fr.state.depth == 1, "the stage did not trip while the loop was held"
                assert rec.fired == [], "commands went out off the event loop"
                for _ in range(10):
                    await asyncio.sleep(0)
                assert len(rec.fired) == 1, "the trip's commands did not go out once the loop was free"
                assert rec.fired[0][0] >= released
                assert rec.fired[0][1] == 2
                assert fr.event is not None
                assert fr.event.first_below_at is not None
                assert fr.event.first_below_at < released  # the first reading below was taken during the hold
                assert [a["step"] for a in rec.audits] == ["tripped", "commands_out"]
            finally:
                fr.close()  # its sleeps are never answered here: the collector is let go
                await meter.stop()

        asyncio.run(run())


def test_the_armed_miners_are_prepared_so_a_shed_sleep_is_one_exchange() -> None:
    """Actuator.prepare fetches ahead what a first control call fetches on the way (the LuxOS session id, the
    Whatsminer v3 salt), through unmodified pyasic against the simulated miners; the sleeps after it are accepted."""
    import asyncio

    from hashflex.agent.core.model import Change, Op
    from hashflex.agent.runtime.actuator import Actuator
    from hashflex.drivers.asic import PyasicDriver
    from hashflex.drivers.base import DriverSettings

    with SimProcess(miners=4, mix="luxos:1,whatsminer:1", base_ip="127.72.3.1", seed=5) as sim:

        async def run() -> None:
            driver = PyasicDriver(DriverSettings(identify_concurrency=4))
            ids = [i for i in await asyncio.gather(*(driver.identify(ip) for ip in sim.ips)) if i is not None]
            assert {str(i.family) for i in ids} == {"luxos", "whatsminer"}
            handles = {i.ip: driver.attach(i) for i in ids}
            actuator = Actuator(handles.__getitem__, concurrency=4, command_timeout_s=5.0)
            assert await actuator.prepare([*handles, "10.9.9.9"]) == set(handles)  # an unknown miner is skipped
            report = await actuator.apply([Change(ip, Op.SLEEP, None, decrease=True) for ip in handles])
            assert [r.outcome for r in report.results] == ["ok"] * len(handles)
            assert all(r.attempts == 1 for r in report.results)

        asyncio.run(run())
