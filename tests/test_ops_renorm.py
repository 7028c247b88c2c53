"""Batch renormalization (Ioffe 2017) against torch's BatchNorm and a direct float64 computation."""

import pytest
import torch
from torch import nn

from normscope.errors import DataShapeError, InvalidArgumentError
from normscope.ops.renorm import BatchRenorm, LinearWarmup

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}


def pair(shape, device="cpu", dtype=torch.float64, **kw):
    """A BatchRenorm (constant limits unless a schedule is given) and a torch BatchNorm with the
    same random affine and running statistics."""
    if not (callable(kw.get("rmax")) or callable(kw.get("dmax"))):
        kw = {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0, **kw}
    renorm = BatchRenorm(shape[1], **kw).to(device, dtype)
    bn = BN[len(shape)](shape[1], momentum=kw.get("momentum", 0.1)).to(device, dtype)
    with torch.no_grad():
        for m in (renorm, bn):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
            m.running_mean.copy_(torch.linspace(-0.2, 0.3, shape[1]))
            m.running_var.copy_(torch.linspace(0.7, 1.4, shape[1]))
    return renorm, bn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (3, 2, 3, 3)])
def test_r1_d0_equals_batchnorm(shape, device):
    torch.manual_seed(0)
    renorm, bn = pair(shape, device, rmax=1.0, dmax=0.0)
    x = torch.randn(shape, dtype=torch.float64, device=device) * 2 + 1
    upstream = torch.randn_like(x)
    grads = []
    for m in (renorm, bn):
        for _ in range(3):
            xi = x.clone().requires_grad_()
            m.zero_grad()
            y = m(xi)
            (y * upstream).sum().backward()
        grads.append((y, xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(renorm, name), getattr(bn, name))
    renorm.eval(), bn.eval()
    torch.testing.assert_close(renorm(x), bn(x))


def test_forward_and_backward_match_ioffe_algorithm_1():
    """r, d from the running moments before the update, clipped, and constant in the backward pass."""
    torch.manual_seed(1)
    renorm, _ = pair((6, 3, 2), rmax=1.2, dmax=0.1, momentum=0.3)
    old_mean, old_var = renorm.running_mean.clone(), renorm.running_var.clone()
    x = (torch.randn(6, 3, 2, dtype=torch.float64) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn_like(x)
    y = renorm(x)
    (y * upstream).sum().backward()
    eps = renorm.eps
    mu = x_ref.mean(dim=(0, 2), keepdim=True)
    sigma_b = (x_ref.var(dim=(0, 2), unbiased=False, keepdim=True) + eps).sqrt()
    sigma = (old_var + eps).sqrt().view(1, 3, 1)
    r = (sigma_b / sigma).clamp(1 / 1.2, 1.2).detach()
    d = ((mu - old_mean.view(1, 3, 1)) / sigma).clamp(-0.1, 0.1).detach()
    assert (r != sigma_b / sigma).any() and (d.abs() == 0.1).any(), "the clips must be active in this test"
    y_ref = ((x_ref - mu) / sigma_b * r + d) * renorm.weight.view(1, 3, 1) + renorm.bias.view(1, 3, 1)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    n = x.numel() // 3
    torch.testing.assert_close(renorm.running_mean, 0.7 * old_mean + 0.3 * mu.flatten())
    torch.testing.assert_close(renorm.running_var, 0.7 * old_var + 0.3 * sigma_b.flatten().square().sub(eps) * n / (n - 1))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_where_r_and_d_are_clipped(device):
    """Where both clips are active r and d are constant, so the renorm backward is the true derivative."""
    torch.manual_seed(2)
    renorm, _ = pair((5, 3, 2), device, rmax=2.0, dmax=0.5, momentum=0.0)
    with torch.no_grad():
        renorm.running_var.fill_(100.0)
        renorm.running_mean.fill_(10.0)
    x = torch.randn(5, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(renorm, (x,))
    bn_like, _ = pair((5, 3), device, rmax=1.0, dmax=0.0)
    assert torch.autograd.gradcheck(bn_like, (torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True),))


def test_warmup_schedule_follows_the_step():
    schedule = LinearWarmup(1.0, 3.0, steps=4, delay=2)
    assert [schedule(s) for s in range(8)] == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    torch.manual_seed(3)
    renorm, bn = pair((8, 3), rmax=LinearWarmup(1.0, 3.0, 10, delay=2), dmax=LinearWarmup(0.0, 5.0, 10, delay=2))
    x = torch.randn(8, 3, dtype=torch.float64) * 3
    for _ in range(3):  # steps 0, 1, 2: rmax = 1, dmax = 0
        torch.testing.assert_close(renorm(x), bn(x))
    assert not torch.allclose(renorm(x), bn(x))
    assert "LinearWarmup" in repr(renorm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    torch.manual_seed(4)
    x = torch.randn(16, 4, 3, 3, dtype=torch.float64)
    ref, _ = pair(x.shape, rmax=1.5, dmax=0.5)
    low, _ = pair(x.shape, dtype=dtype, rmax=1.5, dmax=0.5)
    xs = [x.to(dtype).double().requires_grad_(), x.to(dtype).requires_grad_()]
    outs = [m(t) for m, t in zip((ref, low), xs)]
    for out, t in zip(outs, xs):
        out.square().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert outs[1].dtype == dtype
    torch.testing.assert_close(outs[1].double(), outs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(xs[1].grad.double(), xs[0].grad, rtol=tol, atol=tol * 4)


def test_without_running_stats_is_batchnorm_and_errors():
    torch.manual_seed(5)
    renorm = BatchRenorm(3, track_running_stats=False).double().eval()
    bn = nn.BatchNorm1d(3, track_running_stats=False).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(renorm(x), bn(x))
    with pytest.raises(InvalidArgumentError, match="rmax"):
        BatchRenorm(3, rmax=0.5)
    with pytest.raises(InvalidArgumentError, match="dmax"):
        BatchRenorm(3, dmax=-1.0)
    with pytest.raises(DataShapeError):
        BatchRenorm(3)(torch.randn(4, 5))


def test_reset_running_stats():
    renorm, _ = pair((4, 3))
    renorm(torch.randn(4, 3, dtype=torch.float64))
    renorm.reset_running_stats()
    assert torch.equal(renorm.running_var, torch.ones(3, dtype=torch.float64))
    assert int(renorm.num_batches_tracked) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_cuda_agree():
    torch.manual_seed(6)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    (cpu, _), (cuda, _) = pair(x.shape, rmax=1.5, dmax=0.5), pair(x.shape, "cuda", rmax=1.5, dmax=0.5)
    xs = [x.clone().requires_grad_(), x.cuda().requires_grad_()]
    for norm, t in zip((cpu, cuda), xs):
        norm(t).square().sum().backward()
    torch.testing.assert_close(xs[1].grad.cpu(), xs[0].grad)
    torch.testing.assert_close(cuda.running_var.cpu(), cpu.running_var)
