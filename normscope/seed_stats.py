"""Mean ± std over seeds, and the rules that decide between two variants.

``normscope compare`` (the ``compare_stats`` table and its findings) uses the spread rule: a
difference counts only when it exceeds the sum of the two sample standard deviations over seeds
(with one seed there is no spread and no winner is declared).

The reproduction harness ``benchmarks/papers.py`` runs every variant of a seed from the same
initial weights on the same batches, so its verdicts use the *paired* differences
``d_s = a_s - b_s``: :func:`paired_interval` (Student t interval of the mean of d) decides
"a beats b", :func:`equivalence` (two one-sided t tests) decides "a within tol of b", and
:func:`binomial_resolution` states beforehand the smallest effect a test set of a given size
can show.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats


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


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean d, low, high)``: the Student t interval at ``level`` of the mean of the paired
    differences ``d_s = a_s - b_s`` (``a``, ``b`` in seed order), ``mean ± t_{(1+level)/2, n-1} std(d) / sqrt(n)``;
    NaN bounds with fewer than two pairs."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else math.nan, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def beats(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> str:
    """"a beats b" from the paired interval: ``"reproduced"`` when it lies above 0, ``"not
    reproduced"`` below 0, ``"inconclusive"`` when it contains 0 (or with fewer than two pairs)."""
    _, low, high = paired_interval(a, b, level)
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not reproduced"
    return "inconclusive"


def equivalence(a: Sequence[float], b: Sequence[float], tol: float, alpha: float = 0.05) -> str:
    """"a within ``tol`` of b" by two one-sided paired t tests at ``alpha`` (TOST): ``"reproduced"``
    when the ``1 - 2 alpha`` interval of the mean difference lies inside ``(-tol, tol)``; ``"not
    reproduced"`` when it lies wholly below ``-tol`` (a worse by more than tol); ``"a better by more
    than tol"`` when wholly above ``tol``; else ``"inconclusive"``."""
    _, low, high = paired_interval(a, b, 1 - 2 * alpha)
    if -tol < low and high < tol:
        return "reproduced"
    if high < -tol:
        return "not reproduced"
    if low > tol:
        return "a better by more than tol"
    return "inconclusive"


def binomial_resolution(test_examples: int, seeds: int, accuracy: float = 0.9, level: float = 0.95) -> float:
    """The half-width of the paired interval when each run's accuracy carries only the binomial
    noise of its test set: ``t_{(1+level)/2, n-1} sqrt(2 p (1 - p) / M) / sqrt(n)`` for M test
    examples, n seeds, accuracy p. Effects below it cannot be decided at that size (an estimate
    made before running; the measured interval is what decides)."""
    sd = math.sqrt(2 * accuracy * (1 - accuracy) / test_examples)
    return float(stats.t.ppf((1 + level) / 2, seeds - 1) * sd / math.sqrt(seeds))
