"""The command-line boundary: errors, interrupts and warnings become one stderr line each.

Exit codes: 0 done (warnings, such as an analyzer that failed, are one ``normscope: warning:``
line each); 1 an error of the input or the output (one ``normscope: error:`` line); 2 a usage
error or an internal error (a bug: ``--debug`` shows the traceback); 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import typer

from normscope.checkpoint import first_line
from normscope.errors import NormscopeError, NormscopeWarning

EXIT_ERROR = 1
EXIT_INTERNAL = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that clean-up (staging folders) runs as for Ctrl-C."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises :class:`Terminated`; SIGINT keeps Python's ``KeyboardInterrupt``."""
    signal.signal(signal.SIGTERM, raise_terminated)


@dataclass
class Outcome:
    """What a command has finished so far: ``written`` is the output once it is complete."""

    written: Path | None = None


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``normscope: MESSAGE`` as one line on stderr and return the exit to raise."""
    typer.echo("normscope: " + " ".join(message.split()), err=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """Print ``normscope: warning: MESSAGE`` as one line on stderr."""
    typer.echo("normscope: warning: " + " ".join(str(message).split()), err=True)


@contextlib.contextmanager
def own_warnings_only(debug: bool) -> Iterator[None]:
    """Library warnings (NumPy, torch, matplotlib ...) are silenced, unless ``debug``;
    normscope's own warnings are printed as one line each."""
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
        warnings.simplefilter("always", NormscopeWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, NormscopeWarning):
                warn(str(message))
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous


def interrupted(outcome: Outcome, code: int) -> typer.Exit:
    """The one line for an interrupt: nothing written, or the complete output and where."""
    what = "terminated" if code == EXIT_TERMINATED else "interrupted"
    if outcome.written is not None:
        return fail(f"{what}; the output is complete in {outcome.written}", code)
    return fail(f"{what}; nothing was written", code)


@contextlib.contextmanager
def boundary(debug: bool) -> Iterator[Outcome]:
    """Turn errors and interrupts inside a command into one stderr line and an exit code."""
    outcome = Outcome()
    try:
        with own_warnings_only(debug):
            yield outcome
    except (typer.Exit, typer.Abort):
        raise
    except NormscopeError as error:
        if debug:
            raise
        raise fail(f"error: {error}") from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise interrupted(outcome, EXIT_INTERRUPTED) from None
    except Terminated:
        if debug:
            raise
        raise interrupted(outcome, EXIT_TERMINATED) from None
    except Exception as error:
        if debug:
            raise
        raise fail(
            f"internal error ({type(error).__name__}: {first_line(error)}); rerun with --debug for the traceback",
            EXIT_INTERNAL,
        ) from None
