"""The ``normscope`` console script. Importing torch takes seconds; Ctrl-C (or SIGTERM) during
those imports ends with one line and exit code 130 (143) instead of a traceback."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Import the app, containing an interrupt during the imports, then run it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(SystemExit(143)))
    try:
        from normscope.cli.app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("normscope: interrupted; nothing was written\n")
        raise SystemExit(130) from None
    except SystemExit as stop:
        if stop.code == 143:
            sys.stderr.write("normscope: terminated; nothing was written\n")
        raise
    run()


if __name__ == "__main__":
    main()
