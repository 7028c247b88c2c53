"""Torch's CPU threads for one analysis: fewer when other work already keeps the cores busy.

Oversubscribed OpenMP threads (torch's threads plus other processes' work on more runnable
threads than cores) make every product several to 30 times slower, and so unpredictable that no
budget can price it: ``benchmarks/budget_load.py`` measured a MobileViT analysis at 1.19x its
budget with train mode's headlines missing at 2 threads beside two busy processes, and 0.90x with
every headline at 1 thread. :func:`fitting_threads` therefore lowers torch's intra-op threads to
the cores left free (never raising them) for the analysis and restores the caller's count on exit,
also on error.

The cores left free are read from the kernel's count of runnable threads (the fourth field of
``/proc/loadavg``, ``running/total``, sampled a few times; this process's own sampling thread
excluded), not the load average, which lags by a minute. Where ``/proc/loadavg`` does not exist
the count is left as it is.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Iterator

import torch

LOADAVG = "/proc/loadavg"
SAMPLES, INTERVAL = 5, 0.01  # seconds between samples of the runnable count


def busy_elsewhere(samples: int = SAMPLES, interval: float = INTERVAL) -> int | None:
    """Runnable threads besides this one (median of ``samples`` reads of ``/proc/loadavg``), or
    ``None`` where the file does not exist."""
    counts = []
    for i in range(samples):
        try:
            with open(LOADAVG) as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)  # this thread, reading
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)))


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def fitting_threads(enabled: bool = True) -> Iterator[dict]:
    """Within the block torch uses ``max(1, min(threads, cores - busy))`` intra-op threads (the
    caller's ``threads`` otherwise); yields ``{"threads", "default", "busy", "cores"}`` (``busy``:
    runnable threads elsewhere when the block began, ``None`` not read). The caller's thread count
    is restored on exit."""
    default = torch.get_num_threads()
    busy = busy_elsewhere() if enabled else None
    chosen = default if busy is None else max(1, min(default, cores() - busy))
    if chosen != default:
        torch.set_num_threads(chosen)
    try:
        yield {"threads": chosen, "default": default, "busy": busy, "cores": cores()}
    finally:
        if torch.get_num_threads() != default:
            torch.set_num_threads(default)
