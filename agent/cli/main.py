"""The `hashflex` command. One line per command group below: greppable, no import magic."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from hashflex.agent import __version__
from hashflex.agent.cli import (
    audit,
    config,
    coordinator,
    discover,
    dispatches,
    keys,
    logs,
    miners,
    override,
    run,
    service,
    status,
)
from hashflex.agent.core.units import join_unit_words

try:
    from typer._click.exceptions import ClickException  # newer typer carries its own copy of click
except ImportError:  # pragma: no cover - older typer depends on click itself
    from click.exceptions import ClickException  # type: ignore[import-not-found,no-redef]


class HashflexGroup(TyperGroup):
    """The root command, as typer's, but: a number and its unit typed apart (`--to 12 MW`) are one value, and a bad
    argument is one line on stderr that says what is wrong, not a usage block and a framed box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        words = join_unit_words(list(sys.argv[1:] if args is None else args))
        if not standalone_mode:
            return super().main(words, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        try:
            code = super().main(words, prog_name, complete_var, False, windows_expand_args, **extra)
        except ClickException as exc:
            _usage_error(exc)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: ClickException) -> NoReturn:
    if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
        ctx = getattr(exc, "ctx", None)
        hint = f" (`{ctx.command_path} --help` lists what it takes)" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
    sys.exit(exc.exit_code)


app = typer.Typer(
    cls=HashflexGroup,
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
coordinator.register(app)  # coordinator run|check, program status (the coordinator is imported lazily)
# the simulated site and the demo live in sim/, a separate world: imported only when one of them runs (never by
# `hashflex run` on a site gateway); each hands its arguments to its own argparse CLI
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("sim", add_help_option=False, context_settings=PASS_THROUGH)
def sim(ctx: typer.Context) -> None:
    """Run the simulated mining site (options as `python -m hashflex.sim`; `hashflex sim --help` lists them)."""
    from hashflex.sim.cli import main as sim_main  # noqa: PLC0415

    raise typer.Exit(sim_main(list(ctx.args)))


@app.command("demo", add_help_option=False, context_settings=PASS_THROUGH)
def demo(ctx: typer.Context) -> None:
    """Run the demo: a simulated site, the agent, a grid scenario, a plot (`hashflex demo --help` for options)."""
    from hashflex.sim.demo import main as demo_main  # noqa: PLC0415

    raise typer.Exit(demo_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
