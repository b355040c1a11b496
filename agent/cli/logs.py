"""`hashflex logs`: what the agent did lately.

Two sources:
- the agent's own event feed (verb `events`: received, accepted, rejected, commands_sent, target_reached,
  expired, cancelled, failsafe_entered/exited, cap_changed, alarm). Works wherever the socket does, under
  systemd or not. `--follow` polls it.
- `--journal`: the full log lines from journald (`journalctl -u hashflex`), when the agent runs as the systemd
  unit. Reading another unit's journal needs group `systemd-journal` or `adm`, or sudo.
The audit trail is separate (SQLite, hash-chained): `hashflex audit export`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from hashflex.agent.cli import render as r
from hashflex.agent.cli.agentclient import call
from hashflex.agent.cli.common import DEFAULT_CONFIG, EXIT_UNAVAILABLE, ConfigOpt, JsonOpt, emit_json, fail
from hashflex.agent.runtime.events import EVENT_TYPES
from hashflex.agent.service_files import SERVICE_NAME

EVENT_STYLE = {
    "rejected": "red",
    "failed": "bold red",
    "failsafe_entered": "bold red",
    "alarm": "bold red",
    "target_reached": "green",
    "accepted": "cyan",
    "failsafe_exited": "green",
}


def event_line(event: Mapping[str, Any]) -> str:
    data = event.get("data") or {}
    fields = " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) else v}" for k, v in data.items())
    return f"{r.clock(event.get('ts'))} {event.get('type', '?')} {fields}".rstrip()


def _key(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, default=str)


def _sorted(events: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(events, key=lambda e: r.epoch(e.get("ts")) or 0.0)


# where journald keeps its socket (while it runs) and its files (volatile, persistent)
JOURNAL_SOCKET_DIR = Path("/run/systemd/journal")
JOURNAL_DIRS = (Path("/run/log/journal"), Path("/var/log/journal"))


def journal_present() -> bool:
    """journald runs here, or has left journal files: without either, journalctl answers nothing and exits 0."""
    if JOURNAL_SOCKET_DIR.exists():
        return True
    return any(next(d.rglob("*.journal"), None) is not None for d in JOURNAL_DIRS if d.is_dir())


def journal(limit: int, follow: bool, as_json: bool) -> None:
    exe = shutil.which("journalctl")
    if exe is None:
        fail(
            "journalctl is not installed: without systemd, use `hashflex logs` (no --journal) or the agent's stdout",
            EXIT_UNAVAILABLE,
            as_json=as_json,
        )
    if not journal_present():
        fail(
            "there is no systemd journal on this machine (journald is not running): the agent logs to its stdout "
            "here; `hashflex logs` without --journal shows its events",
            EXIT_UNAVAILABLE,
            as_json=as_json,
        )
    args = [exe, "-u", SERVICE_NAME, "-n", str(limit), "--no-pager", "-o", "json" if as_json else "cat"]
    if follow:
        args.append("-f")
    if follow and not as_json:
        raise typer.Exit(subprocess.run(args, check=False).returncode)
    done = subprocess.run(args, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        fail(
            f"journalctl failed: {done.stderr.strip() or done.returncode} (reading the journal needs group "
            "systemd-journal or adm, or sudo)",
            EXIT_UNAVAILABLE,
            as_json=as_json,
        )
    lines = [line for line in done.stdout.splitlines() if line.strip() and line.strip() != "-- No entries --"]
    if not lines:
        fail(
            f"the journal has no lines from unit {SERVICE_NAME}: the agent has not run as that systemd unit here "
            "(`hashflex install-service`), or reading it needs group systemd-journal or adm, or sudo",
            EXIT_UNAVAILABLE,
            as_json=as_json,
        )
    if as_json:
        emit_json([json.loads(line) for line in lines])
        return
    sys.stdout.write("\n".join(lines) + "\n")


def logs(
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many recent events.")] = 50,
    type_: Annotated[str | None, typer.Option("--type", help="Only events of this type (e.g. rejected).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events (Ctrl-C to stop).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between polls with --follow.")] = 2.0,
    count: Annotated[int | None, typer.Option("--count", min=1, help="With --follow: stop after N polls.")] = None,
    from_journal: Annotated[
        bool, typer.Option("--journal", help=f"Full log lines from journald (`journalctl -u {SERVICE_NAME}`).")
    ] = False,
) -> None:
    """The agent's recent events (dispatches, rejections, fail-safe, alarms), or its journal with --journal."""
    if as_json and follow:
        fail("--json and --follow do not mix: --json prints one document", as_json=True)
    if type_ is not None and type_ not in EVENT_TYPES:
        fail(f"--type: no event type {type_!r} (one of: {', '.join(sorted(EVENT_TYPES))})", as_json=as_json)
    if from_journal:
        journal(limit, follow, as_json)
        return
    data = call(config, "events", {"limit": limit}, as_json=as_json)
    events = _sorted([e for e in data.get("events") or [] if isinstance(e, Mapping)])
    if type_ is not None:
        events = [e for e in events if e.get("type") == type_]
    if as_json:
        emit_json({"events": events})
        return
    console = Console()
    seen: set[str] = set()

    def show(batch: list[Mapping[str, Any]]) -> None:
        for event in batch:
            key = _key(event)
            if key in seen:
                continue
            seen.add(key)
            style = EVENT_STYLE.get(str(event.get("type")), "")
            console.print(event_line(event), style=style, markup=False, highlight=False, soft_wrap=True)

    show(events)
    polls = 0
    try:
        while follow and (count is None or polls < count):
            time.sleep(interval)
            polls += 1
            fresh = call(config, "events", {"limit": limit}, as_json=False).get("events") or []
            show(
                [
                    e
                    for e in _sorted([e for e in fresh if isinstance(e, Mapping)])
                    if type_ is None or e.get("type") == type_
                ]
            )
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
