"""The ``normscope`` console script. Importing torch takes seconds; Ctrl-C (or SIGTERM) during
those imports ends with one line and exit code 130 (143) instead of a traceback.

No exception may be raised from a signal handler during those imports: a ``KeyboardInterrupt``
raised inside a library's import leaves it half-initialised (NumPy then fails with
``AttributeError``), and one raised inside a native callback aborts the process (pybind11's
``terminate``). Nothing has been written before the app runs, so the handlers print the line and
end the process at once with ``os._exit``.

Everything after the imports runs inside an error boundary too: an exception that escapes the
app (none should: each command has its own boundary) is one line and exit code 2, unless
``--debug`` is given.
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_during_start_up(signum: int, frame: object) -> None:
    code, word = (130, "interrupted") if signum == signal.SIGINT else (143, "terminated")
    os.write(2, f"normscope: {word}; nothing was written\n".encode())
    os._exit(code)


def main() -> None:
    """Import the app with start-up signal handlers, restore Python's, then run it."""
    signal.signal(signal.SIGINT, _exit_during_start_up)
    signal.signal(signal.SIGTERM, _exit_during_start_up)
    from normscope.cli.app import main as run

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        run()
    except Exception as error:
        if "--debug" in sys.argv[1:]:
            raise
        from normscope.checkpoint import first_line
        from normscope.cli.boundary import EXIT_INTERNAL, fail

        raise SystemExit(fail(f"internal error ({type(error).__name__}: {first_line(error)}); rerun with --debug for the traceback",
                              EXIT_INTERNAL).exit_code) from None


if __name__ == "__main__":
    main()
