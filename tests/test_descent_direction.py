"""a_crit along an optimizer's update (MATH.md §5) against a dense float64 Hessian and the
published update rules of SGD with momentum and Adam, written out here.

Along d the quadratic model L + a g^T d + a^2/2 d^T H d decreases for 0 < a < 2(-g^T d)/d^T H d;
2||d||^2/d^T H d is that threshold only for d = -g (issue #16, defect 1).
"""

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normscope.analyzers.descent import (
    COLUMNS,
    critical_step,
    critical_step_reason,
    descent_rows,
    findings,
    optimizer_direction,
)
from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.data import load_digits
from normscope.monitor.curvature import curvature_rows


def small_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)).double()


@pytest.fixture(scope="module")
def problem():
    """The model, a batch (32 digits, every 4th pixel) and other batches to build optimizer state."""
    images, labels = load_digits(torch.float64)
    pixels = images.flatten(1)[:, ::4]
    others = [(pixels[32 + 32 * k: 64 + 32 * k], labels[32 + 32 * k: 64 + 32 * k]) for k in range(3)]
    return {"model": small_bn_model(), "x": pixels[:32], "y": labels[:32], "others": others}


def dense_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Parameter names, gradient g and dense Hessian H of the train-mode loss, by plain autograd
    on a flat parameter vector (one double-backward row per parameter)."""
    net = copy.deepcopy(model).train()
    net[1].track_running_stats = False  # batch statistics, the minibatch loss of MATH.md §5
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).requires_grad_(True)
    pieces = dict(zip(names, theta.split([s.numel() for s in shapes])))
    loss = F.cross_entropy(functional_call(net, {n: pieces[n].reshape(s) for n, s in zip(names, shapes)}, (x,)), y)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(theta.numel())])
    assert torch.allclose(H, H.T, atol=1e-12)
    return names, g.detach(), H


def flat(tensors: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def warm(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    """Real optimizer steps on other batches, so its state (momentum, moments) is not trivial."""
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad()


def analyzer_total(problem, model, optimizer) -> tuple[dict, dict]:
    loss = BatchLoss(model, problem["x"], problem["y"])
    d, lr = optimizer_direction(model, optimizer, loss)
    rows = descent_rows(HessianOperator(loss, backend="double_backward"), d, lr, f"optimizer:{type(optimizer).__name__}")
    return rows[0], d


def check_row(row: dict, d: torch.Tensor, g: torch.Tensor, H: torch.Tensor, lr: float) -> float:
    """The row against the dense reference; returns the reference a_crit."""
    slope, curvature = float(g @ d), float(d @ H @ d)
    a_crit = 2 * -slope / curvature
    assert slope < 0 and curvature > 0
    assert row["slope"] == pytest.approx(slope, rel=1e-10)
    assert row["curvature"] == pytest.approx(curvature, rel=1e-9)
    assert row["sq_norm"] == pytest.approx(float(d @ d), rel=1e-12)
    assert row["a_crit"] == pytest.approx(a_crit, rel=1e-9)
    assert row["lr_below_a_crit"] == (lr < a_crit)
    assert row["descent_direction"] and row["a_crit_reason"] == "quadratic"
    return a_crit


def test_sgd_momentum_direction_against_the_published_rule(problem):
    model = copy.deepcopy(problem["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warm(model, optimizer, problem["others"])
    names, g, H = dense_reference(model, problem["x"], problem["y"])
    row, d_analyzer = analyzer_total(problem, model, optimizer)
    # buf <- momentum * buf + g; theta <- theta - lr * buf  (torch.optim.SGD, dampening 0, no Nesterov)
    params = dict(model.named_parameters())
    buf = flat({n: optimizer.state[params[n]]["momentum_buffer"] for n in names}, names)
    d = -(0.9 * buf + g)  # the update per unit learning rate
    torch.testing.assert_close(flat(d_analyzer, names), d, rtol=1e-10, atol=1e-12)
    a_crit = check_row(row, d, g, H, 0.1)
    gradient_form = 2 * float(d @ d) / float(d @ H @ d)
    assert gradient_form / a_crit > 2  # the old formula was off by this factor here


def test_adam_direction_against_the_published_rule(problem):
    model = copy.deepcopy(problem["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    warm(model, optimizer, problem["others"])
    names, g, H = dense_reference(model, problem["x"], problem["y"])
    row, d_analyzer = analyzer_total(problem, model, optimizer)
    params = dict(model.named_parameters())
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = b1 * flat({n: optimizer.state[params[n]]["exp_avg"] for n in names}, names) + (1 - b1) * g
    v = b2 * flat({n: optimizer.state[params[n]]["exp_avg_sq"] for n in names}, names) + (1 - b2) * g * g
    t = 4  # three warm-up steps, then this one
    d = -(m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    torch.testing.assert_close(flat(d_analyzer, names), d, rtol=1e-9, atol=1e-12)
    a_crit = check_row(row, d, g, H, 0.01)
    assert 2 * float(d @ d) / float(d @ H @ d) / a_crit > 5


def test_fresh_adam_at_lr_half_is_no_descent_step(problem):
    """A fresh Adam's first step is -lr g/(|g| + eps); at lr = 0.5 the quadratic model predicts a
    loss increase, so lr_below_a_crit must be False (the old formula said True)."""
    model = copy.deepcopy(problem["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    names, g, H = dense_reference(model, problem["x"], problem["y"])
    row, d_analyzer = analyzer_total(problem, model, optimizer)
    d = -g / (g.abs() + 1e-8)
    torch.testing.assert_close(flat(d_analyzer, names), d, rtol=1e-10, atol=1e-12)
    a_crit = check_row(row, d, g, H, 0.5)
    predicted_change = 0.5 * float(g @ d) + 0.125 * float(d @ H @ d)
    assert predicted_change > 0 and a_crit < 0.5 < 2 * float(d @ d) / float(d @ H @ d)
    assert row["lr_below_a_crit"] is False
    monitored = {(site, metric): value for site, metric, value in
                 curvature_rows(model, problem["x"], problem["y"], F.cross_entropy, optimizer, dtype=torch.float64)}
    assert monitored[("model", "a_crit")] == pytest.approx(a_crit, rel=1e-9)
    assert monitored[("model", "lr_below_a_crit")] == 0.0
    table = {"descent_directions": pd.DataFrame([row], columns=COLUMNS["descent_directions"]),
             **{name: pd.DataFrame(columns=cols) for name, cols in COLUMNS.items() if name != "descent_directions"}}
    sentence = findings(table, True, 0.5)[0]
    assert "is NOT a descent step" in sentence and "step = lr * d" in sentence


def test_ascent_direction_is_flagged(problem):
    """d = +g: g^T d > 0, no descent direction: a_crit NaN, the reason, and the finding say so."""
    _, g, _ = dense_reference(problem["model"], problem["x"], problem["y"])
    loss = BatchLoss(problem["model"], problem["x"], problem["y"])
    up = loss.gradient()
    rows = descent_rows(HessianOperator(loss, backend="double_backward"), up, 0.1, "ascent")
    total = rows[0]
    assert total["slope"] == pytest.approx(float(g @ g), rel=1e-10)
    assert math.isnan(total["a_crit"]) and not total["descent_direction"] and not total["lr_below_a_crit"]
    assert total["a_crit_reason"] == "no_descent"
    table = {"descent_directions": pd.DataFrame(rows, columns=COLUMNS["descent_directions"]),
             **{name: pd.DataFrame(columns=cols) for name, cols in COLUMNS.items() if name != "descent_directions"}}
    assert "is NOT a descent direction" in findings(table, True, 0.1)[0]


def test_critical_step_cases():
    assert critical_step(-3.0, 2.0) == 3.0 and critical_step_reason(-3.0, 2.0) == "quadratic"
    assert critical_step(-1.0, 0.0) == math.inf and critical_step_reason(-1.0, -2.0) == "nonpositive_curvature"
    assert math.isnan(critical_step(0.0, 2.0)) and critical_step_reason(0.5, 2.0) == "no_descent"
