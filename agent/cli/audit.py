"""`hashflex audit verify|export` and `hashflex energy`: read the state database directly, agent running or not.

- `audit verify` checks the file, the hash chain, the energy the chain pins and the signed daily heads; it names
  the first broken record and exits non-zero when anything is wrong.
- `audit export` writes what a regulator asks for over a time range (see agent/io/export.py). Only an export
  written to --out counts towards the export watermark that lets old data be pruned.
- `energy` prints site (or per-miner) kWh per period: measured vs estimated, time under curtailment, energy not
  drawn because of dispatch.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console

from hashflex.agent.cli import render as r
from hashflex.agent.cli.common import (
    DEFAULT_CONFIG,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    ConfigOpt,
    JsonOpt,
    WideOpt,
    config_or_exit,
    emit_json,
    err,
    fail,
)
from hashflex.agent.config import AgentConfig
from hashflex.agent.core import timefmt
from hashflex.agent.core.energy import DAY_S, HOUR_S, MINUTE_S, QUARTER_S, EnergyPeriod
from hashflex.agent.io import export as exp
from hashflex.agent.io.store import Store, StoreError, verify_database
from hashflex.contract import signing
from hashflex.contract.units import parse_duration_s

audit_app = typer.Typer(help="Verify and export the audit trail.", no_args_is_help=True)

FromOpt = Annotated[
    str,
    typer.Option(
        "--from",
        help="Start: ISO date/time (UTC unless an offset is given), "
        "epoch seconds, now, today, yesterday, or -24h style.",
    ),
]
ToOpt = Annotated[str, typer.Option("--to", help="End (exclusive), same forms as --from.")]
STEPS = {"1m": MINUTE_S, "15m": QUARTER_S, "1h": HOUR_S, "day": DAY_S}


def parse_when(text: str, now: float) -> float:
    """Epoch seconds from what a person types; ValueError with the accepted forms otherwise."""
    value = text.strip().lower()
    midnight = float(int(now // DAY_S) * DAY_S)
    if value == "now":
        return now
    if value == "today":
        return midnight
    if value == "yesterday":
        return midnight - DAY_S
    if value.startswith("-"):
        return now - parse_duration_s(value[1:])
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use 2025-01-31, 2025-01-31T12:00, 2025-01-31T12:00+05:00, epoch seconds, "
            "now, today, yesterday, or -24h)"
        ) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=datetime.UTC)).timestamp()


def _range(start_text: str, end_text: str, *, as_json: bool) -> tuple[float, float]:
    now = time.time()
    try:
        start, end = parse_when(start_text, now), parse_when(end_text, now)
    except ValueError as exc:
        fail(str(exc), EXIT_REFUSED, as_json=as_json)
    if not end > start:
        fail(f"--to ({timefmt.iso(end)}) must be after --from ({timefmt.iso(start)})", EXIT_REFUSED, as_json=as_json)
    return start, end


def _public_keys(cfg: AgentConfig, paths: list[Path] | None, *, as_json: bool) -> list[Ed25519PublicKey] | None:
    """Keys to check signed heads with: the ones given, else the site key's public half, else none."""
    try:
        if paths:
            return [signing.load_public_key(p) for p in paths]
        if cfg.audit.signing_key is not None:
            key_path = cfg.resolve(cfg.audit.signing_key)
            if key_path.exists():
                return [signing.load_private_key(key_path).public_key()]
    except (OSError, ValueError) as exc:
        fail(f"cannot load a public key: {exc}", EXIT_UNAVAILABLE, as_json=as_json)
    return None


def _open(cfg: AgentConfig, *, as_json: bool) -> Store:
    try:
        return Store.open(cfg.db_path, create=False, retention_days=cfg.audit.retention_days)
    except StoreError as exc:
        fail(f"{exc} (try `hashflex audit verify` for details)", EXIT_UNAVAILABLE, as_json=as_json)


# ---------------------------------------------------------------------------------------------- verify
@audit_app.command("verify")
def verify(
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    public_key: Annotated[
        list[Path] | None,
        typer.Option("--public-key", help="Check signed daily heads with this key (default: the site key's)."),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Skip SQLite's check of the bulky per-miner table.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check the audit chain; report the first broken record and exit non-zero if anything is wrong."""
    cfg = config_or_exit(config, as_json=as_json)
    keys = _public_keys(cfg, public_key, as_json=as_json)
    result = verify_database(cfg.db_path, keys, full_check=not quick)
    if as_json:
        emit_json({"status": "ok" if result.ok else "error", "db": str(cfg.db_path), **result.to_dict()})
    else:
        where = f"records {result.first_seq}..{result.last_seq}" if result.records else "no records"
        if result.ok:
            signed = f", {result.heads_checked} signed daily head(s)" if result.heads_checked else ""
            sig_note = "" if keys is not None or not result.heads_checked else " (signatures not checked: no key)"
            typer.echo(f"audit chain OK: {result.records} records ({where}){signed}{sig_note}; head {result.head_hash}")
        else:
            err.print(
                f"[bold red]audit chain BROKEN[/] at record {result.broken_seq}: {result.reason}", highlight=False
            )
            for problem in result.problems:
                err.print(f"  also: {problem}", highlight=False)
            err.print(f"  {result.records} records verified before it ({where})", highlight=False)
    if not result.ok:
        raise typer.Exit(EXIT_REFUSED)


# ---------------------------------------------------------------------------------------------- export
@audit_app.command("export")
def export(
    *,
    start_text: FromOpt,
    end_text: ToOpt,
    config: ConfigOpt = DEFAULT_CONFIG,
    fmt: Annotated[Literal["csv", "json"], typer.Option("--format", help="csv or json.")] = "json",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="json: a file. csv: a .zip file, or a directory. Default: stdout."),
    ] = None,
    per_miner: Annotated[bool, typer.Option("--per-miner", help="Add per-miner energy per day.")] = False,
    public_key: Annotated[list[Path] | None, typer.Option("--public-key", help="Check signed heads.")] = None,
) -> None:
    """Audit records, dispatch compliance and energy rollups over [--from, --to), for a regulator."""
    cfg = config_or_exit(config)
    start, end = _range(start_text, end_text, as_json=False)
    keys = _public_keys(cfg, public_key, as_json=False)
    store = _open(cfg, as_json=False)
    try:
        now = time.time()
        files = store.export(start, end, fmt, now=now, site_id=cfg.site.id, per_miner=per_miner, public_keys=keys)
        if out is None:
            export_to_stdout(files)
            return
        try:
            written = write_export(files, out, fmt)
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror or exc}", EXIT_UNAVAILABLE)
        mark = store.mark_exported(start, end, fmt, exp.digest(files), now)
        err.print(
            f"exported {timefmt.iso(start)} .. {timefmt.iso(end)} to {written}; "
            f"export watermark now {timefmt.iso(mark)}",
            highlight=False,
        )
    except StoreError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    finally:
        store.close()


def export_to_stdout(files: dict[str, bytes]) -> None:
    if len(files) == 1:
        typer.echo(next(iter(files.values())).decode(), nl=False)
        return
    for name, body in files.items():
        typer.echo(f"# {name}")
        typer.echo(body.decode())


def write_export(files: dict[str, bytes], out: Path, fmt: str) -> Path:
    """Write atomically enough for a regulator: to a temporary file, then rename over the target.

    The temporary file is created exclusively under a random name (mkstemp: O_CREAT|O_EXCL, never through a
    symlink someone planted in the folder), and the rename replaces a symlink at the target rather than writing
    through it."""
    if fmt == "json":
        _replace_atomically(out, lambda f: f.write(next(iter(files.values()))))
        return out
    if out.suffix == ".zip":

        def write_zip(f: BinaryIO) -> None:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                for name, body in files.items():
                    z.writestr(name, body)

        _replace_atomically(out, write_zip)
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        _replace_atomically(out / name, lambda f, b=body: f.write(b))  # type: ignore[misc]
    return out


def _replace_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # an export is meant to be handed on: not mkstemp's owner-only mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- energy
_SITE_COLUMNS = ("start (UTC)", "kWh", "measured", "estimated", "coverage", "curtailed", "not drawn kWh", "peak")
_MINER_COLUMNS = ("miner", "kWh", "estimated kWh", "minutes")
# on a narrow terminal: the period and its energy always, then the rest in this order (--wide: all)
_SITE_PRIORITY = {
    "start (UTC)": 0,
    "kWh": 0,
    "peak": 1,
    "curtailed": 2,
    "not drawn kWh": 3,
    "coverage": 4,
    "measured": 5,
    "estimated": 6,
}


def energy(
    *,
    config: ConfigOpt = DEFAULT_CONFIG,
    start_text: Annotated[str, typer.Option("--from", help="Start (see `audit export --help`).")] = "-24h",
    end_text: Annotated[str, typer.Option("--to", help="End (exclusive).")] = "now",
    per: Annotated[Literal["site", "miner"], typer.Option("--per", help="site (default) or miner.")] = "site",
    step: Annotated[
        Literal["1m", "15m", "1h", "day", "auto"], typer.Option("--step", help="Rows per period (site).")
    ] = "auto",
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Energy drawn over [--from, --to): kWh, measured vs estimated, time curtailed, energy not drawn."""
    cfg = config_or_exit(config, as_json=as_json)
    start, end = _range(start_text, end_text, as_json=as_json)
    store = _open(cfg, as_json=as_json)
    try:
        if per == "miner":
            miners = store.energy_per_miner(start, end).get(int(start), {})
            _print_miners(miners, start, end, as_json=as_json)
            return
        period = STEPS[step] if step != "auto" else (QUARTER_S if end - start <= 2 * DAY_S else DAY_S)
        periods = store.energy_rollup(start, end, period)
        whole = store.energy_total(start, end)
    except StoreError as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json)
    finally:
        store.close()
    if as_json:
        emit_json(
            {
                "from": start,
                "to": end,
                "step_s": period,
                "periods": [p.to_dict() for p in periods],
                "total": whole.to_dict(),
            }
        )
        return
    if not periods:
        err.print(f"no energy recorded between {timefmt.iso(start)} and {timefmt.iso(end)}", highlight=False)
        return
    rows = [_site_row(p) for p in periods]
    rows.append(["total", *_site_row(whole)[1:]])
    r.print_table(Console(), _SITE_COLUMNS, rows, right=_SITE_COLUMNS[1:], priority=_SITE_PRIORITY, wide=wide)


def _site_row(p: EnergyPeriod) -> list[str]:
    start = datetime.datetime.fromtimestamp(p.start, datetime.UTC).strftime("%Y-%m-%d %H:%M")
    return [
        start,
        f"{p.kwh:,.3f}",
        f"{p.measured_kwh:,.3f}",
        f"{p.estimated_kwh:,.3f}",
        f"{p.coverage * 100:.0f}%",
        f"{p.curtailed_share * 100:.0f}%",
        f"{p.not_drawn_kwh:,.3f}",
        r.kw(p.peak_kw),
    ]


def _print_miners(miners: dict[str, Any], start: float, end: float, *, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "from": start,
                "to": end,
                "miners": {
                    ip: {"kwh": t.kwh, "estimated_kwh": t.estimated_kwh, "minutes": t.minutes}
                    for ip, t in sorted(miners.items())
                },
            }
        )
        return
    if not miners:
        err.print(f"no per-miner energy recorded between {timefmt.iso(start)} and {timefmt.iso(end)}", highlight=False)
        return
    rows = [[ip, f"{t.kwh:,.4f}", f"{t.estimated_kwh:,.4f}", str(t.minutes)] for ip, t in sorted(miners.items())]
    r.print_table(Console(), _MINER_COLUMNS, rows, right=_MINER_COLUMNS[1:])


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.command("energy")(energy)
