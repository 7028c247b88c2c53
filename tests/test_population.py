"""PopulationNorm ("Extreme Normalization" (under review) §3.1) in float64 against torch's BatchNorm, gradcheck and an explicit
ScaleGrad surrogate written out in the test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from normscope.errors import DataShapeError, InvalidArgumentError, UnknownNameError
from normscope.ops.population import PopulationNorm, population_norm, rotation_matrix, scale_grad

DT = torch.float64


def _randomize(norm: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g, dtype=DT) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=DT))
        norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g, dtype=DT))
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g, dtype=DT) + 0.5)
    return norm


def test_scale_grad_value_and_gradient() -> None:
    s = torch.tensor([3.0], dtype=DT)
    q = torch.tensor([2.0], dtype=DT, requires_grad=True)
    out = scale_grad(s, q, 0.25)
    assert out.item() == 3.0
    (g,) = torch.autograd.grad(out.sum(), q)
    assert g.item() == 0.25


@pytest.mark.parametrize("shape", [(12, 5), (6, 4, 3, 3)])
def test_equals_torch_batchnorm_when_ema_is_the_batch_moments(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    dims = [0, *range(2, len(shape))]
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1]).to(DT)
    pn = PopulationNorm(shape[1], microbatch=shape[0]).to(DT)
    _randomize(bn)
    pn.load_state_dict(bn.state_dict())
    with torch.no_grad():
        pn.running_mean.copy_(x.mean(dims))
        pn.running_var.copy_(x.var(dims, unbiased=False))
    y_bn, y_pn = bn(x), pn(x)
    torch.testing.assert_close(y_pn, y_bn, rtol=0, atol=1e-12)
    g = torch.randn_like(y_bn)
    grads_bn = torch.autograd.grad(y_bn, [x, bn.weight, bn.bias], g)
    grads_pn = torch.autograd.grad(y_pn, [x, pn.weight, pn.bias], g)
    for a, b in zip(grads_pn, grads_bn):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradcheck_where_the_gradient_is_a_true_derivative() -> None:
    """With the EMA set to the batch moments inside the function, r = 1 and one group, the value
    is BatchNorm's and so is the ScaleGrad gradient: gradcheck applies."""
    w = torch.rand(3, dtype=DT, requires_grad=True) + 0.5
    b = torch.randn(3, dtype=DT, requires_grad=True)
    rot = rotation_matrix(3, "random", seed=1, dtype=DT)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean = x.detach().mean((0, 2))
        var = x.detach().var((0, 2), unbiased=False)
        return population_norm(x, mean, var, w, b, training=True, momentum=0.0, microbatch=len(x), rotation=rot)

    x = torch.randn(5, 3, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_eval_mode_and_training_without_moment_gradients() -> None:
    x = torch.randn(4, 4, 3, dtype=DT, requires_grad=True)
    w = torch.rand(4, dtype=DT, requires_grad=True) + 0.5
    b = torch.randn(4, dtype=DT, requires_grad=True)
    mean = torch.randn(4, dtype=DT, requires_grad=True)
    var = (torch.rand(4, dtype=DT) + 0.5).requires_grad_()
    rot = rotation_matrix(4, "hadamard", dtype=DT)
    assert torch.autograd.gradcheck(
        lambda x, w, b, m, v: population_norm(x, m, v, w, b, training=False, rotation=rot), (x, w, b, mean, var)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b: population_norm(
            x, mean.detach(), var.detach(), w, b, training=True, momentum=0.0, r_m=0.0, r_v=0.0, u_max=math.inf, rotation=rot
        ),
        (x, w, b),
    )


def _surrogate(x, x0, norm: PopulationNorm, k: int):
    """The function whose derivative at x0 the ScaleGrad gradient is, written out:
    mu† = mu-bar + r_m (mu_g(x) - mu_g(x0)), nu† = nu-bar + c (nu_g(x) - nu_g(x0)),
    c = r_v min((nu-bar + eps)/(nu_g(x0) + eps), f_max), clip frozen at x0."""
    mean, var, eps = norm.running_mean, norm.running_var, norm.eps
    outs = []
    for start in range(0, len(x), k):
        xs, xs0 = x[start : start + k], x0[start : start + k]
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mu, mu0 = xs.mean(dims), xs0.mean(dims)
        nu = (xs - mean.view(shape)).pow(2).mean(dims)
        nu0 = (xs0 - mean.view(shape)).pow(2).mean(dims)
        ratio = (var + eps) / (nu0 + eps)
        c = norm.r_v * torch.clamp(ratio, max=norm.f_max)
        mu_d = mean + norm.r_m * (mu - mu0)
        nu_d = var + c * (nu - nu0)
        clip = torch.clamp(norm.u_max * ratio.sqrt(), max=1.0)
        q = (xs - mu_d.view(shape)) / (nu_d + eps).sqrt().view(shape) * clip.view(shape)
        outs.append(q)
    q = torch.cat(outs) * norm.weight.view(shape)
    q = torch.movedim(torch.movedim(q, 1, -1) @ norm.rotation.T, -1, 1)
    return q + norm.bias.view(shape)


@pytest.mark.parametrize("k,shape", [(1, (5, 4, 3)), (2, (5, 4, 3)), (4, (9, 4)), (1, (6, 4))])
def test_gradient_is_the_scalegrad_derivative(k: int, shape: tuple[int, ...]) -> None:
    # the fixed-mean arrangement (the default is Algorithm 1 since issue 22: tests/test_population_alg1.py)
    norm = _randomize(
        PopulationNorm(shape[1], momentum=0.0, microbatch=k, r_m=0.7, r_v=0.6, f_max=1.5, u_max=1.2, rotation="hadamard", arrangement="fixed_mean").to(DT)
    ).train()
    x0 = torch.randn(*shape, dtype=DT) * 1.5 + 0.3
    jac_op = torch.autograd.functional.jacobian(norm, x0)
    jac_ref = torch.autograd.functional.jacobian(lambda x: _surrogate(x, x0, norm, k), x0)
    torch.testing.assert_close(norm(x0), _surrogate(x0, x0, norm, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(jac_op, jac_ref, rtol=0, atol=1e-11)


def test_per_example_has_no_cross_example_gradient() -> None:
    norm = _randomize(PopulationNorm(3, momentum=0.0)).to(DT).train()
    x = torch.randn(4, 3, 5, dtype=DT)
    jac = torch.autograd.functional.jacobian(norm, x)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert jac[i, :, :, j].abs().max() == 0


def test_running_statistics_update() -> None:
    norm = _randomize(PopulationNorm(3, momentum=0.25, microbatch=2)).to(DT).train()
    mean0, var0 = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(6, 3, 2, 2, dtype=DT)
    norm(x)
    dims = (0, 2, 3)
    torch.testing.assert_close(norm.running_mean, 0.75 * mean0 + 0.25 * x.mean(dims))
    torch.testing.assert_close(norm.running_var, 0.75 * var0 + 0.25 * (x - mean0.view(1, -1, 1, 1)).pow(2).mean(dims))
    assert int(norm.num_batches_tracked) == 1
    frozen = PopulationNorm(3, momentum=0.0).to(DT).train()
    frozen(x)
    assert int(frozen.num_batches_tracked) == 0 and frozen.running_mean.abs().max() == 0
    cumulative = PopulationNorm(3, momentum=None).to(DT).train()
    cumulative(x)
    torch.testing.assert_close(cumulative.running_mean, x.mean(dims))
    norm.reset_running_stats()
    assert norm.running_mean.abs().max() == 0 and int(norm.num_batches_tracked) == 0


def test_eval_mode_formula_and_torch_compatible_state() -> None:
    bn = _randomize(nn.BatchNorm2d(4).to(DT))
    pn = PopulationNorm(4).to(DT)
    pn.load_state_dict(bn.state_dict())
    bn.eval(), pn.eval()
    x = torch.randn(3, 4, 5, 5, dtype=DT)
    torch.testing.assert_close(pn(x), bn(x), rtol=0, atol=1e-12)
    assert "microbatch=1" in repr(pn) and "r_m=1.0" in repr(pn)
    pn.reset_parameters()
    assert pn.weight.eq(1).all() and pn.bias.eq(0).all()


def test_rotation_matrices() -> None:
    for kind, width in [("hadamard", 8), ("random", 6), ("auto", 6), ("auto", 4), ("random", 1)]:
        r = rotation_matrix(width, kind, seed=3, dtype=DT)
        torch.testing.assert_close(r @ r.T, torch.eye(width, dtype=DT), rtol=0, atol=1e-12)
    assert torch.equal(rotation_matrix(6, "random", seed=3), rotation_matrix(6, "random", seed=3))
    torch.testing.assert_close(rotation_matrix(4, "auto").abs(), torch.full((4, 4), 0.5))
    with pytest.raises(InvalidArgumentError, match="power of 2"):
        rotation_matrix(6, "hadamard")
    with pytest.raises(UnknownNameError, match="hadamard"):
        PopulationNorm(4, rotation="givens")


def test_bad_arguments_and_shapes() -> None:
    with pytest.raises(InvalidArgumentError, match="microbatch"):
        PopulationNorm(4, microbatch=0)
    with pytest.raises(InvalidArgumentError, match="r_m"):
        PopulationNorm(4, r_m=1.5)
    with pytest.raises(DataShapeError, match=r"\(N, 4, \*\)"):
        PopulationNorm(4)(torch.randn(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_float64(dtype: torch.dtype) -> None:
    norm = _randomize(PopulationNorm(4, momentum=0.0, microbatch=2, rotation="auto").to(DT)).train()
    x = torch.randn(6, 4, 3, dtype=DT)
    low = PopulationNorm(4, momentum=0.0, microbatch=2, rotation="auto").to(dtype).train()
    low.load_state_dict(norm.state_dict())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(low(x.to(dtype)).to(DT), norm(x), rtol=tol, atol=tol)


def test_frozen_per_example_layer_runs_under_vmap() -> None:
    model = nn.Sequential(nn.Linear(5, 4), _randomize(PopulationNorm(4, momentum=0.0)), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    model.train()
    x, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 2, (6,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    batch = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), batch):
        torch.testing.assert_close(per_example[name].mean(0), g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,shape", [(1, (5, 4, 3)), (2, (7, 4, 2, 2)), (3, (8, 4))])
def test_fused_backward_equals_autograd_through_scalegrad(k: int, shape: tuple[int, ...]) -> None:
    from normscope.ops.population import fused_normalize_groups, normalize_groups

    g = torch.Generator().manual_seed(k)
    x = (torch.randn(*shape, generator=g, dtype=DT) * 2 + 0.5).requires_grad_()
    w = (torch.rand(shape[1], generator=g, dtype=DT) + 0.5).requires_grad_()
    mean, var = torch.randn(shape[1], generator=g, dtype=DT), torch.rand(shape[1], generator=g, dtype=DT) + 0.3
    opts = dict(microbatch=k, eps=1e-3, r_m=0.7, r_v=0.4, f_max=1.4, u_max=1.1)
    fused, _ = fused_normalize_groups(x, mean, var, w, **opts)
    q, _, _ = normalize_groups(x, mean, var, **opts)
    reference = q * w.view(1, -1, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-13)
    upstream = torch.randn(*shape, generator=g, dtype=DT)
    for a, b in zip(torch.autograd.grad(fused, [x, w], upstream), torch.autograd.grad(reference, [x, w], upstream)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu() -> None:
    cpu = _randomize(PopulationNorm(8, momentum=0.1, microbatch=2, rotation="hadamard").to(DT)).train()
    cuda = PopulationNorm(8, momentum=0.1, microbatch=2, rotation="hadamard").to(device="cuda", dtype=DT).train()
    cuda.load_state_dict(cpu.state_dict())
    x = torch.randn(6, 8, 4, 4, dtype=DT)
    xc = x.cuda().requires_grad_()
    xs = x.clone().requires_grad_()
    y_cpu, y_cuda = cpu(xs), cuda(xc)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=0, atol=1e-12)
    g = torch.randn_like(y_cpu)
    torch.testing.assert_close(torch.autograd.grad(y_cuda, xc, g.cuda())[0].cpu(), torch.autograd.grad(y_cpu, xs, g)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(cuda.running_var.cpu(), cpu.running_var, rtol=0, atol=1e-12)


def test_ema_only_steps_move_the_emas_and_leave_the_weights_unchanged() -> None:
    """As in "Extreme Normalization" (under review) §5, warm-up and refresh steps update only the EMAs (rate 0.2 by default)."""
    from normscope.ops.ema import EmaSchedule, ema_only_step, ema_schedule

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 4), PopulationNorm(4, rotation="hadamard", warmup=3, refresh=2, refresh_updates=4), nn.ReLU(), nn.Linear(4, 2)).to(DT).eval()
    norm = model[1]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(6, 5, dtype=DT)
    mean0, var0 = norm.running_mean.clone(), norm.running_var.clone()
    ema_only_step(model, lambda m: m(x))
    u = model[0](x).detach()
    torch.testing.assert_close(norm.running_mean, 0.8 * mean0 + 0.2 * u.mean(0))
    torch.testing.assert_close(norm.running_var, 0.8 * var0 + 0.2 * (u - mean0).pow(2).mean(0))
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None
    assert not model.training and not norm.training  # flags put back
    schedule = ema_schedule(model)
    assert schedule == EmaSchedule(3, 2, 4) and [schedule.after(k) for k in (1, 4, 5)] == [2, 2, 0] and schedule.total(10) == 11
    assert ema_schedule(nn.Sequential(nn.BatchNorm1d(3))) == EmaSchedule()
    assert PopulationNorm(3, rotation="none").rotation is None


def test_paper_defaults() -> None:
    norm = PopulationNorm(4)
    assert (norm.momentum, norm.warmup, norm.refresh, norm.refresh_updates) == (0.2, 200, 50, 50)
    assert (norm.microbatch, norm.r_m, norm.r_v, norm.f_max, norm.u_max) == (1, 1.0, 1.0, 2.0, 5.0)
    with pytest.raises(InvalidArgumentError, match="warmup"):
        PopulationNorm(4, warmup=-1)
