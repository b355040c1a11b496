"""`hashflex dispatches` (what limits the site, now and recently) and `hashflex preview` (what the planner
would do for a target, without doing it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.console import Console

from hashflex.agent.cli import render as r
from hashflex.agent.cli.agentclient import call
from hashflex.agent.cli.common import DEFAULT_CONFIG, ConfigOpt, JsonOpt, WideOpt, emit_json, err
from hashflex.agent.cli.override import parse_power
from hashflex.agent.cli.status import DISPATCH_COLUMNS, DISPATCH_PRIORITY, dispatch_rows


def dispatches(
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include ended ones (expired, cancelled, ...).")] = False,
    wide: WideOpt = False,
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
    r.print_table(Console(), DISPATCH_COLUMNS, dispatch_rows(rows), priority=DISPATCH_PRIORITY, wide=wide)


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
    console = r.unwrapped(Console())
    for line in preview_sentences(target_kw, data):
        console.print(line, markup=False, highlight=False)


CHANGE_WORDS = {"sleep": "put to sleep", "wake": "woken", "set_power": "given a new power limit"}


def preview_sentences(asked_kw: float, plan: Mapping[str, Any]) -> list[str]:
    """The agent's preview reply in plain sentences, each with its reason (--json has every field)."""
    kw = r.num(plan.get("target_kw"))
    kw = asked_kw if kw is None else kw
    lines = [f"Preview only: nothing is sent to any miner. The plan is for {r.kw(kw)}."]
    if kw < asked_kw - 1e-6:
        lines.append(f"You asked for {r.kw(asked_kw)}; the site cap binds, so the plan holds {r.kw(kw)} instead.")
    present, expected, worst = (r.num(plan.get(k)) for k in ("present_kw", "expected_kw", "worst_case_kw"))
    if expected is not None or worst is not None:
        now = f"The site draws {r.kw(present)} now; with this plan" if present is not None else "With this plan"
        lines.append(
            f"{now} it would draw about {r.kw(expected)}, and at most {r.kw(worst)} (miners it cannot "
            "read counted at their worst case)."
        )
    running, asleep = r.num(plan.get("running")), r.num(plan.get("sleeping", plan.get("sleep")))
    if running is not None:
        lines.append(f"{r.count(running)} miner(s) would run and {r.count(asleep or 0)} sleep.")
    elif asleep is not None:
        lines.append(f"{r.count(asleep)} miner(s) would sleep.")
    changes = plan.get("changes")
    if isinstance(changes, Mapping) and changes:
        said = ", ".join(f"{r.count(n)} {CHANGE_WORDS.get(str(op), str(op))}" for op, n in changes.items())
        lines.append(f"To get there, miners would be {said}.")
    elif isinstance(changes, Mapping):
        lines.append("No miner would be told anything: the fleet already fits this target.")
    method = plan.get("method")
    if method == "optimal":
        kept, base = r.num(plan.get("expected_ths")), r.num(plan.get("baseline_ths"))
        why = f" ({r.hashrate(kept)} against {r.hashrate(base)} by sleeping alone)" if base is not None else ""
        lines.append(f"Chosen because it keeps the most hashrate under the target{why}.")
    elif method == "sleep_only":
        lines.append("Chosen: sleep and wake only (power limits would keep no more hashrate here, or are off).")
    uncontrolled = r.num(plan.get("uncontrolled"))
    if uncontrolled:
        lines.append(f"{r.count(uncontrolled)} miner(s) cannot be controlled and count at their worst case.")
    budget = r.num(plan.get("wake_budget"))
    if budget is not None and isinstance(changes, Mapping) and changes.get("wake"):
        lines.append(f"At most {r.count(budget)} miner(s) may wake now (the wake stagger); the rest would follow.")
    for alarm in plan.get("alarms") or []:
        lines.append(f"Warning: {alarm}")
    return lines


def register(app: typer.Typer) -> None:
    app.command("dispatches")(dispatches)
    app.command("preview")(preview)
