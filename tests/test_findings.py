"""The finding rules on constructed cases with known answers, and findings checked against their tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from normscope.analyzers import AnalysisContext, get_analyzer
from normscope.analyzers.bias import bias_statistics
from normscope.analyzers.descent import verdicts
from normscope.data import load_digits
from normscope.findings import Finding, findings_table, number, percent, plural, table_value
from normscope.models import build_model
from normscope.recalibration import evaluate, population_moments, recalibrate
from normscope.rules import descent_findings, descent_verdict, gls_findings, measurable, stats_findings
from normscope.train import train_reference


@pytest.fixture(scope="module")
def digits():
    return load_digits(torch.float32)


@pytest.fixture(scope="module")
def trained():
    return train_reference(epochs=3)


def _stats(model, digits):
    x, y = digits
    ctx = AnalysisContext(model=model, batches=[(x[:128], y[:128]), (x[128:256], y[128:256])], dataset=(x, y))
    return get_analyzer("stats")(ctx)


def test_running_variance_times_100_is_critical_and_costs_accuracy(trained, digits):
    stale = build_model("mlp_bn")
    stale.load_state_dict(trained.state_dict())
    stale.net[2].running_var.mul_(100)
    before = {k: v.clone() for k, v in stale.state_dict().items()}
    out = _stats(stale, digits)
    assert all(torch.equal(before[k], v) for k, v in stale.state_dict().items())
    ratio = out.tables["stats_sites"].set_index("site").loc["net.2", "var_ratio_median"]
    assert 0.005 < ratio < 0.02
    stale_var = [f for f in out.findings if f.label == "stale running variance"]
    assert [f.site for f in stale_var] == ["net.2"] and stale_var[0].severity == "critical"
    assert "normscope.recalibrate(model, data)" in stale_var[0] and stale_var[0].value == pytest.approx(ratio)
    cost = out.tables["stats_recalibration"].set_index("statistics")
    assert cost.loc["running", "accuracy"] < 0.5 < 0.9 < cost.loc["population", "accuracy"]
    first = out.findings[0]
    assert first.severity == "critical"
    healthy = _stats(trained, digits)
    assert not [f for f in healthy.findings if f.severity in ("critical", "warning")]
    assert any(f.severity == "ok" and "running statistics match" in f for f in healthy.findings)


def test_recalibrate_returns_a_copy_with_the_population_moments(trained, digits):
    x, _ = digits
    stale = build_model("mlp_bn")
    stale.load_state_dict(trained.state_dict())
    stale.net[2].running_var.mul_(100)
    stale.net[5].running_mean.add_(3.0)
    original = {k: v.clone() for k, v in stale.state_dict().items()}
    fixed = recalibrate(stale, digits)
    assert fixed is not stale and all(torch.equal(original[k], v) for k, v in stale.state_dict().items())
    model64 = build_model("mlp_bn").double()
    model64.load_state_dict(stale.state_dict())
    model64.eval()
    with torch.no_grad():
        h1 = model64.net[1](model64.net[0](x.double()))
        assert torch.allclose(fixed.net[2].running_mean.double(), h1.mean(0), atol=1e-5)
        assert torch.allclose(fixed.net[2].running_var.double(), h1.var(0, unbiased=True), rtol=1e-5)
        model64.net[2].running_mean.copy_(h1.mean(0))
        model64.net[2].running_var.copy_(h1.var(0, unbiased=True))
        h2 = model64.net[4](model64.net[3](model64.net[2](h1)))
    assert torch.allclose(fixed.net[5].running_mean.double(), h2.mean(0), atol=1e-4)
    assert torch.allclose(fixed.net[5].running_var.double(), h2.var(0, unbiased=True), rtol=1e-4)
    assert set(population_moments(stale, digits)) == {"net.2", "net.5"}
    assert evaluate(fixed, digits)["accuracy"] > evaluate(stale, digits)["accuracy"] + 0.3


def test_kinds_without_running_statistics_get_no_running_statistics_finding(digits):
    for name in ("transformer_ln", "transformer_rms", "cnn_gn"):
        out = _stats(build_model(name), digits)
        assert "stats_recalibration" not in out.tables
        assert not any("running" in f for f in out.findings), (name, out.findings)


def test_descent_verdict_weighs_the_stability_limit_above_a_crit():
    # lr between 2/lambda_max and a_crit along the gradient: still unstable
    assert descent_verdict(lr=0.1, a_crit=0.5, lambda_max=30.0, parting=1.0) == ("unstable along the top curvature direction", "critical")
    assert descent_verdict(lr=0.1, a_crit=0.05, lambda_max=1.0, parting=1.0)[0] == "not a descent step"
    assert descent_verdict(lr=0.1, a_crit=0.5, lambda_max=1.0, parting=0.086)[0] == "beyond the quadratic model"
    assert descent_verdict(lr=0.1, a_crit=0.5, lambda_max=1.0, parting=math.nan) == ("stable", "ok")
    assert descent_verdict(lr=0.1, a_crit=math.nan, lambda_max=1.0, parting=math.nan)[0] == "not a descent direction"


def test_lr_above_two_over_lambda_max_on_a_real_model(trained, digits):
    x, y = digits
    ctx = AnalysisContext(model=trained, batches=[(x[:64], y[:64])], lr=0.05)
    tables = get_analyzer("descent")(ctx).tables
    table = tables["descent_verdicts"].set_index("mode")
    assert (table["verdict"] == "stable").all()
    top = tables["descent_spectrum"].query("group == 'total' and rank == 1").set_index("mode")
    assert np.allclose(table["stability_limit"], 2 / top.loc[table.index, "eigenvalue"])
    limit = float(table.loc["train", "stability_limit"])
    steep = {**tables, "descent_directions": tables["descent_directions"].assign(lr=1.2 * limit)}
    judged = verdicts(steep).set_index("mode")
    assert judged.loc["train", "verdict"] == "unstable along the top curvature direction"
    finding = descent_findings(verdicts(steep))[0]
    assert finding.severity == "critical" and finding.value == pytest.approx(limit)
    assert number(limit) in finding and number(judged.loc["train", "a_crit"]) in finding
    refined = 0
    for mode, part in tables["descent_quadratic"].groupby("mode"):
        parting = table.loc[mode, "parting_step"]
        steps = np.sort(part["step"].to_numpy())
        if np.isfinite(parting) and steps[0] < parting:
            assert steps[steps < parting].max() / parting > 0.85, "the grid is fine just below the parting step"
            refined += 1
    assert refined >= 1


def test_an_unbiased_estimator_is_not_measurable_and_a_biased_one_is():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(50, generator=generator, dtype=torch.float64)
    noise = lambda: 0.5 * torch.randn(32, 50, generator=generator, dtype=torch.float64)  # noqa: E731
    rows = []
    for name, offset in (("control", 0.0), ("unbiased", 0.0), ("biased", 0.4)):
        s = bias_statistics(target + offset + noise(), target)
        rows.append({"estimator": name, "batch_size": 4, "group": "total", "rel_bias": s.rel_bias,
                     "rel_bias_lo": s.rel_bias_lo, "rel_bias_hi": s.rel_bias_hi})
    table = pd.DataFrame(rows)
    flags = dict(zip(table["estimator"], measurable(table)))
    assert flags == {"control": False, "unbiased": False, "biased": True}
    biased = table.set_index("estimator").loc["biased"]
    assert biased["rel_bias_lo"] < 0.4 * math.sqrt(50) / float(target.norm()) < biased["rel_bias_hi"]


def test_gls_ranks_sites_by_the_median_r2_the_figure_plots():
    sites = pd.DataFrame({"site": ["a", "b"], "kind": "batchnorm", "depth": [0, 1], "n_partitions": 8,
                          "r2_mean": [0.5, 0.2], "r2_median": [0.1, 0.3], "naive_gap": [0.2, 0.1],
                          "batch_stats": True, "identity_rel_max": 1e-9, "dtype": "float64"})
    found = gls_findings({"gls_sites": sites})
    least = next(f for f in found if f.label == "explains least")
    assert least.site == "a" and least.metric == "r2_median" and "10%" in least


def test_words_have_no_nan_and_correct_plurals():
    assert plural(1, "site") == "1 site" and plural(2, "site") == "2 sites" and plural(1, "pass", "passes") == "1 pass"
    assert number(math.nan) == "not measured" and percent(math.nan) == "not measured" and "nan" not in percent(math.inf)
    sites = pd.DataFrame({"site": ["ln"], "kind": "layernorm", "depth": [0], "nonfinite": [0], "var_ratio_median": [math.nan],
                          "mean_drift_mean": [math.nan], "eps_fraction_max": [1e-4], "eps_dominated_fraction": [0.0],
                          "relu_zero_fraction": [math.nan]})
    (only,) = stats_findings(sites)
    assert only == "1 site: eps below 10% of every normalizer." and "nan" not in only


def test_findings_table_round_trips_and_checks_values():
    tables = {"t": pd.DataFrame({"site": ["a", "b"], "x": [1.0, 2.0]})}
    finding = Finding("b has x = 2.", "stats", "warning", site="b", metric="x", value=2.0, table="t", where={"site": "b"})
    table = findings_table({"stats": [finding, "a plain sentence"]})
    assert list(table["severity"]) == ["warning", "note"] and table["sentence"].iloc[0] == "b has x = 2."
    row = table.iloc[0]
    assert table_value(tables, row["table"], row["where"], row["metric"], row["statistic"]) == 2.0
    assert table_value(tables, "t", {}, "x", "max") == 2.0
    with pytest.raises(KeyError):
        table_value(tables, "t", {}, "x")
