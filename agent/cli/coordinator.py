"""`hashflex coordinator run|check` (the program coordinator service) and `hashflex program status|dispatches|
audit verify|audit export` (`program export` is the same as `program audit export`).

The coordinator lives in its own package (`hashflex.coordinator`, with nats and the program core); it is imported
inside the commands only, so `hashflex run` on a site gateway never loads it.

`program status` and `program dispatches` read the program state the leading coordinator publishes, retained, on
the fabric (`<root>/program/<id>/state`, `coordinator.service.status_doc`): they need the broker, not the
coordinator's host. `program audit verify|export` read the coordinator's audit chain from JetStream
(`coordinator.store.JetStreamAuditLog`): they need a NATS server of the cluster, and the coordinator need not run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from hashflex.agent.cli import render as r
from hashflex.agent.cli.audit import FromOpt, ToOpt, parse_when
from hashflex.agent.cli.common import EXIT_REFUSED, EXIT_UNAVAILABLE, JsonOpt, WideOpt, emit_json, err, fail, out
from hashflex.agent.core.units import format_kw
from hashflex.contract.topics import ProgramTopics

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
program_audit_app = typer.Typer(help="Verify and export the coordinator's audit chain.", no_args_is_help=True)
program_app.add_typer(program_audit_app, name="audit")


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
        "program_id": cfg.program_id,
        "sites": len(ccfg.sites),
        "program_cap_kw": sum(s.cap_w for s in ccfg.sites) / 1000.0,
        "excluded": [s.site_id for s in ccfg.sites if s.limits.excluded],
        "grid_keys": len(ccfg.grid_keys),
        "brokers": list(cfg.fabric.brokers),
        "nats_servers": list(cfg.fabric.nats_servers),
        "audit_stream": cfg.audit_stream,
        "metrics": f"{cfg.metrics.host}:{cfg.metrics.port}" if cfg.metrics.enabled else None,
    }
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
    try:
        code = runner.run(cfg, ccfg, name=name)
    except runner.StartError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    raise typer.Exit(code)


@program_app.command("status")
def status(
    config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG, as_json: JsonOpt = False, timeout: TimeoutOpt = 5.0
) -> None:
    """The program's target, shares, delivered and short, alarms: the coordinator's retained state on the fabric."""
    doc = _read_state(config, as_json=as_json, timeout=timeout)
    if as_json:
        emit_json(doc)
        return
    _print_status(doc)


def _program_config(config: Path, *, as_json: bool) -> Any:
    from hashflex.coordinator.config import ConfigError, load_program_config  # noqa: PLC0415

    try:
        return load_program_config(config)  # the keys are not needed to read the state or the chain
    except ConfigError as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json)


def _read_state(config: Path, *, as_json: bool, timeout: float) -> dict[str, Any]:
    cfg = _program_config(config, as_json=as_json)
    topic = ProgramTopics(cfg.fabric.root, cfg.program_id).state
    from hashflex.coordinator.fabric import read_retained  # noqa: PLC0415

    try:
        return asyncio.run(read_retained(cfg.brokers, topic, timeout))
    except (OSError, TimeoutError, ValueError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json)


# ------------------------------------------------------------------------------------------ dispatches
DISPATCH_COLUMNS = ("id", "rev", "kind", "target", "window", "state", "ok", "metered", "short")
# on a narrow terminal: which dispatch, its level and state always; then the rest in this order (--wide: all)
DISPATCH_PRIORITY = {
    "id": 0,
    "target": 0,
    "state": 0,
    "short": 1,
    "metered": 2,
    "ok": 3,
    "window": 4,
    "kind": 5,
    "rev": 6,
}
SITE_COLUMNS = ("site", "share", "present", "counted", "rev", "ok", "failure")
SITE_PRIORITY = {"site": 0, "share": 0, "present": 1, "failure": 2, "counted": 3, "ok": 4, "rev": 5}


@program_app.command("dispatches")
def dispatches(
    config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
    sites: Annotated[bool, typer.Option("--sites/--no-sites", help="Each dispatch's per-site allocation.")] = True,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Program dispatches in force (id, rev, kind, target, window, state, sites ok, metered, short), per-site too."""
    doc = _read_state(config, as_json=as_json, timeout=timeout)
    rows = [d for d in doc.get("dispatches") or [] if isinstance(d, dict)]
    if as_json:
        emit_json({"program": doc.get("program"), "revision": doc.get("revision"), "dispatches": rows})
        return
    if not rows:
        err.print(f"no program dispatch in force (program {doc.get('program')})", highlight=False)
        return
    console = Console()
    r.print_table(
        console,
        DISPATCH_COLUMNS,
        [dispatch_row(d) for d in rows],
        right=("rev", "target", "ok", "metered", "short"),
        priority=DISPATCH_PRIORITY,
        wide=wide,
    )
    if not sites:
        return
    for d in rows:
        site_rows = [site_row(s) for s in d.get("sites") or [] if isinstance(s, dict)]
        title = f"{d.get('kind')} {d.get('id')}: per-site allocation" if console.is_terminal else None
        if not console.is_terminal:
            console.file.write(f"# {d.get('id')}\n")
        r.print_table(
            console,
            SITE_COLUMNS,
            site_rows,
            title=title,
            right=("share", "present", "counted", "rev"),
            priority=SITE_PRIORITY,
            wide=wide,
        )


def _window(d: dict[str, Any]) -> str:
    start, end = r.num(d.get("start")), r.num(d.get("end"))
    if start is None:
        return r.DASH
    return f"{r.clock(start)}–{r.clock(end) if end is not None else 'open'}"


def dispatch_row(d: dict[str, Any]) -> list[str]:
    shares = [s for s in d.get("sites") or [] if isinstance(s, dict) and s.get("acked") is not None]
    ok = sum(1 for s in shares if s.get("acked"))
    return [
        str(d.get("id")),
        r.DASH if d.get("rev") is None else str(d.get("rev")),
        str(d.get("kind")),
        _kw(d.get("level_now_w", d.get("level_w"))),
        _window(d),
        str(d.get("state", r.DASH)),
        f"{ok}/{len(shares)}",
        _kw(d.get("metered_w")),
        _kw(d.get("unmet_w")),
    ]


def site_row(s: dict[str, Any]) -> list[str]:
    acked = s.get("acked")
    return [
        str(s.get("site")),
        _kw(s.get("share_w")),
        _kw(s.get("present_w")),
        _kw(s.get("counted_w")),
        r.DASH if s.get("rev") is None else str(s.get("rev")),
        r.DASH if acked is None else ("yes" if acked else "no"),
        str(s.get("failure") or ""),
    ]


# ------------------------------------------------------------------------------------------ audit chain
NatsTimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a NATS server.", min=0.1)]


async def _read_chain(cfg: Any, wait_s: float) -> tuple[int, list[tuple[int, dict[str, Any] | None]]]:
    """(the stream's last sequence, every stored (sequence, document)), from the first NATS server that answers."""
    from hashflex.coordinator.store import JetStreamAuditLog, NoChain, connect_once  # noqa: PLC0415

    nc = await connect_once(list(cfg.fabric.nats_servers), wait_s)
    try:
        log = JetStreamAuditLog(nc.jetstream(timeout=wait_s), cfg.audit_stream, replicas=cfg.audit.replicas)
        try:
            last = await log.last_seq()
        except NoChain:
            raise LookupError(
                f"no audit chain for program {cfg.program_id!r} (stream {cfg.audit_stream} does not "
                "exist: has a coordinator of this program run?)"
            ) from None
        stored = [item async for item in log.records(wait_s=wait_s)]
        return last, stored
    finally:
        await nc.close()


def _chain(config: Path, timeout: float, *, as_json: bool) -> tuple[Any, int, list[tuple[int, dict[str, Any] | None]]]:
    cfg = _program_config(config, as_json=as_json)
    try:
        last, stored = asyncio.run(_read_chain(cfg, timeout))
    except LookupError as exc:
        fail(str(exc.args[0]), EXIT_UNAVAILABLE, as_json=as_json)
    except (OSError, TimeoutError) as exc:
        fail(str(exc) or f"timed out reading the audit stream {cfg.audit_stream}", EXIT_UNAVAILABLE, as_json=as_json)
    except Exception as exc:  # nats' own errors: one line, not a traceback
        fail(
            f"cannot read the audit stream {cfg.audit_stream}: {type(exc).__name__}: {exc}",
            EXIT_UNAVAILABLE,
            as_json=as_json,
        )
    return cfg, last, stored


@program_audit_app.command("verify")
def audit_verify(
    config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG, as_json: JsonOpt = False, timeout: NatsTimeoutOpt = 5.0
) -> None:
    """Check the coordinator's audit chain in JetStream; name the first broken record and exit 1 if any."""
    from hashflex.coordinator.audit import verify_stored  # noqa: PLC0415

    cfg, last, stored = _chain(config, timeout, as_json=as_json)
    result = verify_stored(stored, expected_last_seq=last)
    if as_json:
        emit_json(
            {
                "status": "ok" if result.ok else "error",
                "program": cfg.program_id,
                "stream": cfg.audit_stream,
                **result.to_dict(),
            }
        )
    elif result.ok:
        where = f"records {result.first_seq}..{result.last_seq}" if result.records else "no records"
        typer.echo(
            f"program audit chain OK: {result.records} records ({where}) in stream {cfg.audit_stream}; "
            f"head {result.head_hash}"
        )
    else:
        err.print(
            f"[bold red]program audit chain BROKEN[/] at record {result.broken_seq}: "
            f"{escape(result.reason or '')} ({result.records} records verified before it, "
            f"stream {cfg.audit_stream})",
            highlight=False,
            soft_wrap=True,
        )
    if not result.ok:
        raise typer.Exit(EXIT_REFUSED)


@program_audit_app.command("export")
def audit_export(
    *,
    start_text: FromOpt = "-24h",
    end_text: ToOpt = "now",
    config: ProgramConfigOpt = DEFAULT_PROGRAM_CONFIG,
    fmt: Annotated[Literal["csv", "json"], typer.Option("--format", help="csv or json.")] = "json",
    out_path: Annotated[
        Path | None, typer.Option("--out", help="json: a file. csv: a .zip file, or a directory. Default: stdout.")
    ] = None,
    timeout: NatsTimeoutOpt = 5.0,
) -> None:
    """The coordinator's audit records over [--from, --to) (program commands, allocations, re-dispatches,
    compliance), with the whole chain's verdict, for a regulator."""
    from hashflex.agent.cli.audit import export_to_stdout, write_export  # noqa: PLC0415  (the agent's writers)
    from hashflex.agent.core import timefmt  # noqa: PLC0415
    from hashflex.coordinator.audit import export_files, record_from_dict, verify_stored  # noqa: PLC0415

    now = time.time()
    try:
        start, end = parse_when(start_text, now), parse_when(end_text, now)
    except ValueError as exc:
        fail(str(exc), EXIT_REFUSED)
    if not end > start:
        fail(f"--to ({timefmt.iso(end)}) must be after --from ({timefmt.iso(start)})", EXIT_REFUSED)
    cfg, last, stored = _chain(config, timeout, as_json=False)
    verdict = verify_stored(stored, expected_last_seq=last)
    records = []
    for _, doc in stored:
        try:
            record = record_from_dict(doc or {})
        except ValueError:
            continue  # named by the verdict; an export still carries every readable record
        if start <= record.ts < end:
            records.append(record)
    meta = {
        "program": cfg.program_id,
        "stream": cfg.audit_stream,
        "from": timefmt.iso(start),
        "to": timefmt.iso(end),
        "generated_at": timefmt.iso(now),
        "chain": verdict.to_dict(),
    }
    files = export_files(records, meta, fmt)
    if out_path is None:
        export_to_stdout(files)
    else:
        try:
            written = write_export(files, out_path, fmt)
        except OSError as exc:
            fail(f"cannot write {out_path}: {exc.strerror or exc}", EXIT_UNAVAILABLE)
        err.print(
            f"exported {len(records)} record(s) {timefmt.iso(start)} .. {timefmt.iso(end)} to {written}",
            highlight=False,
        )
    if not verdict.ok:
        err.print(
            f"[bold red]warning:[/] the chain is broken at record {verdict.broken_seq}: {escape(verdict.reason or '')}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_REFUSED)


program_app.command("export", help="The same as `program audit export`.")(audit_export)


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
            highlight=False,
            soft_wrap=True,
        )
        for s in sites:
            failure = f"  {s['failure']}: {s.get('reason')}" if s.get("failure") else ""
            out.print(
                f"  {s.get('site'):<16} share {_kw(s.get('share_w')):>10}  present {_kw(s.get('present_w')):>10}"
                f"  counted {_kw(s.get('counted_w')):>10}  rev {s.get('rev')}{failure}",
                highlight=False,
                soft_wrap=True,
            )
    for alarm in doc.get("alarms") or []:
        err.print(f"[bold red]alarm:[/] {escape(str(alarm))}", highlight=False, soft_wrap=True)


def register(root: typer.Typer) -> None:
    root.add_typer(coordinator_app, name="coordinator")
    root.add_typer(program_app, name="program")
