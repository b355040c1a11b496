"""`hashflex discover CIDR…`: find the miners on the given addresses and say what each one is.

Talks to the miners directly (no agent needed), with bounded concurrency and a deadline per address; a
progress bar on stderr while it runs, then a table on stdout (or one JSON document with --json).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hashflex.agent.cli import render as r
from hashflex.agent.cli.common import EXIT_REFUSED, JsonOpt, WideOpt, config_or_exit, emit_json, err, fail, out
from hashflex.agent.config import LoggingConfig
from hashflex.agent.core.addresses import expand, validate_spec
from hashflex.agent.logging import configure_logging
from hashflex.agent.runtime.fleet import DiscoverProgress, Fleet, driver_settings
from hashflex.drivers.base import Capability, DriverSettings, Identity, OnOff, PowerRange, Presets


def _kw_span(low_w: int, high_w: int) -> str:
    """`1.6–3.4 kW` (one decimal: a table cell, not a measurement); `3.4 kW` when both ends are the same."""
    low, high = f"{low_w / 1000:.1f}", f"{high_w / 1000:.1f}"
    return f"{high} kW" if low == high else f"{low}–{high} kW"


def capability_text(cap: Capability, *, full: bool = False) -> str:
    """How a miner can be controlled, short enough for a table cell (`12 presets 1.6–3.4 kW`); `full` lists every
    preset (--wide; --json has them all)."""
    if isinstance(cap, PowerRange):
        return f"limit {cap.min_w}-{cap.max_w} W" if full else f"limit {_kw_span(cap.min_w, cap.max_w)}"
    if isinstance(cap, Presets):
        if full or not cap.watts:
            return "presets " + "/".join(str(w) for w in cap.watts) + " W"
        n = len(cap.watts)
        return f"{n} preset{'s' if n != 1 else ''} {_kw_span(min(cap.watts), max(cap.watts))}"
    if isinstance(cap, OnOff):
        return "on/off"
    return str(cap)


COLUMNS = ("IP", "FAMILY", "MODEL", "FIRMWARE", "CONTROL", "NOMINAL", "HASHRATE", "MAC")
# on a narrow terminal: the IP and its nominal power always, then the rest in this order (--wide: all)
PRIORITY = {"IP": 0, "NOMINAL": 0, "MODEL": 1, "CONTROL": 2, "FAMILY": 3, "HASHRATE": 4, "FIRMWARE": 5, "MAC": 6}


def identity_rows(found: list[Identity], *, wide: bool = False) -> list[list[str]]:
    return [
        [
            i.ip,
            str(i.family),
            i.model,
            i.firmware,
            capability_text(i.capability, full=wide),
            r.watts(i.nominal_w),
            r.hashrate(i.nominal_ths) if i.nominal_ths else r.DASH,
            i.mac or r.DASH,
        ]
        for i in found
    ]


def capability_doc(cap: Capability) -> dict[str, Any]:
    if isinstance(cap, PowerRange):
        return {"kind": "range", "min_w": cap.min_w, "max_w": cap.max_w, "step_w": cap.step_w}
    if isinstance(cap, Presets):
        return {"kind": "presets", "watts": list(cap.watts)}
    return {"kind": "on_off"}


def identity_doc(i: Identity) -> dict[str, Any]:
    return {
        "ip": i.ip,
        "family": str(i.family),
        "make": i.make,
        "model": i.model,
        "firmware": i.firmware,
        "mac": i.mac,
        "serial": i.serial,
        "nominal_w": i.nominal_w,
        "nominal_ths": i.nominal_ths,
        "reports_power": i.reports_power,
        "capability": capability_doc(i.capability),
        "driver_class": i.driver_class,
    }


async def _run(specs: list[str], settings: DriverSettings, concurrency: int, show_progress: bool) -> list[Identity]:
    from hashflex.drivers.registry import create  # noqa: PLC0415  (pyasic is imported only by commands that use it)

    fleet = Fleet(
        create("pyasic", settings),
        identify_concurrency=concurrency,
        identify_timeout_s=settings.identify_timeout_s,
    )
    total = len(expand(specs))
    with Progress(
        TextColumn("[bold]discover[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("found {task.fields[found]}"),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not show_progress,
        transient=True,
    ) as bar:
        task = bar.add_task("discover", total=total, found=0, last="")

        def on_progress(p: DiscoverProgress) -> None:
            last = f"{p.ip} {p.identity.model}" if p.identity else ""
            bar.update(task, completed=p.done, found=p.found, last=last)

        return await fleet.discover(specs, on_progress, attach=False)


def _event_loop_runner() -> Any:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run
    return uvloop.run


def discover(
    addresses: Annotated[list[str], typer.Argument(help="IPs, ranges a-b or CIDRs, e.g. 10.20.0.0/22.")],
    *,
    as_json: JsonOpt = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-n", min=1, max=600, help="Identifications in flight at once.")
    ] = 128,
    timeout: Annotated[float, typer.Option("--timeout", min=0.5, help="Seconds allowed per address.")] = 10.0,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Take miner passwords and deadlines from this site config.")
    ] = None,
    wide: WideOpt = False,
) -> None:
    """Find the miners on the given addresses and say what each one is and how it can be controlled."""
    # stdout carries the table or the JSON document; log lines (warnings only) go to stderr
    configure_logging(LoggingConfig(level="warning"), stream=sys.stderr)
    for spec in addresses:
        try:
            validate_spec(spec)
        except ValueError as exc:
            fail(f"{exc}", EXIT_REFUSED, as_json=as_json)
    settings = DriverSettings(identify_timeout_s=timeout, identify_concurrency=concurrency)
    if config is not None:
        cfg = config_or_exit(config, as_json=as_json)
        base = driver_settings(cfg)
        settings = DriverSettings(
            read_timeout_s=base.read_timeout_s,
            command_timeout_s=base.command_timeout_s,
            identify_timeout_s=timeout,
            passwords=base.passwords,
            identify_concurrency=concurrency,
        )
    started = time.perf_counter()
    found = _event_loop_runner()(_run(list(addresses), settings, concurrency, show_progress=err.is_terminal))
    elapsed = time.perf_counter() - started
    total = len(expand(addresses))
    if as_json:
        emit_json(
            {
                "status": "ok",
                "addresses": total,
                "found": [identity_doc(i) for i in found],
                "duration_s": round(elapsed, 2),
            }
        )
        return
    r.print_table(
        out,
        COLUMNS,
        identity_rows(found, wide=wide),
        priority=PRIORITY,
        wide=wide,
        title=f"{len(found)} miner(s) on {total} address(es) in {elapsed:.1f} s",
        right=["NOMINAL", "HASHRATE"],
    )
    err.print(f"{len(found)} miner(s) found on {total} address(es) in {elapsed:.1f} s", highlight=False)
