"""Inference folding ("Extreme Normalization" (under review) Algorithm 1, MATH.md §4): linear/conv + population norm -> linear/conv.

At inference a :class:`~normscope.ops.population.PopulationNorm` (or a BatchNorm) computes
``y = R (gamma * (u - mu-bar) / sqrt(nu-bar + eps)) + beta`` from the output ``u = W x + b0`` of the
layer before it. That is one affine map of x, so the pair becomes a single layer:

.. math:: K = R\\,\\mathrm{diag}\\big(\\gamma / \\sqrt{\\bar\\nu + \\epsilon}\\big) W, \\qquad
          b = R\\big(\\gamma \\odot (b_0 - \\bar\\mu) / \\sqrt{\\bar\\nu + \\epsilon}\\big) + \\beta

(the seed writes it for a mean taken before the convolution, ``-mu . sum(K) + beta``: a
PopulationNorm that takes its mean over the layer's input, Algorithm 1, has
``mu-bar = mu_in . sum W + b0`` with the layer's current weights; otherwise ``mu-bar`` is the
running mean after the layer, as for BatchNorm). The inference model is a plain conv/linear with
bias followed by the nonlinearity.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from normscope.errors import InvalidArgumentError
from normscope.ops.norm_sites import is_norm_site

FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def fold(layer: nn.Module, norm: nn.Module) -> nn.Module:
    """A new Linear/Conv with bias equal to ``norm(layer(x))`` in eval mode (formula above).

    ``norm`` is a PopulationNorm (its rotation included) or a torch BatchNorm with running stats.
    """
    if not isinstance(layer, FOLDABLE):
        raise InvalidArgumentError(f"can fold into Linear or Conv1d/2d/3d (got {type(layer).__name__})")
    if not is_norm_site(norm) or norm.running_mean is None:
        raise InvalidArgumentError(f"can fold a PopulationNorm or BatchNorm with running statistics (got {type(norm).__name__})")
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != norm.num_features:
        raise InvalidArgumentError(f"{type(layer).__name__} has {channels} outputs but the norm has {norm.num_features} channels")
    dtype = layer.weight.dtype
    scale = torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(dtype)
    rotation = getattr(norm, "rotation", None)
    rotation = torch.eye(channels, dtype=dtype, device=layer.weight.device) if rotation is None else rotation.to(dtype)
    mixing = rotation * scale[None, :]
    b0 = layer.bias if layer.bias is not None else torch.zeros(channels, dtype=dtype, device=layer.weight.device)
    center = norm.running_mean.to(dtype)
    if getattr(norm, "producer", None) is layer:
        from normscope.ops.population import producer_center

        center = producer_center(layer, norm.input_mean.to(dtype)[None])[0]
    bias = mixing @ (b0 - center)
    if norm.bias is not None:
        bias = bias + norm.bias.to(dtype)
    folded = copy.deepcopy(layer)
    weight = (mixing @ layer.weight.reshape(channels, -1)).reshape(layer.weight.shape)
    folded.weight = nn.Parameter(weight)
    folded.bias = nn.Parameter(bias)
    return folded.train(False)


class _NormLeafTracer(fx.Tracer):
    """Trace norm sites as single calls, like torch's own layers."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_norm_site(m) or super().is_leaf_module(m, qualname)


def fold_model(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (traced with ``torch.fx``) in which every norm site whose only input is
    a Linear/Conv used nowhere else is folded into it with :func:`fold`; for inference (eval mode).
    The model itself is not changed.
    """
    root = copy.deepcopy(model).eval()
    traced = fx.GraphModule(root, _NormLeafTracer().trace(root))
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not is_norm_site(modules[node.target]):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        if not isinstance(modules[source.target], FOLDABLE):
            continue
        parent_name, _, child = source.target.rpartition(".")
        parent = traced.get_submodule(parent_name) if parent_name else traced
        setattr(parent, child, fold(modules[source.target], modules[node.target]))
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval()
