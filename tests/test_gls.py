"""Gradient least squares ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission), MATH.md §2) checked in float64 against autograd.

Every expected value here is computed independently of ``normscope.analyzers.gls``: the true
input gradient by ``torch.autograd.grad`` without capture, the scales ``s`` from the input with
plain torch reductions, the virtual-item regularization by appending the items to a real
``F.batch_norm`` call.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from normscope.analyzers import AnalysisContext
from normscope.analyzers.gls import (
    COLUMNS,
    _channel_whatif,
    _generic_whatif,
    analyze,
    batch_size_sweep,
    extra_regression_r2,
    fit_record,
    fit_records,
    gls_step,
    gls_tables,
    regularized_fit,
    scatter_table,
)
from normscope.capture import capture
from normscope.errors import AnalyzerError, DataShapeError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model
from normscope.ops.chain import BatchLayerNorm

D = torch.float64
EPS0 = 1e-300  # eps = 0 in effect (float64), which torch refuses in training mode


def _loss(y: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A nonlinear loss so that g correlates with z (nonzero alpha and beta)."""
    gen = torch.Generator().manual_seed(seed)
    r1, r2 = torch.randn(y.shape, generator=gen, dtype=D), torch.randn(y.shape, generator=gen, dtype=D)
    return (r1 * y + 0.5 * r2 * y**2).sum()


def _scale(x: torch.Tensor, kind: str, eps: float, ndim: int = 1, groups: int = 1) -> torch.Tensor:
    """s, broadcast to x's shape, from plain torch reductions (MATH.md §1)."""
    if kind == "batchnorm":
        dims = [d for d in range(x.dim()) if d != 1]
        return (x.var(dims, correction=0, keepdim=True) + eps).sqrt().expand_as(x)
    if kind == "layernorm":
        dims = list(range(x.dim() - ndim, x.dim()))
        return (x.var(dims, correction=0, keepdim=True) + eps).sqrt().expand_as(x)
    if kind == "rmsnorm":
        dims = list(range(x.dim() - ndim, x.dim()))
        return (x.pow(2).mean(dims, keepdim=True) + eps).sqrt().expand_as(x)
    if kind == "instancenorm":
        return (x.var(list(range(2, x.dim())), correction=0, keepdim=True) + eps).sqrt().expand_as(x)
    if kind == "groupnorm":
        grouped = x.reshape(x.shape[0], groups, -1)
        return (grouped.var(-1, correction=0, keepdim=True) + eps).sqrt().expand_as(grouped).reshape(x.shape)
    raise ValueError(kind)


def _norm(kind: str, shape: tuple, eps: float, ndim: int = 1, groups: int = 1) -> nn.Module:
    c = shape[1]
    module = {
        "batchnorm": lambda: (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(c, eps=eps),
        "layernorm": lambda: nn.LayerNorm(shape[len(shape) - ndim:], eps=eps),
        "rmsnorm": lambda: nn.RMSNorm(shape[len(shape) - ndim:], eps=eps),
        "instancenorm": lambda: nn.InstanceNorm2d(c, eps=eps, affine=True),
        "groupnorm": lambda: nn.GroupNorm(groups, c, eps=eps),
    }[kind]().double()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module


def _check_identity(kind: str, shape: tuple, eps: float, ndim: int = 1, groups: int = 1, seed: int = 0) -> None:
    """fit_record's residual g - alpha - beta z equals s * dL/dx from autograd (MATH.md §2)."""
    torch.manual_seed(seed)
    module = _norm(kind, shape, eps, ndim, groups)
    x = (torch.randn(shape, dtype=D) * 2 + 0.3).requires_grad_()
    (dx,) = torch.autograd.grad(_loss(module(x)), x)
    with capture(module) as cap:
        _loss(module(x)).backward()
    fit = fit_record(cap.records[0])
    expected = cap.records[0].rows(_scale(x.detach(), kind, eps, ndim, groups) * dx)
    torch.testing.assert_close(fit.residual, expected, rtol=0, atol=1e-12 * expected.abs().max().item())
    assert fit.figures["identity_error"].max() < 1e-12 * fit.g.abs().max()
    if kind == "rmsnorm":
        assert torch.equal(fit.figures["alpha"], torch.zeros_like(fit.figures["alpha"]))
    else:
        torch.testing.assert_close(fit.figures["alpha"], fit.g.mean(1))
    assert fit.figures["alpha"].abs().max() + fit.figures["beta"].abs().max() > 1e-3


CASES = [
    ("batchnorm", (16, 5), 1e-5, 1, 1),
    ("batchnorm", (4, 3, 5, 5), 0.3, 1, 1),
    ("layernorm", (6, 4, 7), 1e-5, 1, 1),
    ("layernorm", (6, 4, 7), 0.1, 2, 1),
    ("groupnorm", (3, 6, 4, 4), 1e-3, 1, 3),
    ("instancenorm", (3, 4, 5, 5), 1e-5, 1, 1),
    ("rmsnorm", (5, 3, 8), 1e-6, 1, 1),
    ("rmsnorm", (5, 8), 0.2, 1, 1),
]


@pytest.mark.parametrize("kind,shape,eps,ndim,groups", CASES, ids=[f"{c[0]}-{len(c[1])}d-eps{c[2]}" for c in CASES])
def test_identity_against_autograd_every_kind(kind, shape, eps, ndim, groups):
    _check_identity(kind, shape, eps, ndim, groups)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 6), c=st.sampled_from([2, 4, 6]), hw=st.integers(2, 4),
    eps=st.sampled_from([1e-300, 1e-5, 1e-2, 0.5]), kind=st.sampled_from(["batchnorm", "groupnorm", "layernorm"]),
    groups=st.sampled_from([1, 2]), seed=st.integers(0, 1000),
)
def test_identity_random_shapes_eps_partitions(n, c, hw, eps, kind, groups, seed):
    _check_identity(kind, (n, c, hw, hw), eps, ndim=2, groups=groups, seed=seed)


@pytest.mark.parametrize("kind,shape,dims", [("batchnorm", (8, 4, 3, 3), (0, 2, 3)), ("layernorm", (5, 9), (1,)),
                                             ("rmsnorm", (5, 9), (1,))])
def test_eps_factor_on_the_ols_slope(kind, shape, dims):
    """beta / OLS slope = Var(z) = var / (var + eps) (mean(x^2) for RMSNorm), far from 1 for a large eps."""
    eps = 0.7
    torch.manual_seed(3)
    module = _norm(kind, shape, eps)
    x = torch.randn(shape, dtype=D) * 0.8 + 0.2
    with capture(module) as cap:
        _loss(module(x)).backward()
    fit = fit_record(cap.records[0])
    var = x.pow(2).mean(dims) if kind == "rmsnorm" else x.var(dims, correction=0)
    expected = (var / (var + eps)).reshape(-1)
    torch.testing.assert_close(fit.figures["slope_ratio"], expected, rtol=1e-10, atol=0)
    assert expected.max() < 0.8
    g, z = fit.g, fit.z
    if kind != "rmsnorm":
        cov = ((g - g.mean(1, keepdim=True)) * (z - z.mean(1, keepdim=True))).mean(1)
        torch.testing.assert_close(fit.figures["ols_slope"], cov / z.var(1, correction=0), rtol=1e-10, atol=0)


def test_rmsnorm_needs_the_intercept_free_fit():
    """s dL/dx = g - z mean(g z) holds for RMSNorm, while a fit with intercept does not."""
    torch.manual_seed(4)
    module = _norm("rmsnorm", (6, 10), 1e-6)
    x = (torch.randn(6, 10, dtype=D) + 1.0).requires_grad_()
    (dx,) = torch.autograd.grad(_loss(module(x)), x)
    with capture(module) as cap:
        _loss(module(x)).backward()
    fit = fit_record(cap.records[0])
    target = _scale(x.detach(), "rmsnorm", 1e-6) * dx
    with_intercept = fit.residual - fit.g.mean(1, keepdim=True)
    assert (fit.residual - target).abs().max() < 1e-12
    assert (with_intercept - target).abs().max() > 1e-3


def test_weight_norm_lemma_2():
    """||v|| dL/dv = g - z (g . z) per output unit with z = v/||v|| and g = weight_g * dL/dW ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Lemma 2)."""
    torch.manual_seed(5)
    layer = weight_norm(nn.Linear(7, 4).double())
    inputs = torch.randn(9, 7, dtype=D)
    v = layer.parametrizations.weight.original1
    (dv,) = torch.autograd.grad(_loss(layer(inputs)), v)
    with capture(layer) as cap:
        _loss(layer(inputs)).backward()
    (record,) = [r for r in cap.records if r.site.kind == "weightnorm"]
    fit = fit_record(record)
    expected = v.detach().norm(dim=1, keepdim=True) * dv
    torch.testing.assert_close(fit.residual, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(fit.figures["beta"], (fit.g * fit.z).sum(1))
    torch.testing.assert_close(fit.figures["slope_ratio"], torch.ones(4, dtype=D))
    assert torch.equal(fit.figures["alpha"], torch.zeros(4, dtype=D))


def test_naive_gap_equals_explained_part_over_s(digits64):
    """gamma/s dL/dy - dL/dx = (alpha + beta z)/s, and the site's naive gap is its norm over ||dL/dx||."""
    x, y = digits64
    model = build_model("mlp_bn").double().train()
    lin, bn, rest = model.net[1], model.net[2], model.net[3:]
    h = lin(x.flatten(1)).detach().requires_grad_()
    out = bn(h)
    out.retain_grad()
    loss = F.cross_entropy(rest(out), y)
    loss.backward()
    s = _scale(h.detach(), "batchnorm", bn.eps)
    z = (h.detach() - h.detach().mean(0)) / s
    g = bn.weight.detach() * out.grad
    naive = g / s
    explained = (g.mean(0) + (g * z).mean(0) * z) / s
    torch.testing.assert_close(naive - h.grad, explained, rtol=0, atol=1e-14)
    expected_gap = float(explained.norm() / h.grad.norm())
    sites = gls_step(model, (x, y))["gls_sites"].set_index("site")
    assert sites.loc["net.2", "naive_gap"] == pytest.approx(expected_gap, rel=1e-9)
    assert sites.loc["net.2", "naive_gap_identity"] == pytest.approx(expected_gap, rel=1e-9)


def _pooled_residual_r2(residual: torch.Tensor, g: torch.Tensor) -> float:
    return 1 - float(residual.pow(2).sum() / g.pow(2).sum())


@pytest.mark.parametrize("order", ["bn_ln", "ln_bn"])
def test_two_step_regression(order):
    """Two norms in series: R^2 of the later one, then of the earlier one on what the first left."""
    torch.manual_seed(6)
    eps = 1e-3
    model = nn.Sequential(nn.Linear(5, 6), BatchLayerNorm(6, eps=eps, order=order), nn.Linear(6, 3)).double()
    x = torch.randn(12, 5, dtype=D)
    table = gls_step(model, (x, torch.zeros(12, dtype=torch.long)), lambda out, _: _loss(out))["gls_two_step"]
    assert len(table) == 1
    row = table.iloc[0]
    assert row["order"] == ("batchnorm->layernorm" if order == "bn_ln" else "layernorm->batchnorm")

    def bn(t):
        return F.batch_norm(t, None, None, training=True, eps=eps)

    def ln(t):
        return F.layer_norm(t, t.shape[1:], eps=eps)

    first, second = (bn, ln) if order == "bn_ln" else (ln, bn)
    kinds = ("batchnorm", "layernorm") if order == "bn_ln" else ("layernorm", "batchnorm")
    gamma, beta = model[1].weight.detach(), model[1].bias.detach()
    h = model[0](x).detach().requires_grad_()
    u = first(h)
    u.retain_grad()
    v = second(u)
    v.retain_grad()
    _loss(model[2](gamma * v + beta)).backward()
    s1, s2 = _scale(h.detach(), kinds[0], eps), _scale(u.detach(), kinds[1], eps)
    assert row["r2_first"] == pytest.approx(_pooled_residual_r2(s2 * u.grad, v.grad), rel=1e-9, abs=1e-12)
    assert row["r2_second_on_residual"] == pytest.approx(_pooled_residual_r2(s1 * h.grad, u.grad), rel=1e-9, abs=1e-12)
    r_first = (s2 * u.grad).detach()
    w = h.detach().requires_grad_()
    (dw,) = torch.autograd.grad((r_first * first(w)).sum(), w)
    unscaled = _pooled_residual_r2(s1 * dw, r_first)
    assert row["r2_second_unscaled"] == pytest.approx(unscaled, rel=1e-9, abs=1e-12)
    assert row["r2_combined"] == pytest.approx(1 - (1 - row["r2_first"]) * (1 - unscaled), rel=1e-12)


def test_whatif_extra_regression_against_autograd():
    """An extra per-sample (LN-style) or per-channel regression of a BN site's residual, eps = 0."""
    torch.manual_seed(7)
    module = _norm("batchnorm", (6, 3, 4, 4), 1e-2)
    x = torch.randn(6, 3, 4, 4, dtype=D).requires_grad_()
    (dx,) = torch.autograd.grad(_loss(module(x)), x)
    with capture(module) as cap:
        _loss(module(x)).backward()
    table = gls_tables(cap)["gls_whatif"].set_index("extra_partitioning")
    r = _scale(x.detach(), "batchnorm", 1e-2) * dx
    z = F.batch_norm(x.detach(), None, None, training=True, eps=1e-2)
    for part, norm in [("per_sample", lambda t: F.layer_norm(t, t.shape[1:], eps=EPS0)),
                       ("per_channel", lambda t: F.batch_norm(t, None, None, training=True, eps=EPS0))]:
        w = z.clone().requires_grad_()
        (dw,) = torch.autograd.grad((r * norm(w)).sum(), w)
        s = _scale(z, "layernorm" if part == "per_sample" else "batchnorm", EPS0, ndim=3)
        expected = _pooled_residual_r2(s * dw, r)
        assert table.loc[part, "r2_extra"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert table.loc["per_sample", "r2_extra"] > 1e-3


@pytest.mark.parametrize("weight", [1, 3])
def test_virtual_items_against_appended_batch(weight):
    """Regularized residual = s dL/dx of the real items when the two virtual items (x = mu +- sigma,
    z = +-1, gradients alpha* +- beta*) are appended ``weight`` times each to a real BatchNorm (eps = 0)."""
    torch.manual_seed(8)
    x = (torch.randn(3, 4, dtype=D) * 1.5 + 0.5).requires_grad_()
    g = torch.randn(3, 4, dtype=D)
    alpha_star, beta_star = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    mu, sigma = x.detach().mean(0), x.detach().std(0, correction=0)
    virtual = torch.cat([(mu + sigma).expand(weight, 4), (mu - sigma).expand(weight, 4)])
    z_all = F.batch_norm(torch.cat([x, virtual]), None, None, training=True, eps=EPS0)
    g_virtual = torch.cat([(alpha_star + beta_star).expand(weight, 4), (alpha_star - beta_star).expand(weight, 4)])
    torch.testing.assert_close(z_all[3:].detach(), torch.cat([torch.ones(weight, 4), -torch.ones(weight, 4)]).to(D))
    (dx,) = torch.autograd.grad((z_all * torch.cat([g, g_virtual])).sum(), x)
    z = ((x.detach() - mu) / sigma).T
    alpha_w, beta_w = regularized_fit(z, g.T, alpha_star, beta_star, float(weight), 3)
    torch.testing.assert_close(g.T - alpha_w - beta_w * z, (sigma * dx).T, rtol=0, atol=1e-13)


def _mlp_eps0() -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, eps=EPS0), nn.Tanh(), nn.Linear(4, 3)).double()


def _site_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, z, g) at the BN of ``_mlp_eps0`` by autograd, h the BN input."""
    h = model[0](x).detach()
    z = F.batch_norm(h, None, None, training=True, eps=EPS0).requires_grad_()
    out = model[1].weight.detach() * z + model[1].bias.detach()
    (gz,) = torch.autograd.grad(F.cross_entropy(model[3](torch.tanh(out)), y), z)
    return h, z.detach(), gz


def test_batch_size_sweep_against_direct_computation():
    """dist_plain and dist_regularized from appended-item BatchNorms batch by batch, running
    alpha*, beta* with momentum over the previous batches (the first batch uses its own)."""
    model = _mlp_eps0()
    torch.manual_seed(10)
    x, y = torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,))
    momentum, weight = 0.5, 2.0
    state = snapshot(model)
    tables = batch_size_sweep(model, x, y, batch_sizes=[2, 4, 8], momentum=momentum, weight=weight)
    assert_unchanged(model, state)
    reg = tables["gls_regularization"].set_index("batch_size")
    h, _, gz = _site_grads(model, x, y)
    hx = h.clone().requires_grad_()
    zx = F.batch_norm(hx, None, None, training=True, eps=EPS0)
    (reference,) = torch.autograd.grad((zx * gz).sum() * 8, hx)
    for size in (2, 4):
        plain, regular, a_star, b_star = [], [], None, None
        for start in range(0, 8, size):
            hb, zb, gb = _site_grads(model, x[start:start + size], y[start:start + size])
            alpha, beta = gb.mean(0), (gb * zb).mean(0)
            if a_star is None:
                a_star, b_star = alpha, beta
            hp = hb.clone().requires_grad_()
            (dp,) = torch.autograd.grad((F.batch_norm(hp, None, None, training=True, eps=EPS0) * gb).sum(), hp)
            mu, sigma = hb.mean(0), hb.std(0, correction=0)
            n_w = int(weight)
            cat = torch.cat([hp, (mu + sigma).expand(n_w, 4), (mu - sigma).expand(n_w, 4)])
            g_cat = torch.cat([gb, (a_star + b_star).expand(n_w, 4), (a_star - b_star).expand(n_w, 4)])
            (dr,) = torch.autograd.grad((F.batch_norm(cat, None, None, training=True, eps=EPS0) * g_cat).sum(), hp)
            plain.append(size * dp)
            regular.append(size * dr)
            a_star, b_star = momentum * a_star + (1 - momentum) * alpha, momentum * b_star + (1 - momentum) * beta
        dist_plain = float((torch.cat(plain) - reference).norm() / reference.norm())
        dist_reg = float((torch.cat(regular) - reference).norm() / reference.norm())
        assert reg.loc[size, "dist_plain"] == pytest.approx(dist_plain, rel=1e-9)
        assert reg.loc[size, "dist_regularized"] == pytest.approx(dist_reg, rel=1e-9)
    assert reg.loc[8, "dist_plain"] == pytest.approx(0.0, abs=1e-12)
    sweep = tables["gls_batch_sweep"]
    assert sorted(sweep["batch_size"]) == [2, 4, 8] and list(sweep.columns) == COLUMNS["gls_batch_sweep"]
    with pytest.raises(DataShapeError, match="3"):
        batch_size_sweep(model, x, y, batch_sizes=[3])


@pytest.mark.parametrize("name", ["resnet_bn", "transformer_rms"])
def test_reductions_storage_gives_the_same_fit(name, digits64):
    x, y = digits64
    model = build_model(name).double().train()
    tables = {}
    for storage in ("device", "reductions"):
        with capture(model, storage=storage) as cap:
            F.cross_entropy(model(x[:16]), y[:16]).backward()
        tables[storage] = gls_tables(cap)
    full, red = tables["device"]["gls_partitions"], tables["reductions"]["gls_partitions"]
    for col in ("alpha", "beta", "ols_slope", "slope_ratio", "r2", "residual_norm"):
        torch.testing.assert_close(torch.tensor(red[col].values), torch.tensor(full[col].values), rtol=1e-8, atol=1e-12)
    assert red["identity_error"].isna().all() and full["identity_error"].max() < 1e-12
    sites_full, sites_red = tables["device"]["gls_sites"], tables["reductions"]["gls_sites"]
    torch.testing.assert_close(torch.tensor(sites_red["naive_gap"].values), torch.tensor(sites_full["naive_gap"].values),
                               rtol=1e-7, atol=0)
    assert tables["reductions"]["gls_scatter"].empty and list(tables["reductions"]["gls_whatif"].columns) == COLUMNS["gls_whatif"]


def test_eval_mode_batchnorm_removes_nothing(digits64):
    x, y = digits64
    model = build_model("mlp_bn").double()
    tables = gls_step(model, (x, y), train=False)
    part = tables["gls_partitions"]
    assert not part["batch_stats"].any()
    assert (part["alpha"] == 0).all() and (part["beta"] == 0).all()
    undefined = part["r2"].isna()  # R^2 is 0/0 where a channel receives no gradient (dead ReLU)
    assert (part.loc[undefined, "residual_norm"] == 0).all() and (part.loc[~undefined, "r2"] == 0).all()
    assert part["identity_error"].max() < 1e-13
    assert (tables["gls_sites"]["naive_gap"] < 1e-13).all()


def test_scatter_pairs_of_one_partition():
    torch.manual_seed(11)
    module = _norm("batchnorm", (7, 3), 1e-5)
    x = torch.randn(7, 3, dtype=D)
    with capture(module) as cap:
        _loss(module(x)).backward()
    fit = fit_record(cap.records[0])
    table = scatter_table(fit, partition=2)
    z = F.batch_norm(x, None, None, training=True, eps=1e-5)[:, 2]
    torch.testing.assert_close(torch.tensor(table["z"].values), z)
    g = torch.tensor(table["g"].values)
    torch.testing.assert_close(torch.tensor(table["fit"].values), g.mean() + (g * z).mean() * z)
    with pytest.raises(DataShapeError, match="partition 3"):
        scatter_table(fit, partition=3)


def test_no_gradient_records_are_left_out(digits64):
    x, _ = digits64
    model = build_model("mlp_bn").double()
    with capture(model) as cap, torch.no_grad():
        model(x)
    tables = gls_tables(cap)
    assert tables["gls_sites"].empty and list(tables["gls_sites"].columns) == COLUMNS["gls_sites"]
    with pytest.raises(AnalyzerError, match="no gradient"):
        fit_record(cap.records[0])


def test_extra_regression_is_zero_on_its_own_partition_with_eps_0():
    """The residual of a centered fit with eps = 0 is orthogonal to 1 and z: nothing left to explain."""
    torch.manual_seed(12)
    z = torch.randn(4, 9, dtype=D)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, correction=0, keepdim=True)
    g = torch.randn(4, 9, dtype=D)
    residual = g - g.mean(1, keepdim=True) - (g * z).mean(1, keepdim=True) * z
    assert abs(extra_regression_r2(residual, z)) < 1e-14
    assert extra_regression_r2(g, z) > 0


def test_analyze_quick_leaves_the_model_unchanged(digits32):
    x, y = digits32
    model = build_model("mlp_bn").eval()
    model(x).sum().backward()
    state = snapshot(model)
    out = analyze(AnalysisContext(model, [(x, y)]))
    assert_unchanged(model, state)
    for name, columns in COLUMNS.items():
        assert list(out.tables[name].columns[: len(columns)]) == columns, name
    assert not out.tables["gls_batch_sweep"].empty and not out.tables["gls_regularization"].empty
    assert out.findings[0].startswith("net.") and "of its incoming gradient: " in out.findings[0] and "% (median R²" in out.findings[0]
    assert out.headline["gls_n_sites"] == 2 and out.headline["gls_identity_rel_max"] < 1e-5
    assert math.isfinite(out.headline["gls_r2_mean"])


def test_captured_dtype_arithmetic_agrees_with_float64(digits32):
    """dtype=None works in the capture's float32 and gives the float64 figures to float32 accuracy."""
    x, y = digits32
    model = build_model("resnet_bn").train()
    with capture(model) as cap:
        F.cross_entropy(model(x[:16]), y[:16]).backward()
    exact, fast = gls_tables(cap)["gls_partitions"], gls_tables(cap, dtype=None)["gls_partitions"]
    for col in ("alpha", "beta", "r2", "slope_ratio"):
        torch.testing.assert_close(torch.tensor(fast[col].values), torch.tensor(exact[col].values), rtol=1e-3, atol=1e-6)
    assert exact["identity_rel"].max() < 1e-5 and fast["identity_rel"].max() < 1e-5


def test_two_step_found_between_modules_only_when_in_series():
    """BatchNorm1d then LayerNorm modules (with BN's affine between) form one pair; a ReLU between
    the next two breaks the chain."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6), nn.ReLU(), nn.BatchNorm1d(6),
                          nn.Linear(6, 3)).double()
    x = torch.randn(10, 4, dtype=D)
    table = gls_step(model, (x, torch.zeros(10, dtype=torch.long)), lambda out, _: _loss(out))["gls_two_step"]
    assert list(zip(table["first_site"], table["second_site"])) == [("1", "2")]
    assert 0 <= table["r2_second_on_residual"].iloc[0] <= 1


@pytest.mark.parametrize("name", ["resnet_bn", "cnn_gn", "transformer_ln", "transformer_rms"])
def test_analysis_leaves_the_captured_tensors_unchanged(name, digits32, digits64):
    """The in-place arithmetic of fit_record works on copies: x, y, dL/dy, dL/dx of every record are
    bit-identical after the analysis, in float64 and in the captured dtype (float32 and float64 captures)."""
    for dtype, (x, y) in ((torch.float32, digits32), (torch.float64, digits64)):
        model = build_model(name).to(dtype).train()
        with capture(model) as cap:
            F.cross_entropy(model(x[:8]), y[:8]).backward()
        before = [[t.clone() for t in (r.x, r.y, r.dy, r.dx)] for r in cap.records]
        for arithmetic in (torch.float64, None):
            gls_tables(cap, dtype=arithmetic)
        for record, saved in zip(cap.records, before):
            for now, then in zip((record.x, record.y, record.dy, record.dx), saved):
                assert torch.equal(now, then), record.site.name


def test_whatif_per_channel_cells_equal_the_generic_sums(digits64):
    """The what-if of per-channel sites from (channel, sample) cell sums equals
    extra_regression_r2 on the input-shaped residual and z."""
    x, y = digits64
    model = build_model("resnet_bn").double().train()
    with capture(model) as cap:
        F.cross_entropy(model(x[:16]), y[:16]).backward()
    for fit in fit_records(cap):
        cells, generic = _channel_whatif(fit), _generic_whatif(fit)
        for part in ("per_sample", "per_channel"):
            assert cells[part] == pytest.approx(generic[part], rel=1e-10, abs=1e-13)
