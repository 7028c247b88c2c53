"""The ``normscope`` command: one Typer app, one module per command.

Errors raised on purpose (:class:`normscope.errors.NormscopeError`) and interrupts end a command
with one line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from normscope.cli.analyze import analyze
from normscope.cli.boundary import fail
from normscope.cli.compare import compare
from normscope.cli.recalibrate import recalibrate
from normscope.cli.report import report
from normscope.cli.sites import sites
from normscope.cli.train import train
from normscope.errors import NormscopeError

app = typer.Typer(
    name="normscope",
    help="Diagnostics for the normalization layers of PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("analyze")(analyze)
app.command("sites")(sites)
app.command("report")(report)
app.command("compare")(compare)
app.command("recalibrate")(recalibrate)
app.command("train")(train)


def main() -> None:
    """Console-script entry point: run the app; errors from any command end as one line."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(prog_name="normscope")
    except NormscopeError as error:
        if debug:
            raise
        raise SystemExit(fail(f"error: {error}").exit_code) from None


if __name__ == "__main__":
    main()
