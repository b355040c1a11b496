"""`hashflex coordinator run|check` (the program coordinator service) and `hashflex program status`.

The coordinator lives in its own package (`hashflex.coordinator`, with nats and the program core); it is imported
inside the commands only, so `hashflex run` on a site gateway never loads it.

`program status` reads the program state the leading coordinator publishes, retained, on the fabric
(`<root>/program/<id>/state`, `coordinator.service.status_doc`): it needs the broker, not the coordinator's host.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from hashflex.agent.cli.common import EXIT_UNAVAILABLE, JsonOpt, emit_json, err, fail, out
from hashflex.agent.core.units import format_kw

DEFAULT_PROGRAM_CONFIG = Path("/etc/hashflex/program.yaml")
ProgramConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Program config file.", envvar="HASHFLEX_PROGRAM_CONFIG")
]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", help="This instance's name (lease holder, MQTT client id); default: the host name."),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", help="Seconds to wait for the broker's retained program state.", min=0.1)
]

coordinator_app = typer.Typer(help="The program coordinator: one grid command for many sites.", no_args_is_help=True)
program_app = typer.Typer(help="The program as the coordinator holds it.", no_args_is_help=True)


def _load(config: Path, *, as_json: bool = False) -> Any:
    from hashflex.coordinator import config as program_config  # noqa: PLC0415  (nats, the program core)

    try:
        return program_config.load(config)
    except program_config.ConfigError as exc:
        if as_json:
            emit_json({"ok": False, "config": str(config), "errors": [str(exc)]})
        err.print(f"[bold red]config error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None


@coordinator_app.command("check")
def check(config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG, as_json: JsonOpt = False) -> None:
    """Validate the program config and read every key it names; exit 2 on an error (the unit runs this first)."""
    cfg, ccfg = _load(config, as_json=as_json)
    summary = {
        "program_id": cfg.program_id, "sites": len(ccfg.sites),
        "program_cap_kw": sum(s.cap_w for s in ccfg.sites) / 1000.0,
        "excluded": [s.site_id for s in ccfg.sites if s.limits.excluded], "grid_keys": len(ccfg.grid_keys),
        "brokers": list(cfg.fabric.brokers), "nats_servers": list(cfg.fabric.nats_servers),
    }  # fmt: skip
    if as_json:
        emit_json({"ok": True, "config": str(config), "errors": [], "summary": summary})
        return
    err.print(
        f"config OK: {config} — program {summary['program_id']}, {summary['sites']} site(s), "
        f"{format_kw(summary['program_cap_kw'])} of caps, {summary['grid_keys']} grid key(s), "
        f"{len(summary['brokers'])} broker(s), {len(summary['nats_servers'])} NATS server(s)",
        highlight=False,
        soft_wrap=True,
    )


@coordinator_app.command("run")
def run(config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG, name: NameOpt = None) -> None:
    """Run a coordinator instance until SIGINT/SIGTERM (run two or three: the lease picks the one that acts)."""
    cfg, ccfg = _load(config)
    from hashflex.agent.logging import configure_logging  # noqa: PLC0415
    from hashflex.coordinator import runner  # noqa: PLC0415

    configure_logging()
    raise typer.Exit(runner.run(cfg, ccfg, name=name))


@program_app.command("status")
def status(
    config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG, as_json: JsonOpt = False, timeout: TimeoutOpt = 5.0
) -> None:
    """The program's target, shares, delivered and short, alarms: the coordinator's retained state on the fabric."""
    from hashflex.coordinator.config import ConfigError, load_program_config  # noqa: PLC0415

    try:
        cfg = load_program_config(config)  # the keys are not needed to read the state
    except ConfigError as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json)
    topic = f"{cfg.fabric.root}/program/{cfg.program_id}/state"
    from hashflex.coordinator.fabric import read_retained  # noqa: PLC0415

    try:
        doc = asyncio.run(read_retained(cfg.brokers, topic, timeout))
    except (OSError, TimeoutError, ValueError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json)
    if as_json:
        emit_json(doc)
        return
    _print_status(doc)


def _kw(w: Any) -> str:
    return "—" if w is None else format_kw(float(w) / 1000.0)


def _print_status(doc: dict[str, Any]) -> None:
    out.print(f"program {doc.get('program')}  revision {doc.get('revision')}", highlight=False)
    dispatches = doc.get("dispatches") or []
    if not dispatches:
        out.print("no program dispatch in force", highlight=False)
    for d in dispatches:
        sites = d.get("sites") or []
        metered = sum(float(s["present_w"]) for s in sites if s.get("present_w") is not None)
        out.print(
            f"{d.get('kind')} {d.get('id')}: target {_kw(d.get('level_now_w'))} (final {_kw(d.get('level_w'))}), "
            f"allocated {_kw(d.get('allocated_w'))}, metered {_kw(metered)}, short {_kw(d.get('unmet_w'))}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        for s in sites:
            failure = f"  {s['failure']}: {s.get('reason')}" if s.get("failure") else ""
            out.print(
                f"  {s.get('site'):<16} share {_kw(s.get('share_w')):>10}  present {_kw(s.get('present_w')):>10}"
                f"  counted {_kw(s.get('counted_w')):>10}  rev {s.get('rev')}{failure}",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
    for alarm in doc.get("alarms") or []:
        err.print(f"[bold red]alarm:[/] {escape(str(alarm))}", highlight=False, soft_wrap=True)


def register(root: typer.Typer) -> None:
    root.add_typer(coordinator_app, name="coordinator")
    root.add_typer(program_app, name="program")
