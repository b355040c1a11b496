"""`hashflex config check` (the unit's ExecStartPre) and `hashflex config dump` (effective config, redacted).

`check` goes past validation (evcc's check_config) with the same checks `hashflex run` starts with
(`agent.preflight`): every file the config names must exist and parse, the socket's group must exist, the metrics
port must be free, the state and socket folders must be usable. Problems are errors (exit 1); things that will
sort themselves out (a state folder not created yet) are warnings. `dump` prints every setting with its default
filled in, plus the paths derived from them; secrets (credentials, passwords) show as `***`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from rich.markup import escape

from hashflex.agent.cli.common import (
    DEFAULT_CONFIG,
    EXIT_REFUSED,
    ConfigOpt,
    JsonOpt,
    config_or_exit,
    emit_json,
    err,
    out,
)
from hashflex.agent.config import AgentConfig, ConfigError, load_config
from hashflex.agent.core.addresses import expand
from hashflex.agent.logging import REDACTED, is_secret_name
from hashflex.agent.preflight import preflight

app = typer.Typer(help="Check or show the site config.", no_args_is_help=True)


def summary(cfg: AgentConfig) -> dict[str, Any]:
    return {
        "site_id": cfg.site.id,
        "cap_kw": cfg.site.cap_kw,
        "addresses": len(expand(cfg.miners.addresses)),
        "mqtt": ", ".join(f"{h}:{p}" for h, p in cfg.mqtt.endpoints()) if cfg.mqtt.enabled else "disabled",
        "grid_keys": len(cfg.grid.public_keys),
        "state_dir": str(cfg.state_path),
        "socket": str(cfg.socket_path),
        "metrics": f"{cfg.metrics.host}:{cfg.metrics.port}" if cfg.metrics.enabled else "disabled",
    }


@app.command("check")
def check(config: ConfigOpt = DEFAULT_CONFIG, as_json: JsonOpt = False) -> None:
    """Validate the config and every file it names; exit 1 on any error (the service runs this first)."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        if as_json:
            emit_json({"ok": False, "config": str(config), "errors": str(exc).splitlines(), "warnings": []})
        # soft_wrap: each problem stays one line in the journal (ExecStartPre) and in a pipe, whatever the width
        err.print(f"[bold red]config error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED) from None
    findings = preflight(cfg)
    ok = not findings.errors
    if as_json:
        emit_json(
            {
                "ok": ok,
                "config": str(config),
                "errors": findings.errors,
                "warnings": findings.warnings,
                "summary": summary(cfg),
            }
        )
    else:
        for message in findings.errors:  # the same lines `hashflex run` refuses with (agent.preflight)
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        for message in findings.warnings:
            err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
        if ok:
            s = summary(cfg)
            err.print(
                f"config OK: {config} — site {s['site_id']}, cap {s['cap_kw']} kW, {s['addresses']} addresses, "
                f"MQTT {s['mqtt']}, {s['grid_keys']} grid key(s), socket {s['socket']}",
                highlight=False,
            )
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


def redact_config(value: Any) -> Any:
    """Secret-named values become `***`; paths stay (a key *file* is not the key), as do empty values."""
    if isinstance(value, dict):
        return {
            k: REDACTED
            if is_secret_name(str(k)) and v not in (None, [], {}) and not isinstance(v, Path)
            else redact_config(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_config(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def effective(cfg: AgentConfig) -> dict[str, Any]:
    doc: dict[str, Any] = redact_config(cfg.model_dump(mode="python", exclude={"source"}))
    derived: dict[str, Any] = {
        "config_file": str(cfg.source) if cfg.source else None,
        "state_dir": str(cfg.state_path),
        "db_path": str(cfg.db_path),
        "socket_path": str(cfg.socket_path),
        "mqtt_root": cfg.mqtt_root,
        "addresses": len(expand(cfg.miners.addresses)),
    }
    try:
        derived["miner_credentials"] = dict.fromkeys(sorted(cfg.credentials()), REDACTED)
    except (OSError, ConfigError) as exc:
        derived["miner_credentials"] = f"unreadable: {exc}"
    try:
        derived["mqtt_password"] = REDACTED if cfg.mqtt_password() else None
    except OSError as exc:
        derived["mqtt_password"] = f"unreadable: {exc.strerror}"
    doc["derived"] = derived
    return doc


@app.command("dump")
def dump(config: ConfigOpt = DEFAULT_CONFIG, as_json: JsonOpt = False) -> None:
    """Print the effective config (defaults filled in, derived paths added), secrets redacted."""
    cfg = config_or_exit(config, as_json=as_json)
    doc = effective(cfg)
    if as_json:
        emit_json(doc)
        return
    out.print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), markup=False, highlight=False, end="")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="config")
