"""Independent implementations of the ops the reproduction harness trains, and the checks that
compare each op with its own: so a claim that does not reproduce can be told apart from an op
that does not implement its paper.

* :class:`AppendixCBatchNorm`: Appendix C of the least-squares paper, the virtual items appended
  to the batch and torch's own BatchNorm backward doing the regression (``LSBatchNorm`` uses the
  closed form).
* :func:`algorithm1_reference`: "Extreme Normalization" Algorithm 1 for one conv + normalization
  layer, one group at a time, from the pseudo-code (``PopulationNorm`` is vectorized and fed by
  a hook on the conv).
* :func:`renorm_reference`: Ioffe 2017's Algorithm 1 per (ghost) batch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope.models import build_model
from normscope.ops.base import ChannelNorm, channel_view, mean_var, reduce_dims, update_running

CHECK_EPS = 1e-12  # the paper's z+- = +-1 holds exactly only without eps; at eps 1e-5 and batch 2 tiny variances differ
LR, REFERENCE_BATCH = 0.05, 32


class AppendixCBatchNorm(ChannelNorm):
    """A direct implementation of App. C of the least-squares paper, independent of ``LSBatchNorm``:
    the batch with ``w`` copies of ``x+ = mu_B + sigma_B`` and of ``x- = mu_B - sigma_B`` appended
    (held constant) goes through torch's own ``F.batch_norm``; in the backward pass the appended
    items receive ``alpha* + beta*`` and ``alpha* - beta*`` and torch's BatchNorm backward of the
    whole concatenation gives the real items' gradient. ``alpha*``, ``beta*`` are running averages
    of ``mean(dL/dz)`` and ``mean(dL/dz z)`` with weight ``grad_momentum``, started from the first
    batch. Integer ``virtual_weight`` only."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, virtual_weight: int = 1, grad_momentum: float = 0.5,
                 grad_init: str = "first") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.virtual_weight, self.grad_momentum = int(virtual_weight), grad_momentum
        self.register_buffer("grad_moments", torch.zeros(2, num_features))
        self.register_buffer("started", torch.tensor(grad_init == "zero"))

    def forward(self, x: Tensor) -> Tensor:
        factor, running_mean, running_var = self._begin_call(x)
        if not self.training:
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps)
        mean, var = mean_var(x.detach())
        update_running(running_mean, running_var, mean, var, x, factor)
        z = _AppendedItems.apply(x, self)
        return torch.addcmul(channel_view(self.bias, x), z, channel_view(self.weight, x))


class _AppendedItems(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm: AppendixCBatchNorm) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.norm = norm
        return F.batch_norm(x, None, None, None, None, True, 0.0, norm.eps)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        norm, w = ctx.norm, ctx.norm.virtual_weight
        dims = reduce_dims(x)
        with torch.enable_grad():
            mean = x.mean(dims, keepdim=True)
            sigma = x.var(dims, unbiased=False, keepdim=True).sqrt()
            plus, minus = (mean + sigma).expand(w, *x.shape[1:]), (mean - sigma).expand(w, *x.shape[1:])
            items = torch.cat([x, plus, minus]).detach().requires_grad_()
            z = F.batch_norm(items, None, None, None, None, True, 0.0, norm.eps)
            z_real = z[: len(x)].detach()
            alpha, beta = g.mean(dims), (g * z_real).mean(dims)
            state = norm.grad_moments
            if not bool(norm.started):
                state.copy_(torch.stack([alpha, beta]))
                norm.started.fill_(True)
            view = (1, -1) + (1,) * (x.dim() - 2)
            g_plus = (state[0] + state[1]).view(view).expand_as(plus)
            g_minus = (state[0] - state[1]).view(view).expand_as(minus)
            (grad,) = torch.autograd.grad(z, items, torch.cat([g, g_plus, g_minus]))
        state.lerp_(torch.stack([alpha, beta]), norm.grad_momentum)
        return grad[: len(x)], None


def appendix_c_check(steps: int, seeds: int, grad_init: str = "zero") -> str:
    """Train ``mlp_bn`` with ``LSBatchNorm`` at batch 2 in float64 and, at every step, compute the
    gradient of the same weights and batch with :class:`AppendixCBatchNorm` in its place (weights
    copied over, each keeping its own alpha*, beta*): the largest relative difference of the two
    parameter gradients over the run (all steps stacked: at batch 2 without spatial dims a
    BatchNorm passes exactly zero gradient below it on the first step, so per-step ratios of
    rounding noise would mean nothing), per grid point."""
    from torch.utils.data import DataLoader, TensorDataset

    from normscope.compare import default_data
    from normscope.ops.swap import swap_norms

    lines = []
    train_x, train_y, _, _ = default_data(torch.device("cpu"), torch.float64)
    for m, w in ((0.003, 8), (0.5, 2)):
        worst = 0.0
        for s in range(seeds):
            diff_sq, norm_sq = 0.0, 0.0
            base = build_model("mlp_bn", seed=s).double()
            op = swap_norms(base, "lsbn", grad_momentum=m, virtual_weight=float(w), eps=CHECK_EPS, grad_init=grad_init)
            direct = swap_norms(base, partial(AppendixCBatchNorm, virtual_weight=w, grad_momentum=m, grad_init=grad_init), eps=CHECK_EPS)
            optimizer = torch.optim.SGD(op.parameters(), lr=LR * 2 / REFERENCE_BATCH, momentum=0.9)
            loader = DataLoader(TensorDataset(train_x, train_y), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(s))
            for _, (x, y) in zip(range(steps), loader):
                with torch.no_grad():
                    for p, q in zip(direct.parameters(), op.parameters()):
                        p.copy_(q)
                grads = []
                for net in (op, direct):
                    net.zero_grad()
                    F.cross_entropy(net(x), y).backward()
                    grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
                diff_sq += float((grads[0] - grads[1]).square().sum())
                norm_sq += float(grads[1].square().sum())
                optimizer.step()
            worst = max(worst, math.sqrt(diff_sq / norm_sq))
        lines.append(
            f"- grad_init {grad_init}, grad_momentum {m}, virtual weight {w}: relative difference of the parameter gradients, all steps stacked, over "
            f"{steps} steps x {seeds} seeds: {worst:.1e} (float64, eps 1e-12)."
        )
    return "\n".join(lines)




def _scale_grad(value: Tensor, source: Tensor, r: Any) -> Tensor:
    r = r.detach() if isinstance(r, Tensor) else r
    return r * source + (value - r * source).detach()


def algorithm1_reference(x: Tensor, conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 of "Extreme Normalization" for ``norm(conv(x))`` in training, group by group of
    ``norm.microbatch`` examples, reading only the layers' parameters and EMAs (``norm.input_mean``:
    mu-bar of the conv's input; ``norm.running_var + eps``: nu-bar). Returns the output and the
    EMAs after the step, ``(y, mu-bar, nu-bar - eps)``."""
    eps, k = norm.eps, norm.microbatch
    mu_bar, nu_bar = norm.input_mean, norm.running_var + eps
    summed = conv.weight.sum(dim=(2, 3))
    outputs, mus, nus = [], [], []
    for start in range(0, len(x), k):
        xs = x[start:start + k]
        mu = xs.mean(dim=(2, 3))
        mu_dagger = _scale_grad(mu_bar, mu.mean(0), norm.r_m)
        p = F.conv2d(xs, conv.weight, None, conv.stride, conv.padding) - (summed @ mu_dagger)[None, :, None, None]
        nu = p.pow(2).mean(dim=(2, 3)) + eps
        nu_dagger = _scale_grad(nu_bar, nu.mean(0), norm.r_v * (nu_bar / nu.mean(0)).detach().clamp(max=norm.f_max))
        clip = (norm.u_max * (nu_bar / nu).sqrt()).clamp(max=1.0).detach()
        q = p / nu_dagger.sqrt()[None, :, None, None] * clip[:, :, None, None]
        z = q * norm.weight[None, :, None, None]
        if norm.rotation is not None:
            z = torch.einsum("oc,bchw->bohw", norm.rotation, z)
        outputs.append(z + norm.bias[None, :, None, None])
        mus.append(mu)
        nus.append(nu - eps)
    rate = norm.momentum
    return torch.cat(outputs), (1 - rate) * mu_bar + rate * torch.cat(mus).mean(0), (1 - rate) * norm.running_var + rate * torch.cat(nus).mean(0)


def renorm_reference(x: Tensor, norm: nn.Module, rmax: float, dmax: float) -> Tensor:
    """Ioffe 2017 Algorithm 1 in training per (ghost) batch: ``gamma ((x - mu_B) / sigma_B r + d) + beta``,
    ``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``, r and d constants."""
    size = norm.ghost or len(x)
    sigma = (norm.running_var + norm.eps).sqrt()
    outputs = []
    for start in range(0, len(x), size):
        xs = x[start:start + size]
        dims = [0, *range(2, xs.dim())]
        mu_b = xs.mean(dim=dims)
        sigma_b = (xs.var(dim=dims, unbiased=False) + norm.eps).sqrt()
        r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
        d = ((mu_b - norm.running_mean) / sigma).clamp(-dmax, dmax).detach()
        view = (1, -1) + (1,) * (xs.dim() - 2)
        z = (xs - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        outputs.append(z * norm.weight.view(view) + norm.bias.view(view))
    return torch.cat(outputs)


def _relative(a: list[Tensor], b: list[Tensor]) -> float:
    flat_a, flat_b = torch.cat([t.detach().flatten() for t in a]), torch.cat([t.detach().flatten() for t in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def population_check(options: dict[str, Any], model: nn.Module, inputs: Tensor) -> str:
    """Every PopulationNorm site of ``model`` (a conv-norm-ReLU stack swapped with ``options``) in
    float64 on ``inputs``, against :func:`algorithm1_reference` fed the same site input: largest
    relative difference of outputs, EMAs and the gradients of the input, conv weights, gamma and beta."""
    from normscope.ops.swap import swap_norms

    net = swap_norms(model, "population", **{k: v for k, v in options.items() if k not in ("warmup", "refresh", "refresh_updates")}).double().train()
    x = inputs.double()
    layers = list(net.children())
    worst = 0.0
    sites = 0
    generator = torch.Generator().manual_seed(0)
    for conv, norm in zip(layers, layers[1:] + [None]):
        if hasattr(conv, "arrangement"):
            continue  # run with the conv before it
        if not hasattr(norm, "arrangement"):
            x = conv(x).detach()
            continue
        with torch.no_grad():  # nontrivial EMAs, as after training
            norm.input_mean.copy_(x.mean(dim=(0, 2, 3)) + 0.1 * torch.randn(norm.input_mean.shape, generator=generator, dtype=x.dtype))
            norm.running_var.copy_(conv(x).var(dim=(0, 2, 3)) * (0.5 + torch.rand(norm.num_features, generator=generator, dtype=x.dtype)))
        probe = torch.randn(conv(x).shape, generator=generator, dtype=x.dtype)
        x_ref = x.clone().requires_grad_()
        y_ref, mu_ref, nu_ref = algorithm1_reference(x_ref, conv, norm)
        params = [conv.weight, norm.weight, norm.bias]
        grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x_ref, *params])
        x_op = x.clone().requires_grad_()
        y = norm(conv(x_op))
        grads = torch.autograd.grad((y * probe).sum(), [x_op, *params])
        worst = max(worst, _relative([y, norm.input_mean, norm.running_var, *grads], [y_ref, mu_ref, nu_ref, *grads_ref]))
        sites += 1
        x = y.detach()
    return f"Algorithm 1 written from the paper, one group at a time: largest relative difference {worst:.1e} over {sites} sites (float64; outputs, EMAs, gradients of input, W, gamma, beta)"


def renorm_check(options: dict[str, Any], steps: int = 30) -> str:
    """``BatchRenorm`` with ``options`` against :func:`renorm_reference` in float64 on random batches
    of 32 after ``steps`` updates of its running statistics: outputs and input/gamma/beta gradients."""
    from normscope.ops.renorm import BatchRenorm

    torch.manual_seed(0)
    norm = BatchRenorm(8, **options).double().train()
    worst = 0.0
    for step in range(steps):
        x = (torch.randn(32, 8, 4, 4, dtype=torch.float64) * 2 + 0.5).requires_grad_()
        rmax, dmax = norm.limits(int(norm.num_batches_tracked))
        probe = torch.randn(x.shape, dtype=torch.float64)
        y_ref = renorm_reference(x, norm, rmax, dmax)
        grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x, norm.weight, norm.bias])
        y = norm(x)
        grads = torch.autograd.grad((y * probe).sum(), [x, norm.weight, norm.bias])
        worst = max(worst, _relative([y, *grads], [y_ref, *grads_ref]))
    return f"Ioffe's Algorithm 1 written per (ghost) batch: largest relative difference {worst:.1e} over {steps} steps (float64; outputs, gradients of input, gamma, beta)"
