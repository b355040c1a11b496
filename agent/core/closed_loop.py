"""The closed loop per miner: did an acknowledged command show in telemetry (confirm, re-send, or count the miner
as ignoring it), does a confirmed limit still hold, and at what does a miner count once its setting has settled.
Pure decisions on the agent's memory of one miner (changed in place: agent.core.observe hands in a copy), with the
alarms, log lines and persisted figures they ask for (`Decisions`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from hashflex.agent.core.miner_memory import MinerMemory
from hashflex.agent.core.model import Change, MinerState, Op
from hashflex.agent.core.snapshot import MinerSnapshot

SETTLED_SHARE = 0.03  # two readings after a change within this share (or SETTLED_W) of each other: settled
SETTLED_W = 50.0
# a steady reading at least this share of its setting shows what a miner draws at it, its drift above it gone too
# (`take_excess_reading`); under it, it is still booting or re-tuning (LuxOS: a few % of its setting for seconds)
EXCESS_GONE_SHARE = 0.5
MAX_RECOMMANDS = 2  # re-sends of an unconfirmed command before the miner is counted as ignoring commands
# a miner counted as ignoring commands is tried again every this many confirm_after_s: what made it ignore one (an
# operator at its web page, a session another client held, a fault) passes, and a site held over its limit by that
# one miner (every other asleep) stayed so for up to ten of them (soak 20261204, site seed 2: 3.58 kW against a
# 0 kW cap for 170 s after the miner's fault had cleared)
IGNORING_RETRY_CONFIRMS = 3
SLEEP_CONFIRM_SHARE = 0.25  # asleep: draws under this share of nominal
LIMIT_CONFIRM_SLACK = 1.08  # obeying a limit: draws at most this × the limit (+ LIMIT_CONFIRM_W)
LIMIT_CONFIRM_W = 100.0

RUNNING = (MinerState.HASHING, MinerState.THROTTLED)


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
class Decisions:
    """What the decisions ask the controller to do: persist these miners' figures, raise or clear alarms, log."""

    changed: set[str] = field(default_factory=set)  # miners whose stored control figures changed (to persist)
    alarms: list[AlarmChange] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)


def counted_draw(
    ms: MinerSnapshot,
    mem: MinerMemory,
    *,
    told: Change | None,
    state: MinerState,
    commanded: float | None,
    stock: float,
    up_at: float,
    woken_to: float | None,
    fresh: bool,
    snap_ts: float,
    confirm_after_s: float,
    steady_gap_s: float,
    peer_excess_share: float = 0.0,
) -> float | None:
    """What it reports drawing, once its present setting had time to take effect: counted at no less (a command
    on the wire, or acknowledged within confirm_after_s, is still settling; a sleep not yet seen is `confirm_command`'s:
    re-sent, then the miner is counted at its real draw as ignoring commands).

    A miner coming up (waking, or running and not yet read settled since it came on) is counted above its setting
    by no less than its peers' share (`peer_excess_share`, observe.peer_excess_shares): what it will draw is not
    known before it draws it."""
    measured_w = None
    if (
        fresh
        and ms.measured
        and told is None
        and not mem.ignores_commands
        and ms.age_s is not None
        and (state in RUNNING or (state is MinerState.SLEEPING and mem.pending_op is None))
        and settled(mem, snap_ts - ms.age_s, float(ms.power_w), confirm_after_s, steady_gap_s)
    ):
        measured_w = float(ms.power_w)
        if state in RUNNING:
            setting = commanded if commanded is not None else stock
            take_excess_reading(mem, snap_ts - ms.age_s, measured_w, setting, steady_gap_s)
            # coming up from a wake or a re-tune: what it drew above its setting is still counted
            measured_w = max(measured_w, setting + excess_counted(mem, setting, peer_excess_share))
    elif state in RUNNING and not mem.ignores_commands:
        # settling at a new setting: the excess it showed at the last one is still counted (not doing so let the
        # plan raise a drifting miner back over its circuit cap every time it moved its limit), and so is a larger
        # one it shows meanwhile above both settings (a drift that began meanwhile). With no settled reading yet
        # (found running at start-up), the setting before is unknown, and a miner may still come down from its
        # stock power to the limit it reports: a draw above that limit is not yet a drift (soak 20261204, site 133:
        # a Whatsminer read at 3.44 kW on its way down to 2.08 kW, slept, was counted 1.36 kW over every level it
        # could be woken to, and never woken under a PDU it fitted for the rest of the run)
        # "Both settings": the new one and the one it is leaving, the higher of the setting of its last excess
        # reading (stock, with none) and the one it acknowledged the new one over (`left_w`). Judged against the
        # first alone, an older and lower one, a LuxOS S21 raised to 2,805 W and lowered to 1,942 W before it got
        # there was read at 2,267 W on its way down and counted 325 W over: the site counted over its cap, a cut,
        # the next plan raised it again, and the site churned at 84 % of its cap (soak of 2026-12-04 night, site 12)
        setting = commanded if commanded is not None else stock
        if fresh and ms.measured and told is None:
            before = max(mem.left_w or 0.0, mem.excess_setting_w or stock)
            above = float(ms.power_w) - max(setting, before)
            mem.excess_w = max(mem.excess_w, above)
        extra = excess_counted(mem, setting, peer_excess_share)
        if extra > 0:
            measured_w = setting + extra
    elif state is MinerState.WAKING and not mem.ignores_commands:
        # the excess it showed when it last ran is kept while it sleeps (a drifting PSU drifts after a wake too)
        # and counted from its wake on, above what it comes up at: forgotten at each sleep, a drifting miner was
        # woken at its bare limit and counted so until its readings settled, and the site ran over its limit each
        # time a cut slept one drifter and the re-plan woke another (soak 20261208)
        base = woken_to or up_at
        extra = excess_counted(mem, base, peer_excess_share)
        if extra > 0:
            measured_w = base + extra
    return measured_w


def excess_counted(mem: MinerMemory, setting_w: float, peer_excess_share: float = 0.0) -> float:
    """The excess counted above a setting: its own (no less than its share of a higher setting than the one it was
    read at: a power supply drawing 30 % over at 1.2 kW draws 30 % over at 2.4 kW; soak 20261204, site 146: a
    drifter read at a low limit, woken at twice it and counted at the excess in watts, drew 0.35 kW more than
    counted), and, until a settled reading since it last came on showed its own, no less than its peers' share."""
    own = mem.excess_w
    if own > 0 and mem.excess_setting_w > 0:
        own = max(own, own / mem.excess_setting_w * setting_w)
    if has_own_excess(mem):
        return own
    return max(own, peer_excess_share * setting_w)


def has_own_excess(mem: MinerMemory) -> bool:
    """Has a settled reading since it last switched on shown what it draws above its setting?"""
    return mem.excess_at >= mem.last_transition


def settled(mem: MinerMemory, read_at: float, power_w: float, confirm_after_s: float, steady_gap_s: float) -> bool:
    """Has the miner's draw settled at its present setting, by this reading? Yes once confirm_after_s has passed
    since it acknowledged the change, or earlier once two readings after it, `steady_gap_s` apart (about a poll
    interval), agree (its ramp is over). Closer readings prove nothing: the early sweep after a batch comes a
    fraction of a second after the one before, and a draw ramping down by tens of W/s reads the same twice (soak
    20261210: five LuxOS miners lowered by 208 W each were counted 150-220 W above their new profile from readings
    0.25 s apart, and the plan slept four running miners to make room for that phantom excess)."""
    if read_at >= mem.changed_at + confirm_after_s or mem.settled:
        return True
    if read_at <= mem.changed_at:
        return False  # taken before the change
    if mem.probe_at <= mem.changed_at:
        mem.probe_at, mem.probe_w = read_at, power_w  # the first reading since the change
        return False
    if read_at >= mem.probe_at + steady_gap_s:
        if abs(power_w - mem.probe_w) <= max(SETTLED_W, SETTLED_SHARE * max(power_w, mem.probe_w)):
            mem.settled = True
            return True
        mem.probe_at, mem.probe_w = read_at, power_w
    return False


def _spread_w(setting_w: float) -> float:
    """What a unit may draw above its setting without drifting (its power factor, a reading's noise)."""
    return max(SETTLED_W, SETTLED_SHARE * setting_w)


def take_excess_reading(
    mem: MinerMemory, read_at: float, power_w: float, setting_w: float, steady_gap_s: float
) -> bool:
    """A settled reading of a running miner: does it set the excess it shows above its setting? A higher excess at
    once; a lower one only once the miner draws what it will: two readings in a row that agree, near its setting or
    above. A miner coming up from a wake or re-tuning to a new limit reads low for a minute while it ramps to its
    drifted draw: taken at its word, the plan forgot the drift, counted it at its bare limit (or raised it) and the
    site ran over. Only a steady reading makes the excess the miner's own (`excess_at`, `has_own_excess`): one read
    while it still climbs is a floor, not yet what it draws (soak 20261204, site 146: a drifter slept half-way up its
    ramp was woken later counted at half its drift)."""
    prev_at, prev_w = mem.last_read
    apart = read_at >= prev_at + steady_gap_s  # (closer readings prove no ramp is over: `settled`)
    if apart:
        mem.last_read = (read_at, power_w)
    steady = apart and abs(power_w - prev_w) <= max(SETTLED_W, SETTLED_SHARE * max(power_w, prev_w))
    seen = power_w - setting_w
    if apart and not steady and prev_at > max(mem.last_transition, mem.changed_at) and seen > _spread_w(setting_w):
        # climbing past its setting: until the next reading shows where it got to, it may climb as much again above
        # it. Counted at the reading, a floor, a lone LuxOS S19 XP drifting 30 % was read at 1,908 W on its way up
        # from a re-tune to 1,695 W and drew 2.08 kW ten seconds later; the PDU the plan had filled around it ran
        # 0.23 kW over its cap (soak 20261204, site 4930: no peer of its family to show the share). Only the rise
        # above the setting, since a reading at the same setting: the climb to a raised limit is no drift
        seen += max(0.0, power_w - max(prev_w, setting_w))
    if seen < mem.excess_w and not (steady and power_w >= EXCESS_GONE_SHARE * setting_w):
        return False
    mem.excess_w, mem.excess_setting_w = max(0.0, seen), setting_w
    mem.excess_read_at = read_at
    if steady:
        mem.excess_at = read_at
    return True


def confirm_command(
    ip: str,
    ms: MinerSnapshot,
    mem: MinerMemory,
    *,
    fresh: bool,
    snap_ts: float,
    now: float,
    confirm_after_s: float,
    out: Decisions,
) -> None:
    """Closed loop per miner: did the last acknowledged command show in telemetry? And, once it did: does the
    miner still keep to it? (One measured above its limit beyond the slack is re-commanded, and after
    MAX_RECOMMANDS counted at its real draw as ignoring commands; until then the plan counts it at what it
    measures, see `counted_draw`.)"""
    if not fresh or ms.age_s is None:
        return
    if mem.pending_op is None:
        _watch_setting(ip, ms, mem, snap_ts=snap_ts, now=now, confirm_after_s=confirm_after_s, out=out)
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
            out.notes.append(Note("info", "miner obeys again", {"ip": ip, "op": mem.pending_op}))
            out.alarms.append(AlarmChange(f"ignores:{ip}", None))
        mem.pending_op, mem.pending_w, mem.recommands, mem.ignores_commands = None, None, 0, False
        mem.resend_due = False
        out.changed.add(ip)
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
        msg = (
            f"{ip} acknowledged a {mem.pending_w or 0:.0f} W limit {MAX_RECOMMANDS + 1} times and draws "
            f"{power:.0f} W: controlled by sleep and wake only, counted at what it draws"
        )
        mem.overdraws_limit = True
        mem.pending_op, mem.pending_w, mem.recommands, mem.resend_due = None, None, 0, False
        out.changed.add(ip)
        out.notes.append(Note("warning", "miner ignores its power limit", {"ip": ip, "power_w": round(power)}))
        out.alarms.append(AlarmChange(f"ignores_limits:{ip}", msg, quiet=True))
        return
    if mem.recommands >= MAX_RECOMMANDS:
        mem.ignores_commands = True
        mem.retry_at = now + IGNORING_RETRY_CONFIRMS * confirm_after_s
        out.changed.add(ip)
        msg = f"{ip} acknowledged {mem.pending_op} {mem.recommands + 1} times and draws {power:.0f} W"
        out.notes.append(
            Note(
                "warning",
                "miner ignores commands",
                {"ip": ip, "op": mem.pending_op, "power_w": round(power), "told_w": mem.pending_w},
            )
        )
        out.alarms.append(AlarmChange(f"ignores:{ip}", msg, quiet=True))
        return
    mem.resend_due = True


def _watch_setting(
    ip: str,
    ms: MinerSnapshot,
    mem: MinerMemory,
    *,
    snap_ts: float,
    now: float,
    confirm_after_s: float,
    out: Decisions,
) -> None:
    """A confirmed limit is not the end of it: firmware drifts above its setting (PSU ageing, LuxOS ATM stepping its
    profile up). Measured above its limit beyond the confirmation slack, once its setting had time to take effect:
    send the limit again (the re-send and ignoring rules of `confirm_command` take it from there).

    A miner on/off for drawing above its limits (`overdraws_limit`) is not re-sent its limit; read steady at it
    again (within a unit's spread), it is limited again: a drift clears (a PSU replaced, a fault that passed, a
    profile re-tuned), and kept on/off for good it was counted at its stock power on every plan. A LuxOS S19k Pro
    that drifted for 5 s stayed on/off at a 1,554 W profile for as long as the site ran, and every plan that kept it
    on counted it at its 2,760 W stock (or slept it), the room under the cap left unused: soak 20261204, site 246,
    8.09 kW of 9.53 kW."""
    limit = mem.commanded_w
    if limit is None or mem.asleep_by_us or mem.limits_unsupported or not ms.measured or ms.age_s is None:
        return
    if ms.state_hint in ("sleeping", "waking") or snap_ts - ms.age_s < mem.changed_at + confirm_after_s:
        return
    if ms.power_w <= limit * LIMIT_CONFIRM_SLACK + LIMIT_CONFIRM_W:
        # cleared on a steady reading since it last came on that shows it within a unit's spread of its limit: a
        # miner still booting after a wake reads far under its limit and proves nothing
        if mem.overdraws_limit and has_own_excess(mem) and mem.excess_w <= _spread_w(limit):
            mem.overdraws_limit = False
            out.changed.add(ip)
            out.notes.append(
                Note("info", "miner keeps its power limit again", {"ip": ip, "power_w": round(ms.power_w)})
            )
            out.alarms.append(AlarmChange(f"ignores_limits:{ip}", None))
        return
    if mem.overdraws_limit:
        return  # counted at what it draws, controlled by sleep and wake
    mem.pending_op, mem.pending_w = Op.SET_POWER.value, int(limit)
    mem.pending_at = now - confirm_after_s  # due for a re-send on this tick (see recommands)
    mem.recommands, mem.resend_due = 0, True
    out.changed.add(ip)
    out.notes.append(
        Note(
            "warning", "miner draws above its limit", {"ip": ip, "power_w": round(ms.power_w), "limit_w": round(limit)}
        )
    )
