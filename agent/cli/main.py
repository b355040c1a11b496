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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
