"""Norm-layer statistics against direct computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from normscope.analyzers import AnalysisContext
from normscope.analyzers.stats import analyze
from normscope.guard import assert_unchanged, snapshot
from normscope.models import MODELS, build_model


def _context(model, digits, n_batches=2):
    x, y = digits
    size = len(x) // n_batches
    return AnalysisContext(model, [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n_batches)])


def test_batchnorm_channel_statistics(digits64):
    model = build_model("mlp_bn").double()
    bn = model.net[2]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    bn.eps = 0.3
    out = analyze(_context(model, digits64, n_batches=1))
    table = out.tables["stats_channels"].query("site == 'net.2'").sort_values("channel")
    h = model.net[1](model.net[0](digits64[0]))
    var, mean = torch.var_mean(h, dim=0, correction=0)
    np.testing.assert_allclose(table["batch_mean"], mean.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["batch_var"], var.detach().numpy(), rtol=1e-12)
    drift = (mean - bn.running_mean).abs() / torch.sqrt(bn.running_var + 0.3)
    np.testing.assert_allclose(table["mean_drift"], drift.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["var_ratio"], (var / bn.running_var).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["eps_fraction"], (0.3 / (var + 0.3)).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["gamma"], bn.weight.detach().numpy())
    bn_out = (h - mean) / torch.sqrt(var + 0.3) * bn.weight + bn.bias
    np.testing.assert_allclose(table["relu_zero_fraction"], (bn_out <= 0).double().mean(0).detach().numpy())
    sites = out.tables["stats_sites"].set_index("site")
    assert sites.loc["net.2", "feeding_weight_norm"] == pytest.approx(float(model.net[1].weight.detach().norm()))
    assert sites.loc["net.2", "producer"] == "net.1" and sites.loc["net.2", "consumer"] == "ReLU"
    assert any("eps is up to" in f for f in out.findings)


def test_rmsnorm_eps_fraction_uses_mean_square(digits64):
    model = build_model("transformer_rms").double()
    model.blocks[0].norm1.eps = 0.5
    out = analyze(_context(model, digits64, 1))
    table = out.tables["stats_channels"].query("site == 'blocks.0.norm1'")
    tokens = model.embed(digits64[0].reshape(-1, 8, 8)) + model.pos
    ms = tokens.pow(2).mean(-1).reshape(-1)
    np.testing.assert_allclose(table["eps_fraction"], (0.5 / (ms + 0.5)).detach().numpy(), rtol=1e-12)


def test_nonfinite_reported_per_site_not_a_crash(digits32):
    model = build_model("mlp_bn")
    with torch.no_grad():
        model.net[4].weight[0, 0] = float("nan")
    out = analyze(_context(model, digits32))
    sites = out.tables["stats_sites"].set_index("site")
    assert sites.loc["net.2", "nonfinite"] == 0 and sites.loc["net.5", "nonfinite"] > 0
    assert out.findings[0].startswith("net.5:") and "NaN" in out.findings[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_reference_model_unchanged(name, digits32):
    model = build_model(name).eval()
    state = snapshot(model)
    out = analyze(_context(model, digits32))
    assert_unchanged(model, state)
    assert len(out.tables["stats_sites"]) == out.headline["sites"] > 0
    assert math.isfinite(out.headline["eps_fraction_max"])
