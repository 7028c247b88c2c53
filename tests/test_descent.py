"""The descent analyzer (Deshmukh, "Batch Norm" (notes, 2020), Deb, "Batch Normalization" (notes); MATH.md §5, §6) against independent float64
computations: dense Hessians, autograd, closed forms and a real optimizer step."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.analyzers import AnalysisContext, get_analyzer
from normscope.analyzers.descent import (
    COLUMNS,
    QUICK,
    critical_step,
    descent_rows,
    descent_tables,
    feeding_layers,
    findings,
    negative_gradient,
    optimizer_direction,
    parting_step,
    quadratic_model,
    scale_invariance,
)
from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.reparam import condition_number, input_covariance, reparam_check, reparam_hessian
from normscope.analyzers.spectrum import dense_hessian, hutchinson_trace, top_eigenvalues
from normscope.errors import InvalidArgumentError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import MODELS, build_model
from tests.test_hvp import tiny_batch, tiny_model


# torch refuses eps = 0 in training mode; var + 1e-300 == var in float64, so this is eps = 0 exactly.
EPS_ZERO = 1e-300


@pytest.fixture(scope="module")
def tiny():
    model, (x, y) = tiny_model(), tiny_batch()
    return model, x, y


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lanczos_matches_the_dense_hessian(tiny, mode):
    model, x, y = tiny
    loss = BatchLoss(model, x, y, mode=mode)
    op = HessianOperator(loss, backend="double_backward")
    H = torch.autograd.functional.hessian(
        lambda flat: loss(op.split(flat)), op.flatten(loss.params)).numpy()
    expected = np.linalg.eigvalsh(H)[::-1]
    np.testing.assert_allclose(top_eigenvalues(op, k=4, tol=1e-12), expected[:4], rtol=1e-8, atol=1e-12)
    block = loss.layers()["0"]
    sub = HessianOperator(loss, block, "double_backward")
    idx = np.arange(sub.numel)
    np.testing.assert_allclose(top_eigenvalues(sub, k=3, tol=1e-12), np.linalg.eigvalsh(H[np.ix_(idx, idx)])[::-1][:3],
                               rtol=1e-8, atol=1e-12)
    traces = hutchinson_trace(op, n_samples=200, seed=5, blocks=loss.layers())
    trace, stderr = traces["total"]
    assert stderr > 0 and abs(trace - np.trace(H)) < 4 * stderr
    start = 0
    for group, names in loss.layers().items():
        n = sum(loss.params[k].numel() for k in names)
        block_trace, block_stderr = traces[group]
        assert abs(block_trace - np.trace(H[start:start + n, start:start + n])) < 4 * block_stderr + 1e-12
        start += n


def test_small_block_is_solved_densely(tiny):
    model, x, y = tiny
    op = HessianOperator(BatchLoss(model, x, y), ["1.bias"], "double_backward")
    values = top_eigenvalues(op, k=5)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(dense_hessian(op))[::-1], rtol=1e-10, atol=1e-14)


def test_descent_rows_against_the_dense_hessian(tiny):
    model, x, y = tiny
    loss = BatchLoss(model, x, y)
    op = HessianOperator(loss, backend="double_backward")
    H = dense_hessian(op)
    d = negative_gradient(loss)
    rows = {r["group"]: r for r in descent_rows(HessianOperator(loss, backend="func"), d, 0.1, "gradient")}
    shared = {r["group"]: r for r in descent_rows(op, d, 0.1, "gradient")}
    assert {g: r["curvature"] for g, r in shared.items()} == pytest.approx({g: r["curvature"] for g, r in rows.items()}, rel=1e-10)
    flat = op.flatten(d).numpy()
    assert rows["total"]["sq_norm"] == pytest.approx(flat @ flat, rel=1e-12)
    assert rows["total"]["curvature"] == pytest.approx(flat @ H @ flat, rel=1e-10)
    assert rows["total"]["a_crit"] == pytest.approx(2 * (flat @ flat) / (flat @ H @ flat), rel=1e-10)
    assert rows["total"]["lr_below_a_crit"] == (0.1 < rows["total"]["a_crit"])
    start = 0
    for group, names in loss.layers().items():
        n = sum(loss.params[k].numel() for k in names)
        part = flat[start:start + n]
        assert rows[group]["curvature"] == pytest.approx(part @ H[start:start + n, start:start + n] @ part, rel=1e-10, abs=1e-14)
        start += n
    assert critical_step(-1.0, -2.0) == math.inf and critical_step(-1.0, 0.0) == math.inf


def test_quadratic_model_against_direct_evaluation(tiny):
    model, x, y = tiny
    loss = BatchLoss(model, x, y)
    op = HessianOperator(loss, backend="double_backward")
    H, g = dense_hessian(op), op.gradient().numpy()
    d = negative_gradient(loss)
    flat = op.flatten(d).numpy()
    steps = [1e-4, 1e-2, 1.0, 10.0]
    table = quadratic_model(op, d, steps)
    assert list(table.columns) == COLUMNS["descent_quadratic"]
    base = F.cross_entropy(copy.deepcopy(model).train()(x), y).item()
    for a, row in zip(steps, table.itertuples()):
        moved = copy.deepcopy(model).train()
        with torch.no_grad():
            for (name, p) in moved.named_parameters():
                p.add_(a * d[name])
        assert row.loss == pytest.approx(F.cross_entropy(moved(x), y).item(), rel=1e-12)
        assert row.quadratic == pytest.approx(base + a * g @ flat + 0.5 * a * a * flat @ H @ flat, rel=1e-10)
    assert table["rel_error"].iloc[0] < 1e-3
    assert parting_step(pd.DataFrame({"step": [1.0, 2.0, 3.0], "rel_error": [0.01, 0.5, 0.05]})) == 2.0
    assert math.isnan(parting_step(pd.DataFrame({"step": [1.0], "rel_error": [0.01]})))


def conv_bn_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4, eps=EPS_ZERO), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 10)).double()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_scale_invariance_with_eps_zero(kind, digits64):
    x, y = digits64
    if kind == "linear":
        model, layer = build_model("mlp_bn").double(), "net.1"
        model.net[2].eps = EPS_ZERO
    else:
        model, layer = conv_bn_model(), "0"
    loss = BatchLoss(model, x, y)
    assert layer in feeding_layers(loss.model, loss.inputs)
    rows = scale_invariance(loss, layer, lr=0.1, scales=(1.0, 0.5, 3.0), backend="double_backward")
    weight = model.get_submodule(layer).weight.detach()
    for r in rows:
        assert r["loss_ratio"] == pytest.approx(1.0, rel=1e-12)
        assert r["a_crit_ratio"] == pytest.approx(r["c"] ** 2, rel=1e-8)
        assert r["max_abs_inner"] < 1e-12
        assert r["effective_lr"] == pytest.approx(0.1 / (r["c"] ** 2 * float(weight.pow(2).sum())), rel=1e-12)
    grad = loss.gradient([f"{layer}.weight"])[f"{layer}.weight"]
    assert float(grad.abs().max()) > 1e-6


def test_inner_product_is_not_zero_without_a_following_batchnorm(digits64):
    model = build_model("mlp_bn").double()
    loss = BatchLoss(model, *digits64)
    w = loss.params["net.7.weight"]
    g = loss.gradient(["net.7.weight"])["net.7.weight"]
    assert float((w * g).sum(dim=1).abs().max()) > 1e-6


def test_feeding_layers_on_the_resnet(digits32):
    model = build_model("resnet_bn")
    pairs = feeding_layers(copy.deepcopy(model).train(), digits32[0][:8])
    assert pairs["conv1"] == "bn1"
    assert pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert "fc" not in pairs and len(pairs) == 1 + 4 * 2 + 1


def test_reparameterization_identity_and_condition(digits64):
    model = build_model("mlp_bn").double()
    x, _ = digits64
    net = copy.deepcopy(model).train()
    for layer, norm in (("net.1", "net.2"), ("net.4", "net.5")):
        result = reparam_check(net, x, layer, norm)
        assert result["max_abs_error"] < 1e-12
        assert 1 <= result["cond_reparam"] <= result["cond_s"] * (1 + 1e-8)
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(40, 5, generator=generator, dtype=torch.float64) @ torch.diag(torch.tensor([1.0, 2, 3, 4, 10]).double())
    S = input_covariance(a)
    torch.testing.assert_close(S, torch.from_numpy(np.cov(a.numpy(), rowvar=False, bias=True)))
    assert condition_number(S) == pytest.approx(np.linalg.cond(S.numpy()), rel=1e-10)


def test_reparam_hessian_against_autograd():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(50, 4, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 3, 0.5, 2]).double()
    xc = x - x.mean(0)
    S = input_covariance(x)
    w0 = torch.randn(4, generator=generator, dtype=torch.float64)

    def objective(w):
        n = lambda v: v / torch.sqrt(v @ S @ v)
        return 0.5 * ((xc @ (n(w) - n(w0))) ** 2).mean()

    H = torch.autograd.functional.hessian(objective, w0)
    torch.testing.assert_close(reparam_hessian(S, w0), H, rtol=1e-10, atol=1e-12)


def test_optimizer_direction_is_the_real_update(digits64):
    model = build_model("mlp_bn").double()
    x, y = digits64
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.zero_grad()
    model_state, opt_state = snapshot(model), copy.deepcopy(optimizer.state_dict())
    loss = BatchLoss(model, x, y)
    d, lr = optimizer_direction(model, optimizer, loss)
    assert lr == 0.01
    assert_unchanged(model, model_state)
    assert optimizer.state_dict()["state"][0]["step"] == opt_state["state"][0]["step"]
    torch.testing.assert_close(optimizer.state_dict()["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"], rtol=0, atol=0)
    twin = copy.deepcopy(model).train()
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    F.cross_entropy(twin(x), y).backward()
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    twin_opt.step()
    for n, p in twin.named_parameters():
        torch.testing.assert_close(d[n], (p.detach() - before[n]) / 0.01, rtol=1e-10, atol=1e-12)


def test_analyzer_tables_and_no_mutation(digits32):
    model = build_model("mlp_bn")
    model.train()
    model.net[1].weight.grad = torch.full_like(model.net[1].weight, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = snapshot(model)
    ctx = AnalysisContext(model=model, batches=[digits32], lr=None, options={"descent_optimizer": optimizer})
    out = get_analyzer("descent")(ctx)
    assert_unchanged(model, before)
    for name, columns in COLUMNS.items():
        assert list(out.tables[name].columns) == columns and len(out.tables[name]), name
    directions = out.tables["descent_directions"]
    assert set(directions["mode"]) == {"train", "eval"}
    assert set(directions["direction"]) == {"gradient", "optimizer:SGD"}
    assert set(directions.loc[directions["direction"] == "optimizer:SGD", "lr"]) == {0.05}
    assert set(out.tables["descent_scale_invariance"]["layer"]) == {"net.1", "net.4"}
    assert any("default lr = 0.1" in f for f in out.findings)
    assert out.headline["lr"] == 0.1 and out.headline["lambda_max_train"] > 0


def test_bad_arguments(tiny, digits32):
    model, x, y = tiny
    loss = BatchLoss(model, x, y)
    op = HessianOperator(loss, backend="double_backward")
    with pytest.raises(InvalidArgumentError, match="k must be"):
        top_eigenvalues(op, k=0)
    with pytest.raises(InvalidArgumentError, match="n_samples"):
        hutchinson_trace(op, n_samples=1)
    with pytest.raises(InvalidArgumentError, match="scales must be positive"):
        scale_invariance(loss, "0", lr=0.1, scales=(0.0,))
    with pytest.raises(InvalidArgumentError, match="lr must be positive"):
        get_analyzer("descent")(AnalysisContext(model=build_model("mlp_bn"), batches=[digits32], lr=-1.0))


def test_analyzer_without_batchnorm(digits32):
    model = build_model("transformer_ln")
    before = snapshot(model)
    out = get_analyzer("descent")(AnalysisContext(model=model, batches=[(digits32[0][:16], digits32[1][:16])], lr=0.05))
    assert_unchanged(model, before)
    assert out.tables["descent_scale_invariance"].empty and out.tables["descent_reparam"].empty
    assert list(out.tables["descent_scale_invariance"].columns) == COLUMNS["descent_scale_invariance"]
    assert np.isfinite(out.tables["descent_trace"]["trace"]).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_descent_runs_on_every_reference_model(name, digits64):
    """The CPU flash-attention kernel has no double backward; the loss runs the math kernel,
    whose values equal the model's own forward to float64 rounding."""
    model = build_model(name)
    before = snapshot(model)
    x, y = digits64[0][:6], digits64[1][:6]
    tables, backends = descent_tables(model, x, y, quick=True, modes=("train",), precision="float64")  # exactness: float64
    assert_unchanged(model, before)
    assert backends["train"]["backend"] in ("double_backward", "func") and backends["train"]["chunk"] is None
    loss = BatchLoss(model, x, y, mode="train", dtype=torch.float64)
    with torch.no_grad():
        direct = F.cross_entropy(loss.model(x), y)
    assert float(loss()) == pytest.approx(float(direct), rel=1e-13)
    total = tables["descent_directions"].query("group == 'total'").iloc[0]
    d = negative_gradient(loss)
    h = 1e-6 / math.sqrt(total["sq_norm"])
    plus = loss.with_params({n: p + h * d[n] for n, p in loss.params.items()}).gradient()
    minus = loss.with_params({n: p - h * d[n] for n, p in loss.params.items()}).gradient()
    finite = sum(float(((plus[n] - minus[n]) * d[n]).sum()) for n in d) / (2 * h)
    assert total["curvature"] == pytest.approx(finite, rel=1e-5)
    layers = set(tables["descent_spectrum"]["group"]) - {"total"}
    assert len(layers) == min(QUICK["layer_spectra"], len(loss.layers()))
    assert set(tables["descent_trace"]["group"]) == {"total", *loss.layers()}
    assert (tables["descent_trace"]["products"] == QUICK["trace_products"]).all()
    assert (tables["descent_trace"]["method"] == "krylov-hutch++").all()
    limited = any(f.startswith("Quick mode limited the per-layer work") for f in findings(tables, True, 0.1))
    assert limited == (len(loss.layers()) > QUICK["layer_spectra"])
    for name_, frame in tables.items():
        numeric = frame.select_dtypes("number").drop(columns=["a_crit", "a_crit_ratio", "stability_limit"], errors="ignore")
        assert np.isfinite(numeric.to_numpy(float)).all(), name_  # a_crit is inf where d^T H d <= 0


def test_descent_on_example_chunks_equals_the_whole_batch(monkeypatch):
    """Chunks forced by a one-byte memory (4 examples each, balanced): the same rows as the whole
    batch, except where BatchNorm's batch statistics couple the examples (train mode: whole batch)."""
    from normscope.analyzers import descent, hvp
    from tests.test_hvp import layernorm_model

    x, y = tiny_batch(16)
    for model, chunked in ((layernorm_model(), {"train": 4, "eval": 4}), (tiny_model(), {"train": None, "eval": 4})):
        whole, meta = descent_tables(model, x, y, modes=("train", "eval"))
        assert {mode: m["chunk"] for mode, m in meta.items()} == {"train": None, "eval": None}
        monkeypatch.setattr(descent, "graph_chunk", lambda loss: None if hvp.graph_chunk(loss, memory=1) is None else 4)
        parts, meta = descent_tables(model, x, y, modes=("train", "eval"))
        monkeypatch.undo()
        assert {mode: m["chunk"] for mode, m in meta.items()} == chunked
        for name in ("descent_directions", "descent_quadratic", "descent_spectrum"):
            numeric = whole[name].select_dtypes("number").columns.drop("products", errors="ignore")
            np.testing.assert_allclose(parts[name][numeric].to_numpy(float), whole[name][numeric].to_numpy(float), rtol=1e-9, atol=1e-12)
