"""Operator overrides: `hashflex curtail`, `hashflex resume`, `hashflex cap`.

They go to the agent over the control socket (trusted by file permissions), through the same validation as
grid commands on MQTT. Powers accept units (`12MW`, `850kW`, `3000W`; a bare number is kW), durations too
(`90s`, `30m`, `2h`). `--wait` follows the site down to its new level with a progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hashflex.agent.cli import render as r
from hashflex.agent.cli.agentclient import call, request_id
from hashflex.agent.cli.common import DEFAULT_CONFIG, EXIT_REFUSED, ConfigOpt, JsonOpt, emit_json, err, fail
from hashflex.agent.core.units import format_kw
from hashflex.contract.requests import MAX_DURATION_S
from hashflex.contract.units import parse_duration_s, parse_power_kw

WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait until the site is at or under the new level.")]
WaitTimeoutOpt = Annotated[
    str, typer.Option("--wait-timeout", help="Give up waiting after this long (e.g. 10m).", show_default=True)
]


def parse_power(value: str, option: str, *, as_json: bool, allow_zero: bool = True) -> float:
    try:
        kw = parse_power_kw(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", as_json=as_json)
    if kw < 0 or (kw == 0 and not allow_zero):
        fail(f"{option}: must be {'zero or more' if allow_zero else 'more than zero'}, got {value!r}", as_json=as_json)
    return kw


def parse_duration(value: str, option: str, *, as_json: bool) -> float:
    try:
        seconds = parse_duration_s(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", as_json=as_json)
    if seconds <= 0:
        fail(f"{option}: must be longer than zero, got {value!r}", as_json=as_json)
    return seconds


def site_power_kw(doc: Mapping[str, Any]) -> float | None:
    power = r.num(doc.get("power_kw_estimated"))
    return power if power is not None else r.num(doc.get("power_kw_measured"))


def dispatch_level_kw(dispatch: Mapping[str, Any]) -> float | None:
    if (target := r.num(dispatch.get("target_kw"))) is not None:
        return target
    baseline, by = r.num(dispatch.get("baseline_kw")), r.num(dispatch.get("curtail_kw"))
    return None if baseline is None or by is None else max(0.0, baseline - by)


def reached(doc: Mapping[str, Any], level_kw: float | None, dispatch_id: str | None) -> bool:
    """The agent says the dispatch met its target, or the site's power is at or under the level."""
    for d in doc.get("dispatches") or []:
        if isinstance(d, Mapping) and dispatch_id is not None and d.get("id") == dispatch_id and d.get("target_met_at"):
            return True
    power = site_power_kw(doc)
    level = level_kw if level_kw is not None else r.num(doc.get("target_kw"))
    return power is not None and level is not None and power <= level + 1e-6


def wait_for_level(
    config: Any, level_kw: float | None, dispatch_id: str | None, timeout_s: float, *, as_json: bool
) -> dict[str, Any]:
    """Poll `status` with a progress bar on stderr until `reached`; exit 1 on timeout."""
    deadline = time.monotonic() + timeout_s
    doc = call(config, "status", {}, as_json=as_json)
    start = site_power_kw(doc) or 0.0
    goal = level_kw if level_kw is not None else r.num(doc.get("target_kw")) or 0.0
    total = max(start - goal, 1e-9)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=as_json,
    ) as progress:
        task = progress.add_task(f"site power → {format_kw(goal)}", total=total)
        while not reached(doc, level_kw, dispatch_id):
            if time.monotonic() > deadline:
                fail(
                    f"the site is still at {format_kw(site_power_kw(doc))}, above {format_kw(goal)}, after "
                    f"{r.duration(timeout_s)}; see `hashflex status` and `hashflex miners --state unreachable`",
                    EXIT_REFUSED,
                    as_json=as_json,
                    data={"status": doc},
                )
            now_kw = site_power_kw(doc) or start
            progress.update(
                task,
                completed=min(total, max(0.0, start - now_kw)),
                description=f"site power {format_kw(now_kw)} → {format_kw(goal)}",
            )
            time.sleep(1.0)
            doc = call(config, "status", {}, as_json=as_json)
        progress.update(task, completed=total)
    return doc


def curtail(
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    to: Annotated[str | None, typer.Option("--to", help="Hold the site at or under this power (e.g. 12MW).")] = None,
    by: Annotated[str | None, typer.Option("--by", help="Lower the site by this much from now (e.g. 3MW).")] = None,
    for_: Annotated[str | None, typer.Option("--for", help="For this long (e.g. 2h); default until resume.")] = None,
    add: Annotated[
        bool, typer.Option("--add", help="Keep the overrides in force too (the lowest binds); default: replace them.")
    ] = False,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = "10m",
) -> None:
    """Operator override: hold the site at --to, or --by under its present draw [--for a while].

    It replaces the operator override in force, if any; --add keeps that one too (the lower level binds)."""
    if (to is None) == (by is None):
        fail("give exactly one of --to POWER (a level) or --by POWER (a reduction), e.g. --to 12MW", as_json=as_json)
    payload: dict[str, Any] = {"id": request_id()}
    if to is not None:
        payload["to_kw"] = parse_power(to, "--to", as_json=as_json)
    else:
        payload["by_kw"] = parse_power(by or "", "--by", as_json=as_json, allow_zero=False)
    if for_ is not None:
        payload["for_s"] = parse_duration(for_, "--for", as_json=as_json)
        if payload["for_s"] > MAX_DURATION_S:
            fail(
                f"--for: at most {MAX_DURATION_S / 86400:.0f} days (leave --for out to hold until "
                f"`hashflex resume`), got {for_!r}",
                as_json=as_json,
            )
    if add:
        payload["add"] = True  # only when asked: an agent that predates the field refuses it, never ignores it
    timeout_s = parse_duration(wait_timeout, "--wait-timeout", as_json=as_json)
    data = call(config, "curtail", payload, as_json=as_json)
    dispatch = data.get("dispatch") or {}
    level = dispatch_level_kw(dispatch)
    if level is None:
        level = payload.get("to_kw")
    final = wait_for_level(config, level, dispatch.get("id"), timeout_s, as_json=as_json) if wait else None
    if as_json:
        emit_json({**data, **({"status": final} if final is not None else {})})
        return
    until = f"until {r.clock(dispatch.get('end'))}" if dispatch.get("end") else "until `hashflex resume`"
    shown = format_kw(level)
    if "by_kw" in payload:  # a reduction: say what from, the level is what binds
        shown += f" (present − {format_kw(payload['by_kw'])})"
    replaced = [str(i) for i in data.get("replaced") or []]
    err.print(
        f"curtailment accepted: override {dispatch.get('id', payload['id'])} holds the site at or under "
        f"{shown} {until}" + (f"; it replaces override(s) {', '.join(replaced)}" if replaced else ""),
        highlight=False,
    )
    if final is not None:
        err.print(f"site at {format_kw(site_power_kw(final))}: target reached", highlight=False)


def resume(config: ConfigOpt = DEFAULT_CONFIG, as_json: JsonOpt = False) -> None:
    """End every operator override (grid dispatches, the cap and time-of-use windows still apply)."""
    data = call(config, "resume", {"id": request_id()}, as_json=as_json)
    if as_json:
        emit_json(data)
        return
    cancelled = [str(c.get("id", c)) if isinstance(c, Mapping) else str(c) for c in data.get("cancelled") or []]
    if cancelled:
        err.print(f"resumed: ended override(s) {', '.join(cancelled)}", highlight=False)
    else:
        err.print("no operator override was in force; nothing to resume", highlight=False)


def cap(
    power: Annotated[str | None, typer.Argument(help="New site cap (e.g. 18MW); omit to show the cap.")] = None,
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    wait: WaitOpt = False,
    wait_timeout: WaitTimeoutOpt = "10m",
    lift_grid_cap: Annotated[
        bool,
        typer.Option(
            "--lift-grid-cap",
            help="Also lift the cap the grid set at run time (audited). Without it the "
            "lower of the grid's cap and yours binds.",
        ),
    ] = False,
) -> None:
    """Show the site cap, or set the operator's run-time cap (never above the licensed cap).

    The grid may set a run-time cap too: the lower of the two binds, and a local cap never lifts the grid's unless
    you say so with --lift-grid-cap (recorded in the audit log).
    """
    if power is None:
        doc = call(config, "status", {}, as_json=as_json)
        # and the run-time caps by source that are set (the lowest cap binds)
        shown = {k: doc.get(k) for k in ("cap_kw", "licensed_cap_kw")}
        shown.update({k: doc[k] for k in ("grid_cap_kw", "operator_cap_kw") if doc.get(k) is not None})
        if as_json:
            emit_json(shown)
        else:
            parts = [f"licensed {r.kw(shown['licensed_cap_kw'])}"]
            for who in ("grid", "operator"):
                if shown.get(f"{who}_cap_kw") is not None:
                    parts.append(f"{who} {r.kw(shown[f'{who}_cap_kw'])}")
            Console().print(f"cap {r.kw(shown['cap_kw'])} ({', '.join(parts)})", highlight=False)
        return
    cap_kw = parse_power(power, "POWER", as_json=as_json, allow_zero=False)
    timeout_s = parse_duration(wait_timeout, "--wait-timeout", as_json=as_json)
    payload: dict[str, Any] = {"id": request_id(), "issued_at": time.time(), "cap_kw": cap_kw}
    if lift_grid_cap:
        payload["lift_grid_cap"] = True
    data = call(config, "cap", payload, as_json=as_json)
    effective = r.num(data.get("cap_kw"))
    final = (
        wait_for_level(config, effective if effective is not None else cap_kw, None, timeout_s, as_json=as_json)
        if wait
        else None
    )
    if as_json:
        emit_json({**data, **({"status": final} if final is not None else {})})
        return
    lifted = r.num(data.get("lifted_grid_cap_kw"))
    if lifted is not None:
        err.print(f"the grid's cap of {format_kw(lifted)} is lifted (recorded in the audit log)", highlight=False)
    grid = r.num(data.get("grid_cap_kw"))
    if grid is not None and effective is not None and grid <= effective and grid < cap_kw:
        err.print(
            f"operator cap set to {format_kw(cap_kw)}; the grid's cap of {format_kw(grid)} still binds "
            "(--lift-grid-cap lifts it)",
            highlight=False,
        )
    else:
        err.print(f"site cap set to {format_kw(effective if effective is not None else cap_kw)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("curtail")(curtail)
    app.command("resume")(resume)
    app.command("cap")(cap)
