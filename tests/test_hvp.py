"""Hessian-vector products (normscope.analyzers.hvp) against autograd's dense Hessian and
finite differences, in float64; both backends agree; the model is never touched."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from normscope.analyzers.hvp import BACKEND_CACHE, BatchLoss, HessianOperator, select_backend
from normscope.errors import UnknownNameError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model


def tiny_model(eps: float = 1e-5) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, eps=eps), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def tiny_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, names: list[str]) -> torch.Tensor:
    """The Hessian over ``names`` by torch.autograd.functional.hessian on an independent copy."""
    net = copy.deepcopy(model).train(mode == "train")
    if mode == "train":
        net[1].track_running_stats = False
    params = dict(net.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(net, {**params, **parts}, (x,)), y)

    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", ["double_backward", "func"])
@pytest.mark.parametrize("group", ["total", "1"])
def test_hvp_matches_dense_hessian(mode, backend, group):
    model, (x, y) = tiny_model(), tiny_batch()
    loss = BatchLoss(model, x, y, mode=mode)
    names = list(loss.params) if group == "total" else loss.layers()[group]
    op = HessianOperator(loss, names, backend)
    H = dense_hessian(model, x, y, mode, names)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    shared = HessianOperator(loss, backend=backend).block(names)
    torch.testing.assert_close(shared(v), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_quadratic_form_against_finite_differences_of_the_gradient(mode):
    model = build_model("mlp_bn").double()
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 1, 8, 8, generator=generator, dtype=torch.float64), torch.randint(0, 10, (32,), generator=generator)
    loss = BatchLoss(model, x, y, mode=mode)
    op = HessianOperator(loss, backend="double_backward")
    d = -op.gradient()
    h = 1e-5
    plus = HessianOperator(loss.with_params({n: p + h * t for (n, p), t in zip(loss.params.items(), op.split(d).values())}))
    minus = HessianOperator(loss.with_params({n: p - h * t for (n, p), t in zip(loss.params.items(), op.split(d).values())}))
    fd = float(torch.dot((plus.gradient() - minus.gradient()) / (2 * h), d))
    assert op.quadratic_form(d) == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("name", ["mlp_bn", "resnet_bn"])
def test_backends_agree(name, digits64):
    model = build_model(name).double()
    x, y = digits64[0][:16], digits64[1][:16]
    for mode in ("train", "eval"):
        loss = BatchLoss(model, x, y, mode=mode)
        a, b = HessianOperator(loss, backend="double_backward"), HessianOperator(loss, backend="func")
        v = torch.randn(a.numel, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        torch.testing.assert_close(a(v), b(v), rtol=1e-9, atol=1e-12)


def test_auto_backend_measures_both_and_the_model_is_untouched(digits32):
    model = build_model("mlp_bn")
    model.net[1].weight.grad = torch.ones_like(model.net[1].weight)
    before = snapshot(model)
    loss = BatchLoss(model, *digits32, mode="train")
    op = HessianOperator(loss, backend="double_backward")
    assert select_backend(op, good_enough=0.0) in ("double_backward", "func")
    assert set(op.timings) == {"double_backward", "func"}
    op = HessianOperator(loss)
    assert op.backend in op.timings and op.timings[op.backend] == BACKEND_CACHE[model][(torch.float32, True, True)][1][op.backend]
    again = HessianOperator(BatchLoss(model, *digits32, mode="train"))
    assert again.timings == op.timings and again.selection_products == 0  # cached, not re-timed
    op(op.gradient())
    HessianOperator(BatchLoss(model, *digits32, mode="eval"))(op.gradient())
    assert_unchanged(model, before)


def counted_products(monkeypatch) -> list[str]:
    """The backend of every product any HessianOperator computes from now on."""
    calls: list[str] = []
    call = HessianOperator.__call__

    def counting(self, v):
        calls.append(self.backend)
        return call(self, v)

    monkeypatch.setattr(HessianOperator, "__call__", counting)
    return calls


@pytest.mark.parametrize("trial_seconds, good_enough, expected", [
    (0.0, 0.0, ["double_backward"]),  # trying func does not fit: the first product decides
    (math.inf, math.inf, ["double_backward"]),  # the first product is fast enough
    (math.inf, 0.0, ["double_backward", "double_backward", "func", "func"]),
])
def test_backend_selection_counts_its_products(monkeypatch, trial_seconds, good_enough, expected):
    model, (x, y) = tiny_model(), tiny_batch()
    op = HessianOperator(BatchLoss(model, x, y), backend="double_backward")
    calls = counted_products(monkeypatch)
    select_backend(op, trial_seconds, good_enough)
    assert calls == expected and op.selection_products == len(expected) and op.products == 0
    assert set(op.timings) == set(expected)


def test_backend_is_chosen_once_per_model_and_shared_by_modes_without_batch_statistics(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = tiny_batch()
    calls = counted_products(monkeypatch)
    shared = [HessianOperator(BatchLoss(plain, x, y, mode=mode), trial_seconds=0.0) for mode in ("train", "eval", "train")]
    assert [op.selection_products for op in shared] == [1, 0, 0] and len(calls) == 1
    batchnorm = tiny_model()
    chosen = [HessianOperator(BatchLoss(batchnorm, x, y, mode=mode), trial_seconds=0.0) for mode in ("train", "eval", "eval")]
    assert [op.selection_products for op in chosen] == [1, 1, 0] and len(calls) == 3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_loss_is_the_model_loss_in_that_mode(mode, digits64):
    model = build_model("mlp_bn").double()
    with torch.no_grad():
        model.net[2].running_mean.uniform_(-1, 1)
    x, y = digits64
    reference = copy.deepcopy(model).train(mode == "train")
    expected = F.cross_entropy(reference(x), y)
    loss = BatchLoss(model, x, y, mode=mode)
    assert float(loss().detach()) == pytest.approx(float(expected.detach()), rel=1e-14)
    loss()
    assert torch.equal(loss.model.net[2].running_mean, model.net[2].running_mean)


def test_bad_names():
    model, (x, y) = tiny_model(), tiny_batch()
    with pytest.raises(UnknownNameError, match="mode"):
        BatchLoss(model, x, y, mode="test")
    with pytest.raises(UnknownNameError, match="backend"):
        HessianOperator(BatchLoss(model, x, y), backend="fast")
    with pytest.raises(UnknownNameError, match="parameter"):
        HessianOperator(BatchLoss(model, x, y), ["nope"], "func")
