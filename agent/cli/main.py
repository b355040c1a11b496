"""The `hashflex` command. One line per command group below: greppable, no import magic."""

from __future__ import annotations

import typer

import sim.demo
import sim.typer_command
from agent import __version__
from agent.cli import audit, config, discover, dispatches, keys, logs, miners, override, run, service, status

app = typer.Typer(
    name="hashflex",
    help="Make a Bitcoin-mining site a grid-dispatchable load.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Make a Bitcoin-mining site a grid-dispatchable load."""


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# the agent itself and the operator's commands over the control socket
run.register(app)  # run, agent run
status.register(app)  # status, watch
miners.register(app)  # miners
override.register(app)  # curtail, resume, cap
dispatches.register(app)  # dispatches, preview
logs.register(app)  # logs
# set-up and records (these work with the agent stopped)
app.command("discover")(discover.discover)  # discover CIDR…
config.register(app)  # config check|dump
service.register(app)  # install-service
audit.register(app)  # audit verify|export, energy
keys.register(app)  # keygen, sign (the grid side's tools)
# the simulated site and the demo live in sim/, a separate world the agent never imports at run time
sim.typer_command.register(app)  # sim
sim.demo.register(app)  # demo


def main() -> None:
    app()


if __name__ == "__main__":
    main()
