"""`hashflex dispatches` (what limits the site, now and recently) and `hashflex preview` (what the planner
would do for a target, without doing it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.console import Console

from agent.cli import render as r
from agent.cli.agentclient import call
from agent.cli.common import DEFAULT_CONFIG, ConfigOpt, JsonOpt, emit_json, err
from agent.cli.override import parse_power
from agent.cli.status import DISPATCH_COLUMNS, dispatch_rows


def dispatches(
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include ended ones (expired, cancelled, ...).")] = False,
) -> None:
    """Grid dispatches and operator overrides: level, window, status, when commands went out, when met."""
    data = call(config, "dispatches", {"all": all_}, as_json=as_json)
    if as_json:
        emit_json(data)
        return
    rows = [d for d in data.get("dispatches") or [] if isinstance(d, Mapping)]
    if not rows:
        err.print("no dispatch" + (" on record" if all_ else " in force (--all shows ended ones)"), highlight=False)
        return
    r.print_table(Console(), DISPATCH_COLUMNS, dispatch_rows(rows))


def preview(
    target: Annotated[str, typer.Option("--target", "-t", help="Site target to plan for (e.g. 12MW).")],
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
) -> None:
    """What the planner would do to hold the site at --target: nothing is sent to any miner."""
    target_kw = parse_power(target, "--target", as_json=as_json)
    data: dict[str, Any] = call(config, "preview", {"target_kw": target_kw}, as_json=as_json, timeout=30.0)
    if as_json:
        emit_json(data)
        return
    console = Console()
    console.print(f"plan for a target of {r.kw(target_kw)} (preview only: nothing sent)", highlight=False)
    r.print_mapping(console, data, indent="  ")


def register(app: typer.Typer) -> None:
    app.command("dispatches")(dispatches)
    app.command("preview")(preview)
