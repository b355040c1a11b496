"""`hashflex sim`: hands every argument to the simulator's own argparse CLI (sim/cli.py).

No `from __future__ import annotations` here: typer evaluates the annotations at registration time."""

import typer

from hashflex.sim.cli import main


def sim(ctx: typer.Context) -> None:
    """Run the simulated mining site (options as `python -m hashflex.sim`; `hashflex sim --help` lists them)."""
    raise typer.Exit(main(list(ctx.args)))


def register(app: typer.Typer) -> None:
    app.command("sim", add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(sim)
