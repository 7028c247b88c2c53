"""normscope.Monitor: training unchanged, rows equal to a snapshot analysis, crash safety, cadences."""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import normscope
from normscope.analyzers.gls import gls_tables
from normscope.analyzers.stats import stats_tables
from normscope.capture import capture
from normscope.errors import InvalidArgumentError
from normscope.models import MLP, build_model
from normscope.monitor.metrics import DRIFT_METRICS, GLS_METRICS, STATS_METRICS, running_stats


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    for i, state in enumerate(optimizer.state.values()):
        out.update({f"o{i}:{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)})
    out["rng"] = torch.get_rng_state()
    return out


def _train(digits, out=None, steps=6, **monitor_kwargs) -> dict[str, torch.Tensor]:
    """SGD with momentum on an MLP with BatchNorm and dropout; the batch order is drawn from the
    global generator each step, so any draw by the monitor would change the run."""
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(build_model("mlp_bn"), nn.Dropout(0.2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = normscope.Monitor(model, out, optimizer=optimizer, flush_seconds=0, **monitor_kwargs) if out else None
    with monitor or torch.enable_grad():
        for _ in range(steps):
            pick = torch.randperm(x.shape[0])[:32]
            batch = (x[pick], y[pick])
            with monitor.step(batch) if monitor else torch.enable_grad():
                F.cross_entropy(model(batch[0]), batch[1]).backward()
            optimizer.step()
            optimizer.zero_grad()
    return _state(model, optimizer)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"changed by the monitor: {different}"


def test_plain_loop_training_is_bit_identical(digits32, tmp_path):
    plain = _train(digits32)
    watched = _train(digits32, tmp_path / "run", every=1, every_curvature=3, curvature_layers="*.net.1")
    assert_bit_identical(plain, watched)
    rows = pd.read_parquet(tmp_path / "run")
    assert set(rows["step"]) == set(range(6)) and {"lambda_max", "r2_mean", "mean_drift_mean"} <= set(rows["metric"])


def test_rows_equal_a_snapshot_analysis_of_the_same_step(digits64, tmp_path):
    x, y = digits64
    model = build_model("resnet_bn").double().train()
    with torch.no_grad():  # move the running statistics away from their initial values
        model(x * 2 + 0.5)
    before = copy.deepcopy(model)
    with normscope.Monitor(model, tmp_path / "run", every=1) as monitor:
        with monitor.step():
            F.cross_entropy(model(x), y).backward()
    rows = pd.read_parquet(tmp_path / "run").set_index(["site", "metric"])["value"]
    running = running_stats(before)
    with capture(before, storage="device", preserve=False) as cap:
        F.cross_entropy(before(x), y).backward()
    gls = gls_tables(cap)["gls_sites"].set_index("site")
    stats = stats_tables(cap.records, before, running)["stats_sites"].set_index("site")
    assert len(gls) == 10 and (stats["mean_drift_mean"] > 0.05).all()
    for site in gls.index:
        for metric in (*GLS_METRICS, *STATS_METRICS, *DRIFT_METRICS):
            assert math.isclose(rows[(site, metric)], gls.loc[site, metric] if metric in GLS_METRICS else stats.loc[site, metric],
                                rel_tol=1e-9, abs_tol=1e-12), (site, metric)


def test_float32_rows_match_the_float64_snapshot_closely(digits32, tmp_path):
    x, y = digits32
    model = build_model("cnn_gn").train()
    twin = copy.deepcopy(model).double()
    with normscope.Monitor(model, tmp_path / "run", every=1) as monitor:
        with monitor.step():
            F.cross_entropy(model(x), y).backward()
    rows = pd.read_parquet(tmp_path / "run").set_index(["site", "metric"])["value"]
    with capture(twin, storage="device", preserve=False) as cap:
        F.cross_entropy(twin(x.double()), y).backward()
    gls = gls_tables(cap)["gls_sites"].set_index("site")
    for site in gls.index:
        for metric in ("r2_mean", "r2_pooled", "beta_mean", "naive_gap"):
            assert math.isclose(rows[(site, metric)], gls.loc[site, metric], rel_tol=1e-4, abs_tol=1e-6), (site, metric)


def _dense_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The loss Hessian over all parameters by torch.autograd.functional.hessian (batch statistics)."""
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[start:start + s.numel()].reshape(s)
            start += s.numel()
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    grad = torch.autograd.functional.jacobian(loss, flat)
    hessian = torch.autograd.functional.hessian(loss, flat, vectorize=True)
    sizes = {n: s.numel() for n, s in zip(names, shapes)}
    return names, sizes, grad, hessian


def test_curvature_rows_equal_a_dense_hessian(digits64, tmp_path):
    x, y = digits64[0][:32], digits64[1][:32]
    torch.manual_seed(0)
    model = MLP(width=4, depth=1).double().train()
    with normscope.Monitor(model, tmp_path / "run", every=0, every_curvature=1, lr=0.3, curvature_samples=64,
                           curvature_layers=None, curvature_tol=1e-2) as monitor:
        with monitor.step((x, y)):
            F.cross_entropy(model(x), y).backward()
    rows = pd.read_parquet(tmp_path / "run").set_index(["site", "metric"])["value"]
    names, sizes, g, h = _dense_curvature(model, x, y)
    eig = torch.linalg.eigvalsh(h)
    lam, residual = rows[("model", "lambda_max")], rows[("model", "lambda_max_residual")]
    assert lam <= float(eig[-1]) * (1 + 1e-12) and float(eig[-1]) - lam <= residual + 1e-12
    assert rows[("model", "lambda_max_error")] <= 1e-2 * lam
    assert rows[("model", "stability_limit")] == 2 / lam
    # one product for the step's a_crit, one per layer, Lanczos, the Hutchinson samples
    layers = (rows.index.get_level_values("metric") == "a_crit").sum() - 1
    assert rows[("model", "products")] == 1 + layers + rows[("model", "lambda_max_products")] + 64
    assert abs(rows[("model", "trace")] - float(h.trace())) < 4 * rows[("model", "trace_stderr")]
    d = -g
    assert math.isclose(rows[("model", "a_crit")], float(2 * d @ d / (d @ h @ d)), rel_tol=1e-8)
    offsets = np.cumsum([0] + list(sizes.values()))
    for layer in ("net.1", "net.4"):
        idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names) if n.rpartition(".")[0] == layer])
        dg, hg = d[idx], h[idx][:, idx]
        a_crit = float(2 * dg @ dg / (dg @ hg @ dg))
        assert math.isclose(rows[(layer, "a_crit")], a_crit, rel_tol=1e-8)
        assert rows[(layer, "lr_below_a_crit")] == float(0.3 < a_crit)
    assert rows[("model", "lr")] == 0.3


CADENCE_SCRIPT = """
import sys, torch, torch.nn.functional as F, normscope
from normscope.data import load_digits
from normscope.models import build_model
x, y = load_digits()
x, y = x[:32], y[:32]
model = build_model("mlp_bn")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
with normscope.Monitor(model, sys.argv[1], every=1, flush_seconds=0) as monitor:
    step = 0
    while True:
        with monitor.step():
            F.cross_entropy(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        step += 1
        print(step, flush=True)
"""


def test_a_run_killed_with_sigkill_leaves_a_readable_dataset(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CADENCE_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 5:
                break
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    rows = pd.read_parquet(out)
    steps = sorted(set(rows["step"]))
    assert steps[:5] == [0, 1, 2, 3, 4] and steps == list(range(len(steps)))
    per_step = rows.groupby("step").size()
    assert (per_step == per_step.iloc[0]).all()


def test_every_metric_has_a_series_for_every_site_and_cadence(digits32, tmp_path):
    x, y = digits32
    model = build_model("transformer_ln")
    bn = build_model("mlp_bn")
    for net, name in ((model, "ln"), (bn, "bn")):
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        with normscope.Monitor(net, tmp_path / name, every=2, every_curvature=3, optimizer=optimizer,
                               curvature_layers=["norm", "net.1"], curvature_full_every=1) as monitor:
            for _ in range(7):
                with monitor.step((x[:16], y[:16])):
                    F.cross_entropy(net(x[:16]), y[:16]).backward()
                optimizer.step()
                optimizer.zero_grad()
    for name, sites, metrics in (("ln", 5, GLS_METRICS + STATS_METRICS), ("bn", 2, GLS_METRICS + STATS_METRICS + DRIFT_METRICS)):
        rows = pd.read_parquet(tmp_path / name)
        norm = rows[rows["site"] != "model"]
        norm = norm[norm["metric"].isin(metrics)]
        assert norm["site"].nunique() == sites
        for site, part in norm.groupby("site"):
            for metric in metrics:
                assert sorted(part.loc[part["metric"] == metric, "step"]) == [0, 2, 4, 6], (name, site, metric)
        model_rows = rows[rows["site"] == "model"]
        for metric in ("lambda_max", "stability_limit", "trace", "a_crit"):
            assert sorted(model_rows.loc[model_rows["metric"] == metric, "step"]) == [0, 3, 6], (name, metric)
        assert sorted(model_rows.loc[model_rows["metric"] == "lr", "step"]) == [0, 2, 3, 4, 6]
        assert np.isfinite(rows.loc[rows["metric"].isin(["r2_mean", "lambda_max"]), "value"]).all()


def test_curvature_step_without_a_batch_is_a_clear_error(tmp_path):
    model = build_model("mlp_bn")
    with normscope.Monitor(model, tmp_path / "run", every_curvature=1) as monitor:
        with pytest.raises(normscope.errors.InvalidArgumentError, match="pass the batch"):
            with monitor.step():
                pass


def test_tensorboard_scalars_sit_beside_a_readable_dataset(digits32, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = digits32
    model = build_model("mlp_bn")
    with normscope.Monitor(model, tmp_path / "run", every=1, lr=0.1, tensorboard=True) as monitor:
        for _ in range(2):
            with monitor.step():
                F.cross_entropy(model(x), y).backward()
    rows = pd.read_parquet(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "_tensorboard" / "rank0"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "normscope/r2_mean/net.2" in scalars and "normscope/lr/model" in scalars
    logged = [e.value for e in events.Scalars("normscope/r2_mean/net.2")]
    expected = rows[(rows["site"] == "net.2") & (rows["metric"] == "r2_mean")].sort_values("step")["value"]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)


def test_steps_that_record_nothing_install_no_hooks(digits32, tmp_path):
    from torch.nn.modules import module as torch_module

    x, y = digits32
    model = build_model("resnet_bn")
    hooked = []

    def count(*_):
        hooked.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
                      + len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks))

    with normscope.Monitor(model, tmp_path / "run", every=3) as monitor:
        for _ in range(4):
            with monitor.step():
                count()
                F.cross_entropy(model(x), y).backward()
    assert hooked[1] == hooked[2] == 0 and hooked[0] == hooked[3] > 0
    assert set(pd.read_parquet(tmp_path / "run")["step"]) == {0, 3}


def test_warm_started_lambda_max_is_within_its_bound_of_a_dense_hessian(digits64, tmp_path):
    """Lanczos from the previous step's Ritz vector: each step's lambda_max at most the dense
    Hessian's (float64) and within its stated residual of it, and cheaper than from a random start."""
    x, y = digits64[0][:32], digits64[1][:32]
    torch.manual_seed(0)
    model = MLP(width=16, depth=2).double().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dense = []
    with normscope.Monitor(model, tmp_path / "run", every=0, every_curvature=1, optimizer=optimizer,
                           curvature_layers=0, curvature_full_every=1, curvature_tol=1e-2) as monitor:
        for _ in range(4):
            dense.append(float(torch.linalg.eigvalsh(_dense_curvature(model, x, y)[3])[-1]))
            with monitor.step((x, y)):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    rows = pd.read_parquet(tmp_path / "run").set_index(["step", "site", "metric"])["value"]
    products = [rows[(step, "model", "lambda_max_products")] for step in range(4)]
    for step, exact in enumerate(dense):
        lam, residual = rows[(step, "model", "lambda_max")], rows[(step, "model", "lambda_max_residual")]
        assert lam <= exact * (1 + 1e-12) and exact - lam <= residual, (step, lam, exact, residual)
        assert rows[(step, "model", "lambda_max_error")] <= 1e-2 * lam
        assert rows[(step, "model", "products")] == 1 + products[step] + 4
    assert max(products[1:]) < products[0], products


def test_curvature_layers_k_takes_the_layers_the_step_moves_most(digits64):
    from normscope.analyzers.descent import optimizer_direction
    from normscope.analyzers.hvp import BatchLoss
    from normscope.monitor.curvature import curvature_rows

    x, y = digits64[0][:32], digits64[1][:32]
    torch.manual_seed(0)
    model = MLP(width=8, depth=2).double().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    d, _ = optimizer_direction(model, optimizer, BatchLoss(model, x, y))
    size: dict[str, float] = {}
    for name, t in d.items():
        size[name.rpartition(".")[0]] = size.get(name.rpartition(".")[0], 0.0) + float(t.pow(2).sum())
    biggest = set(sorted(size, key=size.get, reverse=True)[:2])
    rows = curvature_rows(model, x, y, F.cross_entropy, optimizer, layers=2)
    assert {site for site, metric, _ in rows if metric == "a_crit"} == {"model", *biggest}


def test_curvature_without_the_trace_spends_its_samples_less(digits64, tmp_path):
    """curvature_samples=0: no trace rows and exactly the Hutchinson products fewer; 1 is refused."""
    from normscope.monitor.curvature import curvature_rows

    x, y = digits64[0][:32], digits64[1][:32]
    torch.manual_seed(0)
    model = MLP(width=8, depth=2).double().train()
    rows = {samples: {(site, metric): value for site, metric, value in curvature_rows(model, x, y, F.cross_entropy, lr=0.1, layers=1,
                                                                                     samples=samples)}
            for samples in (0, 3)}
    assert ("model", "trace") in rows[3] and not any(metric == "trace" for _, metric in rows[0])
    assert rows[3][("model", "products")] - rows[0][("model", "products")] == 3
    with pytest.raises(InvalidArgumentError, match="curvature_samples"):
        normscope.Monitor(model, tmp_path, curvature_samples=1)


class _Mixed(nn.Module):
    """A weight-norm linear, one BatchNorm called twice (two records per channel) and a functional layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(64, 32))
        self.bn, self.out = nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.relu(self.bn(self.fc(x.flatten(1)))))
        return self.out(F.layer_norm(h, (32,)))


def _reference_rows(records, running) -> dict[tuple[str, str], float]:
    """The rows by exactly rounded float64 sums (math.fsum) and sorted medians, site by site."""
    import statistics

    from normscope.analyzers.gls import fit_from_sums

    def mean(values):
        kept = [v for v in values if not math.isnan(v)]
        return math.fsum(kept) / len(kept) if kept else math.nan

    out, by_site = {}, {}
    for r in records:
        by_site.setdefault(r.site.name, []).append(r)
    for site, group in by_site.items():
        used = group if group[0].layout.rule == "channel" else group[:1]
        per = []
        for r in used:
            lay = r.layout
            m, v = r.reductions["mean"].tolist(), r.reductions["var"].tolist()
            eps = [lay.eps / ((vi if lay.kind.centered else vi + mi * mi) + lay.eps) for mi, vi in zip(m, v)]
            rm, rv = (running[site][0].double().tolist(), running[site][1].double().tolist()) if site in running else ([], [])
            drift = [abs(mi - a) / math.sqrt(b + lay.eps) for mi, a, b in zip(m, rm, rv)]
            per.append((eps, drift, [vi / b for vi, b in zip(v, rv)]))
        eps, drift, ratio = ([math.fsum(col) / len(used) for col in zip(*(p[k] for p in per))] for k in range(3))
        out[(site, "eps_fraction_max")], out[(site, "eps_dominated_fraction")] = max(eps), sum(e > 0.5 for e in eps) / len(eps)
        if group[0].layout.weight is not None:
            out[(site, "gamma_mean")] = mean(group[0].layout.weight.double().reshape(-1).tolist())
        if drift:
            out[(site, "mean_drift_mean")], out[(site, "var_ratio_median")] = mean(drift), statistics.median(ratio)
        fits = [r for r in group if r.has_grad]
        if not fits:
            continue
        fig = {k: [] for k in ("r2", "beta", "slope_ratio", "residual_sq", "g_sq", "e", "res")}
        for r in fits:
            f = fit_from_sums(r.reductions, r.layout.kind.centered, r.layout.rule == "weight", r.layout.batch_stats)
            s2 = r.reductions["scale"] ** 2
            for k, v in (*((k, f[k]) for k in ("r2", "beta", "slope_ratio", "residual_sq", "g_sq")),
                         ("e", f["explained_sq"] / s2), ("res", f["residual_sq"] / s2)):
                fig[k] += v.tolist()
        finite = [v for v in fig["r2"] if math.isfinite(v)]
        out.update({(site, "r2_mean"): mean(fig["r2"]) if finite else math.nan,
                    (site, "r2_median"): statistics.median([v for v in fig["r2"] if not math.isnan(v)]) if finite else math.nan,
                    (site, "r2_pooled"): 1 - math.fsum(fig["residual_sq"]) / math.fsum(fig["g_sq"]),
                    (site, "beta_mean"): mean(fig["beta"]), (site, "beta_abs_mean"): mean([abs(b) for b in fig["beta"]]),
                    (site, "slope_ratio_mean"): mean(fig["slope_ratio"]),
                    (site, "naive_gap"): math.sqrt(math.fsum(fig["e"]) / math.fsum(fig["res"]))})
    return out


@pytest.mark.parametrize("name", ["resnet_bn", "mixed", "transformer_rms", "resnet_eval"])
def test_step_rows_equal_exactly_rounded_sums_to_float64_rounding(name, digits64):
    """The rows are segment reductions over all sites at once, summed in item order: they equal
    per-site exactly rounded sums (math.fsum) to float64 rounding, relative to the size of the terms."""
    from normscope.monitor.metrics import step_rows

    x, y = digits64
    torch.manual_seed(0)
    model = (_Mixed() if name == "mixed" else build_model(name.replace("_eval", "_bn"))).double().train(name != "resnet_eval")
    with torch.no_grad():
        model.train()(x * 2 + 0.5)
    model.train(name != "resnet_eval")
    running = running_stats(model)
    with capture(model, storage="reductions", preserve=False, functional=True) as cap:
        F.cross_entropy(model(x), y).backward()
    rows = step_rows(cap.records, running)
    expected = _reference_rows(cap.records, running)
    assert [(s, m) for s, m, _ in rows] == [k for k in expected if k[1] not in GLS_METRICS] + [k for k in expected if k[1] in GLS_METRICS]
    for site, metric, value in rows:
        want = expected[(site, metric)]
        scale = 1.0 if metric in ("r2_pooled", "beta_mean", "r2_mean") else abs(want)  # 1 - ratio, sums of +-terms
        assert value == want or (math.isnan(value) and math.isnan(want)) or abs(value - want) <= 1e-13 * max(scale, 1e-300), (site, metric, value, want)


def test_rows_of_several_steps_at_once_equal_each_step_alone(digits64):
    """The monitor computes the rows of all steps since the last flush in one call (steps_rows):
    each equals the rows of its step computed alone, bit for bit (NaN where NaN)."""
    from normscope.monitor.metrics import step_rows, steps_rows

    x, y = digits64
    model = _Mixed().double().train()
    session = capture(model, storage="reductions", preserve=False, functional=True)
    steps = []
    for step, batch in enumerate((slice(0, 40), slice(40, 64), slice(8, 64))):
        running = running_stats(model)
        with session as cap:
            F.cross_entropy(model(x[batch] * (1 + step)), y[batch]).backward()
        steps.append((10 * step, cap.records, running))
    together = steps_rows(steps)
    assert list(together) == [0, 10, 20]
    for step, records, running in steps:
        alone = step_rows(records, running)
        assert len(alone) == len(together[step]) > 0
        for (site, metric, value), (site2, metric2, value2) in zip(alone, together[step]):
            assert (site, metric) == (site2, metric2)
            assert value == value2 or (math.isnan(value) and math.isnan(value2))
