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
    """seed 002 Theorem 1 on one partition (1-D tensors): alpha = mean g, beta = mean g z."""
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
