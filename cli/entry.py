"""The ``normscope`` console script. Importing torch takes seconds; Ctrl-C (or SIGTERM) during
those imports ends with one line and exit code 130 (143) instead of a traceback.

A ``KeyboardInterrupt`` raised inside a library's import can leave that library half-initialised,
and the import then fails with some other exception (NumPy raises ``AttributeError``). So the
interrupt is remembered by the handler itself, and whatever the import raises after it is the
interrupt's doing.
"""

from __future__ import annotations

import signal
import sys


class _StartUp:
    """Signal handlers for the imports: they remember which signal arrived, then stop the import."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def interrupt(self, signum: int, frame: object) -> None:
        self.signal = signal.SIGINT
        raise KeyboardInterrupt

    def terminate(self, signum: int, frame: object) -> None:
        self.signal = signal.SIGTERM
        raise SystemExit(143)


def main() -> None:
    """Import the app, containing an interrupt during the imports, then run it."""
    start_up = _StartUp()
    signal.signal(signal.SIGINT, start_up.interrupt)
    signal.signal(signal.SIGTERM, start_up.terminate)
    try:
        from normscope.cli.app import main as run
    except BaseException:
        if start_up.signal == signal.SIGINT:
            sys.stderr.write("normscope: interrupted; nothing was written\n")
            raise SystemExit(130) from None
        if start_up.signal == signal.SIGTERM:
            sys.stderr.write("normscope: terminated; nothing was written\n")
            raise SystemExit(143) from None
        raise
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run()


if __name__ == "__main__":
    main()
