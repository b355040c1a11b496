"""`hashflex status` and `hashflex watch`: the site at a glance, once or live.

Shows site power against target and cap, which input sets the target and why, miners by state, dispatches
in force, the fail-safe, the broker link, the gateway's health and alarms; with a site meter, an under-frequency
event while one holds, and the facility loads (cooling per circuit) when configured. Reads the agent's STATUS DOC
(verb `status`) over the control socket, so it works with the network and the broker down.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, cast

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hashflex.agent.cli import render as r
from hashflex.agent.cli.agentclient import call, socket_path
from hashflex.agent.cli.common import (
    DEFAULT_CONFIG,
    EXIT_UNAVAILABLE,
    ConfigOpt,
    JsonOpt,
    config_or_exit,
    emit_json,
    err,
    fail,
)
from hashflex.agent.core.units import format_kw
from hashflex.agent.io.control_socket import AgentUnavailable, request_sync
from hashflex.contract.status import BrokerDoc, EnergyDoc, FailsafeDoc, GatewayDoc, MinerCounts, StatusDoc
from hashflex.contract.vocabulary import MinerState, Source

STATE_STYLE = {
    MinerState.HASHING: "green",
    MinerState.THROTTLED: "yellow",
    MinerState.SLEEPING: "blue",
    MinerState.WAKING: "cyan",
    MinerState.UNREACHABLE: "red",
}
ACTIVE_STATUSES = (None, "active", "accepted", "pending", "scheduled")


def explain_target(doc: StatusDoc) -> str:
    """Why the target is what it is, in words (the lowest of all limits wins)."""
    source = str(doc.get("target_source") or "")
    reason = str(doc.get("target_reason") or "")
    binding = reason.split(":", 1)[1] if ":" in reason else None
    failsafe = doc.get("failsafe") or {}
    match source:
        case Source.CAP:
            return "the site cap binds (no dispatch, override or window asks for less)"
        case Source.GRID:
            return f"grid dispatch {binding or '?'} binds"
        case Source.OPERATOR:
            return f"operator override {binding or '?'} binds (`hashflex resume` ends it)"
        case Source.SCHEDULE:
            return f"time-of-use window {binding or '?'} binds"
        case Source.FREQUENCY:
            return "under-frequency response holds the site (see the frequency row)"
        case Source.FAILSAFE:
            why = failsafe.get("reason") or "grid link lost"
            return (
                f"FAIL-SAFE holds it: {why} (last heartbeat {r.ago(failsafe.get('last_heartbeat'))}); "
                f"{failsafe_release(failsafe)}"
            )
    return reason or r.DASH


def _power_line(doc: StatusDoc) -> Text:
    power = r.num(doc.get("power_kw_estimated"))
    if power is None:
        power = r.num(doc.get("power_kw_measured"))
    target = r.num(doc.get("target_kw"))
    line = Text(format_kw(power), style="bold")
    line.append(
        f"  (measured {r.kw(doc.get('power_kw_measured'))} · worst case {r.kw(doc.get('power_kw_worst_case'))})"
    )
    if power is not None and target is not None:
        gap = target - power
        if gap < 0:
            line.append(f"  {format_kw(-gap)} OVER TARGET", style="bold red")
        else:
            line.append(f"  {format_kw(gap)} under target", style="green")
    return line


def _miners_line(miners: MinerCounts) -> Text:
    line = Text()
    for i, state in enumerate(MinerState):
        if i:
            line.append(" · ")
        n = r.num(miners.get(state.value)) or 0
        line.append(f"{r.count(n)} {state.value}", style=STATE_STYLE[state] if n else "dim")
    line.append(f"  ({r.count(miners.get('total'))} total)")
    return line


def failsafe_release(fs: FailsafeDoc) -> str:
    """What releases an active fail-safe and when, in a sentence (the status doc's released_by / releases_at)."""
    match fs.get("released_by"):
        case "grid_command":
            at = fs.get("releases_at")
            when = f" or by itself at {r.clock(at)} ({r.ago(at)}) if the heartbeat holds" if at else ""
            return f"released by a grid command{when}"
        case "next_heartbeat":
            return "released by the next grid heartbeat (a grid command has come)"
        case "heartbeat":
            after = r.num(fs.get("release_after_s"))
            then = f", or {r.duration(after)} of heartbeats" if after is not None else ""
            return f"released once the grid is heard: a heartbeat, then a grid command{then}"
    return "released when the grid link is back"


def _meter_line(m: Mapping[str, Any]) -> Text:
    """The site meter: what it reads and the non-miner load, or that the agent has fallen back."""
    if not m.get("fresh"):
        faults = ", ".join(str(f) for f in m.get("faults") or []) or "no good reading"
        return Text(
            f"STALE since {r.clock(m.get('stale_since'))} ({faults}): counting miners + {r.kw(m.get('allowance_kw'))}"
            f" = {r.kw(m.get('site_kw'))}, increases held",
            style="bold red",
        )
    hz, age = r.num(m.get("hz")), r.num(m.get("age_s"))
    parts = [f"non-miner {r.kw(m.get('non_miner_kw'))}, counted {r.kw(m.get('non_miner_counted_kw'))}"]
    if hz is not None:
        parts.append(f"{hz:.3f} Hz")
    if age is not None:
        parts.append(f"read {r.duration(age)} ago")
    line = Text(r.kw(m.get("power_kw")), style="bold")
    line.append(f"  ({' · '.join(parts)})")
    return line


def _frequency_line(fr: Mapping[str, Any], now: float | None = None) -> Text:
    """An under-frequency event while one holds: the stage, the kW held, the lowest Hz, since when, what ends it."""
    stage = r.num(fr.get("stage"))
    line = Text(f"EVENT stage {int(stage) + 1 if stage is not None else '?'}", style="bold red")
    lowest = r.num(fr.get("min_hz"))
    if lowest is None:
        lowest = r.num(fr.get("lowest_hz"))
    waiting = f", {r.count(fr.get('awaiting_ack'))} awaiting ack" if r.num(fr.get("awaiting_ack")) else ""
    line.append(
        f": held at {r.kw(fr.get('held_kw'))} ({r.kw(fr.get('shed_kw'))} shed, {r.count(fr.get('slept'))} "
        f"asleep{waiting})",
        style="bold red",
    )
    line.append(f" · lowest {lowest:.3f} Hz" if lowest is not None else "")
    line.append(f" · below since {r.clock(fr.get('first_below_at'))} ({r.ago(fr.get('first_below_at'), now)})")
    if fr.get("shed_reached_at"):
        line.append(f" · shed reached {r.clock(fr.get('shed_reached_at'))}")
    above, after = r.num(fr.get("restore_above_hz")), r.num(fr.get("restore_after_s"))
    need = f"{after:g} s above {above:g} Hz" if above is not None and after is not None else "the frequency back"
    since = r.epoch(fr.get("restoring_since"))
    if since is None:
        line.append(f" · restores after {need}")
    else:
        left = (after or 0.0) - ((now if now is not None else time.time()) - since)
        line.append(
            f" · restores after {need}: above since {r.clock(since)}, "
            + (f"{r.duration(left)} to go" if left > 0 else "due now")
        )
    return line


def _facility_text(loads: list[Mapping[str, Any]]) -> Text:
    """One line per circuit: the device's setpoint (and what it acknowledged), the miners on it, and its wakes."""
    out = Text()
    for i, ld in enumerate(loads):
        if i:
            out.append("\n")
        out.append(f"{ld.get('circuit', '?')}", style="bold")
        out.append(f" {ld.get('kind', '')} {ld.get('device', '')}".rstrip())
        ack = ld.get("acknowledged_pct")
        out.append(
            f" · setpoint {r.pct(ld.get('setpoint_pct'))}"
            + (f" (ack {r.pct(ack)})" if ack != ld.get("setpoint_pct") else "")
        )
        out.append(f" · miners {r.count(ld.get('miners_on'))}/{r.count(ld.get('miners'))} on · wakes ")
        wakes = str(ld.get("wakes") or "allowed")
        style = "bold red" if wakes.startswith("blocked") else "yellow" if wakes.startswith("held") else "green"
        out.append(wakes, style=style)
    return out


def _energy_line(e: EnergyDoc) -> Text:
    """Where the site's kWh come from (with a site meter): its counter, or the miners' sum while it is stale."""
    counts = e.get("by_source") or {}
    tally = ", ".join(f"{r.count(n)} {name}" for name, n in sorted(counts.items()))
    source = e.get("source")
    if source == "fallback":
        line = Text("FALLBACK: the miners' sum (no meter counter)", style="bold yellow")
    elif source == "metered":
        line = Text("metered: the meter's import counter", style="bold")
    else:
        line = Text("no minute recorded yet" if source is None else str(source))
    if tally:
        line.append(f"  (minutes: {tally})")
    return line


def _failsafe_line(fs: FailsafeDoc) -> Text:
    if fs.get("active"):
        return Text(
            f"ACTIVE since {r.clock(fs.get('since'))}: {fs.get('reason') or 'grid link lost'} "
            f"(last heartbeat {r.ago(fs.get('last_heartbeat'))}); {failsafe_release(fs)}",
            style="bold red",
        )
    return Text(f"off · last heartbeat {r.ago(fs.get('last_heartbeat'))}")


def _broker_line(broker: BrokerDoc) -> Text:
    state = str(broker.get("state") or "unknown")
    style = {"connected": "green", "disabled": "dim", "connecting": "yellow"}.get(state, "red")
    since = f" since {r.clock(broker.get('since'))} ({r.ago(broker.get('since'))})" if broker.get("since") else ""
    # with a broker list (a cluster's nodes), which one: "connected to nats-2:1883 since …" (tried, while connecting)
    where = f" {'to' if state == 'connected' else 'via'} {broker['address']}" if broker.get("address") else ""
    return Text(f"{state}{where}{since}", style=style)


def _gateway_line(gw: GatewayDoc) -> Text:
    line = Text(
        f"cpu {r.pct(gw.get('cpu_pct'))} · mem {r.pct(gw.get('mem_pct'))} · disk {r.mib(gw.get('disk_free_mb'))} "
        f"free · agent {r.mib(gw.get('rss_mb'))}"
    )
    if gw.get("low_disk"):
        line.append("  LOW DISK", style="bold red")
    return line


def level_text(d: Mapping[str, Any]) -> str:
    """The level a dispatch holds the site at, as a power: `412.00 kW`; a reduction (`curtail_kw`, `--by`) as
    `present − 50.00 kW → 412.00 kW`, from the site's power when it was accepted (its baseline)."""
    if d.get("target_kw") is not None:
        return r.kw(d.get("target_kw"))
    by = f"present − {r.kw(d.get('curtail_kw'))}"
    level = r.num(d.get("level_kw"))
    baseline, cut = r.num(d.get("baseline_kw")), r.num(d.get("curtail_kw"))
    if level is None and baseline is not None and cut is not None:
        level = max(0.0, baseline - cut)
    return by if level is None else f"{by} → {format_kw(level)}"


def dispatch_rows(dispatches: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for d in dispatches:
        rows.append(
            [
                str(d.get("id", r.DASH)),
                str(d.get("source", r.DASH)),
                level_text(d),
                r.clock(d.get("start")),
                r.clock(d.get("end")) if d.get("end") is not None else "open",
                str(d.get("status", r.DASH)),
                r.clock(d.get("commands_sent_at")),
                r.clock(d.get("target_met_at")),
                r.kw(d.get("max_overshoot_kw")),
            ]
        )
    return rows


DISPATCH_COLUMNS = ("id", "source", "level", "start", "end", "status", "sent", "target met", "max over")
# on a narrow terminal: which dispatch, what level and its status always; then the rest in this order
DISPATCH_PRIORITY = {
    "id": 0,
    "level": 0,
    "status": 0,
    "source": 1,
    "end": 2,
    "start": 3,
    "target met": 4,
    "sent": 5,
    "max over": 6,
}


def status_view(doc: StatusDoc, console: Console | None = None) -> RenderableType:
    tick = doc.get("tick") or {}
    head = Text(f"hashflex · site {doc.get('site_id', '?')} · v{doc.get('version', '?')}", style="bold")
    dur_ms = r.num(tick.get("dur_ms")) or 0
    head.append(f" · tick {r.count(tick.get('n'))} ({dur_ms:.0f} ms) · updated {r.ago(doc.get('ts'))}")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("power", _power_line(doc))
    meter = doc.get("meter")
    if isinstance(meter, Mapping):
        grid.add_row("meter", _meter_line(meter))
        energy = doc.get("energy")
        if isinstance(energy, Mapping):
            grid.add_row("energy", _energy_line(energy))
        fr = meter.get("frequency_response")
        if isinstance(fr, Mapping) and fr.get("active"):
            grid.add_row("frequency", _frequency_line(fr))
    loads = doc.get("facility")
    if isinstance(loads, list) and loads:
        grid.add_row("facility", _facility_text([ld for ld in loads if isinstance(ld, Mapping)]))
    grid.add_row("target", Text(f"{r.kw(doc.get('target_kw'))} — {explain_target(doc)}"))
    grid.add_row("cap", Text(f"{r.kw(doc.get('cap_kw'))} (licensed {r.kw(doc.get('licensed_cap_kw'))})"))
    grid.add_row("hashrate", Text(r.hashrate(doc.get("hashrate_ths"))))
    grid.add_row("miners", _miners_line(doc.get("miners") or {}))
    grid.add_row("fail-safe", _failsafe_line(doc.get("failsafe") or {}))
    grid.add_row("broker", _broker_line(doc.get("broker") or {}))
    grid.add_row("gateway", _gateway_line(doc.get("gateway") or {}))
    alarms = [str(a.get("message", a) if isinstance(a, Mapping) else a) for a in doc.get("alarms") or []]
    grid.add_row("alarms", Text("; ".join(alarms), style="bold red") if alarms else Text("none", style="dim"))
    parts: list[RenderableType] = [head, grid]
    active = [d for d in doc.get("dispatches") or [] if isinstance(d, Mapping) and d.get("status") in ACTIVE_STATUSES]
    if active:
        parts.append(
            r.fitted_table(
                console or Console(),
                DISPATCH_COLUMNS,
                dispatch_rows(active),
                title="dispatches in force",
                priority=DISPATCH_PRIORITY,
            )
        )
    else:
        parts.append(Text("no dispatch in force", style="dim"))
    return Group(*parts)


def status(config: ConfigOpt = DEFAULT_CONFIG, as_json: JsonOpt = False) -> None:
    """Site power against cap and target, why that target, miners by state, dispatches, fail-safe, broker."""
    doc = cast(StatusDoc, call(config, "status", {}, as_json=as_json))  # the agent's answer to `status`
    if as_json:
        emit_json(doc)
        return
    console = r.unwrapped(Console())  # piped: never wrapped mid-phrase
    console.print(status_view(doc, console))


def watch(
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    interval: Annotated[float, typer.Option("--interval", "-n", min=0.1, help="Seconds between refreshes.")] = 2.0,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Stop after this many refreshes.")] = None,
) -> None:
    """A live view of `hashflex status`, refreshed every --interval seconds (Ctrl-C to stop)."""
    if as_json and count is None:
        fail("--json needs --count N (it prints one JSON array of N status documents)", as_json=True)
    cfg = config_or_exit(config, as_json=as_json)
    path = socket_path(cfg)
    console = r.unwrapped(Console())
    docs: list[dict[str, Any]] = []
    n = 0

    def fetch() -> RenderableType:
        try:
            reply = request_sync(path, "status", {})
        except AgentUnavailable as exc:
            if not docs:  # nothing to show yet: say so and stop, as `status` would
                fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json, data={"reason": exc.reason, "socket": str(path)})
            return Text(f"{time.strftime('%H:%M:%S')} agent unreachable: {exc}", style="bold red")
        if not reply.is_ok:
            fail(f"the agent refused 'status': {reply.error_message}", as_json=as_json)
        docs.append(reply.data)
        return status_view(cast(StatusDoc, reply.data), console)

    try:
        if as_json or not console.is_terminal:
            while count is None or n < count:
                view = fetch()
                n += 1
                if not as_json:
                    console.print(f"── {time.strftime('%H:%M:%S')} ──", highlight=False)  # no 1000-column rule
                    console.print(view)
                if count is None or n < count:
                    time.sleep(interval)
        else:
            with Live(fetch(), console=console, refresh_per_second=4, screen=False) as live:
                n = 1
                while count is None or n < count:
                    time.sleep(interval)
                    live.update(fetch())
                    n += 1
    except KeyboardInterrupt:
        err.print("stopped")
    if as_json:
        emit_json(docs)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("watch")(watch)
