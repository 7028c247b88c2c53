"""One row of every analyzer table with a documented formula (docs/tables.md), recomputed from
scratch inside the test: explicit normalizations written out with torch ops, plain autograd,
least squares by torch.linalg.lstsq, dense Hessians; no normscope helper on the reference side.

The model: Linear -> BatchNorm1d -> LayerNorm -> ReLU -> Linear in float64 on digits (every 4th
pixel), so one BatchNorm site (per-channel partitions) feeds one LayerNorm site (per-sample
partitions) in series, and a ReLU follows the LayerNorm.
"""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.analyzers import AnalysisContext, get_analyzer
from normscope.analyzers.bias import estimator_bias, jacobian_product_bias, slopes
from normscope.analyzers.descent import descent_tables
from normscope.analyzers.gls import batch_size_sweep, gls_tables
from normscope.capture import capture
from normscope.data import load_digits

D = torch.float64
N = 24


def build() -> nn.Module:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(16, 6), nn.BatchNorm1d(6, eps=1e-3), nn.LayerNorm(6, eps=1e-4), nn.ReLU(),
                          nn.Linear(6, 10)).to(D)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def data():
    images, labels = load_digits(D)
    return images.flatten(1)[:, ::4][:N].contiguous(), labels[:N]


def by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Every quantity of both sites, written out: BatchNorm over the batch (dim 0), LayerNorm over
    the features (dim 1), and gradients by autograd at the intermediate tensors."""
    lin1, bn, ln, lin2 = model[0], model[1], model[2], model[4]
    h = (x @ lin1.weight.T + lin1.bias).detach().requires_grad_()
    mu_b, var_b = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    s_b = torch.sqrt(var_b + bn.eps)
    z_b = (h - mu_b) / s_b
    y_b = bn.weight * z_b + bn.bias
    mu_l, var_l = y_b.mean(1, keepdim=True), ((y_b - y_b.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True)
    s_l = torch.sqrt(var_l + ln.eps)
    z_l = (y_b - mu_l) / s_l
    y_l = ln.weight * z_l + ln.bias
    loss = F.cross_entropy(torch.clamp(y_l, min=0) @ lin2.weight.T + lin2.bias, y)
    dh, dyb, dyl = torch.autograd.grad(loss, [h, y_b, y_l])
    out = {"h": h.detach(), "loss": float(loss), "dh": dh, "dyb": dyb, "dyl": dyl, "y_l": y_l.detach()}
    out["bn"] = {"z": z_b.detach(), "g": (bn.weight * dyb).detach(), "s": s_b.detach().expand_as(h), "dx": dh,
                 "dy": dyb, "gamma": bn.weight.detach().expand_as(h)}
    out["ln"] = {"z": z_l.detach(), "g": (ln.weight * dyl).detach(), "s": s_l.detach().expand_as(h), "dx": dyb,
                 "dy": dyl, "gamma": ln.weight.detach().expand_as(h)}
    return out


def partition_fit(z: torch.Tensor, g: torch.Tensor) -> dict:
    """Theorem 1 of "Normalization Gradients are Least-Squares Residuals" on one partition (1-D tensors): alpha = mean g, beta = mean g z."""
    alpha, beta = g.mean(), (g * z).mean()
    residual = g - alpha - beta * z
    ols = ((z - z.mean()) * (g - g.mean())).mean() / ((z - z.mean()) ** 2).mean()
    return {"alpha": float(alpha), "beta": float(beta), "ols_slope": float(ols), "slope_ratio": float(beta / ols),
            "r2": float(1 - residual.pow(2).sum() / g.pow(2).sum()), "residual": residual,
            "residual_sq": float(residual.pow(2).sum()), "g_sq": float(g.pow(2).sum())}


def partitions(site: dict, dim: int) -> list[dict]:
    """The fits of every partition: BatchNorm's columns (dim 1 indexes them) or LayerNorm's rows."""
    select = (lambda t, i: t[:, i]) if dim == 1 else (lambda t, i: t[i])
    count = site["z"].shape[dim]
    return [{**partition_fit(select(site["z"], i), select(site["g"], i)),
             **{k: select(site[k], i) for k in ("z", "g", "s", "dx", "dy", "gamma")}} for i in range(count)]


@pytest.fixture(scope="module")
def gls(data):
    x, y = data
    model = build().train()
    with capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    tables = gls_tables(cap)
    hand = by_hand(build(), x, y)
    return tables, hand, {"bn": partitions(hand["bn"], 1), "ln": partitions(hand["ln"], 0)}


def test_gls_partitions_row(gls):
    tables, hand, parts = gls
    row = tables["gls_partitions"].query("site == '1' and partition == 2").iloc[0]
    p = parts["bn"][2]
    for column in ("alpha", "beta", "ols_slope", "slope_ratio", "r2"):
        assert row[column] == pytest.approx(p[column], rel=1e-10), column
    assert row["residual_norm"] == pytest.approx(math.sqrt(p["residual_sq"]), rel=1e-10)
    identity = float((p["s"] * p["dx"] - p["residual"]).abs().max())
    assert identity < 1e-13 and row["identity_error"] < 1e-13
    assert row["identity_rel"] == pytest.approx(row["identity_error"] / float(p["g"].abs().max()), rel=1e-12)


def test_gls_sites_and_kinds_rows(gls):
    tables, hand, parts = gls
    for site, key in (("1", "bn"), ("2", "ln")):
        row = tables["gls_sites"].set_index("site").loc[site]
        r2 = np.array([p["r2"] for p in parts[key]])
        assert row["n_partitions"] == len(r2)
        assert row["r2_mean"] == pytest.approx(r2.mean(), rel=1e-10)
        assert row["r2_median"] == pytest.approx(np.median(r2), rel=1e-10)
        assert row["r2_q10"] == pytest.approx(np.quantile(r2, 0.1), rel=1e-10)
        assert row["r2_q90"] == pytest.approx(np.quantile(r2, 0.9), rel=1e-10)
        pooled = 1 - sum(p["residual_sq"] for p in parts[key]) / sum(p["g_sq"] for p in parts[key])
        assert row["r2_pooled"] == pytest.approx(pooled, rel=1e-10)
        site_t = hand[key]
        naive = site_t["gamma"] / site_t["s"] * site_t["dy"]
        assert row["naive_gap"] == pytest.approx(float((naive - site_t["dx"]).norm() / site_t["dx"].norm()), rel=1e-9)
        explained = sum(float(((p["g"] - p["residual"]) / p["s"]).pow(2).sum()) for p in parts[key])
        left = sum(float((p["residual"] / p["s"]).pow(2).sum()) for p in parts[key])
        assert row["naive_gap_identity"] == pytest.approx(math.sqrt(explained / left), rel=1e-9)
        kind = tables["gls_kinds"].set_index("kind").loc[row["kind"]]
        assert kind["n_sites"] == 1 and kind["r2_mean"] == pytest.approx(r2.mean(), rel=1e-10)
        assert kind["naive_gap_mean"] == pytest.approx(row["naive_gap"], rel=1e-12)


def test_gls_scatter_rows(gls):
    tables, _, parts = gls
    scatter = tables["gls_scatter"]
    for site, key in (("1", "bn"), ("2", "ln")):
        part = scatter[scatter["site"] == site]
        p = parts[key][int(part["partition"].iloc[0])]
        assert (part["partition"] == part["partition"].iloc[0]).all()
        np.testing.assert_allclose(part["fit"], p["alpha"] + p["beta"] * part["z"], rtol=1e-10, atol=1e-13)
        pairs = {(round(float(a), 10), round(float(b), 10)) for a, b in zip(p["z"], p["g"])}
        assert {(round(a, 10), round(b, 10)) for a, b in zip(part["z"], part["g"])} <= pairs


def test_gls_two_step_row(gls):
    """BN (first in the forward) then LN: the backward regresses at LN, then at BN."""
    tables, hand, parts = gls
    row = tables["gls_two_step"].iloc[0]
    assert (row["first_site"], row["second_site"]) == ("1", "2")
    pooled = lambda ps: 1 - sum(p["residual_sq"] for p in ps) / sum(p["g_sq"] for p in ps)  # noqa: E731
    assert row["r2_first"] == pytest.approx(pooled(parts["ln"]), rel=1e-10)
    assert row["r2_second_on_residual"] == pytest.approx(pooled(parts["bn"]), rel=1e-10)
    r = torch.stack([p["residual"] for p in parts["ln"]])  # (N, C): LN's residual
    z = hand["bn"]["z"]
    left = r - r.mean(0) - (r * z).mean(0) * z  # refitted on BN's per-channel partitions
    unscaled = 1 - float(left.pow(2).sum() / r.pow(2).sum())
    assert row["r2_second_unscaled"] == pytest.approx(unscaled, rel=1e-9)
    assert row["r2_combined"] == pytest.approx(1 - (1 - row["r2_first"]) * (1 - unscaled), rel=1e-12)


def _ols_r2(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    left = total = 0.0
    for z, r in groups:
        design = torch.stack([torch.ones_like(z), z], 1)
        coef = torch.linalg.lstsq(design, r[:, None]).solution
        left += float((r - (design @ coef)[:, 0]).pow(2).sum())
        total += float(r.pow(2).sum())
    return 1 - left / total


def test_gls_whatif_rows(gls):
    """One more least-squares fit of the BN site's residual on [1, z] per sample or per channel."""
    tables, hand, parts = gls
    table = tables["gls_whatif"].query("site == '1'").set_index("extra_partitioning")["r2_extra"]
    r = torch.stack([p["residual"] for p in parts["bn"]], 1)  # (N, C)
    z = hand["bn"]["z"]
    assert table["per_sample"] == pytest.approx(_ols_r2([(z[i], r[i]) for i in range(N)]), rel=1e-9, abs=1e-13)
    assert table["per_channel"] == pytest.approx(_ols_r2([(z[:, c], r[:, c]) for c in range(6)]), rel=1e-9, abs=1e-13)


def test_gls_batch_sweep_and_regularization_rows(data):
    """B = 6 of L = 24: the sweep's R^2 of the BN site over the four batches, and the distances of
    the plain and the regularized gradient (two virtual items of weight 1, running alpha*, beta*
    with momentum 0.5, the first batch's own to start) to the one-batch gradient, rescaled per item."""
    x, y = data
    momentum, size = 0.5, 6
    tables = batch_size_sweep(build(), x, y, batch_sizes=[size], momentum=momentum, weight=1.0)
    sweep = tables["gls_batch_sweep"].query("site == '1'").iloc[0]
    reg = tables["gls_regularization"].query("site == '1'").iloc[0]
    model = build()
    reference = N * by_hand(model, x, y)["dh"]
    r2, plain, regular, star = [], [], [], None
    for start in range(0, N, size):
        hand = by_hand(model, x[start:start + size], y[start:start + size])
        site = hand["bn"]
        r2 += [p["r2"] for p in partitions(site, 1)]
        plain.append(size * hand["dh"])
        alpha, beta = site["g"].mean(0), (site["g"] * site["z"]).mean(0)
        star = (alpha, beta) if star is None else star
        # the weighted means over the real items and the two virtual batch items (z, g) =
        # (+1, alpha* + beta*), (-1, alpha* - beta*) of weight 1 (MATH.md §2)
        alpha_w = (size * alpha + 2 * star[0]) / (size + 2)
        beta_w = (size * beta + 2 * star[1]) / (size + 2)
        regular.append(size * (site["g"] - alpha_w - beta_w * site["z"]) / site["s"])
        star = (momentum * star[0] + (1 - momentum) * alpha, momentum * star[1] + (1 - momentum) * beta)
    assert sweep["batch_size"] == size and sweep["r2_mean"] == pytest.approx(np.mean(r2), rel=1e-10)
    dist = lambda parts: float((torch.cat(parts) - reference).norm() / reference.norm())  # noqa: E731
    assert reg["dist_plain"] == pytest.approx(dist(plain), rel=1e-9)
    assert reg["dist_regularized"] == pytest.approx(dist(regular), rel=1e-9)


def test_stats_rows(data):
    x, y = data
    model = build()
    out = get_analyzer("stats")(AnalysisContext(model=model, batches=[(x, y)]))
    hand = by_hand(build(), x, y)
    bn, ln = model[1], model[2]
    h = hand["h"]
    row = out.tables["stats_channels"].query("site == '1' and channel == 4").iloc[0]
    mean, var = float(h[:, 4].mean()), float(((h[:, 4] - h[:, 4].mean()) ** 2).mean())
    rm, rv = float(bn.running_mean[4]), float(bn.running_var[4])
    assert row["batch_mean"] == pytest.approx(mean, rel=1e-12) and row["batch_var"] == pytest.approx(var, rel=1e-12)
    assert row["mean_drift"] == pytest.approx(abs(mean - rm) / math.sqrt(rv + bn.eps), rel=1e-12)
    assert row["var_ratio"] == pytest.approx(var / rv, rel=1e-12)
    assert row["eps_fraction"] == pytest.approx(bn.eps / (var + bn.eps), rel=1e-12)
    assert row["gamma"] == float(bn.weight[4]) and row["beta"] == float(bn.bias[4])
    site = out.tables["stats_sites"].set_index("site").loc["1"]
    channels = out.tables["stats_channels"].query("site == '1'")
    var_all = ((h - h.mean(0)) ** 2).mean(0).numpy()
    drift = np.abs(h.mean(0).numpy() - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps)
    assert site["eps_fraction_max"] == pytest.approx((bn.eps / (var_all + bn.eps)).max(), rel=1e-12)
    assert site["mean_drift_mean"] == pytest.approx(drift.mean(), rel=1e-12)
    assert site["var_ratio_median"] == pytest.approx(np.median(var_all / bn.running_var.numpy()), rel=1e-12)
    assert site["gamma_mean"] == pytest.approx(float(bn.weight.mean()), rel=1e-12)
    assert site["feeding_weight_norm"] == pytest.approx(float(model[0].weight.norm()), rel=1e-12)
    assert len(channels) == 6
    # the LayerNorm site: partitions are samples, and a ReLU follows it
    sample = out.tables["stats_channels"].query("site == '2' and channel == 5").iloc[0]
    ln_in = (bn.weight * (h - h.mean(0)) / torch.sqrt(torch.tensor(var_all) + bn.eps) + bn.bias).detach()
    v5 = float(((ln_in[5] - ln_in[5].mean()) ** 2).mean())
    assert sample["batch_var"] == pytest.approx(v5, rel=1e-10)
    assert sample["eps_fraction"] == pytest.approx(ln.eps / (v5 + ln.eps), rel=1e-10)
    assert sample["relu_zero_fraction"] == pytest.approx(float((hand["y_l"][5] <= 0).double().mean()), abs=1e-15)
    assert out.tables["stats_sites"].set_index("site").loc["2", "relu_zero_fraction"] == pytest.approx(
        float((hand["y_l"] <= 0).double().mean()), rel=1e-12)


# -- descent and bias: Linear -> BatchNorm1d -> Tanh -> Linear, one normalization level ----------
def mlp() -> nn.Module:
    torch.manual_seed(14)  # d^T H d > 0 along -g in total and for layers 0 and 3, < 0 for layer 1
    model = nn.Sequential(nn.Linear(16, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 10)).to(D)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def mlp_loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The train-mode loss written out: params = [W1, b1, gamma, beta, W2, b2]."""
    w1, b1, gamma, beta, w2, b2 = params
    h = x @ w1.T + b1
    z = (h - h.mean(0)) / torch.sqrt(((h - h.mean(0)) ** 2).mean(0) + eps)
    return F.cross_entropy(torch.tanh(gamma * z + beta) @ w2.T + b2, y)


def flat_loss(model: nn.Module, x, y):
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    unflat = lambda t: [piece.reshape(s) for piece, s in zip(t.split(sizes), shapes)]  # noqa: E731
    return theta, lambda t: mlp_loss(unflat(t), x, y)


def dense(loss_of, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and dense Hessian by one double-backward row per coordinate."""
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_of(t), t, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(t.numel())])
    return g.detach(), H.detach()


@pytest.fixture(scope="module")
def descent(data):
    x, y = data[0][:16], data[1][:16]
    tables, _ = descent_tables(mlp(), x, y, lr=0.1, modes=("train",), quick=True)
    theta, loss_of = flat_loss(mlp(), x, y)
    g, H = dense(loss_of, theta)
    return tables, x, y, theta, loss_of, g, H


def test_descent_directions_quadratic_spectrum_trace_rows(descent):
    tables, x, y, theta, loss_of, g, H = descent
    d = -g
    sizes = [p.numel() for p in mlp().parameters()]
    ends = np.cumsum([0, *sizes])
    blocks = {"total": slice(0, int(ends[-1])), "0": slice(0, int(ends[2])), "1": slice(int(ends[2]), int(ends[4])),
              "3": slice(int(ends[4]), int(ends[6]))}
    rows = tables["descent_directions"].query("direction == 'gradient'").set_index("group")
    assert set(rows.index) == set(blocks)
    for group, b in blocks.items():
        row, db, gb, Hb = rows.loc[group], d[b], g[b], H[b, b]
        curvature = float(db @ Hb @ db)
        assert row["sq_norm"] == pytest.approx(float(db @ db), rel=1e-12)
        assert row["slope"] == pytest.approx(float(gb @ db), rel=1e-12)
        assert row["curvature"] == pytest.approx(curvature, rel=1e-8, abs=1e-14)
        expected = 2 * float(-gb @ db) / curvature if curvature > 0 else math.inf
        assert row["a_crit"] == pytest.approx(expected, rel=1e-8)
        assert row["lr_below_a_crit"] == (0.1 < expected)
    assert rows.loc["1", "a_crit"] == math.inf and rows.loc["1", "a_crit_reason"] == "nonpositive_curvature"
    base = float(loss_of(theta))
    for q in tables["descent_quadratic"].itertuples():
        moved = float(loss_of(theta + q.step * d))
        predicted = base + q.step * float(g @ d) + 0.5 * q.step**2 * float(d @ H @ d)
        assert q.loss == pytest.approx(moved, rel=1e-12)
        assert q.quadratic == pytest.approx(predicted, rel=1e-9)
        assert q.rel_error == pytest.approx(abs(moved - predicted) / max(abs(moved - base), abs(predicted - base)), rel=1e-6)
    top = tables["descent_spectrum"].query("group == 'total' and rank == 1").iloc[0]
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert top["eigenvalue"] == pytest.approx(lam, rel=1e-3)
    assert top["stability_limit"] == pytest.approx(2 / top["eigenvalue"], rel=1e-12)
    trace = tables["descent_trace"].query("group == 'total'").iloc[0]
    assert abs(trace["trace"] - float(H.trace())) < 4 * trace["trace_stderr"]


def test_descent_scale_invariance_and_reparam_rows(descent):
    tables, x, y, theta, loss_of, g, H = descent
    model = mlp()
    params = [p.detach() for p in model.parameters()]
    w = params[0]

    def at(c: float) -> tuple[float, float, float]:
        """L(cW), a_crit of the W block along -dL/d(cW), max_j |<cW_j, dL/d(cW)_j>|."""
        leaf = (c * w).clone().requires_grad_()
        loss = mlp_loss([leaf, *params[1:]], x, y)
        (gw,) = torch.autograd.grad(loss, leaf, create_graph=True)
        flat = gw.reshape(-1)
        Hw = torch.stack([torch.autograd.grad(flat[i], leaf, retain_graph=True)[0].reshape(-1) for i in range(flat.numel())])
        gd = flat.detach()
        return float(loss), 2 * float(gd @ gd) / float(gd @ Hw @ gd), float((c * w * gw.detach()).sum(1).abs().max())

    (l1, a1, _), (l2, a2, inner2) = at(1.0), at(2.0)
    row = tables["descent_scale_invariance"].query("layer == '0' and c == 2.0").iloc[0]
    assert row["loss_ratio"] == pytest.approx(l2 / l1, rel=1e-12)
    assert row["a_crit_ratio"] == pytest.approx(a2 / a1, rel=1e-8)
    assert row["max_abs_inner"] == pytest.approx(inner2, rel=1e-6, abs=1e-15)
    assert row["effective_lr"] == pytest.approx(0.1 / float((2 * w).pow(2).sum()), rel=1e-12)
    rep = tables["descent_reparam"].query("layer == '0'").iloc[0]
    xc = x - x.mean(0)
    S = xc.T @ xc / len(x)
    gamma, beta = params[2], params[3]
    h = x @ w.T + params[1]
    bn_out = gamma * (h - h.mean(0)) / torch.sqrt(((h - h.mean(0)) ** 2).mean(0) + 1e-5) + beta
    w_hat = gamma[:, None] * w / torch.sqrt(torch.einsum("ji,ik,jk->j", w, S, w) + 1e-5)[:, None]
    assert rep["max_abs_error"] == pytest.approx(float((bn_out - (xc @ w_hat.T + beta)).abs().max()), abs=1e-13)
    assert rep["max_abs_error"] < 1e-12

    def range_cond(matrix: np.ndarray) -> float:
        values = np.linalg.eigvalsh(matrix)
        kept = values[values > 1e-10 * values[-1]]
        return values[-1] / kept[0]

    Sn = S.numpy()
    assert rep["cond_s"] == pytest.approx(range_cond(Sn), rel=1e-8)
    conds = [range_cond((Sn - np.outer(Sn @ wj, Sn @ wj) / (wj @ Sn @ wj)) / (wj @ Sn @ wj)) for wj in w.numpy()]
    assert rep["cond_reparam"] == pytest.approx(max(conds), rel=1e-8)


def test_bias_rows(data):
    """bias_estimators (BatchNorm, B = 2 and 4, total) from R seeded minibatches drawn without
    replacement, against g* = the full-batch gradient (the data fit in one batch, MATH.md §4);
    bias_slopes from those rows; bias_jacobian: zero gap at one normalization level."""
    x, y = data
    repeats, sizes = 12, (2, 4)
    table, _ = estimator_bias(mlp(), x, y, batch_sizes=sizes, repeats=repeats, estimators=("batchnorm",), seed=3)
    theta, loss_of = flat_loss(mlp(), x, y)
    leaf = theta.clone().requires_grad_()
    (star,) = torch.autograd.grad(loss_of(leaf), leaf)
    generator = torch.Generator().manual_seed(3)
    draws = {b: [torch.randperm(N, generator=generator)[:b] for _ in range(repeats)] for b in sizes}
    rel = {}
    for b in sizes:
        samples = []
        for idx in draws[b]:
            _, batch_loss = flat_loss(mlp(), x[idx], y[idx])
            leaf = theta.clone().requires_grad_()
            samples.append(torch.autograd.grad(batch_loss(leaf), leaf)[0])
        diffs = torch.stack(samples) - star
        mean_diff = diffs.mean(0)
        pairs = sum(float(diffs[i] @ diffs[j]) for i in range(repeats) for j in range(repeats) if i != j)
        unbiased = pairs / (repeats * (repeats - 1))  # E||g_hat - g*||^2 without the noise term
        tr_cov = float(((diffs - mean_diff) ** 2).sum()) / (repeats - 1)
        norm = float(star.norm())
        row = table.query(f"batch_size == {b} and group == 'total'").iloc[0]
        rel[b] = math.sqrt(max(unbiased, 0)) / norm
        assert row["rel_bias"] == pytest.approx(rel[b], rel=1e-9)
        assert row["rel_bias_uncorrected"] == pytest.approx(float(mean_diff.norm()) / norm, rel=1e-9)
        assert row["variance"] == pytest.approx(tr_cov / norm**2, rel=1e-9)
        mean_est = torch.stack(samples).mean(0)
        assert row["cosine"] == pytest.approx(float(mean_est @ star) / float(mean_est.norm() * star.norm()), rel=1e-12)
        assert row["mse"] == pytest.approx(rel[b] ** 2 + tr_cov / norm**2, rel=1e-9)
    slope = slopes(table).query("group == 'total'").iloc[0]
    assert rel[2] > 0 and rel[4] > 0
    # bias_slopes fits only on three or more measurable points (MATH.md §4): two sizes give no slope.
    assert slope["n_points"] <= 2 and math.isnan(slope["slope"])
    forced = table.assign(measurable=True)
    three = pd.concat([forced, forced.query("batch_size == 4").assign(batch_size=8, rel_bias=rel[4] ** 2 / rel[2])])
    fit = slopes(three.reset_index(drop=True)).query("group == 'total'").iloc[0]
    assert fit["n_points"] == 3
    assert fit["slope"] == pytest.approx((math.log(rel[4]) - math.log(rel[2])) / (math.log(4) - math.log(2)), rel=1e-9)
    jac = jacobian_product_bias(mlp(), x, y).iloc[0]
    assert jac["n_norm_layers"] == 1 and jac["jacobian_product_gap"] < 1e-12 * float(star.norm())
    assert jac["relative_gap"] == pytest.approx(jac["jacobian_product_gap"] / float(star.norm()), rel=1e-9)
