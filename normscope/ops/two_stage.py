"""Two-stage backpropagation ("Extreme Normalization" (under review) §3.2) and its two-tower form ("Extreme Normalization" (under review) §3.4).

Every BatchNorm-style site normalizes with its EMA moments mu-bar, nu-bar (``running_mean``,
``running_var``; a torch BatchNorm counts as a PopulationNorm with r = 1 and no caps).
Stage (a) backpropagates the minibatch loss ``l = E_b L_b`` to the weights and to the moments,
treated as leaves, one chunk of examples at a time: ``g^W``, ``g^mu = sum_b g_b^mu``,
``g^nu = sum_b g_b^nu``. Stage (b) backpropagates
``sum_sites r_m g^mu . E_b mu_b + c g^nu . E_b nu_b``, ``c = r_v min(nu-bar / E_b nu_b, f_max)``,
through the first tower, whose sites normalize each example with its own moments (ScaleGrad,
:func:`normscope.ops.population.normalize_groups` with microbatch 1), again one chunk at a time:
``h^W``. The estimate is ``g^W + h^W``. Memory holds one chunk; compute is about two
forward-backward passes of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope import batch as batches
from normscope.errors import InvalidArgumentError
from normscope.ops.norm_sites import (
    forward_until,
    grads_or_zeros,
    override,
    parameters,
    require_sites,
    site_options,
    site_output,
)
from normscope.ops.population import example_moments, normalize_groups, normalize_shared, scale_grad

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TwoStageResult:
    """The two-stage estimate and what the step saw.

    Attributes:
        grads: ``g^W + h^W`` by parameter name.
        loss: the minibatch loss ``E_b L_b``.
        batch_mean: ``E_b mu_b`` per site (for the EMA update).
        batch_var: ``E_b nu_b`` per site, second moments about mu-bar.
        chunks: number of chunks each stage used.
    """

    grads: dict[str, Tensor]
    loss: float
    batch_mean: dict[str, Tensor]
    batch_var: dict[str, Tensor]
    chunks: int


def _ema(module: nn.Module) -> tuple[Tensor, Tensor]:
    if module.running_mean is None or module.running_var is None:
        raise InvalidArgumentError(
            f"two-stage backprop needs running statistics; {type(module).__name__} has track_running_stats=False"
        )
    return module.running_mean.detach(), module.running_var.detach()


def _second_moment_scale(module: nn.Module, var: Tensor, batch_var: Tensor) -> Tensor:
    """``r_v min((nu-bar + eps) / (E_b nu_b + eps), f_max)`` of nu-double-dagger ("Extreme Normalization" (under review) §3.2)."""
    opt = site_options(module)
    return opt.r_v * ((var + opt.eps) / (batch_var + opt.eps)).clamp(max=opt.f_max)


def _per_example(module: nn.Module, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """First tower: ``(q, mu_b, nu_b)`` with each example normalized by its own moments (ScaleGrad)."""
    opt = site_options(module)
    return normalize_groups(
        x, mean, var, microbatch=1, eps=opt.eps, r_m=opt.r_m, r_v=opt.r_v, f_max=opt.f_max, u_max=opt.u_max
    )


def _shared_output(module: nn.Module, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """The site's output with ``x`` normalized by the shared moments ``mean``, ``var``."""
    return site_output(module, normalize_shared(x, mean, var, module.eps, site_options(module).u_max))


def two_stage_gradient(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    chunk_size: int | None = None,
) -> TwoStageResult:
    """The two-stage gradient estimate of "Extreme Normalization" (under review) §3.2 for one minibatch, chunk by chunk.

    .. math:: \\hat g = g^W + h^W,\\quad h^W = \\nabla_W \\sum_{sites}
              \\big(r_m g^\\mu \\cdot \\mathbb{E}_b \\mu_b + c\\, g^\\nu \\cdot \\mathbb{E}_b \\nu_b\\big)

    ``loss_fn`` must average over the examples it is given (as ``F.cross_entropy`` does).
    ``chunk_size`` None: the whole minibatch at once. The model is not changed (no ``.grad``,
    no running-statistic update); stochastic layers such as dropout should be in eval mode,
    since the two stages must see the same forward values.
    """
    n = batches.check_sliceable((inputs, targets))
    size = n if chunk_size is None else chunk_size
    if size < 1:
        raise InvalidArgumentError(f"chunk_size must be >= 1 (got {chunk_size})")
    sites = require_sites(model)
    params = parameters(model)
    names, tensors = list(params), list(params.values())
    ema = {name: _ema(m) for name, m in sites.items()}
    leaves = {name: (mean.clone().requires_grad_(), var.clone().requires_grad_()) for name, (mean, var) in ema.items()}
    leaf_list = [t for pair in leaves.values() for t in pair]
    g_w = [torch.zeros_like(t) for t in tensors]
    g_s = [torch.zeros_like(t) for t in leaf_list]
    sums = {name: [torch.zeros_like(mean), torch.zeros_like(mean)] for name, (mean, _) in ema.items()}
    loss_total = 0.0
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]

    def shared(name: str, module: nn.Module, x: Tensor) -> Tensor:
        mean, var = leaves[name]
        mu_b, nu_b = example_moments(x.detach(), mean.detach())
        sums[name][0] += mu_b.sum(0)
        sums[name][1] += nu_b.sum(0)
        return _shared_output(module, x, mean, var)

    with override(model, shared) as order:
        for start, stop in bounds:
            order.clear()
            chunk_inputs, chunk_targets = batches.take((inputs, targets), slice(start, stop))
            loss = loss_fn(batches.forward(model, chunk_inputs), chunk_targets) * ((stop - start) / n)
            grads = grads_or_zeros(torch.autograd.grad(loss, tensors + leaf_list, allow_unused=True), tensors + leaf_list)
            g_w = [a + b for a, b in zip(g_w, grads[: len(tensors)])]
            g_s = [a + b for a, b in zip(g_s, grads[len(tensors) :])]
            loss_total += loss.item()
    last_site = order[-1]
    adjoint = {name: (g_s[2 * i], g_s[2 * i + 1]) for i, name in enumerate(leaves)}
    batch_mean = {name: s[0] / n for name, s in sums.items()}
    batch_var = {name: s[1] / n for name, s in sums.items()}
    coef = {
        name: (site_options(sites[name]).r_m * adjoint[name][0], _second_moment_scale(sites[name], ema[name][1], batch_var[name]) * adjoint[name][1])
        for name in sites
    }
    h_w = [torch.zeros_like(t) for t in tensors]
    terms: list[Tensor] = []

    def tower_one(name: str, module: nn.Module, x: Tensor) -> Tensor:
        q, mu_b, nu_b = _per_example(module, x, *ema[name])
        terms.append((coef[name][0] * mu_b.sum(0)).sum() / n + (coef[name][1] * nu_b.sum(0)).sum() / n)
        return site_output(module, q)

    with override(model, tower_one, stop_after=last_site):
        for start, stop in bounds:
            terms.clear()
            forward_until(model, batches.take((inputs, targets), slice(start, stop))[0])
            objective = torch.stack(terms).sum()
            if objective.requires_grad:
                grads = grads_or_zeros(torch.autograd.grad(objective, tensors, allow_unused=True), tensors)
                h_w = [a + b for a, b in zip(h_w, grads)]
    grads = {name: (a + b).detach() for name, a, b in zip(names, g_w, h_w)}
    return TwoStageResult(grads, loss_total, batch_mean, batch_var, len(bounds))


def two_tower_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn = F.cross_entropy
) -> dict[str, Tensor]:
    """The two-tower construction of "Extreme Normalization" (under review) §3.4 and Algorithm 1, in one backward pass.

    Tower 1 normalizes each example with its own moments (ScaleGrad to ``mu_b``, ``nu_b``);
    ``mu‡ = ScaleGrad(mu-bar, E_b mu_b, r_m)`` and
    ``nu‡ = ScaleGrad(nu-bar, E_b nu_b, r_v min(nu-bar / E_b nu_b, f_max))`` normalize tower 2,
    whose loss is differentiated. Equal to :func:`two_stage_gradient` at any chunk size; this
    form holds the whole batch twice and serves as its reference.
    """
    sites = require_sites(model)
    params = parameters(model)
    moments: dict[str, tuple[Tensor, Tensor]] = {}

    def tower_one(name: str, module: nn.Module, x: Tensor) -> Tensor:
        q, mu_b, nu_b = _per_example(module, x, *_ema(module))
        moments[name] = (mu_b.mean(0), nu_b.mean(0))
        return site_output(module, q)

    with override(model, tower_one):
        batches.forward(model, inputs)
    shared_moments = {}
    for name, module in sites.items():
        mean, var = _ema(module)
        mu, nu = moments[name]
        shared_moments[name] = (
            scale_grad(mean, mu, site_options(module).r_m),
            scale_grad(var, nu, _second_moment_scale(module, var, nu.detach())),
        )

    def tower_two(name: str, module: nn.Module, x: Tensor) -> Tensor:
        return _shared_output(module, x, *shared_moments[name])

    with override(model, tower_two):
        loss = loss_fn(batches.forward(model, inputs), targets)
    grads = grads_or_zeros(torch.autograd.grad(loss, list(params.values()), allow_unused=True), list(params.values()))
    return dict(zip(params, grads))


def two_stage_step(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    chunk_size: int | None = None,
) -> float:
    """A training step's backward with two-stage backprop: adds the estimate to each ``.grad``
    (as ``loss.backward()`` would) and moves every site's EMAs towards ``E_b mu_b``, ``E_b nu_b``
    with the site's momentum ("Extreme Normalization" (under review) Alg. 1, UpdateEMA). Returns the minibatch loss.
    """
    result = two_stage_gradient(model, inputs, targets, loss_fn, chunk_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in result.grads:
                p.grad = result.grads[name].clone() if p.grad is None else p.grad + result.grads[name]
        for name, module in require_sites(model).items():
            momentum = module.momentum
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.add_(1)
                momentum = 1.0 / float(module.num_batches_tracked) if momentum is None else momentum
            if momentum:
                module.running_mean.lerp_(result.batch_mean[name].to(module.running_mean.dtype), momentum)
                module.running_var.lerp_(result.batch_var[name].to(module.running_var.dtype), momentum)
    return result.loss
