"""Least-squares-regularized BatchNorm ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) App. C) against a direct computation with the
two virtual items appended to the batch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.errors import InvalidArgumentError
from normscope.ops.ls_bn import LSBatchNorm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def lsbn(c, device="cpu", dtype=torch.float64, **kw):
    norm = LSBatchNorm(c, **kw).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, c))
        norm.bias.copy_(torch.linspace(-1, 1, c))
    return norm


def appended_batch_gradient(x, g, alpha_star, beta_star, weight):
    """dL/dx of the real items from torch's own BatchNorm (eps ~ 0) run on the batch with the two
    virtual items ``x+- = mu +- sigma`` appended ``weight`` times each, receiving ``alpha* +- beta*``."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dim=dims, keepdim=True)
    sigma = x.var(dim=dims, unbiased=False, keepdim=True).sqrt()
    spatial = x.shape[2:]
    plus = (mu + sigma).expand(weight, -1, *spatial)
    minus = (mu - sigma).expand(weight, -1, *spatial)
    augmented = torch.cat([x, plus, minus]).detach().requires_grad_()
    z = F.batch_norm(augmented, None, None, None, None, True, 0.0, 1e-200)  # torch refuses eps = 0
    g_plus = (alpha_star + beta_star).view(view).expand_as(plus)
    g_minus = (alpha_star - beta_star).view(view).expand_as(minus)
    torch.testing.assert_close(z[len(x):len(x) + weight], torch.ones_like(plus))  # z+ = 1, z- = -1
    (grad,) = torch.autograd.grad(z, augmented, torch.cat([g, g_plus, g_minus]))
    return grad[: len(x)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (3, 2, 2, 3)])
@pytest.mark.parametrize("weight", [1, 3])
def test_backward_equals_batchnorm_with_the_virtual_items_appended(shape, weight, device):
    torch.manual_seed(0)
    norm = lsbn(shape[1], device, eps=0.0, virtual_weight=weight, grad_momentum=0.5)
    upstream = [torch.randn(shape, dtype=torch.float64, device=device) for _ in range(3)]
    for step, dy in enumerate(upstream):
        x = (torch.randn(shape, dtype=torch.float64, device=device) * 2 + 1).requires_grad_()
        state, first = norm.grad_moments.clone(), int(norm.grad_batches_tracked) == 0
        norm(x).backward(dy)
        g = dy * norm.weight.detach().view((1, -1) + (1,) * (len(shape) - 2))
        if first:  # the first batch initializes alpha*, beta* with its own alpha, beta
            state = norm.grad_moments.clone()
        expected = appended_batch_gradient(x.detach(), g, state[0], state[1], weight)
        torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-10)


def test_running_alpha_beta_follow_the_momentum_and_eps_enters_only_through_s():
    torch.manual_seed(1)
    norm = lsbn(3, eps=0.1, virtual_weight=2.0, grad_momentum=0.25)
    history = []
    for _ in range(3):
        x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
        dy = torch.randn_like(x)
        state = norm.grad_moments.clone()
        norm(x).backward(dy)
        mean = x.detach().mean(dim=(0, 2), keepdim=True)
        var = x.detach().var(dim=(0, 2), unbiased=False, keepdim=True)
        s = (var + 0.1).sqrt()
        z = (x.detach() - mean) / s
        g = dy * norm.weight.detach().view(1, 3, 1)
        alpha, beta = g.mean(dim=(0, 2)), (g * z).mean(dim=(0, 2))
        history.append(torch.stack([alpha, beta]))
        if len(history) == 1:
            state = history[0]
        # the regression on the concatenated data: 5 real items and 2 x 2 virtual ones at z = +1, -1
        z_all = torch.cat([z, torch.ones(2, 3, 2, dtype=torch.float64), -torch.ones(2, 3, 2, dtype=torch.float64)])
        g_virtual = [(state[0] + sign * state[1]).view(1, 3, 1).expand(2, 3, 2) for sign in (1, -1)]
        g_all = torch.cat([g, *g_virtual])
        alpha_w, beta_w = g_all.mean(dim=(0, 2), keepdim=True), (g_all * z_all).mean(dim=(0, 2), keepdim=True)
        torch.testing.assert_close(x.grad, (g - alpha_w - beta_w * z) / s, rtol=1e-10, atol=1e-12)
    expected = history[0]
    for h in history[1:]:
        expected = 0.75 * expected + 0.25 * h
    torch.testing.assert_close(norm.grad_moments, expected)
    assert int(norm.grad_batches_tracked) == 3


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 2, 2)])
def test_forward_parameters_and_running_stats_are_batchnorms(shape):
    torch.manual_seed(2)
    norm = lsbn(shape[1], virtual_weight=4.0)
    bn = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1]).double()
    bn.load_state_dict({k: v for k, v in norm.state_dict().items() if k in bn.state_dict()})
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64)
        dy = torch.randn_like(x)
        outputs = []
        for m in (norm, bn):
            m.zero_grad()
            outputs.append(m(x))
            (outputs[-1] * dy).sum().backward()
        torch.testing.assert_close(outputs[0], outputs[1])
        torch.testing.assert_close(norm.weight.grad, bn.weight.grad)
        torch.testing.assert_close(norm.bias.grad, bn.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(norm, name), getattr(bn, name))
    norm.eval(), bn.eval()
    torch.testing.assert_close(norm(x), bn(x))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_zero_weight_and_failure_with_virtual_items(device):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lsbn(3, device, virtual_weight=0.0), (x,))
    assert not torch.autograd.gradcheck(lsbn(3, device, virtual_weight=1.0), (x,), raise_exception=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    torch.manual_seed(4)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    dy = torch.randn_like(x)
    ref, low = lsbn(4, virtual_weight=2.0), lsbn(4, dtype=dtype, virtual_weight=2.0)
    xs = [x.to(dtype).double().requires_grad_(), x.to(dtype).requires_grad_()]
    for m, t in zip((ref, low), xs):
        out = m(t)
        assert out.dtype == t.dtype
        out.backward(dy.to(t.dtype))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(xs[1].grad.double(), xs[0].grad, rtol=tol, atol=tol)
    torch.testing.assert_close(low.grad_moments.double(), ref.grad_moments, rtol=tol, atol=tol)


def test_arguments_repr_and_reset():
    with pytest.raises(InvalidArgumentError, match="virtual_weight"):
        LSBatchNorm(3, virtual_weight=-1.0)
    with pytest.raises(InvalidArgumentError, match="grad_momentum"):
        LSBatchNorm(3, grad_momentum=1.5)
    norm = lsbn(3)
    norm(torch.randn(4, 3, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert int(norm.grad_batches_tracked) == 1
    norm.reset_running_stats()
    assert int(norm.grad_batches_tracked) == 0 and not norm.grad_moments.any()
    assert "virtual_weight=1.0" in repr(norm)


def test_virtual_items_through_the_batch_statistics_would_be_batchnorm():
    """Appendix C read without stop-gradient: x+- = mu +- sigma computed from the batch make the
    concatenation's statistics and z+- constant in x, so the real items' gradient is BatchNorm's,
    whatever the virtual gradients. LSBatchNorm holds the items constant and differs."""
    torch.manual_seed(5)
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 4, 2, dtype=torch.float64)
    mu = x.mean(dim=(0, 2), keepdim=True)
    sigma = x.var(dim=(0, 2), unbiased=False, keepdim=True).sqrt()
    items = torch.cat([x, (mu + sigma).expand(2, -1, 2), (mu - sigma).expand(2, -1, 2)])
    z = F.batch_norm(items, None, None, None, None, True, 0.0, 1e-200)
    virtual = torch.randn(4, 4, 2, dtype=torch.float64)
    (literal,) = torch.autograd.grad(z, x, torch.cat([dy, virtual]))
    x_bn = x.detach().requires_grad_()
    (plain,) = torch.autograd.grad(F.batch_norm(x_bn, None, None, None, None, True, 0.0, 1e-200), x_bn, dy)
    torch.testing.assert_close(literal, plain, rtol=1e-9, atol=1e-10)


def test_zero_start_of_the_running_gradient_moments():
    torch.manual_seed(6)
    norm = lsbn(3, eps=0.0, virtual_weight=2.0, grad_momentum=0.25, grad_init="zero")
    assert norm.grad_momentum == 0.25 and LSBatchNorm(3).grad_momentum == 0.5  # the paper's grid, not 0.1
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    norm(x).backward(dy)
    g = dy * norm.weight.detach()
    expected = appended_batch_gradient(x.detach(), g, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 2)
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-10)
    z = (x.detach() - x.detach().mean(0)) / x.detach().var(0, unbiased=False).sqrt()
    torch.testing.assert_close(norm.grad_moments, 0.25 * torch.stack([g.mean(0), (g * z).mean(0)]))
    with pytest.raises(Exception, match="grad_init"):
        LSBatchNorm(3, grad_init="last")
