"""The population gradient g* ("Extreme Normalization" (under review) §2, MATH.md §4): BatchNorm with moments over the whole data.

Every BatchNorm-style site normalizes with the mean and biased variance of its input over all N
examples (and positions) and the gradient flows through those moments. When the data fits in
one batch, that is the full-batch training-mode gradient (:func:`population_gradient`).
:func:`streamed_population_gradient` computes the same from a DataLoader holding one chunk of
activations at a time, by reverse-mode differentiation over the seed's S-graph of moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope import batch as batches
from normscope.distributed import all_reduce, all_reduce_float
from normscope.guard import preserved
from normscope.capture.graph import SiteGraph, site_graph
from normscope.ops.norm_sites import (
    channel_moments,
    norm_sites,
    forward_until,
    grads_or_zeros,
    override,
    parameters,
    site_output,
)
from normscope.ops.population import normalize_shared
from normscope.recalibration import Moments

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class PopulationGradient:
    """g* and how it was computed.

    Attributes:
        grads: dL/dW by parameter name.
        loss: the population loss ``E_n L_n``.
        mean, var: population mean and biased variance per site (C,).
        levels: normalization sites in series (longest chain of sites whose moments depend on
            each other's moments), L.
        passes: passes over the data (1 for full batch; 2L + 1 streamed).
        method: ``"full-batch"`` or ``"streamed"``.
    """

    grads: dict[str, Tensor]
    loss: float
    mean: dict[str, Tensor]
    var: dict[str, Tensor]
    levels: int
    passes: int
    method: str


def _shared(module: nn.Module, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return site_output(module, normalize_shared(x, mean, var, module.eps))


def population_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn = F.cross_entropy
) -> PopulationGradient:
    """g* for data that fits in memory: one forward-backward of all N examples ("Extreme Normalization" (under review) §2).

    .. math:: g^* = \\nabla_W \\, \\mathbb{E}_n L\\big(f(D_n; W, \\mu(W), \\nu(W))\\big),\\quad
              \\mu = \\mathbb{E}_{n,i} x,\\; \\nu = \\mathbb{E}_{n,i} (x - \\mu)^2

    Non-norm modules run in eval mode (no dropout); ``model`` is left bit-identical.
    """
    moments: dict[str, tuple[Tensor, Tensor]] = {}

    def batch(name: str, module: nn.Module, x: Tensor) -> Tensor:
        mean, var = channel_moments(x)
        moments[name] = (mean.detach(), var.detach())
        return _shared(module, x, mean, var)

    with preserved(model):
        model.eval()
        params = parameters(model)
        with override(model, batch):
            loss = loss_fn(batches.forward(model, inputs), targets)
        grads = grads_or_zeros(torch.autograd.grad(loss, list(params.values()), allow_unused=True), list(params.values()))
    return PopulationGradient(
        dict(zip(params, grads)),
        loss.item(),
        {k: v[0] for k, v in moments.items()},
        {k: v[1] for k, v in moments.items()},
        levels=_count_levels(model, batches.take((inputs, targets), slice(0, 1))[0]),
        passes=1,
        method="full-batch",
    )


def _to_model(batch: tuple, reference: Tensor) -> tuple:
    return batches.to_device((batch[0], batch[1]), reference.device, reference.dtype)


def site_levels(model: nn.Module, inputs: Tensor, graph: SiteGraph | None = None) -> tuple[list[str], dict[str, int]]:
    """The BatchNorm-style sites in call order and their level: 1 + the highest level of the sites
    whose moments their own moments depend on (:meth:`normscope.capture.graph.SiteGraph.levels`;
    ``graph`` from :func:`normscope.capture.graph.site_graph` on ``inputs`` when not given)."""
    graph = graph or site_graph(model, inputs, examples=1)
    sites = norm_sites(model)
    order = [name for name in graph.order if name in sites]
    return order, graph.levels(order)


def _count_levels(model: nn.Module, inputs: Tensor) -> int:
    return max(site_levels(model, inputs)[1].values())


def streamed_population_gradient(
    model: nn.Module, loader: Iterable, loss_fn: LossFn = F.cross_entropy, graph: SiteGraph | None = None
) -> PopulationGradient:
    """g* from an iterable of ``(inputs, targets)`` chunks (:mod:`normscope.batch` pairs), one chunk of activations in memory.

    Reverse mode over the S-graph of "Extreme Normalization" (under review) §2.1. Sites are grouped into levels (L = sites in
    series; parallel sites such as a ResNet shortcut share a level). Passes over the data:

    1. L forward passes, one per level in order: the population moments of that level's sites,
       with the earlier levels normalized by their now-known moments (a site's moments depend on
       the moments before it, so they cannot all come from one pass);
    2. one forward-backward pass with every moment a leaf: the direct ``dL/dW`` and
       ``a_k = dL/dS_k`` (``loss_fn`` must average over a chunk; chunks are weighted by size);
    3. L forward-backward passes, levels in reverse: backpropagate
       ``sum_k <a_k, S_k>``, ``S_k = (E x, E (x - mu_k)^2)`` over the chunks to W and to the
       earlier levels' adjoints (the mean inside the variance is a constant: its Jacobian,
       ``-2 E(x - mu)``, is zero at the population).

    2L + 1 passes in all (plus a one-example capture for the levels unless ``graph``, the model's
    site graph of :mod:`normscope.capture.graph`, is given), each stopped after the
    last site it needs. The loader must give the same examples on every pass (no augmentation);
    order does not matter. ``model`` is left bit-identical.

    Under :func:`normscope.distributed.session` ``loader`` is this rank's shard: each pass's sums
    (moments, ``dL/dW``, the adjoints, the loss) are all-reduced before the next pass uses them,
    so every rank ends with g* of the union of the shards. No pass couples examples (every moment
    is a constant of the pass), so splitting the examples changes only the order of the sums.
    """
    with preserved(model):
        model.eval()
        params = parameters(model)
        tensors = list(params.values())
        reference = tensors[0]
        first = _to_model(next(iter(loader)), reference)
        order, level = site_levels(model, batches.take(first, slice(0, 1))[0], graph)
        levels = max(level.values())
        mean: dict[str, Tensor] = {}
        var: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        n_examples = 0
        for current in range(1, levels + 1):
            stats = {name: Moments() for name in order if level[name] == current}
            last = [name for name in order if level[name] == current][-1]

            def moment_pass(name: str, module: nn.Module, x: Tensor) -> Tensor:
                if name in stats:
                    stats[name].add(x)
                if name in mean:
                    return _shared(module, x, mean[name], var[name])
                return _shared(module, x, *channel_moments(x))

            with torch.no_grad(), override(model, moment_pass, stop_after=last):
                for batch in loader:
                    inputs, _ = _to_model(batch, reference)
                    n_examples += batches.size(inputs) if current == 1 else 0
                    forward_until(model, inputs)
            for name, s in stats.items():
                m, v, counts[name] = s.variance()
                mean[name], var[name] = m.to(reference.dtype), v.to(reference.dtype)
            n_examples = int(all_reduce_float(n_examples)) if current == 1 else n_examples

        leaves = {name: (mean[name].clone().requires_grad_(), var[name].clone().requires_grad_()) for name in order}
        leaf_list = [t for pair in leaves.values() for t in pair]
        g_w = [torch.zeros_like(t) for t in tensors]
        adjoint = {name: [torch.zeros_like(mean[name]), torch.zeros_like(var[name])] for name in order}
        loss_total = 0.0
        with override(model, lambda name, module, x: _shared(module, x, *leaves[name])):
            for batch in loader:
                inputs, targets = _to_model(batch, reference)
                loss = loss_fn(batches.forward(model, inputs), targets) * (batches.size(inputs) / n_examples)
                grads = grads_or_zeros(torch.autograd.grad(loss, tensors + leaf_list, allow_unused=True), tensors + leaf_list)
                g_w = [a + b for a, b in zip(g_w, grads[: len(tensors)])]
                for i, name in enumerate(leaves):
                    adjoint[name][0] += grads[len(tensors) + 2 * i]
                    adjoint[name][1] += grads[len(tensors) + 2 * i + 1]
                loss_total += loss.item()
        g_w = [all_reduce(g) for g in g_w]
        adjoint = {name: [all_reduce(a) for a in pair] for name, pair in adjoint.items()}
        loss_total = all_reduce_float(loss_total)

        for current in range(levels, 0, -1):
            below = [name for name in order if level[name] < current]
            below_list = [t for name in below for t in leaves[name]]
            last = [name for name in order if level[name] == current][-1]
            terms: list[Tensor] = []
            step_w = [torch.zeros_like(t) for t in tensors]
            step_adjoint = {name: [torch.zeros_like(mean[name]), torch.zeros_like(var[name])] for name in below}

            def adjoint_pass(name: str, module: nn.Module, x: Tensor) -> Tensor:
                if level[name] == current:
                    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                    centered = (flat - mean[name][:, None]).pow(2)
                    terms.append(
                        (adjoint[name][0] * flat.sum(dim=1)).sum() / counts[name]
                        + (adjoint[name][1] * centered.sum(dim=1)).sum() / counts[name]
                    )
                return _shared(module, x, *leaves[name]) if level[name] < current else _shared(module, x, mean[name], var[name])

            with override(model, adjoint_pass, stop_after=last):
                for batch in loader:
                    terms.clear()
                    inputs, _ = _to_model(batch, reference)
                    forward_until(model, inputs)
                    objective = torch.stack(terms).sum()
                    if not objective.requires_grad:
                        continue
                    grads = grads_or_zeros(
                        torch.autograd.grad(objective, tensors + below_list, allow_unused=True), tensors + below_list
                    )
                    step_w = [a + b for a, b in zip(step_w, grads[: len(tensors)])]
                    for i, name in enumerate(below):
                        step_adjoint[name][0] += grads[len(tensors) + 2 * i]
                        step_adjoint[name][1] += grads[len(tensors) + 2 * i + 1]
            g_w = [a + all_reduce(b) for a, b in zip(g_w, step_w)]
            for name in below:
                adjoint[name] = [a + all_reduce(b) for a, b in zip(adjoint[name], step_adjoint[name])]
    return PopulationGradient(
        {name: g.detach() for name, g in zip(params, g_w)},
        loss_total,
        mean,
        var,
        levels=levels,
        passes=2 * levels + 1,
        method="streamed",
    )
