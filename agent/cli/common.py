"""What every CLI command shares: the --config and --json options, output, and errors.

`--json` writes exactly one JSON document to stdout; human messages go to stderr; any refused or failed
command exits non-zero with a message that says what to do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from hashflex.agent.cli.render import SoftConsole
from hashflex.agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Site config file.", envvar="HASHFLEX_CONFIG")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write one JSON document to stdout.")]
WideOpt = Annotated[
    bool, typer.Option("--wide", "-w", help="Show every column and cell in full, however wide the terminal.")
]
DEFAULT_CONFIG = DEFAULT_CONFIG_PATH

out = SoftConsole()  # piped, a line is never wrapped (agent.cli.render.SoftConsole)
err = SoftConsole(stderr=True)

EXIT_REFUSED = 1  # the agent or the input said no
EXIT_UNAVAILABLE = 2  # no agent, bad config, unreachable


def fail(message: str, code: int = EXIT_REFUSED, *, as_json: bool = False, data: Any = None) -> NoReturn:
    if as_json:
        emit_json({"status": "error", "error": message, **({"data": data} if data is not None else {})})
    # soft_wrap: one line in a pipe or the journal; escape: a message may quote YAML such as `[keys/grid.pub]`
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def config_or_exit(path: Path, *, as_json: bool = False) -> AgentConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc), EXIT_UNAVAILABLE, as_json=as_json)
