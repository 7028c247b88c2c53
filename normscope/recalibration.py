"""Recalibrate running statistics: a copy of a model whose BatchNorms hold the population moments.

BatchNorm layers normalize with running statistics in eval mode (Ioffe & Szegedy, "Batch
Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift", ICML
2015, §3.1: the inference statistics should be the population moments). When the running averages
are stale, eval mode sees different statistics than training. :func:`recalibrate` returns a copy
whose ``running_mean`` and ``running_var`` are the moments of each layer's input over the whole
data, computed level by level in eval mode: a layer's input depends on the statistics of the
layers before it, so each pass fixes the layers whose inputs depend only on layers already fixed
(one pass per level of normalization in series, from the site graph of
:mod:`normscope.capture.graph`). The variance is stored the way BatchNorm stores
it, unbiased: ``sum (x - mean)^2 / (n - 1)`` over the ``n`` values per channel.

fvcore's ``update_bn_stats`` (precise BN) does this in place by averaging train-mode batch
moments; this module leaves the given model untouched and uses the exact moments.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope import batch as B
from normscope.capture.graph import SiteGraph, covering
from normscope.distributed import all_reduce, all_reduce_float

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
CHUNK = 512


def running_stat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that normalize with running statistics in eval mode."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(getattr(m, "running_mean", None), Tensor) and isinstance(getattr(m, "running_var", None), Tensor)
        and getattr(m, "track_running_stats", True)
    }


def batches(data: Batch | Iterable[Batch], chunk: int = CHUNK) -> list[Batch]:
    """``data`` as a list of ``(inputs, targets)`` batches (:mod:`normscope.batch` forms): one
    ``(inputs, targets)`` tuple is cut into chunks of ``chunk`` examples; a list holds batches
    already; any other iterable (a DataLoader) is listed, each item read by :func:`normscope.batch.split`."""
    if isinstance(data, tuple) and len(data) == 2:
        n = B.size(data[0])
        return [B.take(data, slice(i, i + chunk)) for i in range(0, n, chunk)]
    if isinstance(data, list):
        return list(data)
    return [B.split(raw) for raw in data]


def _on_model(batch: Batch, model: nn.Module) -> Batch:
    reference = next(iter(model.parameters()), None)
    return batch if reference is None else B.to_device(batch, reference.device, reference.dtype)


class Moments:
    """Per-channel count, mean and sum of squared deviations ``M2`` of a stream of chunks, exact and
    mergeable (Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983): a chunk
    of ``n_b`` values with mean ``mu_b`` and ``M2_b = sum (x - mu_b)^2`` (two passes over the chunk,
    in float64) joins the running ``(n_a, mu_a, M2_a)`` as::

        n = n_a + n_b,  delta = mu_b - mu_a,  mu = mu_a + delta n_b / n,
        M2 = M2_a + M2_b + delta^2 n_a n_b / n

    and the ranks of :func:`normscope.distributed.session` merge theirs the same way
    (:meth:`all_ranks`). No sum of squares is ever formed, so an input far from zero (an offset of
    1e6 on unit-variance data) loses no digits of its variance, unlike ``E x^2 - (E x)^2``. The one
    implementation of population moments: :func:`population_moments` and
    :func:`normscope.analyzers.population_gradient.streamed_population_gradient` use it.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        """Add the values of ``x`` (``(N, C, ...)``: channel dim 1; ``(N,)``: one channel)."""
        x = x.detach().double()
        flat = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 1 else x[None]
        n, mean = flat.shape[1], flat.mean(dim=1)
        self.merge(n, mean, (flat - mean[:, None]).pow(2).sum(dim=1))

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Join the moments ``(n, mean, M2)`` of other values (Chan's combination)."""
        if n == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    def all_ranks(self) -> tuple[Tensor, Tensor, int]:
        """``(mean, M2, count)`` over every rank's values: ``n = sum_r n_r``, ``mu = sum_r n_r mu_r / n``,
        ``M2 = sum_r (M2_r + n_r (mu_r - mu)^2)`` (this rank's own in one process)."""
        count = int(all_reduce_float(self.count))
        mean = all_reduce(self.mean * self.count) / count
        m2 = all_reduce(self.m2 + (self.mean - mean).pow(2) * self.count)
        return mean, m2, count

    def variance(self, unbiased: bool = False) -> tuple[Tensor, Tensor, int]:
        """``(mean, variance, count)`` over every rank (:meth:`all_ranks`): ``M2 / n``, or
        ``M2 / (n - 1)`` when ``unbiased``."""
        mean, m2, count = self.all_ranks()
        return mean, m2 / (max(count - 1, 1) if unbiased else count), count


def _levels(model: nn.Module, layers: dict[str, nn.Module], graph: SiteGraph) -> list[list[str]]:
    """Groups of layers to fix in one pass, in forward order: their levels in series in the site
    graph (:meth:`normscope.capture.graph.SiteGraph.in_levels`) when every layer is a
    BatchNorm-style site the graph saw, else one layer per pass in call order (layers the graph
    did not see last, in definition order)."""
    from normscope.ops.norm_sites import norm_sites

    seen = [name for name in graph.order if name in layers]
    if set(layers) <= set(seen) and set(layers) <= set(norm_sites(model)) and graph.wired:
        return graph.in_levels(layers)
    return [[name] for name in [*seen, *(n for n in layers if n not in seen)]]


def population_moments(model: nn.Module, data: Batch | Iterable[Batch],
                       graph: SiteGraph | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer with running statistics: ``(mean, unbiased variance)`` of its input over every
    example and position (:class:`Moments`, float64), with the earlier layers normalizing by their
    population moments (eval mode on a copy; ``model`` is not touched). ``graph``: the model's site
    graph (:func:`normscope.capture.graph.site_graph` on the first chunk when not given). Under
    :func:`normscope.distributed.session` ``data`` is this rank's shard and each level's moments are
    merged over the ranks."""
    work = copy.deepcopy(model).eval()
    layers = running_stat_layers(work)
    chunks = [_on_model(b, work) for b in batches(data)]
    if not layers or not chunks:
        return {}
    graph = covering(graph, work, chunks[0][0], layers)
    moments: dict[str, tuple[Tensor, Tensor]] = {}
    for level in _levels(work, layers, graph):
        stats = {name: Moments() for name in level}
        handles = [layers[name].register_forward_pre_hook(lambda m, args, name=name: stats[name].add(args[0])) for name in level]
        try:
            with torch.no_grad():
                for inputs, _ in chunks:
                    B.forward(work, inputs)
        finally:
            for handle in handles:
                handle.remove()
        for name, stat in stats.items():
            mean, var, _ = stat.variance(unbiased=True)
            module = layers[name]
            module.running_mean.copy_(mean.to(module.running_mean.dtype))
            module.running_var.copy_(var.to(module.running_var.dtype))
            moments[name] = (mean, var)
    return moments


def recalibrate(model: nn.Module, data: Batch | Iterable[Batch], graph: SiteGraph | None = None) -> nn.Module:
    """A copy of ``model`` (in ``model``'s train/eval mode) whose running statistics are the
    population moments of :func:`population_moments`; ``model`` itself is not touched."""
    moments = population_moments(model, data, graph)
    fixed = copy.deepcopy(model)
    for name, module in running_stat_layers(fixed).items():
        if name in moments:
            mean, var = moments[name]
            with torch.no_grad():
                module.running_mean.copy_(mean.to(module.running_mean.dtype))
                module.running_var.copy_(var.to(module.running_var.dtype))
    return fixed


def evaluate(model: nn.Module, data: Batch | Iterable[Batch], loss_fn: LossFn = F.cross_entropy) -> dict[str, float]:
    """Eval-mode ``loss`` (mean over examples, chunks weighted by size), ``accuracy`` (argmax of
    2-D outputs against integer targets; NaN otherwise) and ``examples``, on a copy of ``model``.
    Under :func:`normscope.distributed.session` ``data`` is this rank's shard and the sums of the
    loss, the correct answers and the examples are all-reduced."""
    work = copy.deepcopy(model).eval()
    loss_sum, correct, count, classified = 0.0, 0, 0, True
    with torch.no_grad():
        for batch in batches(data):
            inputs, targets = _on_model(batch, work)
            outputs = B.forward(work, inputs)
            n = B.size(inputs)
            loss_sum += float(loss_fn(outputs, targets)) * n
            if isinstance(outputs, Tensor) and outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point():
                correct += int((outputs.argmax(dim=1) == targets).sum())
            else:
                classified = False
            count += n
    sums = all_reduce(torch.tensor([loss_sum, correct, count], dtype=torch.float64))
    loss_sum, correct, count = float(sums[0]), int(sums[1]), int(sums[2])
    return {"loss": loss_sum / count if count else math.nan,
            "accuracy": correct / count if classified and count else math.nan, "examples": count}


def recalibration_table(model: nn.Module, data: Batch | Iterable[Batch], loss_fn: LossFn = F.cross_entropy,
                        graph: SiteGraph | None = None) -> pd.DataFrame:
    """The ``stats_recalibration`` table: eval loss and accuracy with the model's running
    statistics and with population statistics (:func:`recalibrate`) on the same data."""
    fixed = recalibrate(model, data, graph)
    rows = [{"statistics": "running", **evaluate(model, data, loss_fn)},
            {"statistics": "population", **evaluate(fixed, data, loss_fn)}]
    return pd.DataFrame(rows, columns=["statistics", "loss", "accuracy", "examples"])
