"""What every miner is doing now: the one function that decides a miner's state (`observe`).

From the fleet picture, the agent's memory of each miner and the commands on the wire: the planner's view of each
miner (MinerView: its state, what it is counted at), the state the status, the `miners` table and the
`hashflex_miners{state}` metric show, and the closed-loop decisions on earlier commands (confirmed, to re-send,
ignored). Pure: the memory is handed back as new objects, alarms and log lines as data; the controller applies
them (agent.runtime.controller), and a read-only caller (the preview, the flexibility offer) drops them.

Closed loop (agent.core.closed_loop): a command acknowledged by a miner is confirmed from telemetry within
confirm_after_s; if the miner still draws well above what it was told, it is re-commanded (agent.core.recommand),
then (after MAX_RECOMMANDS) counted at its real draw (`ignores_commands`) and retried now and then; one that keeps
drawing above a power limit is still slept and woken (`overdraws_limit`: on/off until read under it again, at what it
draws). Once confirmed, a miner is still watched: every plan counts it at no less than its settled measured draw
(on its circuit and the site), and one measured above its limit beyond the confirmation slack is re-commanded the
same way. A miner coming up (woken, or not read steady since it came on) is counted above its setting by no less
than its peers' share (`peer_excess_shares`). A miner whose command failed is counted at its worst case, like an
unreachable one, until its back-off ends. Configured addresses no miner
answered at are counted at a worst case until the fleet identifies them (an alarm names them).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

from hashflex.agent.core.closed_loop import (
    RUNNING,
    SLEEP_CONFIRM_SHARE,
    AlarmChange,
    Decisions,
    confirm_command,
    counted_draw,
    excess_counted,
)
from hashflex.agent.core.efficiency import stock_w
from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, MinerState, MinerView, Op
from hashflex.agent.core.snapshot import FleetSnapshot, MinerSnapshot
from hashflex.drivers.base import Family, OnOff, wakes_at_limit

UNIDENTIFIED_NAMED = 20  # addresses named in the `unidentified` alarm (then a count)
# a miner told to wake is `waking` until it draws this share of its setting (a booting unit reports mining at a
# fraction of its power long before it is up), for at most WAKE_MAX_S (clock seconds)
WAKE_UP_SHARE = 0.85
WAKE_MAX_S = 900.0
PEER_EVIDENCE_S = 120.0  # a miner's settled reading tells of its peers' draw this long (peer_excess_shares)


@dataclass(frozen=True, slots=True)
class ObserveRules:
    stale_after_s: float  # a reading older than this is no reading (polling.stale_after_s)
    confirm_after_s: float  # a command shows in telemetry within this (control.confirm_after_s)
    # two readings this far apart that agree show a draw that stopped moving (closed_loop.settled): about a poll
    # interval (less a tenth: a sweep's readings are taken as their replies come), at most confirm_after_s / 2
    steady_gap_s: float
    circuit_of: Mapping[str, str] = field(default_factory=dict)
    priority_of: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Observation(Decisions):
    views: list[MinerView] = field(default_factory=list)  # the planner's view of every miner and unidentified address
    shown: dict[str, MinerState] = field(default_factory=dict)  # the state shown per miner (status, `miners`, metric)
    memory: dict[str, MinerMemory] = field(default_factory=dict)  # every miner's, after this (changed ones: new)

    def counts(self, unidentified: int) -> dict[str, int]:
        """Miners by shown state, unidentified addresses counted unreachable (as the plan counts them)."""
        out = {s.value: 0 for s in MinerState}
        for state in self.shown.values():
            out[state.value] += 1
        out[MinerState.UNREACHABLE.value] += unidentified
        out["unidentified"] = unidentified
        out["total"] = len(self.shown) + unidentified
        return out


def observe(
    snap: FleetSnapshot,
    memory: Mapping[str, MinerMemory],
    in_flight: Mapping[str, Change],
    now: float,
    rules: ObserveRules,
) -> Observation:
    """What every miner in `snap` is doing, with what the agent told it (`memory`, `in_flight`), at `now`."""
    obs = Observation(memory=dict(memory))
    peers = peer_excess_shares(memory, {ip: ms.identity.family for ip, ms in snap.miners.items()}, now)
    for ip, ms in snap.miners.items():
        old = memory.get(ip)
        mem = MinerMemory() if old is None else old.copy()
        obs.memory[ip] = mem
        peer = peers.get(ms.identity.family, 0.0)
        view = _view(ip, ms, mem, told=in_flight.get(ip), snap_ts=snap.ts, now=now, rules=rules, obs=obs, peer=peer)
        obs.views.append(view)
        obs.shown[ip] = shown_state(ms, mem, now, rules.stale_after_s)
    obs.views.extend(_unidentified_views(snap, rules, obs))
    return obs


def _view(
    ip: str,
    ms: MinerSnapshot,
    mem: MinerMemory,
    *,
    told: Change | None,
    snap_ts: float,
    now: float,
    rules: ObserveRules,
    obs: Observation,
    peer: float,
) -> MinerView:
    confirm = rules.confirm_after_s
    ident = ms.identity
    fresh = ms.reachable and ms.age_s is not None and ms.age_s <= rules.stale_after_s
    confirm_command(ip, ms, mem, fresh=fresh, snap_ts=snap_ts, now=now, confirm_after_s=confirm, out=obs)
    cap = OnOff() if mem.limits_unsupported or mem.overdraws_limit else ident.capability
    stock = stock_w(cap, ident.nominal_w)
    commanded = mem.commanded_w
    if commanded is None and ms.reading is not None and ms.reading.power_limit_w:
        commanded = float(ms.reading.power_limit_w)
    # a command in flight, or acknowledged and not yet seen in telemetry, is taken as done (so the next plan does
    # not count the miner twice); a miner that ignores commands is taken as it is
    told_op = told.op if told is not None else (Op(mem.pending_op) if mem.pending_op else None)
    told_w = told.watts if told is not None else mem.pending_w
    if mem.ignores_commands:
        told_op = None
    if told_op is Op.SET_POWER and told_w is not None:
        commanded = float(told_w)
    running = MinerState.THROTTLED if commanded is not None and commanded < stock - 1 else MinerState.HASHING
    hint = ms.state_hint
    if hint == "sleeping" and not mem.asleep_by_us:
        # off, and not by us: believe it once it lasts (a firmware re-tuning after a new limit, or a restarting
        # miner, shows off for a moment); until then it counts as running, which is safe
        if mem.off_seen_at is None:  # (found off at start-up: nothing to wait for)
            first_look = mem.seen_on is None
            mem.off_seen_at = now - confirm if first_look else now
        if now - mem.off_seen_at < confirm:
            hint = "hashing"
    else:
        mem.off_seen_at = None
    if hint in ("sleeping", "waking") and now - mem.limited_at < confirm and not mem.asleep_by_us:
        # re-tuning to the limit it just accepted; not when we slept it since (a fast cut right after a raise:
        # taken for a miner that had just come on, it was "kept on" by min-on and sent a limit)
        hint = "hashing"
    if hint == "hashing" and powering_down(ms, mem, now, confirm):
        hint = "sleeping"
    if not fresh:
        state = MinerState.UNREACHABLE
    elif told_op is Op.SLEEP:
        state = MinerState.SLEEPING
    elif told_op is Op.WAKE:
        state = MinerState.WAKING
    elif hint == "sleeping" or (hint == "unknown" and mem.asleep_by_us):
        state = MinerState.SLEEPING
    elif hint == "waking" and not mem.asleep_by_us:
        state = MinerState.WAKING
    elif hint == "waking":
        state = MinerState.SLEEPING  # not hashing, still drawing: we slept it and it is powering down
    else:
        state = running
    if fresh:
        _track_transition(ip, mem, state, now, obs)
    if state in RUNNING:
        mem.woken_to_w = None  # up: it runs at its limit now, whatever it woke to
    up_at = commanded if commanded is not None else stock  # what it draws once up
    if fresh and mem.wake_sent_at is not None and not still_waking(mem, ms, up_at, now):
        mem.wake_sent_at = None  # up by its power: the status shows it as it is from now on
    woken_to = mem.woken_to_w
    if told is not None and told.op is Op.WAKE and told.watts is not None and wakes_at_limit(ident.family, cap):
        # a wake on the wire whose limit goes out first (and the wake only if the limit took, `Actuator`) comes up
        # at that limit, as the plan that sent it counted it; counted at full power until its result came back, the
        # next plan "made room" for it by sleeping or lowering running miners, and those lowered limits were still
        # ramping down when the wakes reached full power (crash-restart test: a restart's first plan woke 7 miners,
        # a tick 0.24 s later slept 2 and lowered 3 more, and the site reached 31.78 kW against its 30.5 kW cap)
        woken_to = float(told.watts)
    measured_w = counted_draw(
        ms,
        mem,
        told=told,
        state=state,
        commanded=commanded,
        stock=stock,
        up_at=up_at,
        woken_to=woken_to,
        fresh=fresh,
        snap_ts=snap_ts,
        confirm_after_s=confirm,
        steady_gap_s=rules.steady_gap_s,
        peer_excess_share=peer,
    )
    if mem.failed_op is not None and now < mem.failed_retry_at and told is None:
        # its last command failed and it is left alone until the back-off ends (`blocked`); that command may or
        # may not have taken, so the plan counts it as one it cannot reach: no action, at the larger of its full
        # power and its draw (not at what the plan would like it to do)
        state = MinerState.UNREACHABLE
    return MinerView(
        id=ip,
        family=ident.family,
        capability=cap,
        nominal_w=ident.nominal_w,
        nominal_ths=ident.nominal_ths,
        state=state,
        power_w=ms.power_w if fresh else None,
        commanded_w=commanded,
        asleep_by_us=mem.asleep_by_us,
        last_transition=mem.last_transition,
        circuit=rules.circuit_of.get(ip),
        priority=rules.priority_of.get(ip, 0),
        ignores_commands=mem.ignores_commands,
        measured_w=measured_w,
        woken_to_w=woken_to if state is MinerState.WAKING else None,
        wake_excess_w=excess_counted(mem, up_at, peer)
        if state is MinerState.SLEEPING and not mem.ignores_commands
        else 0.0,
    )


def peer_excess_shares(
    memory: Mapping[str, MinerMemory], family_of: Mapping[str, Family], now: float
) -> dict[Family, float]:
    """Per firmware family, the share above its setting its miners draw on this site: the median of their settled
    readings of the last PEER_EVIDENCE_S (0 with none; a reading while a miner still climbs counts as the floor it
    is). A miner that has not been read steady since it last came on is woken and counted above its setting by no
    less than that share until its own readings say (`closed_loop.excess_counted`): its draw is not known before it
    draws, and what its peers draw is the best evidence there is. The median: one faulty power supply says nothing of
    the others, a site-wide cause (supply voltage, a firmware's calibration) shows in most of them (soak 20261204,
    site 388: every miner drifting 30 %, three sleeping ones woken at their bare limits one after the other behind a
    circuit, which ran 0.77 kW over its cap while their corrections caught up). Recent readings only: running miners
    renew theirs every poll, and what sleepers showed before a change began (site 1422: readings of no drift taken
    three minutes before every miner drifted 30 %) would outvote the one miner running since (a drifter slept for
    its excess and another woken at its bare limit in its place, 3.08 kW against 2.84 kW)."""
    shares: dict[Family, list[float]] = {}
    for ip, family in family_of.items():
        mem = memory.get(ip)
        fresh = now - mem.excess_read_at <= PEER_EVIDENCE_S if mem is not None else False
        if mem is None or mem.ignores_commands or not fresh or mem.excess_setting_w <= 0:
            continue
        shares.setdefault(family, []).append(mem.excess_w / mem.excess_setting_w)
    return {family: statistics.median(values) for family, values in shares.items()}


def shown_state(ms: MinerSnapshot, mem: MinerMemory | None, now: float, stale_after_s: float) -> MinerState:
    """The state shown for a miner (status counts, the `miners` table, the metric): as the planner counts it, but
    a miner told to wake is `waking` until its power says it is up, and one off by itself shows off at once."""
    if not ms.reachable or ms.age_s is None or ms.age_s > stale_after_s:
        return MinerState.UNREACHABLE
    if mem is not None and mem.wake_sent_at is not None:
        # told to wake: `waking` until its power says it is up (a booting unit reports mining at a fraction of its
        # power: not yet "hashing", nor "throttled" at its limit)
        limit = mem.commanded_w or (ms.reading.power_limit_w if ms.reading is not None else None)
        setting = float(limit) if limit else stock_w(ms.identity.capability, ms.identity.nominal_w)
        if still_waking(mem, ms, setting, now):
            return MinerState.WAKING
    if ms.state_hint == "sleeping" or (ms.state_hint == "unknown" and mem is not None and mem.asleep_by_us):
        return MinerState.SLEEPING
    if ms.state_hint == "waking":
        return MinerState.WAKING
    commanded = mem.commanded_w if mem is not None else None
    if commanded is None and ms.reading is not None and ms.reading.power_limit_w:
        commanded = ms.reading.power_limit_w
    if commanded is not None and commanded < stock_w(ms.identity.capability, ms.identity.nominal_w) - 1:
        return MinerState.THROTTLED
    return MinerState.HASHING


def still_waking(mem: MinerMemory, ms: MinerSnapshot, setting_w: float, now: float) -> bool:
    """A miner told to wake (`mem.wake_sent_at`) that is not up yet: it draws under WAKE_UP_SHARE of its setting;
    where it reports no watts, it makes under that share of its hashrate at the setting (or, reporting neither,
    does not report mining yet). At most WAKE_MAX_S after the wake: a unit that never gets there is not waking for
    ever. (`observe` clears `wake_sent_at` by the same rule once the miner is up.)"""
    if mem.wake_sent_at is None or now - mem.wake_sent_at > WAKE_MAX_S:
        return False
    if ms.measured:
        return float(ms.power_w) < WAKE_UP_SHARE * setting_w
    ident, reading = ms.identity, ms.reading
    ths = None if reading is None else reading.hashrate_ths
    if ths is not None and ident.nominal_ths > 0 and ident.nominal_w > 0:
        return bool(float(ths) < WAKE_UP_SHARE * ident.nominal_ths * min(1.0, setting_w / ident.nominal_w))
    return bool(ms.state_hint != "hashing")


def powering_down(ms: MinerSnapshot, mem: MinerMemory, now: float, confirm_after_s: float) -> bool:
    """A miner we slept less than confirm_after_s ago (its sleep acknowledged: `changed_at`) whose fresh reading
    draws under the share that confirms a sleep (closed_loop.SLEEP_CONFIRM_SHARE) is powering down, whatever its
    mining flag says: firmware reports mining until its draw falls under its own threshold (a fifth of nominal, say),
    while the sleep is confirmed under a quarter. Counted running at its limit on that reading, the sleep its draw had
    just confirmed was undone in the accounting, and the next plan slept another running miner in its place (soak
    20261213: six Whatsminers slept for a cut four covered). Later than confirm_after_s after the sleep, a reading
    that says mining is a miner that came back on (a reboot, someone at its web page): counted running, as it is."""
    if not mem.asleep_by_us or now - mem.changed_at >= confirm_after_s:
        return False
    if not ms.measured or ms.age_s is None or ms.power_w is None:
        return False
    return float(ms.power_w) < SLEEP_CONFIRM_SHARE * max(1.0, ms.identity.nominal_w)


def _unidentified_views(snap: FleetSnapshot, rules: ObserveRules, obs: Observation) -> list[MinerView]:
    """Configured addresses no miner has answered at yet (booting, unplugged, refusing connections at start): the
    fleet retries them in the background; until one is identified it is held at a worst case (the fleet's
    `unknown_w`) on its circuit and the site, and an alarm names them. Zero would let the site run over its cap the
    moment they come back."""
    held = dict(snap.unidentified)
    if not held:
        obs.alarms.append(AlarmChange("unidentified", None))
        return []
    names = sorted(held, key=ip_sort_key)
    shown = ", ".join(names[:UNIDENTIFIED_NAMED]) + (
        f" and {len(names) - UNIDENTIFIED_NAMED} more" if len(names) > UNIDENTIFIED_NAMED else ""
    )
    obs.alarms.append(
        AlarmChange(
            "unidentified",
            f"{len(names)} configured addresses not identified yet, each counted at {max(held.values()):.0f} W "
            f"until it answers: {shown}",
        )
    )
    return [
        MinerView(
            id=ip,
            family=Family.OTHER,
            capability=OnOff(),
            nominal_w=w,
            nominal_ths=0.0,
            state=MinerState.UNREACHABLE,
            power_w=None,
            commanded_w=None,
            circuit=rules.circuit_of.get(ip),
            priority=rules.priority_of.get(ip, 0),
        )
        for ip, w in held.items()
    ]


def _track_transition(ip: str, mem: MinerMemory, state: MinerState, now: float, obs: Observation) -> None:
    """A miner seen switching on or off by itself (or by someone else) starts its min on/off time too."""
    on = state is not MinerState.SLEEPING
    was = mem.seen_on
    mem.seen_on = on
    if was is not None and was != on and mem.pending_op is None:
        mem.last_transition = now
        obs.changed.add(ip)


def ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in ip.split("."))
    except ValueError:
        return (1 << 16,)
