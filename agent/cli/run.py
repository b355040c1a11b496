"""`hashflex run --config FILE` (also `hashflex agent run`): run the site agent in the foreground.

systemd runs it as a `Type=notify` service; on a shell it logs to stdout until Ctrl-C. A config that cannot be
used exits with status 2 before any miner is contacted.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from hashflex.agent.cli.common import DEFAULT_CONFIG, EXIT_UNAVAILABLE, ConfigOpt, config_or_exit, err, fail
from hashflex.agent.config import ConfigError

TimeScaleOpt = Annotated[
    float | None,
    typer.Option(
        "--time-scale",
        help="SIMULATION ONLY: run the agent's clock K times faster (match the simulator's --speed K). "
        "Refused unless every miner address is a loopback address.",
        min=0.001,
    ),
]


TimeOriginOpt = Annotated[
    float | None,
    typer.Option(
        "--time-origin",
        help="SIMULATION ONLY: epoch seconds from which the scaled clock counts (default: now). Give every "
        "restart of one scaled run the same origin so they share one timeline.",
        hidden=True,
    ),
]


def run(config: ConfigOpt = DEFAULT_CONFIG, time_scale: TimeScaleOpt = None, time_origin: TimeOriginOpt = None) -> None:
    """Run the agent: read the fleet, follow the grid and the cap, serve the CLI socket and MQTT."""
    from hashflex.agent import app as agent_app  # noqa: PLC0415  (keeps pyasic and friends out of other commands)
    from hashflex.agent.io.control_socket import ControlSocketError  # noqa: PLC0415
    from hashflex.agent.io.store import StoreError  # noqa: PLC0415
    from hashflex.agent.preflight import PreflightError  # noqa: PLC0415

    cfg = config_or_exit(config)
    try:
        code = agent_app.run(cfg, time_scale=time_scale, time_origin=time_origin)
    except PreflightError as exc:  # one line per problem, as `hashflex config check` prints them
        for line in exc.errors:
            err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except (ConfigError, ControlSocketError, StoreError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    raise typer.Exit(code)


agent_group = typer.Typer(help="The site agent itself.", no_args_is_help=True)
agent_group.command("run")(run)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.add_typer(agent_group, name="agent")
