"""The command-line boundary: errors and interrupts become one stderr line and an exit code."""

from __future__ import annotations

import contextlib
from typing import Iterator

import typer

from normscope.checkpoint import first_line
from normscope.errors import NormscopeError

EXIT_ERROR = 1
EXIT_INTERNAL = 2
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``normscope: MESSAGE`` as one line on stderr and return the exit to raise."""
    typer.echo("normscope: " + " ".join(message.split()), err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def boundary(debug: bool) -> Iterator[None]:
    """Turn errors and interrupts inside a command into one stderr line and an exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except NormscopeError as error:
        if debug:
            raise
        raise fail(f"error: {error}") from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise fail("interrupted; nothing was written", EXIT_INTERRUPTED) from None
    except Exception as error:
        if debug:
            raise
        raise fail(
            f"internal error ({type(error).__name__}: {first_line(error)}); rerun with --debug for the traceback",
            EXIT_INTERNAL,
        ) from None
