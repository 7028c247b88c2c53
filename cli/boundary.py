"""The command-line boundary: errors, interrupts and warnings become one stderr line each.

Exit codes: 0 done (warnings, such as an analyzer that failed, are one ``normscope: warning:``
line each); 1 an error of the input or the output (one ``normscope: error:`` line); 2 a usage
error or an internal error (a bug: ``--debug`` shows the traceback); 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).

:func:`check_launch_environment` checks the launcher's variables (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) inside the boundary of a
command that launches (``analyze``), so a bad value is one line. Every line is :func:`printable`:
control characters in paths and names (ESC, BEL, bidirectional overrides) are shown as ``\\xNN``
escapes instead of reaching the terminal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import typer

from normscope.checkpoint import first_line
from normscope.errors import InvalidArgumentError, NormscopeError, NormscopeWarning

EXIT_ERROR = 1
EXIT_INTERNAL = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
LAUNCH_MINIMUM = {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}
PORTS = (1, 65535)


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


def printable(text: str) -> str:
    """``text`` with every character that is not printable (C0 and C1 controls such as ESC and
    BEL, DEL, bidirectional overrides, line separators) written as its Python escape."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(message: str) -> str:
    """``message`` on one line: whitespace runs (newlines, tabs) become one space, the rest :func:`printable`."""
    return printable(" ".join(str(message).split()))


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``normscope: MESSAGE`` as one line on stderr and return the exit to raise."""
    typer.echo("normscope: " + one_line(message), err=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """Print ``normscope: warning: MESSAGE`` as one line on stderr."""
    typer.echo("normscope: warning: " + one_line(message), err=True)


def check_launch_environment() -> None:
    """Refuse launcher variables torch would choke on: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE`` must be integers at least :data:`LAUNCH_MINIMUM`; with ``WORLD_SIZE`` > 1,
    ``RANK`` below it and ``MASTER_ADDR`` and ``MASTER_PORT`` set (as ``torchrun`` does).

    Raises:
        InvalidArgumentError: one line naming the variable and its value.
    """
    values = {}
    for name, minimum in LAUNCH_MINIMUM.items():
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise InvalidArgumentError(f"environment variable {name}={text!r} is not an integer; unset it or launch with torchrun") from None
        if values[name] < minimum:
            raise InvalidArgumentError(f"environment variable {name}={text!r} is below {minimum}; unset it or launch with torchrun")
    world = values.get("WORLD_SIZE", 1)
    if world == 1:
        return
    if values.get("RANK", 0) >= world:
        raise InvalidArgumentError(f"environment variable RANK={values['RANK']} is not below WORLD_SIZE={world}; launch with torchrun")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise InvalidArgumentError(f"WORLD_SIZE={world} but {name} is not set; launch with torchrun, or unset WORLD_SIZE")
    port = os.environ["MASTER_PORT"]
    if not port.isdigit() or not PORTS[0] <= int(port) <= PORTS[1]:
        raise InvalidArgumentError(f"environment variable MASTER_PORT={port!r} is not a port number (1-65535); launch with torchrun")


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
