"""Ghost-batch BatchNorm and renorm, Ioffe's default schedule, and LayerNorm at a BatchNorm site,
in float64 against torch's BatchNorm and direct computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.errors import DataShapeError, InvalidArgumentError
from normscope.ops import create_norm
from normscope.ops.layer_norm import ChannelLayerNorm
from normscope.ops.renorm import BatchRenorm, GhostBatchNorm, LinearWarmup

DT = torch.float64


def affine(norm, c):
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, c))
        norm.bias.copy_(torch.linspace(-1, 1, c))
    return norm


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 2, 2)])
def test_ghost_bn_at_k_equal_batch_is_batchnorm(shape):
    torch.manual_seed(0)
    ghost = affine(GhostBatchNorm(shape[1], ghost=shape[0]).to(DT), shape[1])
    bn = affine((nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1]).to(DT), shape[1])
    for _ in range(2):
        x = torch.randn(shape, dtype=DT) * 2 + 1
        xs = [x.clone().requires_grad_() for _ in range(2)]
        dy = torch.randn(shape, dtype=DT)
        outs = [m(t) for m, t in zip((ghost, bn), xs)]
        for out in outs:
            out.backward(dy)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, name), getattr(bn, name))
    ghost.eval(), bn.eval()
    torch.testing.assert_close(ghost(x), bn(x))


@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 2, 3)])
def test_ghost_bn_is_batchnorm_on_each_ghost_batch(shape):
    """Output and input gradient against torch's BatchNorm run separately on each group of k."""
    torch.manual_seed(1)
    k = 2
    ghost = affine(GhostBatchNorm(shape[1], ghost=k, momentum=0.3).to(DT), shape[1])
    x = (torch.randn(shape, dtype=DT) * 3 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(shape, dtype=DT)
    ghost(x).backward(dy)
    pieces = [F.batch_norm(part, None, None, ghost.weight, ghost.bias, True, 0.0, ghost.eps) for part in x_ref.split(k)]
    torch.cat(pieces).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-11, atol=1e-12)
    dims = [1, *range(3, x.dim() + 1)]
    groups = x.detach().reshape(shape[0] // k, k, *shape[1:])
    count = k * (x[0, 0].numel())
    expected_mean = 0.7 * torch.zeros(shape[1], dtype=DT) + 0.3 * groups.mean(dim=dims).mean(0)
    expected_var = 0.7 + 0.3 * (groups.var(dim=dims, unbiased=False) * count / (count - 1)).mean(0)
    torch.testing.assert_close(ghost.running_mean, expected_mean)
    torch.testing.assert_close(ghost.running_var, expected_var)


def test_ghost_renorm_matches_ioffe_per_microbatch():
    """y = gamma ((x - mu_g) / sigma_g r_g + d_g) + beta with r_g, d_g clipped and constant (Ioffe 2017 Alg. 1 per microbatch)."""
    torch.manual_seed(2)
    norm = affine(BatchRenorm(3, rmax=1.3, dmax=0.2, bn_steps=0, rmax_steps=0, dmax_steps=0, ghost=2, momentum=0.0).to(DT), 3)
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        norm.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
    x = (torch.randn(6, 3, 4, dtype=DT) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    norm(x).backward(dy)
    sigma = (norm.running_var + norm.eps).sqrt().view(1, 3, 1)
    outs = []
    for part in x_ref.split(2):
        mu = part.mean(dim=(0, 2), keepdim=True)
        s = (part.var(dim=(0, 2), unbiased=False, keepdim=True) + norm.eps).sqrt()
        r = (s / sigma).clamp(1 / 1.3, 1.3).detach()
        d = ((mu - norm.running_mean.view(1, 3, 1)) / sigma).clamp(-0.2, 0.2).detach()
        outs.append(((part - mu) / s * r + d) * norm.weight.view(1, 3, 1) + norm.bias.view(1, 3, 1))
    torch.cat(outs).backward(dy)
    torch.testing.assert_close(norm(x.detach()), torch.cat(outs).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_ghost_gradcheck_and_bad_sizes():
    torch.manual_seed(3)
    norm = GhostBatchNorm(3, ghost=2, momentum=0.0).to(DT)
    x = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    with pytest.raises(DataShapeError, match="multiple of 4"):
        GhostBatchNorm(3, ghost=4)(torch.randn(6, 3))
    with pytest.raises(InvalidArgumentError, match="ghost"):
        GhostBatchNorm(3, ghost=0)


def test_fresh_renorm_is_batchnorm_until_the_schedule_relaxes():
    """Ioffe 2017 §4 by default: rmax = 1, dmax = 0 for 5000 steps, rmax 3 at 40k, dmax 5 at 25k."""
    norm = BatchRenorm(3)
    assert norm.limits(0) == (1.0, 0.0) and norm.limits(4999) == (1.0, 0.0)
    assert norm.limits(40_000) == (3.0, 5.0) and norm.limits(25_000)[1] == 5.0
    assert norm.limits(22_500) == pytest.approx((2.0, 4.375))  # (17.5k / 35k, 17.5k / 20k) of the way
    torch.manual_seed(4)
    renorm, bn = affine(BatchRenorm(3).to(DT), 3), affine(nn.BatchNorm1d(3).to(DT), 3)
    with torch.no_grad():  # running statistics far from the batch's: a relaxed renorm would differ
        for m in (renorm, bn):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(9.0)
    x = torch.randn(8, 3, dtype=DT)
    torch.testing.assert_close(renorm(x), bn(x), rtol=1e-12, atol=1e-12)
    constant = affine(BatchRenorm(3, bn_steps=0, rmax_steps=0, dmax_steps=0).to(DT), 3)
    with torch.no_grad():
        constant.running_mean.fill_(5.0)
        constant.running_var.fill_(9.0)
    assert not torch.allclose(constant(x), bn(x), atol=1e-3)
    assert LinearWarmup(0.0, 5.0, 0, delay=3)(2) == 0.0 and LinearWarmup(0.0, 5.0, 0, delay=3)(3) == 5.0


@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 2, 2)])
def test_layernorm_op_against_the_formula_and_gradcheck(shape):
    torch.manual_seed(5)
    norm = affine(create_norm("layernorm", shape[1], eps=1e-3).to(DT), shape[1])
    assert isinstance(norm, ChannelLayerNorm) and norm.running_mean is None
    x = torch.randn(shape, dtype=DT) * 2 + 1
    flat = x.reshape(shape[0], -1)
    z = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True) + 1e-3).sqrt()
    view = (1, -1) + (1,) * (len(shape) - 2)
    expected = z.reshape(shape) * norm.weight.view(view) + norm.bias.view(view)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.eval()(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(norm.train(), (x.requires_grad_(),))
    assert norm(torch.randn(1, *shape[1:], dtype=DT)).shape == (1, *shape[1:])  # per example: batch 1 works
