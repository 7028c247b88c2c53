"""Curvature in the model's dtype (issue 21, item 4): float32 products with float64 Lanczos and
trace sums, checked against float64 on the batch; ``precision="float64"`` keeps the exact path;
quick mode computes lambda_max alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normscope
from normscope.analyzers.descent import descent_tables
from normscope.analyzers.hvp import BatchLoss, HessianOperator, curvature_dtype
from normscope.errors import UnknownNameError
from normscope.models import build_model


@pytest.fixture(scope="module")
def batch(digits32):
    x, y = digits32
    return x[:32], y[:32]


def test_curvature_dtype_follows_the_model():
    model = build_model("mlp_bn")
    assert curvature_dtype(model) == torch.float32
    assert curvature_dtype(model, "float64") == torch.float64
    assert curvature_dtype(build_model("mlp_bn").double()) == torch.float64
    assert curvature_dtype(build_model("mlp_bn").to(torch.bfloat16)) == torch.float32  # half precision is raised
    with pytest.raises(UnknownNameError, match="precision"):
        curvature_dtype(model, "float16")


def float64_product(model, x, y, mode: str, v: torch.Tensor) -> torch.Tensor:
    """``H v`` in float64 by plain double backward, written out here (no normscope operator)."""
    net = build_model("mlp_bn")
    net.load_state_dict(model.state_dict())
    net = net.double().train(mode == "train")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d) and mode == "train":
            m.track_running_stats = False
    params = [p for p in net.parameters()]
    loss = F.cross_entropy(net(x.double()), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hv = torch.autograd.grad(flat @ v, params)
    return torch.cat([h.reshape(-1) for h in hv])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float32_products_agree_with_float64_and_the_check_says_how_well(batch, mode):
    model = build_model("mlp_bn")
    x, y = batch
    loss = BatchLoss(model, x, y, mode=mode, dtype=curvature_dtype(model))
    op = HessianOperator(loss)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hv32 = op(v)
    assert hv32.dtype == torch.float32
    exact = float64_product(model, x, y, mode, v)
    relative = float((hv32.double() - exact).norm() / exact.norm())
    assert 0 < relative < 1e-5
    tables, meta = descent_tables(model, x, y, modes=(mode,))
    row = tables["descent_operator"].iloc[0]
    assert row["dtype"] == "float32" and row["float64_check"] == "measured"
    assert 0 < row["float64_rel_error"] < 1e-5 and meta[mode]["float64_rel_error"] == row["float64_rel_error"]


def test_float32_lambda_max_is_within_its_bound_of_the_float64_one(batch):
    model = build_model("mlp_bn")
    x, y = batch
    fast, _ = descent_tables(model, x, y, modes=("eval",))
    exact, _ = descent_tables(model, x, y, modes=("eval",), precision="float64")
    a = fast["descent_spectrum"].query("group == 'total'")
    b = exact["descent_spectrum"].query("group == 'total'")
    assert list(a["rank"]) == [1] == list(b["rank"])  # quick mode: lambda_max alone
    assert exact["descent_operator"].iloc[0]["dtype"] == "float64"
    assert exact["descent_operator"].iloc[0]["float64_check"] == "products in float64"
    top, ref = a.iloc[0], b.iloc[0]
    assert top["converged"] and top["residual"] <= 1e-3 * top["eigenvalue"]
    assert abs(top["eigenvalue"] - ref["eigenvalue"]) <= top["error_bound"] + ref["error_bound"] + 1e-5 * ref["eigenvalue"]
    trace = fast["descent_trace"].query("group == 'total'").iloc[0]
    ref_trace = exact["descent_trace"].query("group == 'total'").iloc[0]
    assert trace["trace_low"] < trace["trace"] < trace["trace_high"]
    assert abs(trace["trace"] - ref_trace["trace"]) < (trace["trace_high"] - trace["trace_low"]) + (
        ref_trace["trace_high"] - ref_trace["trace_low"])


def test_top_k_when_asked(batch):
    model = build_model("mlp_bn")
    tables, _ = descent_tables(model, *batch, modes=("eval",), k=3)
    values = tables["descent_spectrum"].query("group == 'total'")["eigenvalue"].to_numpy()
    assert len(values) == 3 and np.all(np.diff(values) <= 0)


def test_api_precision(batch):
    model = build_model("mlp_bn")
    result = normscope.analyze(model, batch, analyzers="descent", batch_size=32, batches=1, budget=None, precision="float64")
    assert set(result.tables["descent_operator"]["dtype"]) == {"float64"}
    with pytest.raises(UnknownNameError, match="precision"):
        normscope.analyze(model, batch, analyzers="descent", batch_size=32, batches=1, precision="half")
