"""The control loop and its parts, built in one place: the agent (agent/app.py) and the test harnesses build the same
object graph through `build_controller`.

Most parts talk back to the loop through what is made first and handed to them: the `Wake` (an early tick asked
for), the `Inbox` (the miners' answers) and the `StatusPublisher` (a frequency record marks the status doc stale;
the loop hands it its state after every tick). Three edges point at parts made later, because the parts name each
other: the commander goes first (the frequency response sheds through it), yet hears the energy meter before a batch
goes out and hands every result to the frequency response; the energy meter's curtailment reads the loop's target.
Those are closures over the later part, called only once the loop runs, never while it is built. A fourth runs the
other way round: the site meter is made first (the frequency response reads it) and is told here to hand every
reading to the frequency response as it arrives (`listen`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hashflex.agent.config import AgentConfig
from hashflex.agent.runtime import continuity
from hashflex.agent.runtime.actuator import Actuator, OpResult
from hashflex.agent.runtime.alarms import AlarmBoard
from hashflex.agent.runtime.arbiter import Arbiter
from hashflex.agent.runtime.caps import Caps
from hashflex.agent.runtime.clock import Clock, steady
from hashflex.agent.runtime.commanding import Commander
from hashflex.agent.runtime.controller import Controller
from hashflex.agent.runtime.dispatches import DispatchBook
from hashflex.agent.runtime.energy_meter import EnergyMeter, curtailment
from hashflex.agent.runtime.events import EventLog
from hashflex.agent.runtime.facility import FacilityControl
from hashflex.agent.runtime.frequency import FrequencyRecords, FrequencyResponse
from hashflex.agent.runtime.inbox import Inbox, Wake
from hashflex.agent.runtime.metering import MeterControl, SiteMeterPort
from hashflex.agent.runtime.persist import WriteBehind
from hashflex.agent.runtime.ports import ControlStore, Notifier, RuntimeMetrics, SnapshotSource
from hashflex.agent.runtime.readout import StatusPublisher
from hashflex.agent.runtime.rules import ControlRules
from hashflex.contract.status import GatewayDoc


def build_controller(
    cfg: AgentConfig,
    *,
    fleet: SnapshotSource,
    store: ControlStore,
    actuator: Actuator,
    clock: Clock,
    events: EventLog,
    persist: WriteBehind | None = None,
    metrics: RuntimeMetrics | None = None,
    notifier: Notifier | None = None,
    grid_link: bool = True,
    gateway_health: Callable[[], GatewayDoc] | None = None,
    meter: SiteMeterPort | None = None,
    sweep_request: asyncio.Event | None = None,
    on_actuating: Callable[[bool], None] | None = None,
) -> Controller:
    """The controller with its parts (`restore` it before its first tick)."""
    wake = Wake()
    inbox = Inbox(wake.event)  # commands, and the miners' answers (`commands.deliver`)
    # the loop's own records go through this: a store that refuses writes must not stop the control loop
    persist = persist if persist is not None else WriteBehind(store)
    # elapsed-time rules (heartbeat timeout, min on/off, stagger, confirmation, a dispatch's start at receipt)
    # read a time that never steps with the wall clock; a step is alarmed (continuity.TimeKeeper)
    steady_clock = steady(clock)
    rules = ControlRules.from_config(cfg, grid_link=grid_link)
    publisher = StatusPublisher(notifier)  # the status doc of the loop's state, after every tick
    alarms = AlarmBoard(events, persist, steady_clock.time)
    caps = Caps(cfg.site.cap_kw)
    book = DispatchBook(store=store, persist=persist, events=events, rules=rules.arbitration, metrics=metrics)

    def batch_done() -> None:
        if sweep_request is not None:
            sweep_request.set()  # confirm from a fresh picture, soon
        wake.trigger()

    def on_result(r: OpResult) -> None:
        if frequency is not None:
            frequency.on_result(r)

    commands = Commander(
        actuator=actuator,
        persist=persist,
        clock=steady_clock.time,
        stagger=rules.stagger,
        confirm_after_s=cfg.control.confirm_after_s,
        deliver=inbox.deliver,
        batch_done=batch_done,
        # what miners drew until a batch goes out is what was last read
        before_send=lambda now: energy.hold(fleet.latest(), now),
        metrics=metrics,
        # the fleet pauses its sweeps while a batch is on the wire (commands first)
        on_actuating=on_actuating,
        on_result=on_result,
    )
    time_keeper = continuity.TimeKeeper(steady_clock, persist, alarms)
    # the site meter (site.meter): the cap and every target apply to what it reads (agent.runtime.metering)
    site_meter = MeterControl.for_site(cfg, meter, started_at=steady_clock.time())
    energy = EnergyMeter(
        persist=persist,
        clock=steady_clock.time,
        meter=site_meter,
        meter_cfg=cfg.site.meter,
        cap_kw=cfg.site.cap_kw,
        curtailment=lambda: curtailment(ctl.target, book.records),
        max_gap_s=max(120.0, 10 * cfg.polling.interval_s, 30 * clock.scale),
        metrics=metrics,
    )
    # under-frequency response (frequency_response): sheds a tripped stage at once, holds it through arbitration
    frequency = FrequencyResponse.for_site(
        cfg,
        commands,
        FrequencyRecords(persist, publisher.mark_stale),
        site_meter,
        trigger=wake.trigger,
        clock=steady_clock.time,
        wall_scale=clock.scale,
        prepare=actuator.prepare,
    )
    if meter is not None and frequency is not None:  # every reading reaches the detector as it arrives
        meter.listen(on_hz=frequency.on_hz, on_reading=frequency.on_reading)
    arbiter = Arbiter(
        rules=rules, caps=caps, book=book, frequency=frequency, time_keeper=time_keeper, persist=persist, events=events
    )
    # cooling that follows circuits' miners (site.circuits[].cooling): a wake waits for it (agent.runtime.facility)
    facility = FacilityControl.from_config(
        cfg, rules.tree, steady_clock, raise_alarm=alarms.raise_alarm, clear_alarm=alarms.drop
    )
    ctl = Controller(
        cfg,
        fleet=fleet,
        store=store,
        clock=steady_clock,
        events=events,
        persist=persist,
        metrics=metrics,
        publisher=publisher,
        gateway_health=gateway_health,
        wake=wake,
        inbox=inbox,
        rules=rules,
        alarms=alarms,
        caps=caps,
        book=book,
        commands=commands,
        time_keeper=time_keeper,
        meter=site_meter,
        energy=energy,
        frequency=frequency,
        arbiter=arbiter,
        facility=facility,
    )
    return ctl
