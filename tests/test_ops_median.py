"""Median batch normalization (King, "Median Batch Normalization" (2022), MATH.md §3) against independent float64 computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq

from normscope.errors import DataShapeError, InvalidArgumentError, UnknownNameError
from normscope.ops.median import MedianBatchNorm, batch_median, median_batch_norm, pseudo_huber_median

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
SHAPES = [(6, 3), (4, 3, 3), (3, 2, 2, 2)]


def reference(x, weight, bias, eps):
    """Median BN by plain autograd through torch.median (the 'exact' mode's definition)."""
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    median = rows.median(dim=1).values
    view = (1, -1) + (1,) * (x.dim() - 2)
    xc = x - median.view(view)
    var = xc.square().mean(dim=[0, *range(2, x.dim())])
    return xc / (var + eps).sqrt().view(view) * weight.view(view) + bias.view(view)


def module(mode="exact", c=3, delta=0.3, device="cpu", **kw):
    norm = MedianBatchNorm(c, backward=mode, delta=delta, **kw).to(device, torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["exact", "smoothed"])
def test_gradcheck(mode, shape, device):
    torch.manual_seed(0)
    norm = module(mode, shape[1], device=device)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,), fast_mode=mode == "smoothed")
    if mode == "exact":
        assert torch.autograd.gradgradcheck(norm, (x,))


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_equals_autograd_through_torch_median(shape):
    torch.manual_seed(1)
    norm = module("exact", shape[1])
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(shape, dtype=torch.float64)
    y, y_ref = norm(x), reference(x_ref, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    (grad_ref,) = torch.autograd.grad((y_ref * upstream).sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_exact_derivative_is_the_indicator_and_even_counts_take_the_lower_middle():
    x = torch.tensor([[4.0], [1.0], [3.0], [2.0]], dtype=torch.float64, requires_grad=True)
    median = batch_median(x)
    assert median.item() == 2.0
    (grad,) = torch.autograd.grad(median.sum(), x)
    assert grad.flatten().tolist() == [0.0, 0.0, 0.0, 1.0]


def test_smoothed_median_solves_the_pseudo_huber_problem():
    torch.manual_seed(2)
    rows = torch.randn(4, 9, dtype=torch.float64) * 3
    delta = 0.5
    y = pseudo_huber_median(rows, delta)
    for row, value in zip(rows.numpy(), y.tolist()):
        slope = lambda t: float(((row - t) / ((row - t) ** 2 + delta**2) ** 0.5).sum())  # noqa: E731
        assert value == pytest.approx(brentq(slope, row.min(), row.max(), xtol=1e-14), abs=1e-12)


@pytest.mark.parametrize("delta", [0.05, 0.5, 5.0])
def test_smoothed_derivative_against_finite_differences(delta):
    torch.manual_seed(3)
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda t: batch_median(t, "smoothed", delta), x)
    h = 1e-6
    for k in range(x.shape[0]):
        for c in range(x.shape[1]):
            step = torch.zeros_like(x)
            step[k, c] = h
            fd = (batch_median(x.detach() + step, "smoothed", delta) - batch_median(x.detach() - step, "smoothed", delta)) / (2 * h)
            torch.testing.assert_close(jac[:, k, c], fd, rtol=1e-6, atol=1e-8)
    assert (jac.sum(dim=(1, 2)) - 1).abs().max() < 1e-12
    assert (jac >= 0).all()


def test_smoothed_weights_follow_the_closed_form():
    torch.manual_seed(4)
    x = torch.randn(9, 1, dtype=torch.float64, requires_grad=True)
    delta = 0.3
    median = batch_median(x, "smoothed", delta)
    (grad,) = torch.autograd.grad(median.sum(), x)
    w = delta**2 / ((x.detach() - median.detach()) ** 2 + delta**2) ** 1.5
    torch.testing.assert_close(grad, w / w.sum(), rtol=1e-12, atol=1e-14)


def test_seed_mode_warns_sums_to_minus_one_and_fails_gradcheck():
    torch.manual_seed(5)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="sums to -1"):
        jac = torch.autograd.functional.jacobian(lambda t: batch_median(t, "seed", 1e-3), x)
    torch.testing.assert_close(jac.sum(dim=(1, 2)), -torch.ones(3, dtype=torch.float64))
    assert (jac <= 0).all()
    with pytest.warns(UserWarning, match="King.s \\(2022\\) closed form"):
        norm = module("seed")
    assert not torch.autograd.gradcheck(norm, (x,), raise_exception=False)
    with pytest.warns(UserWarning):
        median_batch_norm(x, None, None, training=True, backward="seed")


def test_running_stats_like_torch_batchnorm():
    torch.manual_seed(6)
    norm = module("exact", momentum=0.25)
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    norm(x)
    rows = x.transpose(0, 1).reshape(3, -1)
    median = rows.median(dim=1).values
    var_unbiased = (rows - median[:, None]).square().sum(dim=1) / (rows.shape[1] - 1)
    torch.testing.assert_close(norm.running_mean, 0.25 * median)
    torch.testing.assert_close(norm.running_var, 0.75 + 0.25 * var_unbiased)
    assert int(norm.num_batches_tracked) == 1
    norm.eval()
    expected = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    before = norm.running_mean.clone()
    torch.testing.assert_close(norm(x), expected)
    assert torch.equal(norm.running_mean, before) and int(norm.num_batches_tracked) == 1


def test_cumulative_average_and_no_running_stats():
    torch.manual_seed(7)
    norm = module("exact", momentum=None)
    batches = [torch.randn(6, 3, dtype=torch.float64) for _ in range(3)]
    for b in batches:
        norm(b)
    medians = torch.stack([b.median(dim=0).values for b in batches])
    torch.testing.assert_close(norm.running_mean, medians.mean(dim=0))
    free = module("exact", track_running_stats=False).eval()
    assert free.running_mean is None
    torch.testing.assert_close(free(batches[0]), reference(batches[0], free.weight, free.bias, free.eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "smoothed"])
def test_low_precision_close_to_float64(dtype, mode):
    torch.manual_seed(8)
    x64 = torch.randn(16, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(x64)
    norm64 = module(mode, 4, delta=0.5)
    norm = module(mode, 4, delta=0.5).to(dtype)
    norm.load_state_dict(norm64.state_dict())
    x = x64.detach().to(dtype).requires_grad_()
    y = norm(x)
    assert y.dtype == dtype
    (y * upstream.to(dtype)).sum().backward()
    x_ref = x64.detach().to(dtype).double().requires_grad_()
    y_ref = norm64(x_ref)
    (y_ref * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=tol, atol=tol * 2)


def test_bad_input():
    with pytest.raises(UnknownNameError, match="exact, seed, smoothed"):
        MedianBatchNorm(3, backward="huber")
    with pytest.raises(InvalidArgumentError, match="delta"):
        MedianBatchNorm(3, delta=0.0)
    norm = MedianBatchNorm(3)
    with pytest.raises(DataShapeError, match="got 1D"):
        norm(torch.randn(3))
    with pytest.raises(DataShapeError, match="3 channels"):
        norm(torch.randn(4, 2))
    with pytest.raises(DataShapeError, match="more than 1 value"):
        norm(torch.randn(1, 3))


def test_reset_and_repr():
    norm = module("smoothed", momentum=0.5)
    norm(torch.randn(4, 3, dtype=torch.float64))
    norm.reset_running_stats()
    assert torch.equal(norm.running_mean, torch.zeros(3, dtype=torch.float64)) and int(norm.num_batches_tracked) == 0
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(3, dtype=torch.float64))
    assert "backward='smoothed'" in repr(norm) and "delta=0.3" in repr(norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["exact", "smoothed"])
def test_cpu_cuda_agree(mode):
    torch.manual_seed(9)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    cpu, cuda = module(mode), module(mode, device="cuda")
    cuda.load_state_dict(cpu.state_dict())
    xs = [x.clone().requires_grad_(), x.cuda().requires_grad_()]
    for norm, t in zip((cpu, cuda), xs):
        norm(t).square().sum().backward()
    torch.testing.assert_close(xs[1].grad.cpu(), xs[0].grad)
    assert math.isclose(float(cpu.running_var.sum()), float(cuda.running_var.sum().cpu()), rel_tol=1e-12)
