"""One implementation of the gradient-least-squares site figures: analyze's gls_sites and the
monitor's rows come from normscope.analyzers.gls.site_values, and agree on the same model and batch."""

import math

import numpy as np
import pytest
import torch

from normscope.analyzers.gls import site_values
from normscope.models import build_model
from normscope.monitor.metrics import GLS_METRICS
from tests.test_plan_monitor import analyze_and_monitor


@pytest.mark.parametrize("name", ["mlp_bn", "transformer_ln", "transformer_rms"])
def test_analyze_and_the_monitor_report_the_same_gls_figures(name, digits64, tmp_path):
    """Every gls figure both report, per site, in float64: R^2 (mean, median, pooled), beta, |beta|,
    the slope ratio, and the monitor's naive gap against both of analyze's (measured on dL/dx, and by
    the identity). Centered (BatchNorm, LayerNorm) and uncentered (RMSNorm) regressions."""
    x, y = digits64[0][:32].double(), digits64[1][:32]
    model = build_model(name).double().train()
    result, rows = analyze_and_monitor(model, x, y, "gls", tmp_path)
    gls = result.tables["gls_sites"].set_index("site")
    assert len(gls) >= 2
    for site in gls.index:
        for metric in GLS_METRICS:
            theirs = [gls.loc[site, metric]] + ([gls.loc[site, "naive_gap_identity"]] if metric == "naive_gap" else [])
            for value in theirs:
                assert math.isclose(rows[(site, metric)], value, rel_tol=1e-9, abs_tol=1e-12), (site, metric, rows[(site, metric)], value)
        assert 0 < gls.loc[site, "r2_median"] < 1


def test_site_values_equal_numpy_over_segments_with_nans():
    """site_values against numpy's nanmean, nanquantile and sums, segment by segment, on figures
    with NaN R^2 (a partition with g = 0) and a site whose R^2 are all NaN."""
    gen = torch.Generator().manual_seed(3)
    sizes = [5, 1, 8, 3]
    total = sum(sizes)
    figures = {k: torch.rand(total, generator=gen, dtype=torch.float64) + 0.1
               for k in ("beta", "slope_ratio", "residual_sq", "g_sq", "explained_sq", "scale")}
    figures["beta"] -= 0.6
    figures["r2"] = 1 - figures["residual_sq"] / (figures["g_sq"] + 1)
    figures["r2"][[2, 6, 7]] = math.nan  # the second site (item 5) keeps one; the fourth (14..16) all NaN below
    figures["r2"][14:] = math.nan
    values = site_values(figures, sizes)
    start = 0
    for s, size in enumerate(sizes):
        part = {k: v[start:start + size].numpy() for k, v in figures.items()}
        start += size
        r2 = part["r2"]
        if np.isfinite(r2).any():
            expected = dict(zip(("r2_q10", "r2_q25", "r2_median", "r2_q75", "r2_q90"),
                                np.nanquantile(r2, [0.1, 0.25, 0.5, 0.75, 0.9])), r2_mean=np.nanmean(r2))
        else:
            expected = {k: math.nan for k in ("r2_q10", "r2_q25", "r2_median", "r2_q75", "r2_q90", "r2_mean")}
        scale_sq = part["scale"] ** 2
        expected.update(
            r2_pooled=1 - part["residual_sq"].sum() / part["g_sq"].sum(), beta_mean=part["beta"].mean(),
            beta_abs_mean=np.abs(part["beta"]).mean(), slope_ratio_mean=part["slope_ratio"].mean(),
            naive_gap_identity=math.sqrt((part["explained_sq"] / scale_sq).sum() / (part["residual_sq"] / scale_sq).sum()))
        for key, value in expected.items():
            got = float(values[key][s])
            assert (math.isnan(value) and math.isnan(got)) or math.isclose(got, value, rel_tol=1e-12), (s, key, got, value)
