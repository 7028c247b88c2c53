"""The ``normscope`` command: one Typer app, one module per command.

Errors raised on purpose (:class:`normscope.errors.NormscopeError`), usage errors and interrupts
end a command with one line on stderr and a non-zero exit code (see :mod:`normscope.cli.boundary`);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

import normscope
from normscope.cli.analyze import analyze
from normscope.cli.boundary import EXIT_INTERNAL, EXIT_INTERRUPTED, fail, install_signal_handlers
from normscope.cli.compare import compare
from normscope.cli.recalibrate import recalibrate
from normscope.cli.report import report
from normscope.cli.sites import sites
from normscope.cli.train import train
from normscope.errors import NormscopeError

try:  # recent Typer vendors Click as typer._click; older Typer uses Click itself
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click


class HelpAsFlag:
    """``--help`` shown as a flag, like the commands' own flags (no ``<bool>``)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class OneLineErrors(HelpAsFlag, TyperGroup):
    """The app's group: a usage error (bad option value, unknown option or command) is one line,
    ``normscope: usage error: ... (see normscope COMMAND --help)``, exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "normscope"
            message = error.format_message()
            code = fail(f"usage error: {message} (see {command} --help)", EXIT_INTERNAL).exit_code if message else EXIT_INTERNAL
        except click.ClickException as error:
            code = fail(f"error: {error.format_message()}", error.exit_code).exit_code
        except typer.Abort:
            code = fail("interrupted; nothing was written", EXIT_INTERRUPTED).exit_code
        code = code if isinstance(code, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


class FlagHelp(HelpAsFlag, TyperCommand):
    """A command whose ``--help`` is shown as a flag."""


app = typer.Typer(
    name="normscope",
    help="Diagnostics for the normalization layers of PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"normscope {normscope.__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.", metavar=""),
    ] = None,
) -> None:
    """Diagnostics for the normalization layers of PyTorch models."""


app.command("analyze", cls=FlagHelp)(analyze)
app.command("sites", cls=FlagHelp)(sites)
app.command("report", cls=FlagHelp)(report)
app.command("compare", cls=FlagHelp)(compare)
app.command("recalibrate", cls=FlagHelp)(recalibrate)
app.command("train", cls=FlagHelp)(train)


def main() -> None:
    """Console-script entry point: run the app; errors from any command end as one line."""
    install_signal_handlers()
    debug = "--debug" in sys.argv[1:]
    try:
        app(prog_name="normscope")
    except NormscopeError as error:
        if debug:
            raise
        raise SystemExit(fail(f"error: {error}").exit_code) from None


if __name__ == "__main__":
    main()
