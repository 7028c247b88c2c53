"""Two-stage backprop ("Extreme Normalization" (under review) §3.2) in float64: against the two-tower construction (§3.4) and,
with one normalization layer at B = N, against the plain full-batch BatchNorm gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.errors import InvalidArgumentError, NoNormSitesError
from normscope.guard import assert_unchanged, snapshot
from normscope.ops.population import PopulationNorm
from normscope.ops.two_stage import two_stage_gradient, two_stage_step, two_tower_gradient

DT = torch.float64


def _mlp(layers: int, norm=nn.BatchNorm1d, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Flatten()]
    fan = 12
    for _ in range(layers):
        mods += [nn.Linear(fan, 8), norm(8), nn.ReLU()]
        fan = 8
    mods.append(nn.Linear(fan, 3))
    model = nn.Sequential(*mods).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _cnn(layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    cin = 2
    for _ in range(layers):
        mods += [nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
        cin = 4
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    return nn.Sequential(*mods).to(DT)


def _data(model_kind: str, n: int = 24):
    g = torch.Generator().manual_seed(1)
    shape = (n, 12) if model_kind == "mlp" else (n, 2, 5, 5)
    return torch.randn(*shape, generator=g, dtype=DT) + 0.5, torch.randint(0, 3, (n,), generator=g)


def _full_batch_bn_grad(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Plain autograd through training-mode torch BatchNorm on all examples: g*."""
    train = copy.deepcopy(model).train()
    grads = torch.autograd.grad(F.cross_entropy(train(x), y), list(train.parameters()))
    return dict(zip([n for n, _ in train.named_parameters()], grads))


def _set_population_moments(model: nn.Module, x) -> None:
    """EMAs := population mean and biased variance of every norm's input (one full-batch pass)."""
    probe = copy.deepcopy(model).train()
    moments = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, name=name: moments.__setitem__(name, a[0].detach()))
        for name, m in probe.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    probe(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for name, act in moments.items():
            dims = [0, *range(2, act.dim())]
            module = model.get_submodule(name)
            module.running_mean.copy_(act.mean(dims))
            module.running_var.copy_(act.var(dims, unbiased=False))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_one_layer_at_full_batch_equals_population_gradient(kind: str) -> None:
    model = (_mlp if kind == "mlp" else _cnn)(1).eval()
    x, y = _data(kind)
    _set_population_moments(model, x)
    target = _full_batch_bn_grad(model, x, y)
    for chunk in (None, 5):
        result = two_stage_gradient(model, x, y, chunk_size=chunk)
        assert _max_diff(result.grads, target) < 1e-10
    scale = max(float(g.abs().max()) for g in target.values())
    assert scale > 1e-3


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_two_layers_in_series_stay_biased_at_full_batch(kind: str) -> None:
    model = (_mlp if kind == "mlp" else _cnn)(2).eval()
    x, y = _data(kind)
    _set_population_moments(model, x)
    target = _full_batch_bn_grad(model, x, y)
    result = two_stage_gradient(model, x, y)
    assert _max_diff(result.grads, target) > 1e-4


def _population_norm_model() -> nn.Module:
    def norm(c: int) -> nn.Module:
        return PopulationNorm(c, r_m=0.6, r_v=0.8, f_max=1.3, u_max=1.5, rotation="auto")

    model = _mlp(3, norm=norm, seed=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PopulationNorm):
                m.running_mean.copy_(torch.randn(8, generator=g, dtype=DT))
                m.running_var.copy_(torch.rand(8, generator=g, dtype=DT) + 0.5)
    return model.eval()


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_chunked_two_stage_equals_two_towers(chunk: int | None) -> None:
    model = _population_norm_model()
    x, y = _data("mlp", 20)
    reference = two_tower_gradient(model, x, y)
    result = two_stage_gradient(model, x, y, chunk_size=chunk)
    assert _max_diff(result.grads, reference) < 1e-12
    assert max(float(g.abs().max()) for g in reference.values()) > 1e-3
    assert result.chunks == (1 if chunk is None else -(-20 // chunk))


def test_model_is_not_mutated() -> None:
    model = _population_norm_model().train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = snapshot(model)
    x, y = _data("mlp", 10)
    two_stage_gradient(model, x, y, chunk_size=3)
    two_tower_gradient(model, x, y)
    assert_unchanged(model, state)


def test_step_adds_gradients_and_moves_the_emas() -> None:
    model = _population_norm_model()
    x, y = _data("mlp", 12)
    expected = two_stage_gradient(copy.deepcopy(model), x, y)
    norm = model[2]
    mean0, var0 = norm.running_mean.clone(), norm.running_var.clone()
    loss = two_stage_step(model, x, y, chunk_size=4)
    assert loss == pytest.approx(expected.loss, abs=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected.grads[name], rtol=0, atol=1e-12)
    act = model[1](x).detach()
    rate = norm.momentum
    assert rate == 0.2  # PopulationNorm's own EMA rate ("Extreme Normalization" (under review) §5), not BatchNorm's 0.1
    torch.testing.assert_close(norm.running_mean, (1 - rate) * mean0 + rate * act.mean(0))
    torch.testing.assert_close(norm.running_var, (1 - rate) * var0 + rate * (act - mean0).pow(2).mean(0))


def test_bad_inputs() -> None:
    x, y = _data("mlp", 4)
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        two_stage_gradient(_mlp(1), x, y, chunk_size=0)
    with pytest.raises(NoNormSitesError):
        two_stage_gradient(nn.Sequential(nn.Linear(12, 3)).to(DT), x, y)
    untracked = _mlp(1, norm=lambda c: nn.BatchNorm1d(c, track_running_stats=False))
    with pytest.raises(InvalidArgumentError, match="running statistics"):
        two_stage_gradient(untracked, x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu() -> None:
    model = _population_norm_model()
    x, y = _data("mlp", 12)
    cpu = two_stage_gradient(model, x, y, chunk_size=5).grads
    cuda = two_stage_gradient(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), chunk_size=5).grads
    assert max(float((cuda[k].cpu() - cpu[k]).abs().max()) for k in cpu) < 1e-12
