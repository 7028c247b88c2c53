"""Mean ± std over seeds and the one rule that decides a winner: a difference counts only when it
exceeds the seeds' spread.

Used by ``normscope compare`` (the ``compare_stats`` table and its findings) and by the
reproduction harness ``benchmarks/papers.py`` (the verdicts of ``docs/reproductions.md``).
The spread of two variants is the sum of their sample standard deviations over seeds; a
difference in means larger than that is "beyond the spread". With one seed there is no spread
and no winner is declared.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def spread(a: Sequence[float], b: Sequence[float]) -> float:
    """``std(a) + std(b)``, the spread a difference of means must exceed; NaN with one seed."""
    return mean_std(a)[1] + mean_std(b)[1]


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(a) - mean(b), spread(a, b))``."""
    return mean_std(a)[0] - mean_std(b)[0], spread(a, b)


def compare_means(a: Sequence[float], b: Sequence[float]) -> str:
    """``"higher"``, ``"lower"`` when ``mean(a) - mean(b)`` exceeds the spread in that direction,
    ``"within spread"`` otherwise, ``"one seed"`` when the spread is unknown."""
    delta, width = difference(a, b)
    if math.isnan(width):
        return "one seed"
    if abs(delta) > width:
        return "higher" if delta > 0 else "lower"
    return "within spread"


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"0.957 ± 0.003"`` (or the single value)."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
