"""PopulationNorm against an independent float64 implementation of "Extreme Normalization" Algorithm 1.

The reference below is written from the paper's pseudo-code, one group of k examples at a time,
with ScaleGrad(S, Q, r) = sg(r) Q + sg(S - r Q): mu = E_ij x over the *input* of the convolution,
p = conv(x, W) - mu-dagger . sum W, nu = E_ij p^2 + eps keeping its gradient through mu-dagger,
q = p / sqrt(nu-dagger) * sg(min(1, u_max sqrt(nu-bar / nu))), y = Rotate(q * gamma) + beta, then
UpdateEMA of mu-bar and nu-bar with the batch means of mu and nu. Here nu-bar includes eps (the
paper's nu = E p^2 + eps); the op stores running_var = nu-bar - eps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.ops.population import PopulationNorm
from normscope.ops.swap import swap_norms

EPS, RATE = 1e-3, 0.2


def sg(t):
    return t.detach() if torch.is_tensor(t) else t


def scale_grad(value, source, r):
    return sg(r) * source + sg(value - r * source)


def reference(x, layer, gamma, beta, mu_bar, nu_bar, k, r_m, r_v, f_max, u_max, rotation):
    """Algorithm 1 per group, output and the new EMAs (mu-bar over the layer's input, or over its
    output when ``layer`` is None: then x is the output itself and sum W is the identity)."""
    outs, mus, nus = [], [], []
    for start in range(0, x.shape[0], k):
        xs = x[start:start + k]
        spatial = tuple(range(2, xs.dim()))
        mu = xs.mean(dim=spatial) if spatial else xs
        mu_dd = scale_grad(mu_bar, mu.mean(dim=0), r_m)
        if layer is None:
            conv, shift = xs, mu_dd
        else:
            summed = layer.weight.sum(dim=(2, 3)) if spatial else layer.weight
            conv = layer(xs) - (0 if layer.bias is None else layer.bias.view(1, -1, *[1] * len(spatial)))
            shift = summed @ mu_dd
        p = conv - shift.view(1, -1, *[1] * len(spatial))
        nu = (p ** 2).mean(dim=spatial) + EPS if spatial else p ** 2 + EPS
        nu_group = nu.mean(dim=0)
        nu_dd = scale_grad(nu_bar, nu_group, r_v * torch.clamp(sg(nu_bar / nu_group), max=f_max))
        clip = sg(torch.clamp(u_max * torch.sqrt(nu_bar / nu), max=1.0))
        view = (1, -1, *[1] * len(spatial))
        q = p / torch.sqrt(nu_dd).view(view) * clip.view(*clip.shape, *[1] * len(spatial))
        z = q * gamma.view(view)
        if rotation is not None:
            z = torch.einsum("oc,bc...->bo...", rotation, z)
        outs.append(z + beta.view(view))
        mus.append(mu)
        nus.append(nu)
    new_mu = (1 - RATE) * mu_bar + RATE * torch.cat(mus).mean(dim=0)
    new_nu = (1 - RATE) * nu_bar + RATE * torch.cat(nus).mean(dim=0)
    return torch.cat(outs), new_mu, new_nu


def build(kind: str, k: int, rotation: str | None, r_m: float, r_v: float, u_max: float):
    torch.manual_seed(0)
    if kind == "conv":
        layer, x = nn.Conv2d(3, 4, 3, padding=1, bias=True), torch.randn(8, 3, 5, 5) * 2 + 0.5
    else:
        layer, x = nn.Linear(6, 4), torch.randn(8, 6) * 2 + 0.5
    model = nn.Sequential(layer, nn.BatchNorm2d(4) if kind == "conv" else nn.BatchNorm1d(4), nn.ReLU())
    options = dict(microbatch=k, rotation=rotation, r_m=r_m, r_v=r_v, u_max=u_max, f_max=2.0, momentum=RATE, eps=EPS)
    swapped = swap_norms(model, "population", **options).double()
    norm = swapped[1]
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 4))
        norm.bias.copy_(torch.linspace(-0.2, 0.3, 4))
        norm.running_var.copy_(torch.tensor([0.05, 1.0, 4.0, 30.0]))  # f_max caps some channels
        if norm.producer is not None:
            norm.input_mean.copy_(torch.linspace(0.1, 0.6, norm.input_mean.numel()))
        else:
            norm.running_mean.copy_(torch.linspace(-0.3, 0.3, 4))
    return swapped, x.double()


CASES = [
    (kind, k, rotation, shrink, u_max)
    for kind in ("conv", "linear")
    for k in (1, 2, 4)
    for rotation, shrink, u_max in ((None, (1.0, 1.0), 5.0), ("hadamard", (0.5, 0.8), 5.0), ("hadamard", (0.0, 0.8), 0.7))
]


@pytest.mark.parametrize("kind,k,rotation,shrink,u_max", CASES)
def test_op_is_algorithm1(kind, k, rotation, shrink, u_max):
    swapped, x = build(kind, k, rotation, *shrink, u_max)
    layer, norm = swapped[0], swapped[1]
    assert norm.producer is layer
    mu_bar, nu_bar = norm.input_mean.clone(), norm.running_var.clone() + EPS
    weights = torch.randn(8, 4, *x.shape[2:], dtype=torch.float64)

    x_op = x.clone().requires_grad_()
    y = swapped[1](swapped[0](x_op))
    params = [layer.weight, layer.bias, norm.weight, norm.bias]
    grads_op = torch.autograd.grad((y * weights).sum(), [x_op, *params])

    x_ref = x.clone().requires_grad_()
    ref_layer = layer  # same parameters; the reference only reads them
    y_ref, new_mu, new_nu = reference(
        x_ref, ref_layer, norm.weight, norm.bias, mu_bar, nu_bar, k, *shrink, 2.0, u_max, norm.rotation
    )
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x_ref, *params])

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(norm.input_mean, new_mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(norm.running_var + EPS, new_nu, rtol=0, atol=1e-10)
    for got, want in zip(grads_op, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * max(1.0, float(want.abs().max())))


def test_clip_and_cap_are_active_in_the_cases():
    """The u_max = 0.7 cases clip some examples and f_max caps some channels, so those tests see them."""
    swapped, x = build("conv", 1, None, 1.0, 1.0, 0.7)
    norm = swapped[1]
    with torch.no_grad():
        p = swapped[0](x) - (norm.producer.weight.sum((2, 3)) @ norm.input_mean + norm.producer.bias).view(1, -1, 1, 1)
        nu = p.pow(2).mean((2, 3)) + EPS
        nu_bar = norm.running_var + EPS
    assert bool((0.7 * (nu_bar / nu).sqrt() < 1).any())
    assert bool((nu_bar / nu > 2.0).any())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_without_producer_mean_of_output(k):
    """A PopulationNorm with no known layer before it takes mu over its own input, nu keeping its gradient through it."""
    torch.manual_seed(1)
    norm = PopulationNorm(4, microbatch=k, rotation="hadamard", r_m=0.5, r_v=0.8, momentum=RATE, eps=EPS).double()
    with torch.no_grad():
        norm.running_mean.copy_(torch.linspace(-0.3, 0.3, 4))
        norm.running_var.copy_(torch.tensor([0.05, 1.0, 4.0, 30.0]))
        norm.weight.copy_(torch.linspace(0.5, 1.5, 4))
    mu_bar, nu_bar = norm.running_mean.clone(), norm.running_var + EPS
    x = (torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    weights = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    y = norm(x)
    grads = torch.autograd.grad((y * weights).sum(), [x, norm.weight, norm.bias])
    x_ref = x.detach().clone().requires_grad_()
    y_ref, new_mu, new_nu = reference(x_ref, None, norm.weight, norm.bias, mu_bar, nu_bar, k, 0.5, 0.8, 2.0, 5.0, norm.rotation)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x_ref, norm.weight, norm.bias])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(norm.running_mean, new_mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(norm.running_var + EPS, new_nu, rtol=0, atol=1e-10)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_eval_uses_current_weights_and_input_mean():
    """In eval, y = gamma (conv(x, W) - mu-bar . sum W) / sqrt(nu-bar + eps) + beta with the current W."""
    swapped, x = build("conv", 1, None, 1.0, 1.0, 5.0)
    swapped.eval()
    layer, norm = swapped[0], swapped[1]
    with torch.no_grad():
        layer.weight.mul_(1.3)
        want = norm.weight.view(1, -1, 1, 1) * (
            F.conv2d(x, layer.weight, padding=1) - (layer.weight.sum((2, 3)) @ norm.input_mean).view(1, -1, 1, 1)
        ) / (norm.running_var + EPS).sqrt().view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(swapped[1](swapped[0](x)), want, rtol=0, atol=1e-12)


def test_fixed_mean_arrangement_is_kept():
    """``arrangement="fixed_mean"`` is the former op: nu about the fixed EMA mean after the layer, no producer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    swapped = swap_norms(model, "population", arrangement="fixed_mean")
    assert swapped[1].producer is None and swapped[1].arrangement == "fixed_mean"


def test_fold_uses_the_input_mean_with_current_weights():
    """Folding a conv + Algorithm-1 PopulationNorm gives the eval output after the weights moved."""
    from normscope.ops.folding import fold

    swapped, x = build("conv", 1, "hadamard", 1.0, 1.0, 5.0)
    swapped.eval()
    with torch.no_grad():
        swapped[0].weight.mul_(0.7)
        folded = fold(swapped[0], swapped[1])
        torch.testing.assert_close(folded(x), swapped[1](swapped[0](x)), rtol=0, atol=1e-12)
