"""The `hashflex` command. One line per command group below: greppable, no import magic."""

from __future__ import annotations

import typer

from agent import __version__

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


app.command("discover")(__import__("agent.cli.discover", fromlist=["discover"]).discover)
__import__("agent.cli.keys", fromlist=["register"]).register(app)  # keygen, sign (grid side)


# operator commands over the control socket, config and service set-up (ops)
__import__("agent.cli.status", fromlist=["register"]).register(app)  # status, watch
__import__("agent.cli.miners", fromlist=["register"]).register(app)  # miners
__import__("agent.cli.override", fromlist=["register"]).register(app)  # curtail, resume, cap
__import__("agent.cli.dispatches", fromlist=["register"]).register(app)  # dispatches, preview
__import__("agent.cli.logs", fromlist=["register"]).register(app)  # logs
__import__("agent.cli.config", fromlist=["register"]).register(app)  # config check|dump
__import__("agent.cli.service", fromlist=["register"]).register(app)  # install-service

__import__("agent.cli.run", fromlist=["register"]).register(app)  # run, agent run (the agent itself)
__import__("agent.cli.audit", fromlist=["register"]).register(app)  # audit verify|export, energy (store)
__import__("sim.typer_command", fromlist=["register"]).register(app)  # sim (the simulated site; sim/ owns it)
__import__("sim.demo", fromlist=["register"]).register(app)  # demo (simulated site + agent + scenario; sim/demo.py)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
