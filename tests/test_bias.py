"""Estimator-bias analyzer ("Extreme Normalization" (under review), MATH.md §4) in float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normscope.rules import log_log_fit
from normscope.analyzers import AnalysisContext, get_analyzer
from normscope.analyzers.bias import (
    _Estimators,
    bias_statistics,
    estimator_bias,
    jacobian_product_bias,
    per_example_grads,
)
from normscope.analyzers.population_gradient import population_gradient, streamed_population_gradient
from normscope.data import load_digits
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model

DT = torch.float64


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(DT)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]
    return x[idx], y[idx]


def _autograd_bn_grad(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    train = copy.deepcopy(model).to(DT).train()
    grads = torch.autograd.grad(F.cross_entropy(train(x), y), list(train.parameters()))
    return dict(zip([n for n, _ in train.named_parameters()], grads))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.parametrize("name,n,levels", [("mlp_bn", 150, 2), ("resnet_bn", 48, 9)])
def test_streamed_population_gradient_equals_full_batch(digits, name: str, n: int, levels: int) -> None:
    x, y = digits[0][:n], digits[1][:n]
    model = build_model(name).to(DT)
    state = snapshot(model)
    full = population_gradient(model, x, y)
    assert _max_diff(full.grads, _autograd_bn_grad(model, x, y)) < 1e-12
    loader = DataLoader(TensorDataset(x, y), batch_size=n // 5 + 1, shuffle=True, generator=torch.Generator().manual_seed(1))
    streamed = streamed_population_gradient(model, loader)
    assert _max_diff(streamed.grads, full.grads) < 1e-12
    assert streamed.loss == pytest.approx(full.loss, abs=1e-12)
    for site in full.mean:
        torch.testing.assert_close(streamed.mean[site], full.mean[site], rtol=0, atol=1e-12)
        torch.testing.assert_close(streamed.var[site], full.var[site], rtol=0, atol=1e-12)
    assert (streamed.levels, streamed.passes) == (levels, 2 * levels + 1)
    assert_unchanged(model, state)


def test_per_example_grads_match_one_backward_per_example(digits) -> None:
    model = build_model("mlp_bn").to(DT).eval()
    x, y = digits[0][:7], digits[1][:7]
    grads = per_example_grads(model, x, y, chunk_size=3)
    for i in range(7):
        reference = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), reference):
            torch.testing.assert_close(grads[name][i], g, rtol=0, atol=1e-13)


def test_bias_statistics_against_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(300, generator=g, dtype=DT)
    bias = 0.3 * torch.randn(300, generator=g, dtype=DT)
    samples = target + bias + torch.randn(12, 300, generator=g, dtype=DT)
    figures = bias_statistics(samples, target)
    mean = samples.mean(0)
    trace_cov = torch.cov(samples.T).trace()
    expected = (mean - target).pow(2).sum() - trace_cov / 12
    assert figures.rel_bias == pytest.approx(float(expected.sqrt() / target.norm()), rel=1e-12)
    assert figures.rel_bias_uncorrected == pytest.approx(float((mean - target).norm() / target.norm()), rel=1e-12)
    assert figures.variance == pytest.approx(float(trace_cov / target.pow(2).sum()), rel=1e-12)
    assert figures.cosine == pytest.approx(float(F.cosine_similarity(mean, target, dim=0)), rel=1e-12)
    assert figures.mse == pytest.approx(figures.rel_bias**2 + figures.variance, rel=1e-12)
    assert figures.rel_bias_lo < float(bias.norm() / target.norm()) < figures.rel_bias_hi
    assert figures.abs_bias == pytest.approx(float(expected.sqrt()), rel=1e-12)
    assert figures.abs_bias_lo == pytest.approx(figures.rel_bias_lo * float(target.norm()), rel=1e-12)
    assert not figures.zero_gradient


def test_group_with_a_rounding_level_population_gradient_gets_nan_relative_figures() -> None:
    g = torch.Generator().manual_seed(0)
    target = 1e-17 * torch.randn(40, generator=g, dtype=DT)
    samples = target + torch.randn(8, 40, generator=g, dtype=DT)
    figures = bias_statistics(samples, target, total_norm=1.0)
    assert figures.zero_gradient
    for name in ("rel_bias", "rel_bias_lo", "rel_bias_hi", "rel_bias_uncorrected", "variance", "cosine", "mse"):
        assert np.isnan(getattr(figures, name)), name
    diff = samples - target
    expected = (diff.sum(0).pow(2).sum() - diff.pow(2).sum()) / (8 * 7)
    assert figures.abs_bias == pytest.approx(float(expected.clamp(min=0).sqrt()), rel=1e-12)
    assert not bias_statistics(samples, target + 1e-6, total_norm=1.0).zero_gradient


def test_biases_feeding_batchnorm_are_reported_as_zero_gradient_not_biased(digits) -> None:
    model = _two_layer_mlp(2)
    x, y = digits[0][:64], digits[1][:64]
    table, g_star = estimator_bias(model, x, y, batch_sizes=(4, 16), repeats=4, estimators=("batchnorm",))
    total_norm = float(torch.cat([g.reshape(-1) for g in g_star.grads.values()]).norm())
    for name in ("1.bias", "4.bias"):
        assert float(g_star.grads[name].norm()) < 1e-12 * total_norm
        rows = table[table["group"] == name]
        assert rows["zero_gradient"].all() and rows["rel_bias"].isna().all() and rows["cosine"].isna().all()
        assert np.isfinite(rows["abs_bias"]).all()
    rest = table[~table["group"].isin(["1.bias", "4.bias"])]
    assert not rest["zero_gradient"].any() and np.isfinite(rest["rel_bias"]).all()
    np.testing.assert_allclose(rest["abs_bias"], rest["rel_bias"] * rest["target_norm"], rtol=1e-12)


def test_confidence_interval_of_an_unbiased_estimator_covers_zero_in_most_draws() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(200, generator=g, dtype=DT)
    covered = uncorrected_covered = 0
    for _ in range(200):
        figures = bias_statistics(target + torch.randn(16, 200, generator=g, dtype=DT), target)
        covered += figures.rel_bias_lo == 0
        uncorrected_covered += figures.rel_bias_uncorrected_lo == 0
    assert covered >= 180
    assert uncorrected_covered == 0


def test_control_is_unbiased_and_batchnorm_bias_falls_with_batch_size(digits) -> None:
    model = build_model("mlp_bn")
    state = snapshot(model)
    table, _ = estimator_bias(model, *digits, batch_sizes=(4, 64), repeats=48, estimators=("batchnorm", "control"))
    assert_unchanged(model, state)
    total = table[table["group"] == "total"].set_index(["estimator", "batch_size"])
    for b in (4, 64):
        control = total.loc[("control", b)]
        assert control["rel_bias_lo"] == 0
        assert control["rel_bias_uncorrected_lo"] > 0
    small, large = total.loc[("batchnorm", 4)], total.loc[("batchnorm", 64)]
    assert small["rel_bias"] > large["rel_bias"]
    assert small["rel_bias_lo"] > large["rel_bias_hi"]
    assert large["rel_bias_lo"] > 0


def _two_layer_mlp(layers: int) -> nn.Module:
    torch.manual_seed(3)
    mods: list[nn.Module] = [nn.Flatten()]
    fan = 64
    for _ in range(layers):
        mods += [nn.Linear(fan, 16), nn.BatchNorm1d(16), nn.ReLU()]
        fan = 16
    return nn.Sequential(*mods, nn.Linear(fan, 10))


def test_jacobian_product_bias_zero_with_one_level_nonzero_with_two(digits) -> None:
    x, y = digits[0][:64], digits[1][:64]
    one = jacobian_product_bias(_two_layer_mlp(1), x, y, chunk_size=16).iloc[0]
    two = jacobian_product_bias(_two_layer_mlp(2), x, y, chunk_size=16).iloc[0]
    assert one["n_norm_layers"] == 1 and one["relative_gap"] < 1e-12
    assert two["n_norm_layers"] == 2 and two["relative_gap"] > 1e-3
    conv = jacobian_product_bias(build_model("resnet_bn"), x[:16], y[:16]).iloc[0]
    assert conv["n_norm_layers"] == 9 and conv["relative_gap"] > 1e-3


def test_log_log_fit_of_a_power_law_needs_three_measurable_points() -> None:
    b = np.array([2.0, 4.0, 8.0, 16.0])
    fit = log_log_fit(b, 3.0 * b**-1.0, np.ones(4, bool))
    assert fit["slope"] == pytest.approx(-1.0) and fit["intercept"] == pytest.approx(np.log(3.0)) and fit["n_points"] == 4
    assert fit["slope_lo"] == pytest.approx(-1.0) and fit["slope_hi"] == pytest.approx(-1.0)
    noisy = log_log_fit(b, 3.0 * b**-1.0 * np.array([1.0, 1.3, 0.8, 1.1]), np.ones(4, bool))
    assert noisy["slope_lo"] < noisy["slope"] < noisy["slope_hi"]
    assert np.isnan(log_log_fit(b, 3.0 * b**-1.0, np.array([True, True, False, False]))["slope"])
    assert np.isnan(log_log_fit(b, np.array([0.0, 0.0, 0.0, 1.0]), np.ones(4, bool))["slope"])


def test_analyze_quick_on_the_default_model(digits) -> None:
    model = build_model("mlp_bn")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    state = snapshot(model)
    seen = []

    def track(iterable, description="", total=None):
        seen.append((description, total))
        yield from iterable

    x, y = digits[0].float(), digits[1]
    ctx = AnalysisContext(
        model=model, batches=[(x[:32], y[:32])], dataset=(x, y), track=track, seed=3, options={"bias_repeats": 3}
    )
    out = get_analyzer("bias")(ctx)
    assert_unchanged(model, state)
    columns = {
        "bias_estimators": ["estimator", "batch_size", "group", "rel_bias", "rel_bias_lo", "rel_bias_hi",
                            "rel_bias_uncorrected", "variance", "cosine", "mse", "repeats", "abs_bias",
                            "zero_gradient"],
        "bias_slopes": ["estimator", "group", "slope", "intercept", "slope_lo", "slope_hi", "n_points"],
        "bias_jacobian": ["n_norm_layers", "jacobian_product_gap", "relative_gap"],
    }
    for name, cols in columns.items():
        assert set(cols) <= set(out.tables[name].columns)
    estimators = out.tables["bias_estimators"]
    assert set(estimators["estimator"]) == {"batchnorm", "per_example", "microbatch", "two_stage", "batch_renorm", "control"}
    assert set(estimators["batch_size"]) == {4, 16, 64}
    assert set(estimators["group"]) == {"total", *[n for n, _ in model.named_parameters()]}
    assert seen == [("estimator bias", 18)]
    assert any(f.startswith("BatchNorm at batch size 4") for f in out.findings)
    assert any("zero population gradient" in f and "net.1.bias" in f for f in out.findings)
    assert out.headline["bias_examples"] == 256
    again = get_analyzer("bias")(ctx)
    assert again.tables["bias_estimators"].equals(estimators)


def test_per_example_means_are_the_draws_mean_per_example_gradients(digits) -> None:
    model = copy.deepcopy(_two_layer_mlp(2)).to(DT).eval()
    x, y = digits[0][:40], digits[1][:40]
    g_star = population_gradient(model, x, y)
    generator = torch.Generator().manual_seed(1)
    draws = [torch.randperm(40, generator=generator)[:b] for b in (3, 7, 7, 16)]
    est = _Estimators(model, g_star, F.cross_entropy, {"chunk_size": 5})
    every = per_example_grads(est.base, x, y)
    flat = torch.cat([every[name].reshape(40, -1) for name in est.names], dim=1)
    means = est.samples("control", x, y, draws)
    assert means.shape == (4, flat.shape[1])
    for row, idx in zip(means, draws):
        assert torch.allclose(row, flat[idx].mean(dim=0), rtol=0, atol=1e-14)


def test_a_small_memory_budget_gives_small_chunks_and_the_same_bias(digits) -> None:
    """``bias_memory`` (default: a multiple of the training step) sizes the per-example chunks;
    the figures do not depend on it beyond float64 rounding."""
    model = build_model("mlp_bn")
    state = snapshot(model)
    x, y = digits[0][:96].float(), digits[1][:96]
    options = {"bias_repeats": 3, "bias_batch_sizes": (4, 16), "bias_examples": 96}
    tables = {}
    for memory in (10**9, 1):
        ctx = AnalysisContext(model=model, batches=[(x[:32], y[:32])], dataset=(x, y), options={**options, "bias_memory": memory})
        tables[memory] = get_analyzer("bias")(ctx).tables["bias_estimators"]
    assert_unchanged(model, state)
    chunks = {m: set(t.loc[t["estimator"] == "two_stage", "settings"]) for m, t in tables.items()}
    assert chunks == {10**9: {"r_m=1, r_v=1, no caps, chunks of 64"}, 1: {"r_m=1, r_v=1, no caps, chunks of 1"}}
    large, small = tables[10**9], tables[1]
    numbers = [c for c in large.columns if large[c].dtype.kind == "f"]
    assert large[["estimator", "batch_size", "group"]].equals(small[["estimator", "batch_size", "group"]])
    np.testing.assert_allclose(small[numbers].to_numpy(), large[numbers].to_numpy(), rtol=1e-10, atol=1e-12)


def test_analyze_without_batchnorm_explains_why() -> None:
    x, y = load_digits()
    out = get_analyzer("bias")(AnalysisContext(model=build_model("cnn_gn"), batches=[(x[:8], y[:8])]))
    assert out.tables == {} and "BatchNorm" in out.findings[0]
