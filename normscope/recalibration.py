"""Recalibrate running statistics: a copy of a model whose BatchNorms hold the population moments.

BatchNorm layers normalize with running statistics in eval mode (Ioffe & Szegedy, "Batch
Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift", ICML
2015, §3.1: the inference statistics should be the population moments). When the running averages
are stale, eval mode sees different statistics than training. :func:`recalibrate` returns a copy
whose ``running_mean`` and ``running_var`` are the moments of each layer's input over the whole
data, computed level by level in eval mode: a layer's input depends on the statistics of the
layers before it, so each pass fixes the layers whose inputs depend only on layers already fixed
(one pass per level of normalization in series). The variance is stored the way BatchNorm stores
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


def _first_two(inputs: B.Part) -> B.Part:
    return B.take((inputs, None), slice(0, 2))[0]


def _call_order(model: nn.Module, layers: dict[str, nn.Module], inputs: B.Part) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            B.forward(model, _first_two(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _levels(model: nn.Module, layers: dict[str, nn.Module], inputs: B.Part) -> list[list[str]]:
    """Groups of layers to fix in one pass, in forward order: the levels of
    :func:`normscope.analyzers.population_gradient.site_levels` where every layer is a BatchNorm-style
    site, else one layer per pass in call order."""
    from normscope.analyzers.population_gradient import site_levels
    from normscope.ops.norm_sites import norm_sites

    order = _call_order(model, layers, inputs)
    if set(order) <= set(norm_sites(model)):
        try:
            with torch.no_grad():
                _, level = site_levels(model, _first_two(inputs))
            depth = max(level.get(n, 1) for n in order) if order else 0
            return [[n for n in order if level.get(n, 1) == k] for k in range(1, depth + 1)]
        except Exception:  # noqa: BLE001 - fall back to one layer per pass
            pass
    return [[name] for name in order]


def population_moments(model: nn.Module, data: Batch | Iterable[Batch]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer with running statistics: ``(mean, unbiased variance)`` of its input over every
    example and position, with the earlier layers normalizing by their population moments
    (eval mode on a copy; ``model`` is not touched). Under :func:`normscope.distributed.session`
    ``data`` is this rank's shard and the per-level sums ``(n, sum x, sum x^2)`` are all-reduced."""
    work = copy.deepcopy(model).eval()
    layers = running_stat_layers(work)
    chunks = [_on_model(b, work) for b in batches(data)]
    if not layers or not chunks:
        return {}
    moments: dict[str, tuple[Tensor, Tensor]] = {}
    for level in _levels(work, layers, chunks[0][0]):
        sums = {name: [0, 0.0, 0.0] for name in level}

        def accumulate(module: nn.Module, args: tuple, name: str) -> None:
            x = args[0].detach().double()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 1 else x[None]
            entry = sums[name]
            entry[0] += flat.shape[1]
            entry[1] = entry[1] + flat.sum(dim=1)
            entry[2] = entry[2] + flat.pow(2).sum(dim=1)

        handles = [layers[name].register_forward_pre_hook(lambda m, args, name=name: accumulate(m, args, name)) for name in level]
        try:
            with torch.no_grad():
                for inputs, _ in chunks:
                    B.forward(work, inputs)
        finally:
            for handle in handles:
                handle.remove()
        for name, (count, total, squares) in sums.items():
            count, total, squares = int(all_reduce_float(count)), all_reduce(total), all_reduce(squares)
            mean = total / count
            var = (squares - count * mean.pow(2)).clamp(min=0) / max(count - 1, 1)
            module = layers[name]
            module.running_mean.copy_(mean.to(module.running_mean.dtype))
            module.running_var.copy_(var.to(module.running_var.dtype))
            moments[name] = (mean, var)
    return moments


def recalibrate(model: nn.Module, data: Batch | Iterable[Batch]) -> nn.Module:
    """A copy of ``model`` (in ``model``'s train/eval mode) whose running statistics are the
    population moments of :func:`population_moments`; ``model`` itself is not touched."""
    moments = population_moments(model, data)
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


def recalibration_table(model: nn.Module, data: Batch | Iterable[Batch], loss_fn: LossFn = F.cross_entropy) -> pd.DataFrame:
    """The ``stats_recalibration`` table: eval loss and accuracy with the model's running
    statistics and with population statistics (:func:`recalibrate`) on the same data."""
    fixed = recalibrate(model, data)
    rows = [{"statistics": "running", **evaluate(model, data, loss_fn)},
            {"statistics": "population", **evaluate(fixed, data, loss_fn)}]
    return pd.DataFrame(rows, columns=["statistics", "loss", "accuracy", "examples"])
