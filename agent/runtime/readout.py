"""The controller's read side: the STATUS DOC, the miners table, dispatch lists and the preview.

Functions over a Controller; they read its state and never change it (the preview plans on a copy of the
controller's memory), so transports may call them at any time from the event loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from hashflex.agent import __version__
from hashflex.agent.core import failsafe as fs
from hashflex.agent.core.efficiency import stock_w
from hashflex.agent.core.model import MinerState, MinerView, RunAction, SleepAction
from hashflex.agent.core.planner import plan
from hashflex.agent.core.ramp import wake_budget
from hashflex.agent.core.site_meter import miner_level
from hashflex.agent.core.timefmt import iso_ms as iso
from hashflex.agent.runtime.actuator import diff
from hashflex.agent.runtime.memory import DispatchRecord, MinerMemory
from hashflex.contract.status import BrokerDoc, DispatchDoc, StatusDoc

if TYPE_CHECKING:
    from hashflex.agent.runtime.controller import Controller


# a miner told to wake is `waking` until it draws this share of its setting (a booting unit reports mining at a
# fraction of its power long before it is up), for at most WAKE_MAX_S (clock seconds)
WAKE_UP_SHARE = 0.85
WAKE_MAX_S = 900.0

_SORT_KEYS = {
    "ip": "ip", "model": "model", "state": "state", "power": "power_w", "limit": "limit_w",
    "hashrate": "hashrate_ths", "efficiency": "efficiency_j_th", "temp": "temp_c", "last_seen": "age_s",
}  # fmt: skip


def build_status(ctl: Controller, snap: Any, now: float) -> StatusDoc:
    counts = {s.value: 0 for s in MinerState}
    hashrate = 0.0
    for ms in snap.miners.values():
        counts[state_of(ctl, ms).value] += 1
        if ms.reachable and ms.reading is not None:
            hashrate += ms.reading.hashrate_ths or 0.0
    # configured addresses not identified yet: unreachable miners as far as anyone can tell (and counted so)
    unidentified = len(getattr(snap, "unidentified", {}) or {})
    counts[MinerState.UNREACHABLE.value] += unidentified
    counts["unidentified"] = unidentified
    counts["total"] = len(snap.miners) + unidentified
    t, f = ctl.target, ctl.failsafe
    released_by, releases_at = (None, None) if f is None else fs.release(f, now, ctl.fs_rules)
    broker: BrokerDoc = ctl.broker_status() if ctl.broker_status else {"state": "disabled", "since": None}
    return {
        "ts": iso(now),
        "site_id": ctl.cfg.site.id,
        "version": __version__,
        "target_kw": None if t is None else round(t.kw, 3),
        "target_reason": None if t is None else t.reason,
        "target_source": None if t is None else t.source.value,
        "target_detail": None if t is None else t.detail,
        "planning_level_kw": planning_level_kw(ctl),
        "cap_kw": ctl.effective_cap_kw(),
        "licensed_cap_kw": ctl.licensed_cap_kw,
        "grid_cap_kw": ctl.grid_cap_kw,  # run-time caps by source (None = not set); the lowest cap binds
        "operator_cap_kw": ctl.operator_cap_kw,
        # power_kw_measured: what miners reported; power_kw_estimated (= power_kw): the site's power with an
        # estimate for every miner that did not report (unknown is never zero); power_kw_unmeasured: those estimates
        "power_kw": round(snap.power_w / 1000, 3),
        "power_kw_measured": round(snap.power_w_measured / 1000, 3),
        "power_kw_estimated": round(snap.power_w / 1000, 3),
        "power_kw_unmeasured": round(snap.power_w_estimated / 1000, 3),
        # never below what the site draws now, whatever the plan counts (a miner still spinning down, …)
        "power_kw_worst_case": None if ctl.plan is None else round(max(ctl.plan.worst_case_kw, snap.power_w / 1000), 3),
        "hashrate_ths": round(hashrate, 3),
        "miners": counts,
        "dispatches": [r.doc() for r in ctl.dispatches.values() if r.open],
        "failsafe": {
            "active": bool(f and f.active), "since": iso(f.since) if f else None,
            "reason": f.reason if f else None,
            "last_heartbeat": iso(f.last_heartbeat) if f and f.last_heartbeat else None,
            "applies": ctl.fs_rules.applies,
            # what releases an active fail-safe (failsafe.release: "grid_command", "next_heartbeat", "heartbeat"),
            # and when it releases by itself if the heartbeat holds (null: not before a heartbeat)
            "released_by": released_by,
            "releases_at": iso(releases_at),
            "release_after_s": ctl.fs_rules.release_after_s,
        },
        "broker": broker,
        "alarms": [{"key": k, "message": v} for k, v in sorted(ctl.alarms.items())],
        "gateway": ctl.gateway_health() if ctl.gateway_health else {},
        "tick": {"n": ctl.tick_n, "dur_ms": round(ctl.tick_ms, 2), "ts": iso(ctl.tick_at)},
        "sweep": {"ts": iso(snap.ts), "dur_s": round(snap.sweep_s, 3), "unreachable": snap.unreachable + unidentified},
        "plan": None if ctl.plan is None else {
            "method": ctl.plan.method, "expected_kw": round(ctl.plan.expected_kw, 3),
            "expected_ths": round(ctl.plan.expected_ths, 3),
            "baseline_ths": None if ctl.plan.baseline_ths is None else round(ctl.plan.baseline_ths, 3),
        },
        "in_flight": len(ctl.in_flight),
        # since when the plan in force has been carried out in full (nothing to send, on the wire, held back or
        # awaiting confirmation); null while the agent is still moving the fleet
        "settled_since": iso(ctl.settled_at),
        # the site meter (site.meter; null without one): what it reads, the non-miner load (meter − miners) and
        # what the plan counts for it, whether the agent has fallen back to the miners' sum plus the allowance
        "meter": None if ctl.meter is None else ctl.meter.doc(now),
        # where the site's kWh come from (agent/runtime/energy_meter.py): the last minute's source (metered, miners,
        # fallback), minutes by source, counter energy waiting to be carried into the next metered minute
        "energy": ctl._energy.doc(),
    }


def planning_level_kw(ctl: Controller) -> float | None:
    """The level the miners are planned to (with a site meter: the site level less the non-miner load counted)."""
    if ctl.meter is not None and ctl.plan_kw is not None:
        return round(ctl.plan_kw, 3)
    return None if ctl.level_kw is None else round(ctl.level_kw - ctl.bias_kw, 3)

def state_of(ctl: Controller, ms: Any) -> MinerState:
    stale = ctl.cfg.polling.stale_after_s
    if not ms.reachable or ms.age_s is None or ms.age_s > stale:
        return MinerState.UNREACHABLE
    mem = ctl.memory.get(ms.ip)
    if mem is not None and mem.wake_sent_at is not None:
        # told to wake: `waking` until its power says it is up (a booting unit reports mining at a fraction of its
        # power: not yet "hashing", nor "throttled" at its limit)
        limit = mem.commanded_w or (ms.reading.power_limit_w if ms.reading is not None else None)
        setting = float(limit) if limit else stock_w(ms.identity.capability, ms.identity.nominal_w)
        if still_waking(mem, ms, setting, ctl.clock.time()):
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


def still_waking(mem: MinerMemory, ms: Any, setting_w: float, now: float) -> bool:
    """A miner told to wake (`mem.wake_sent_at`) that is not up yet: it draws under WAKE_UP_SHARE of its setting;
    where it reports no watts, it makes under that share of its hashrate at the setting (or, reporting neither,
    does not report mining yet). At most WAKE_MAX_S after the wake: a unit that never gets there is not waking for
    ever. (The controller clears `wake_sent_at` by the same rule once the miner is up.)"""
    if mem.wake_sent_at is None or now - mem.wake_sent_at > WAKE_MAX_S:
        return False
    if ms.measured:
        return float(ms.power_w) < WAKE_UP_SHARE * setting_w
    ident, reading = ms.identity, ms.reading
    ths = None if reading is None else reading.hashrate_ths
    if ths is not None and ident.nominal_ths > 0 and ident.nominal_w > 0:
        return bool(float(ths) < WAKE_UP_SHARE * ident.nominal_ths * min(1.0, setting_w / ident.nominal_w))
    return bool(ms.state_hint != "hashing")


def miner_rows(ctl: Controller, state: str | None, sort: str, desc: bool, limit: int | None) -> list[dict[str, Any]]:
    snap = ctl.fleet.latest()
    rows: list[dict[str, Any]] = []
    for ip, ms in snap.miners.items():
        st = state_of(ctl, ms).value
        if state is not None and st != state:
            continue
        r, ident, mem = ms.reading, ms.identity, ctl.memory.get(ip)
        power = ms.power_w if st != "unreachable" else None
        ths = r.hashrate_ths if r is not None and st != "unreachable" else None
        rows.append({
            "ip": ip, "model": ident.model, "make": ident.make, "family": ident.family.value,
            "firmware": ident.firmware, "state": st, "power_w": power, "measured": ms.measured,
            "limit_w": (mem.commanded_w if mem and mem.commanded_w is not None
                        else (r.power_limit_w if r is not None else None)),
            "nominal_w": ident.nominal_w, "hashrate_ths": ths,
            "efficiency_j_th": round(power / ths, 2) if power and ths else None,
            "temp_c": max(r.temps_c) if r is not None and r.temps_c else None,
            "last_seen": iso(snap.ts - ms.age_s) if ms.age_s is not None else None,
            "age_s": None if ms.age_s is None else round(ms.age_s, 1),
            "asleep_by_us": bool(mem and mem.asleep_by_us), "ignores_commands": bool(mem and mem.ignores_commands),
            "circuit": ctl.circuit_of.get(ip), "priority": ctl.priority_of.get(ip, 0),
            "error": ms.last_error,
        })  # fmt: skip
    if state is None or state == MinerState.UNREACHABLE.value:
        for ip, held_w in (getattr(snap, "unidentified", {}) or {}).items():
            rows.append({
                "ip": ip, "model": None, "make": None, "family": None, "firmware": None, "state": "unreachable",
                "power_w": None, "measured": False, "limit_w": None, "nominal_w": held_w, "hashrate_ths": None,
                "efficiency_j_th": None, "temp_c": None, "last_seen": None, "age_s": None, "asleep_by_us": False,
                "ignores_commands": False, "circuit": ctl.circuit_of.get(ip), "priority": ctl.priority_of.get(ip, 0),
                "error": f"not identified yet; counted at {held_w:.0f} W until it answers",
            })  # fmt: skip
    key = _SORT_KEYS[sort]
    rows.sort(key=lambda row: (row[key] is None, row[key] if row[key] is not None else 0), reverse=desc)
    if desc:  # keep unknowns last either way
        rows.sort(key=lambda row: row[key] is None)
    return rows[:limit] if limit else rows

def preview(ctl: Controller, target_kw: float) -> dict[str, Any]:
    """What the planner would do for `target_kw` now, without doing it."""
    now = ctl.clock.time()
    snap = ctl.fleet.latest()
    views = views_readonly(ctl, snap, now)
    kw = min(target_kw, ctl.effective_cap_kw())
    budget = wake_budget(ctl.wake_times, now, ctl.stagger)
    miners_kw = kw
    if ctl.meter is not None and ctl.meter.last is not None:  # at the meter: the miners get the site level's share
        miners_kw = miner_level(kw, miners_now_kw=snap.power_w / 1000, non_miner_kw=ctl.meter.last.base_kw,
                                cooling_share=ctl.meter.cfg.cooling_share).miner_level_kw  # fmt: skip
    started = time.perf_counter()
    p = plan(miners_kw, views, ctl.tree, ctl.planner_rules, now, wake_budget=budget, ramp_allowance_kw=None)
    by_ip = {v.id: v for v in views}
    changes = diff(p.actions, by_ip, use_power_limits=ctl.cfg.control.use_power_limits)
    ops: dict[str, int] = {}
    for c in changes:
        ops[c.op.value] = ops.get(c.op.value, 0) + 1
    return {
        "target_kw": kw, "requested_kw": target_kw, "method": p.method,
        "worst_case_kw": round(p.worst_case_kw, 3), "expected_kw": round(p.expected_kw, 3),
        "expected_ths": round(p.expected_ths, 3),
        "baseline_ths": None if p.baseline_ths is None else round(p.baseline_ths, 3),
        "present_kw": round(snap.power_w / 1000, 3),
        "running": sum(1 for a in p.actions.values() if isinstance(a, RunAction)),
        "sleeping": sum(1 for a in p.actions.values() if isinstance(a, SleepAction)),
        "uncontrolled": len(p.uncontrolled), "changes": ops, "alarms": list(p.alarms),
        "circuits": {k: round(v, 3) for k, v in p.circuit_worst_case_kw.items()},
        "wake_budget": budget, "plan_ms": round((time.perf_counter() - started) * 1000, 2),
    }  # fmt: skip

def views_readonly(ctl: Controller, snap: Any, now: float) -> list[MinerView]:
    """Views without side effects on memory (for preview)."""
    saved_memory = {ip: MinerMemory(**{f: getattr(m, f) for f in MinerMemory.__slots__})
                    for ip, m in ctl.memory.items()}  # fmt: skip
    saved_seen, saved_dirty, saved_alarms = dict(ctl.seen_on), set(ctl._dirty_controls), dict(ctl.alarms)
    try:
        return ctl._views(snap, now)
    finally:
        ctl.memory, ctl.seen_on, ctl._dirty_controls, ctl.alarms = (
            saved_memory, saved_seen, saved_dirty, saved_alarms,
        )

def dispatch_docs(ctl: Controller, include_closed: bool) -> list[DispatchDoc]:
    if not include_closed:
        return [r.doc() for r in ctl.dispatches.values() if r.open]
    seen: dict[str, DispatchDoc] = {}
    for d, status, progress in ctl.store.load_dispatches(active_only=False):
        seen[d.id] = DispatchRecord.from_stored(d, status, dict(progress or {})).doc()
    for r in ctl.dispatches.values():
        seen[r.dispatch.id] = r.doc()
    return sorted(seen.values(), key=lambda doc: doc["received_at"] or "")
