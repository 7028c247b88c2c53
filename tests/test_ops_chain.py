"""BN then LN / LN then BN with one affine after both ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1) against torch's own layers."""

import pytest
import torch
from torch import nn

from normscope.errors import UnknownNameError
from normscope.ops.chain import BatchLayerNorm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def chain(c, order, device="cpu", dtype=torch.float64, **kw):
    norm = BatchLayerNorm(c, order=order, **kw).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, c))
        norm.bias.copy_(torch.linspace(-1, 1, c))
    return norm


class TorchChain(nn.Module):
    """The same chain from torch modules: BatchNorm (no affine), LayerNorm (no affine), affine."""

    def __init__(self, shape, order, weight, bias):
        super().__init__()
        bn = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1], affine=False).double()
        ln = nn.LayerNorm(shape[1:], elementwise_affine=False).double()
        self.stages = nn.Sequential(bn, ln) if order == "bn_ln" else nn.Sequential(ln, bn)
        self.bn = bn
        self.view = (1, -1) + (1,) * (len(shape) - 2)
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return self.stages(x) * self.weight.view(self.view) + self.bias.view(self.view)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["bn_ln", "ln_bn"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 3, 3)])
def test_gradcheck(shape, order, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(chain(shape[1], order, device), (x,))


@pytest.mark.parametrize("order", ["bn_ln", "ln_bn"])
@pytest.mark.parametrize("shape", [(5, 4), (4, 3, 5), (3, 2, 3, 3)])
def test_equals_torch_layers_in_series(shape, order):
    torch.manual_seed(1)
    norm = chain(shape[1], order, momentum=0.3)
    ref = TorchChain(shape, order, norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_())
    ref.bn.momentum = 0.3
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        dy = torch.randn_like(x)
        outs = [m(t) for m, t in zip((norm, ref), xs)]
        for out in outs:
            out.backward(dy)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad)
    torch.testing.assert_close(norm.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(norm.running_var, ref.bn.running_var)
    norm.eval(), ref.eval()
    torch.testing.assert_close(norm(x), ref(x))


def test_one_affine_only_and_errors():
    norm = BatchLayerNorm(6)
    assert sum(p.numel() for p in norm.parameters()) == sum(p.numel() for p in nn.BatchNorm1d(6).parameters())
    assert "order='bn_ln'" in repr(norm)
    with pytest.raises(UnknownNameError, match="bn_ln, ln_bn"):
        BatchLayerNorm(6, order="bn_bn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    torch.manual_seed(2)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    ref, low = chain(4, "bn_ln"), chain(4, "bn_ln", dtype=dtype)
    xs = [x.to(dtype).double().requires_grad_(), x.to(dtype).requires_grad_()]
    outs = [m(t) for m, t in zip((ref, low), xs)]
    for out in outs:
        out.square().sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert outs[1].dtype == dtype
    torch.testing.assert_close(outs[1].double(), outs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(xs[1].grad.double(), xs[0].grad, rtol=tol, atol=tol * 4)
