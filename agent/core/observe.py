"""What every miner is doing now: the one function that decides a miner's state (`observe`).

From the fleet picture, the agent's memory of each miner and the commands on the wire: the planner's view of each
miner (MinerView: its state, what it is counted at), the state the status, the `miners` table and the
`hashflex_miners{state}` metric show, and the closed-loop decisions on earlier commands (confirmed, to re-send,
ignored). Pure: the memory is handed back as new objects, alarms and log lines as data; the controller applies
them (agent.runtime.controller), and a read-only caller (the preview, the flexibility offer) drops them.

Closed loop: a command acknowledged by a miner is confirmed from telemetry within confirm_after_s; if the miner
still draws well above what it was told, it is re-commanded (`recommands`), then (after MAX_RECOMMANDS) counted at
its real draw (`ignores_commands`) and retried now and then; one that keeps drawing above a power limit is still
slept and woken (`limits_unsupported`: on/off from then on, at what it draws). Once confirmed, a miner is still
watched: every plan counts it at no less than its settled measured draw (on its circuit and the site), and one
measured above its limit beyond the confirmation slack is re-commanded the same way. A miner whose command failed
is counted at its worst case, like an unreachable one, until its back-off ends. Configured addresses no miner
answered at are counted at a worst case until the fleet identifies them (an alarm names them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hashflex.agent.core.efficiency import stock_w
from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, MinerState, MinerView, Op, Plan, SleepAction
from hashflex.agent.core.snapshot import FleetSnapshot, MinerSnapshot
from hashflex.drivers.base import Family, OnOff

SETTLED_SHARE = 0.03  # two readings after a change within this share (or SETTLED_W) of each other: settled
SETTLED_W = 50.0
# a steady reading at least this share of its setting shows what a miner draws at it, its drift above it gone too
# (`_lowers_excess`); under it, it is still booting or re-tuning (LuxOS: a few % of its setting for seconds)
EXCESS_GONE_SHARE = 0.5
UNIDENTIFIED_NAMED = 20  # addresses named in the `unidentified` alarm (then a count)
MAX_RECOMMANDS = 2  # re-sends of an unconfirmed command before the miner is counted as ignoring commands
SLEEP_CONFIRM_SHARE = 0.25  # asleep: draws under this share of nominal
LIMIT_CONFIRM_SLACK = 1.08  # obeying a limit: draws at most this × the limit (+ LIMIT_CONFIRM_W)
LIMIT_CONFIRM_W = 100.0
# a miner told to wake is `waking` until it draws this share of its setting (a booting unit reports mining at a
# fraction of its power long before it is up), for at most WAKE_MAX_S (clock seconds)
WAKE_UP_SHARE = 0.85
WAKE_MAX_S = 900.0

RUNNING = (MinerState.HASHING, MinerState.THROTTLED)


@dataclass(frozen=True, slots=True)
class ObserveRules:
    stale_after_s: float  # a reading older than this is no reading (polling.stale_after_s)
    confirm_after_s: float  # a command shows in telemetry within this (control.confirm_after_s)
    circuit_of: Mapping[str, str] = field(default_factory=dict)
    priority_of: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AlarmChange:
    """Raise the alarm `key` with `message` (quiet: no log line of its own), or clear it (`message` None)."""

    key: str
    message: str | None
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class Note:
    """A log line the decision asks for (the core does not log)."""

    level: Literal["info", "warning"]
    event: str
    fields: Mapping[str, object]


@dataclass(slots=True)
class Observation:
    views: list[MinerView]  # the planner's view of every miner and every unidentified address
    shown: dict[str, MinerState]  # the state shown for each identified miner (status, `miners`, metrics)
    memory: dict[str, MinerMemory]  # every miner's memory after this observation (changed ones are new objects)
    changed: set[str]  # miners whose stored control figures changed (to persist)
    alarms: list[AlarmChange]
    notes: list[Note]

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
    obs = Observation(views=[], shown={}, memory=dict(memory), changed=set(), alarms=[], notes=[])
    for ip, ms in snap.miners.items():
        old = memory.get(ip)
        mem = MinerMemory() if old is None else old.copy()
        obs.memory[ip] = mem
        obs.views.append(_view(ip, ms, mem, told=in_flight.get(ip), snap_ts=snap.ts, now=now, rules=rules, obs=obs))
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
) -> MinerView:
    confirm = rules.confirm_after_s
    ident = ms.identity
    fresh = ms.reachable and ms.age_s is not None and ms.age_s <= rules.stale_after_s
    _confirm(ip, ms, mem, fresh=fresh, snap_ts=snap_ts, now=now, confirm_after_s=confirm, obs=obs)
    cap = OnOff() if mem.limits_unsupported else ident.capability
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
    measured_w = _counted_draw(ms, mem, told=told, state=state, commanded=commanded, stock=stock, up_at=up_at,
                               fresh=fresh, snap_ts=snap_ts, confirm_after_s=confirm)  # fmt: skip
    if mem.failed_op is not None and now < mem.failed_retry_at and told is None:
        # its last command failed and it is left alone until the back-off ends (`blocked`); that command may or
        # may not have taken, so the plan counts it as one it cannot reach: no action, at the larger of its full
        # power and its draw (not at what the plan would like it to do)
        state = MinerState.UNREACHABLE
    return MinerView(
        id=ip, family=ident.family, capability=cap, nominal_w=ident.nominal_w,
        nominal_ths=ident.nominal_ths, state=state, power_w=ms.power_w if fresh else None,
        commanded_w=commanded, asleep_by_us=mem.asleep_by_us, last_transition=mem.last_transition,
        circuit=rules.circuit_of.get(ip), priority=rules.priority_of.get(ip, 0),
        ignores_commands=mem.ignores_commands, measured_w=measured_w,
        woken_to_w=mem.woken_to_w if state is MinerState.WAKING else None,
    )  # fmt: skip


def _counted_draw(
    ms: MinerSnapshot,
    mem: MinerMemory,
    *,
    told: Change | None,
    state: MinerState,
    commanded: float | None,
    stock: float,
    up_at: float,
    fresh: bool,
    snap_ts: float,
    confirm_after_s: float,
) -> float | None:
    """What it reports drawing, once its present setting had time to take effect: counted at no less (a command
    on the wire, or acknowledged within confirm_after_s, is still settling; a sleep not yet seen is `_confirm`'s:
    re-sent, then the miner is counted at its real draw as ignoring commands)."""
    measured_w = None
    if (fresh and ms.measured and told is None and not mem.ignores_commands and ms.age_s is not None
            and (state in RUNNING or (state is MinerState.SLEEPING and mem.pending_op is None))
            and _settled(mem, snap_ts - ms.age_s, float(ms.power_w), confirm_after_s)):  # fmt: skip
        measured_w = float(ms.power_w)
        if state in RUNNING:
            setting = commanded if commanded is not None else stock
            if _lowers_excess(mem, snap_ts - ms.age_s, measured_w, setting):
                mem.excess_w, mem.excess_setting_w = max(0.0, measured_w - setting), setting
            else:  # coming up from a wake or a re-tune: what it drew above its setting is still counted
                measured_w = max(measured_w, setting + mem.excess_w)
    elif state in RUNNING and not mem.ignores_commands:
        # settling at a new setting: the excess it showed at the last one is still counted (not doing so let the
        # plan raise a drifting miner back over its circuit cap every time it moved its limit), and so is a larger
        # one it shows meanwhile above both settings (a drift that began meanwhile)
        setting = commanded if commanded is not None else stock
        if fresh and ms.measured and told is None:
            above = float(ms.power_w) - max(setting, mem.excess_setting_w)
            mem.excess_w = max(mem.excess_w, above)
        if mem.excess_w > 0:
            measured_w = setting + mem.excess_w
    elif state is MinerState.WAKING and mem.excess_w > 0 and not mem.ignores_commands:
        # the excess it showed when it last ran is kept while it sleeps (a drifting PSU drifts after a wake too)
        # and counted from its wake on, above what it comes up at: forgotten at each sleep, a drifting miner was
        # woken at its bare limit and counted so until its readings settled, and the site ran over its limit each
        # time a cut slept one drifter and the re-plan woke another (soak 20261208)
        measured_w = (mem.woken_to_w or up_at) + mem.excess_w
    return measured_w


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


def _settled(mem: MinerMemory, read_at: float, power_w: float, confirm_after_s: float) -> bool:
    """Has the miner's draw settled at its present setting, by this reading? Yes once confirm_after_s has passed
    since it acknowledged the change, or earlier once two readings after it agree (its ramp is over)."""
    if read_at >= mem.changed_at + confirm_after_s or mem.settled:
        return True
    if read_at <= mem.changed_at:
        return False  # taken before the change
    if mem.probe_at <= mem.changed_at:
        mem.probe_at, mem.probe_w = read_at, power_w  # the first reading since the change
        return False
    if read_at > mem.probe_at:
        if abs(power_w - mem.probe_w) <= max(SETTLED_W, SETTLED_SHARE * max(power_w, mem.probe_w)):
            mem.settled = True
            return True
        mem.probe_at, mem.probe_w = read_at, power_w
    return False


def _lowers_excess(mem: MinerMemory, read_at: float, power_w: float, setting_w: float) -> bool:
    """May this settled reading of a running miner lower the excess it showed above its setting? Only once it
    draws what it will: two readings in a row that agree, near its setting or above. A miner coming up from a wake
    or re-tuning to a new limit reads low for a minute while it ramps to its drifted draw: taken at its word, the
    plan forgot the drift, counted it at its bare limit (or raised it) and the site ran over."""
    prev_at, prev_w = mem.last_read
    if read_at > prev_at:
        mem.last_read = (read_at, power_w)
    if power_w - setting_w >= mem.excess_w:
        return True
    steady = read_at > prev_at and abs(power_w - prev_w) <= max(SETTLED_W, SETTLED_SHARE * max(power_w, prev_w))
    return steady and power_w >= EXCESS_GONE_SHARE * setting_w


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
    shown = ", ".join(names[:UNIDENTIFIED_NAMED]) + (f" and {len(names) - UNIDENTIFIED_NAMED} more"
                                                    if len(names) > UNIDENTIFIED_NAMED else "")  # fmt: skip
    obs.alarms.append(AlarmChange(
        "unidentified",
        f"{len(names)} configured addresses not identified yet, each counted at {max(held.values()):.0f} W "
        f"until it answers: {shown}",
    ))  # fmt: skip
    return [
        MinerView(
            id=ip, family=Family.OTHER, capability=OnOff(), nominal_w=w, nominal_ths=0.0,
            state=MinerState.UNREACHABLE, power_w=None, commanded_w=None, circuit=rules.circuit_of.get(ip),
            priority=rules.priority_of.get(ip, 0),
        )
        for ip, w in held.items()
    ]  # fmt: skip


def _track_transition(ip: str, mem: MinerMemory, state: MinerState, now: float, obs: Observation) -> None:
    """A miner seen switching on or off by itself (or by someone else) starts its min on/off time too."""
    on = state is not MinerState.SLEEPING
    was = mem.seen_on
    mem.seen_on = on
    if was is not None and was != on and mem.pending_op is None:
        mem.last_transition = now
        obs.changed.add(ip)


def _confirm(
    ip: str,
    ms: MinerSnapshot,
    mem: MinerMemory,
    *,
    fresh: bool,
    snap_ts: float,
    now: float,
    confirm_after_s: float,
    obs: Observation,
) -> None:
    """Closed loop per miner: did the last acknowledged command show in telemetry? And, once it did: does the
    miner still keep to it? (One measured above its limit beyond the slack is re-commanded, and after
    MAX_RECOMMANDS counted at its real draw as ignoring commands; until then the plan counts it at what it
    measures, see `_counted_draw`.)"""
    if not fresh or ms.age_s is None:
        return
    if mem.pending_op is None:
        _watch_setting(ip, ms, mem, snap_ts=snap_ts, now=now, confirm_after_s=confirm_after_s, obs=obs)
        return
    read_at = snap_ts - ms.age_s
    if read_at <= mem.pending_at:
        return  # no reading taken after the command yet
    nominal = max(1.0, ms.identity.nominal_w)
    power = ms.power_w
    if mem.pending_op == Op.SLEEP:
        complied = ms.state_hint == "sleeping" or power < SLEEP_CONFIRM_SHARE * nominal
    elif mem.pending_op == Op.WAKE:
        complied = ms.state_hint in ("hashing", "waking") or power >= SLEEP_CONFIRM_SHARE * nominal
    else:
        limit = mem.pending_w or nominal
        complied = not ms.measured or power <= limit * LIMIT_CONFIRM_SLACK + LIMIT_CONFIRM_W
    if complied:
        if mem.ignores_commands:
            obs.notes.append(Note("info", "miner obeys again", {"ip": ip, "op": mem.pending_op}))
            obs.alarms.append(AlarmChange(f"ignores:{ip}", None))
        mem.pending_op, mem.pending_w, mem.recommands, mem.ignores_commands = None, None, 0, False
        mem.resend_due = False
        obs.changed.add(ip)
        return
    if now - mem.pending_at < confirm_after_s:
        return
    if mem.ignores_commands:
        return  # re-sent now and then by `recommands`
    if mem.recommands >= MAX_RECOMMANDS and mem.pending_op == Op.SET_POWER.value:
        # it takes commands and keeps drawing above its limit (a drifting PSU, firmware re-tuning up): a miner that
        # ignores its limit, not one that ignores a sleep. Controlled by sleep and wake from now on, at what it
        # draws (its excess over stock is counted); marked uncontrollable it was never slept, not even by a
        # fail-safe to 0 kW (soak: 4 drifting LuxOS miners held a site at 9.8 kW)
        msg = (f"{ip} acknowledged a {mem.pending_w or 0:.0f} W limit {MAX_RECOMMANDS + 1} times and draws "
               f"{power:.0f} W: controlled by sleep and wake only, counted at what it draws")  # fmt: skip
        mem.limits_unsupported = True
        mem.pending_op, mem.pending_w, mem.recommands, mem.resend_due = None, None, 0, False
        obs.changed.add(ip)
        obs.notes.append(Note("warning", "miner ignores its power limit", {"ip": ip, "power_w": round(power)}))
        obs.alarms.append(AlarmChange(f"ignores_limits:{ip}", msg, quiet=True))
        return
    if mem.recommands >= MAX_RECOMMANDS:
        mem.ignores_commands = True
        mem.retry_at = now + 10 * confirm_after_s
        obs.changed.add(ip)
        msg = f"{ip} acknowledged {mem.pending_op} {mem.recommands + 1} times and draws {power:.0f} W"
        obs.notes.append(Note("warning", "miner ignores commands", {
            "ip": ip, "op": mem.pending_op, "power_w": round(power), "told_w": mem.pending_w}))  # fmt: skip
        obs.alarms.append(AlarmChange(f"ignores:{ip}", msg, quiet=True))
        return
    mem.resend_due = True


def _watch_setting(
    ip: str, ms: MinerSnapshot, mem: MinerMemory, *, snap_ts: float, now: float, confirm_after_s: float,
    obs: Observation,
) -> None:  # fmt: skip
    """A confirmed limit is not the end of it: firmware drifts above its setting (PSU ageing, LuxOS ATM stepping its
    profile up). Measured above its limit beyond the confirmation slack, once its setting had time to take effect:
    send the limit again (the re-send and ignoring rules of `_confirm` take it from there)."""
    limit = mem.commanded_w
    if limit is None or mem.asleep_by_us or mem.limits_unsupported or not ms.measured or ms.age_s is None:
        return
    if ms.state_hint in ("sleeping", "waking") or snap_ts - ms.age_s < mem.changed_at + confirm_after_s:
        return
    if ms.power_w <= limit * LIMIT_CONFIRM_SLACK + LIMIT_CONFIRM_W:
        return
    mem.pending_op, mem.pending_w = Op.SET_POWER.value, int(limit)
    mem.pending_at = now - confirm_after_s  # due for a re-send on this tick (see recommands)
    mem.recommands, mem.resend_due = 0, True
    obs.changed.add(ip)
    obs.notes.append(Note("warning", "miner draws above its limit",
                          {"ip": ip, "power_w": round(ms.power_w), "limit_w": round(limit)}))  # fmt: skip


# ---------------------------------------------------------------------------------------------- re-commands
def recommands(
    memory: Mapping[str, MinerMemory],
    planned: Plan,
    in_flight: Mapping[str, Change],
    *,
    skip: set[str],
    now: float,
    confirm_after_s: float,
) -> tuple[list[Change], dict[str, MinerMemory]]:
    """Re-send acknowledged commands telemetry has not confirmed in time, where the plan still wants them (`skip`:
    miners the diff already sends something else). Miners counted as ignoring commands are tried again now and
    then. Returns the changes and the memories they change (new objects)."""
    out: list[Change] = []
    updated: dict[str, MinerMemory] = {}
    for ip, old in memory.items():
        pending = old.pending_op
        if pending is None or ip in in_flight or ip in skip or now - old.pending_at < confirm_after_s:
            continue
        if now < old.failed_retry_at:
            continue  # its last command failed: backing off
        if (now < old.retry_at) if old.ignores_commands else not old.resend_due:
            continue
        mem = updated[ip] = old.copy()
        if mem.ignores_commands:
            mem.retry_at = now + 10 * confirm_after_s
        else:
            mem.resend_due = False
            mem.recommands += 1
        op = Op(pending)
        wanted = planned.actions.get(ip)
        if wanted is not None and isinstance(wanted, SleepAction) != (op is Op.SLEEP):
            continue  # the plan moved on; the diff sends what it wants
        if op is Op.SET_POWER and mem.pending_w is None:
            continue
        out.append(Change(ip, op, mem.pending_w if op is not Op.SLEEP else None, decrease=op is Op.SLEEP))
    return out, updated


def blocked(memory: Mapping[str, MinerMemory], in_flight: Mapping[str, Change], now: float) -> dict[str, Op]:
    """Miners the diff leaves alone: a command is on the wire, or one failed and its back-off is not over (the views
    count such a miner at its worst case). (An acknowledged command awaiting confirmation needs no block: the views
    already take it as done, so the diff only sends what the plan changes.)"""
    out = {ip: Op(m.failed_op) for ip, m in memory.items() if m.failed_op and now < m.failed_retry_at}
    out.update({ip: c.op for ip, c in in_flight.items()})
    return out


def just_lowered(memory: Mapping[str, MinerMemory], now: float, window_s: float) -> set[str]:
    """Miners whose limit went down less than `window_s` (confirm_after_s) ago: a raise waits until then. Re-plans
    on readings that lag the limits they just sent traded one miner's limit against another's every tick for good
    (a LuxOS preset up, a Whatsminer down; then back), and a site that never settles serves nobody; a raise held is
    the safe side (the plan counts the miner at the raised limit)."""
    return {ip for ip, m in memory.items() if now - m.lowered_at < window_s}


def ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in ip.split("."))
    except ValueError:
        return (1 << 16,)
