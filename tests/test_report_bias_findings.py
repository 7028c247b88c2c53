"""Bias findings read together: one sentence per estimator saying what is known and what is not."""

from __future__ import annotations

import pandas as pd

from normscope.findings import table_value
from normscope.rules import WIDE_INTERVAL, bias_findings, measurable

LABELS = {"batchnorm": "BatchNorm", "two_stage": "Two-stage backprop", "per_example": "Per-example normalization",
          "control": "The control"}


def _tables():
    rows = []
    cells = {  # estimator: [(B, rel_bias, lo, hi)]
        "batchnorm": [(4, 0.9, 0.0, 13.0), (16, 0.3, 0.1, 0.5), (64, 0.08, 0.03, 0.12)],
        "two_stage": [(4, 1.05, 0.0, 1.58), (16, 0.9, 0.0, 1.4), (64, 1.3, 1.1, 1.5)],
        "per_example": [(4, 0.02, 0.0, 0.06), (16, 0.01, 0.0, 0.04), (64, 0.01, 0.0, 0.03)],
        "control": [(4, 0.04, 0.0, 0.09), (16, 0.02, 0.0, 0.05), (64, 0.01, 0.0, 0.03)],
    }
    for estimator, values in cells.items():
        for b, bias, lo, hi in values:
            rows.append({"estimator": estimator, "batch_size": b, "group": "total", "rel_bias": bias, "rel_bias_lo": lo,
                         "rel_bias_hi": hi, "repeats": 16})
    table = pd.DataFrame(rows)
    table["measurable"] = measurable(table)
    slopes = pd.DataFrame([{"estimator": e, "group": "total", "slope": float("nan"), "intercept": float("nan"),
                            "slope_lo": float("nan"), "slope_hi": float("nan"), "n_points": int(table[(table["estimator"] == e)]["measurable"].sum())}
                           for e in cells])
    jacobian = pd.DataFrame([{"n_norm_layers": 2, "relative_gap": 1.4}])
    return table, slopes, jacobian


def test_one_sentence_per_estimator_with_what_is_and_is_not_known():
    table, slopes, jacobian = _tables()
    found = bias_findings(table, slopes, LABELS, jacobian, 256, ["net.2"], quick=True)
    assert sorted(f.site for f in found) == ["batchnorm", "control", "per_example", "two_stage"], "one per estimator"
    by = {f.site: str(f) for f in found}
    assert by["batchnorm"].startswith("BatchNorm at batch size 4: not measurable at this number of draws (interval 0% to 13× from 16 draws); "
                                      "`--full` draws more; no slope against the batch size, since only 2 of the 3 batch sizes have")
    two = by["two_stage"]
    assert "not measurable at this number of draws (interval 0% to 158% from 16 draws)" in two
    assert "On all 256 examples, where no draw adds noise, it misses the population gradient by 140%" in two
    assert "no bias measurable" not in two
    assert by["per_example"].startswith("Per-example normalization at batch size 4: no bias above the noise, at most 6% of the population gradient")
    tables = {"bias_estimators": table}
    for finding in found:
        assert table_value(tables, finding.table, finding.where, finding.metric) == finding.value


def test_full_settings_do_not_promise_more_draws_and_narrow_intervals_are_bounds():
    table, slopes, jacobian = _tables()
    found = {f.site: str(f) for f in bias_findings(table, slopes, LABELS, jacobian, 256, [], quick=False)}
    assert "--full" not in found["batchnorm"] and "not measurable at this number of draws" in found["batchnorm"]
    assert WIDE_INTERVAL == 1.0 and "0% to 6%" in found["per_example"]
