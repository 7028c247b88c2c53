"""Paired verdicts of the reproduction harness against scipy's own paired t test."""

import math

import numpy as np
from scipy import stats

from normscope.seed_stats import beats, binomial_resolution, equivalence, paired_interval


def test_paired_interval_is_scipys_paired_t():
    rng = np.random.default_rng(0)
    a = rng.normal(0.9, 0.02, 6)
    b = a - 0.01 + rng.normal(0, 0.004, 6)
    mean, low, high = paired_interval(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert math.isclose(low, ci.low, rel_tol=1e-12) and math.isclose(high, ci.high, rel_tol=1e-12)
    assert math.isclose(mean, float(np.mean(a - b)), rel_tol=1e-12)
    # pairing decides where the spread rule would not: b's seeds spread far more than the difference
    assert beats(a, b) == "reproduced" and beats(b, a) == "not reproduced"
    assert abs(np.mean(a) - np.mean(b)) < np.std(a, ddof=1) + np.std(b, ddof=1)


def test_equivalence_and_resolution():
    a = np.array([0.90, 0.91, 0.92, 0.90, 0.91, 0.92])
    assert equivalence(a, a - 0.001 * np.array([1, 2, 1, 2, 1, 2]), tol=0.01) == "reproduced"
    assert equivalence(a - 0.05 + 0.001 * np.arange(6), a, tol=0.01) == "not reproduced"
    assert equivalence(a, a + np.array([0.02, -0.02, 0.03, -0.03, 0.0, 0.01]), tol=0.01) == "inconclusive"
    # 6 seeds, 397 test images at 90%: t_{.975,5} * sqrt(2 * .09 / 397) / sqrt(6)
    assert math.isclose(binomial_resolution(397, 6), 2.5706 * math.sqrt(0.18 / 397) / math.sqrt(6), rel_tol=1e-4)
