"""How normscope's analyzers read its own ops: each op registered through :func:`normscope.register_norm`.

Each op states the center and scale statistics it normalizes with and whether its backward pass
is the least-squares residual of MATH.md §2 (``s dL/dx = g - alpha - beta z``):

=====================  ==============================  ================================  ==================
op                     center                          scale                             backward = residual
=====================  ==============================  ================================  ==================
``lsbn``               batch mean                      batch std                         no: the fit includes two virtual items (App. C)
``renorm``             batch mean                      batch std; affine gamma r, gamma d + beta   yes (r, d constants)
``ghost_bn``           ghost-batch mean                ghost-batch std                   yes
``ghost_renorm``       ghost-batch mean, and while     ghost-batch std, and while        yes at r = 1, d = 0; else no: read as
                       r, d act: mu_g - d sigma_g / r  r, d act: sigma_g / r             z r + d, whose backward is not its residual
``median``             batch median                    sqrt(mean (x - median)^2 + eps)   no: the center is the median
``layernorm``          sample mean over (C, *)         sample std (a GroupNorm of 1 group)  yes
``population``,        EMA mean (of the conv's input,  sqrt(EMA second moment + eps)     no: ScaleGrad to the example's/group's moments
``microbatch``         mapped by the current weights)
``bn_ln``, ``ln_bn``   read as their two functional calls (``F.batch_norm``, ``F.layer_norm``): two sites in series
=====================  ==============================  ================================  ==================

PopulationNorm's rotation and, in a training call where it acts, its ``u_max`` clip are read as the
map after the affine (:class:`AfterAffine`, the reading's ``activation``): per channel the reading
is the EMA normalization above, the site's output ``R (c * gamma z) + beta``.

In eval mode every op with running statistics is read as BatchNorm with them (no regression; the
backward is ``g / s``, which the identity with alpha = beta = 0 states). ``residual_backward``
False makes the gls tables report, per site, how far the backward is from the residual
(``identity_rel``) instead of checking the capture with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normscope.ops.base import mean_var
from normscope.registry import KINDS, Layout, register_norm, running_stats_layout


def _batchnorm(m: nn.Module, x: Tensor) -> Layout:
    batch_stats = m.training or m.running_mean is None
    return running_stats_layout("batchnorm", m.eps, m.weight, m.bias, batch_stats, m.running_mean, m.running_var)


def lsbn_layout(m: nn.Module, x: Tensor) -> Layout:
    """BatchNorm's forward; in training the backward regresses with the virtual items, not the residual."""
    layout = _batchnorm(m, x)
    layout.residual_backward = not layout.batch_stats or m.virtual_weight == 0
    return layout


def renorm_layout(m: nn.Module, x: Tensor) -> Layout:
    """Batch statistics with the effective affine ``gamma r``, ``gamma d + beta`` (r, d as the op
    computes them for this call, from the running statistics before it); ghost batches by
    :func:`ghost_layout`."""
    layout = _batchnorm(m, x)
    ghost = getattr(m, "ghost", None)
    if layout.batch_stats and ghost is not None and ghost < x.shape[0] and x.shape[0] % ghost == 0:
        return ghost_layout(m, x, layout)
    if not layout.batch_stats or m.running_mean is None:
        return layout
    step = int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0
    rmax, dmax = m.limits(step)
    with torch.no_grad():
        mean_b, var_b = mean_var(x.detach().to(m.running_var.dtype))
        sigma = (m.running_var + m.eps).sqrt()
        r = ((var_b + m.eps).sqrt() / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean_b - m.running_mean) / sigma).clamp(-dmax, dmax)
        gamma = torch.ones_like(r) if m.weight is None else m.weight.detach()
        beta = torch.zeros_like(d) if m.bias is None else m.bias.detach()
    layout.weight, layout.bias = gamma * r, gamma * d + beta
    return layout


def ghost_layout(m: nn.Module, x: Tensor, layout: Layout) -> Layout:
    """Partitions (ghost batch, channel); while renorm's r, d act (not 1, 0 for some partition),
    the op's effective statistics ``mu_g - d sigma_g / r`` and ``sigma_g / r``, so the forward is
    read exactly and the gls tables say the backward is not the residual of that reading."""
    layout.rule, layout.groups = "ghost", m.ghost
    if m.running_mean is None:
        return layout
    rmax, dmax = m.limits(int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0)
    if rmax == 1.0 and dmax == 0.0:
        return layout
    from normscope.registry import to_rows

    with torch.no_grad():
        rows = to_rows(x.detach().to(m.running_var.dtype), layout)
        mean, var = rows.mean(dim=1), rows.var(dim=1, unbiased=False)
        sigma_g = (var + m.eps).sqrt()
        channels = x.shape[1]
        sigma = (m.running_var + m.eps).sqrt().repeat(len(rows) // channels)
        r = (sigma_g / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - m.running_mean.repeat(len(rows) // channels)) / sigma).clamp(-dmax, dmax)
    layout.center, layout.scale, layout.residual_backward = mean - d * sigma_g / r, sigma_g / r, False
    return layout


def median_layout(m: nn.Module, x: Tensor) -> Layout:
    """Center the batch median (or its pseudo-Huber form), scale ``sqrt(mean((x - M)^2) + eps)``."""
    layout = _batchnorm(m, x)
    if not layout.batch_stats:
        return layout
    from normscope.ops.median import _rows, pseudo_huber_median

    with torch.no_grad():
        rows = _rows(x).to(torch.float64)
        center = pseudo_huber_median(rows, m.delta) if m.backward == "smoothed" else rows.median(dim=1).values
        scale = ((rows - center[:, None]).square().mean(dim=1) + m.eps).sqrt()
    layout.center, layout.scale, layout.residual_backward = center, scale, False
    return layout


class AfterAffine:
    """The map a site applies to its per-channel affine output ``y = gamma z + beta``, set as a
    reading's ``activation`` (the capture records ``y`` and takes ``dL/dy`` through this map's
    vector-Jacobian product): a per-call linear map ``L`` of ``gamma z``, with beta added after it,

    .. math:: \\mathrm{out} = L(y - \\beta) + \\beta,\\quad
              L(v) = R\\,(c \\odot v)\\ \\text{over the channel dim 1},

    ``c`` (N, C) a per-example, per-channel factor (PopulationNorm's ``u_max`` clip, a constant of
    the call) and R a fixed orthogonal matrix (its rotation): "Extreme Normalization" (under review)
    Alg. 1, ``y = Rotate(q * gamma) + beta`` with the clip inside q. Either may be absent.
    """

    gates = False  # not an activation: the dead-units table names no consumer from it

    def __init__(self, clip: Tensor | None, rotation: Tensor | None, bias: Tensor | None) -> None:
        self.clip, self.rotation, self.bias = clip, rotation, bias
        self.__name__ = ", ".join(name for name, part in (("u_max clip", clip), ("rotation", rotation)) if part is not None)

    def __call__(self, y: Tensor) -> Tensor:
        shift = None if self.bias is None else self.bias.to(y).view(1, -1, *([1] * (y.dim() - 2)))
        v = y if shift is None else y - shift
        if self.clip is not None:
            v = v * self.clip.to(v).view(*self.clip.shape, *([1] * (y.dim() - 2)))
        if self.rotation is not None:
            v = torch.movedim(torch.movedim(v, 1, -1) @ self.rotation.to(v).T, -1, 1)
        return v if shift is None else v + shift


def population_clip(m: nn.Module, x: Tensor, center: Tensor, var: Tensor) -> Tensor:
    """PopulationNorm's ``u_max`` clip of one training call, (N, C) in float64:
    ``min(1, u_max sqrt((nu-bar + eps) / (nu + eps)))`` with ``nu = E_i (x_{b,i} - center)^2``
    per example (Algorithm 1: the example's own second moment of p) or, in the ``fixed_mean``
    arrangement, its mean over the example's group of ``microbatch`` examples (the last group
    taking the rest)."""
    from normscope.ops.population import clip_factor, example_moments, group_mean

    _, nu = example_moments(x.detach().to(torch.float64), center.to(torch.float64))
    if m.arrangement == "fixed_mean":
        nu = group_mean(nu, min(m.microbatch, x.shape[0]))
    return clip_factor(nu, var.to(torch.float64), m.eps, m.u_max)


def population_layout(m: nn.Module, x: Tensor) -> Layout:
    """The EMA moments: center mu-bar (mapped through the producer's current weights when the op
    takes its mean over the producer's input), scale ``sqrt(nu-bar + eps)``; in training the
    gradient goes to each example's or group's moments (not the residual). A rotation, and in
    training a ``u_max`` clip that acts on this call, are read as the map after the affine
    (:class:`AfterAffine`): the record holds ``gamma z + beta`` per channel and ``dL/dy`` taken
    back through the map."""
    from normscope.ops.population import producer_center

    with torch.no_grad():
        producer = m.producer
        if producer is not None and m.arrangement == "algorithm1":
            center = producer_center(producer, m.input_mean[None])[0].detach()
        else:
            center = m.running_mean.detach().clone()  # the forward moves the buffer in place after this reading
        var = m.running_var.detach().clone()
        clip = population_clip(m, x, center, var) if m.training and math.isfinite(m.u_max) else None
    layout = Layout(KINDS["batchnorm"], "channel", float(m.eps), m.weight, m.bias)
    if m.training:
        layout.center, layout.scale, layout.residual_backward = center, (var + m.eps).sqrt(), False
    else:
        layout.batch_stats, layout.running_mean, layout.running_var = False, center, var
    clip = None if clip is None or bool((clip == 1.0).all()) else clip
    if clip is not None or m.rotation is not None:
        bias = None if m.bias is None else m.bias.detach()
        layout.activation = AfterAffine(clip, None if m.rotation is None else m.rotation.detach(), bias)
    return layout


def register_ops() -> None:
    """Register every op of :mod:`normscope.ops` with :func:`normscope.register_norm` (the public call)."""
    from normscope.ops.layer_norm import ChannelLayerNorm
    from normscope.ops.ls_bn import LSBatchNorm
    from normscope.ops.median import MedianBatchNorm
    from normscope.ops.population import PopulationNorm
    from normscope.ops.renorm import BatchRenorm

    for cls, layout in ((LSBatchNorm, lsbn_layout), (BatchRenorm, renorm_layout), (MedianBatchNorm, median_layout),
                        (PopulationNorm, population_layout)):
        register_norm(cls, "batchnorm", layout=layout, overwrite=True)
    register_norm(ChannelLayerNorm, "groupnorm", groups=1, overwrite=True)
