"""The one table of normalization kinds: how each splits a tensor into partitions.

Every normalization computes, per partition P, ``z = (x - mu_P) / sqrt(var_P + eps)`` (or the
uncentered ``x / sqrt(mean_P(x^2) + eps)``) and then ``y = gamma * z + beta`` (MATH.md §1).
A :class:`NormKind` says whether the kind centers and which partition rule it uses; a
:class:`Layout` is what one call of one site needs to recompute ``z``: the rule, eps, the
affine parameters and, for BatchNorm in eval mode, the running statistics.

Partition rules, for an input of shape ``(N, C, *)``:

==================  ======================================================  ============
rule                one partition per                                       used by
==================  ======================================================  ============
``channel``         channel, over (N, spatial)                              BatchNorm
``sample_last``     leading index, over the last ``normalized_ndim`` dims   LayerNorm, RMSNorm
``sample_channel``  (sample, position), over the channel dim 1              ConvNeXt LayerNorm
``group``           (sample, group), over (C/G channels, spatial)           GroupNorm
``instance``        (sample, channel), over spatial                         InstanceNorm
``weight``          output unit of a weight ``v``, over the other dims      weight norm
``ghost``           (ghost batch of ``groups`` samples, channel)            ghost-batch BN
==================  ======================================================  ============

Readings are per instance: classes added with :func:`register_norm` come first (along the MRO),
then a module's own ``data_format`` (a ConvNeXt LayerNorm subclasses ``nn.LayerNorm`` but its
channels-first instances normalize over dim 1), then torch's norm classes along the MRO, then
structural rules for third-party classes (:func:`recognize`). Norm-like classes that are not
recognised are reported by :func:`looks_like_norm`, and every reading is checked against the
site's actual output when it first runs (:mod:`normscope.capture.verify`).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm

from normscope.errors import NormscopeError, UnknownNameError

RULES = ("channel", "sample_last", "sample_channel", "group", "instance", "weight", "ghost")


@dataclass(frozen=True)
class NormKind:
    """A family of normalization: its name, whether it centers, its default partition rule."""

    name: str
    centered: bool
    rule: str


KINDS: dict[str, NormKind] = {
    k.name: k
    for k in (
        NormKind("batchnorm", True, "channel"),
        NormKind("layernorm", True, "sample_last"),
        NormKind("groupnorm", True, "group"),
        NormKind("instancenorm", True, "instance"),
        NormKind("rmsnorm", False, "sample_last"),
        NormKind("weightnorm", False, "weight"),
    )
}


@dataclass
class Layout:
    """What one call of a normalization needs to recompute ``z`` and ``g = dL/dz``.

    ``weight_offset`` is 1 for norms that scale by ``1 + weight`` (Gemma-style RMSNorm).
    ``batch_stats`` is False when running statistics normalize (BatchNorm in eval mode).
    ``center`` and ``scale`` (one value per partition) are the statistics of an op that does not
    normalize by the partition's mean and standard deviation (median BN, population norm), so
    ``z = (x - center) / scale``; ``residual_backward`` is False when the op's backward pass is not
    the least-squares residual of MATH.md §2 (the gls tables then measure how far it is).
    ``activation`` is the function of ``y`` a module applies after its affine: an elementwise
    activation of a fused module (BiT's ``BitGroupNormActivation``) or a per-call map such as
    PopulationNorm's rotation and ``u_max`` clip (:class:`normscope.ops.readings.AfterAffine`, whose
    ``gates`` is False): the site's output is ``activation(y)``, its record holds ``y`` and ``dL/dy``
    taken back through it.
    """

    kind: NormKind
    rule: str
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_offset: float = 0.0
    normalized_ndim: int = 1
    groups: int = 1
    dim: int = 0
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    batch_stats: bool = True
    center: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    residual_backward: bool = True
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None


def to_rows(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reshape ``t`` (an input-shaped tensor) to ``(partitions, items)`` by the layout's rule."""
    rule = layout.rule
    if rule == "channel":
        return t.transpose(0, 1).reshape(t.shape[1], -1)
    if rule == "sample_last":
        return t.reshape(-1, math.prod(t.shape[t.dim() - layout.normalized_ndim :]))
    if rule == "sample_channel":
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    if rule == "group":
        return t.reshape(t.shape[0] * layout.groups, -1)
    if rule == "instance":
        return t.reshape(t.shape[0] * t.shape[1], -1)
    if rule == "weight":
        return t.movedim(layout.dim, 0).reshape(t.shape[layout.dim], -1)
    if rule == "ghost":
        k = layout.groups
        return t.reshape(t.shape[0] // k, k, t.shape[1], -1).transpose(1, 2).reshape(t.shape[0] // k * t.shape[1], -1)
    raise UnknownNameError("partition rule", rule, RULES)


def from_rows(rows: torch.Tensor, shape: torch.Size, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a tensor of the given input ``shape``."""
    rule = layout.rule
    if rule == "channel":
        moved = (shape[1], shape[0], *shape[2:])
        return rows.reshape(moved).transpose(0, 1)
    if rule == "sample_channel":
        moved = (shape[0], *shape[2:], shape[1])
        return rows.reshape(moved).movedim(-1, 1)
    if rule == "weight":
        moved = (shape[layout.dim], *[s for i, s in enumerate(shape) if i != layout.dim])
        return rows.reshape(moved).movedim(0, layout.dim)
    if rule == "ghost":
        k = layout.groups
        return rows.reshape(shape[0] // k, shape[1], k, -1).transpose(1, 2).reshape(shape)
    return rows.reshape(shape)


def affine_like(param: torch.Tensor | None, x: torch.Tensor, layout: Layout) -> torch.Tensor | None:
    """Broadcast a per-channel or per-feature affine parameter against ``x``."""
    if param is None:
        return None
    if layout.rule in ("channel", "group", "instance", "sample_channel", "ghost"):
        return param.reshape(1, -1, *([1] * (x.dim() - 2)))
    return param


def partition_moments(rows: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-partition ``(shift, scale)``, each ``(P, 1)``, with ``z = (x - shift) / scale`` (MATH.md §1).

    centered, batch statistics: ``(mean_P x, sqrt(var_P x + eps))`` (biased variance);
    running statistics: ``(running_mean, sqrt(running_var + eps))``;
    uncentered (RMSNorm): ``(0, sqrt(mean_P x^2 + eps))``; weight norm: ``(0, ||v||)``.
    The variance is two-pass (mean, then the dot product of the centered rows), about 7x faster
    on CPU than ``torch.var_mean`` over rows in float64.
    """
    if layout.rule == "weight":
        return torch.zeros_like(rows[:, :1]), rows.norm(dim=1, keepdim=True)
    if layout.center is not None:
        return layout.center.to(rows)[:, None], layout.scale.to(rows)[:, None]
    if not layout.batch_stats:
        mean, var = layout.running_mean.to(rows), layout.running_var.to(rows)
        repeat = rows.shape[0] // mean.shape[0]
        return mean.repeat(repeat)[:, None], torch.sqrt(var.repeat(repeat)[:, None] + layout.eps)
    n = rows.shape[1]
    if layout.kind.centered:
        mean = rows.sum(dim=1, keepdim=True) / n
        centered = rows - mean
        return mean, torch.sqrt(torch.linalg.vecdot(centered, centered)[:, None] / n + layout.eps)
    return torch.zeros_like(rows[:, :1]), torch.sqrt(torch.linalg.vecdot(rows, rows)[:, None] / n + layout.eps)


def normalize_rows(x: torch.Tensor, layout: Layout, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Recompute ``z`` as ``(partitions, items)`` rows from the input ``x``, in ``dtype``
    (float64 by default; ``None`` keeps x's dtype), with :func:`partition_moments`."""
    rows = to_rows(x.detach() if dtype is None else x.detach().to(dtype), layout)
    shift, scale = partition_moments(rows, layout)
    return (rows - shift).div_(scale)


def _eps(value: float | None, dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if value is None else float(value)


def running_stats_layout(
    kind: str, eps: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
    batch_stats: bool, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
) -> Layout:
    """Layout of a norm that may normalize with running statistics (BatchNorm, InstanceNorm):
    batch statistics when ``batch_stats``, else copies of the running buffers as they are now."""
    return Layout(
        KINDS[kind], KINDS[kind].rule, float(eps), weight, bias,
        running_mean=None if batch_stats else running_mean.detach().clone(),
        running_var=None if batch_stats else running_var.detach().clone(),
        batch_stats=batch_stats,
    )


def _batchnorm_layout(m: nn.Module, x: torch.Tensor) -> Layout:
    batch_stats = m.training or m.running_mean is None
    return running_stats_layout("batchnorm", m.eps, m.weight, m.bias, batch_stats, m.running_mean, m.running_var)


def _instancenorm_layout(m: nn.Module, x: torch.Tensor) -> Layout:
    batch_stats = m.training or not m.track_running_stats
    return running_stats_layout("instancenorm", m.eps, m.weight, m.bias, batch_stats, m.running_mean, m.running_var)


def _layernorm_layout(m: nn.Module, x: torch.Tensor) -> Layout:
    return Layout(KINDS["layernorm"], "sample_last", m.eps, m.weight, m.bias, normalized_ndim=len(m.normalized_shape))


def _groupnorm_layout(m: nn.Module, x: torch.Tensor) -> Layout:
    return Layout(KINDS["groupnorm"], "group", m.eps, m.weight, m.bias, groups=m.num_groups)


def _rmsnorm_layout(m: nn.Module, x: torch.Tensor) -> Layout:
    return Layout(KINDS["rmsnorm"], "sample_last", _eps(m.eps, x.dtype), m.weight, None, normalized_ndim=len(m.normalized_shape))


def _weightnorm_layout(m: nn.Module, v: torch.Tensor) -> Layout:
    return Layout(KINDS["weightnorm"], "weight", 0.0, None, None, dim=m.dim)


LayoutFn = Callable[[nn.Module, torch.Tensor], Layout]


@dataclass(frozen=True)
class Recognized:
    """How normscope reads a module: its kind and the function giving a call's layout."""

    kind: NormKind
    layout: LayoutFn


_REGISTRY: dict[type, Recognized] = {
    nn.modules.batchnorm._BatchNorm: Recognized(KINDS["batchnorm"], _batchnorm_layout),
    nn.modules.instancenorm._InstanceNorm: Recognized(KINDS["instancenorm"], _instancenorm_layout),
    nn.LayerNorm: Recognized(KINDS["layernorm"], _layernorm_layout),
    nn.GroupNorm: Recognized(KINDS["groupnorm"], _groupnorm_layout),
    nn.RMSNorm: Recognized(KINDS["rmsnorm"], _rmsnorm_layout),
    _WeightNorm: Recognized(KINDS["weightnorm"], _weightnorm_layout),
}


_REGISTERED: set[type] = set()


def register_norm(
    cls: type[nn.Module],
    kind: str,
    *,
    eps: str = "eps",
    weight: str | None = "weight",
    bias: str | None = "bias",
    normalized_ndim: int = 1,
    groups: str | int = 1,
    channels_first: bool | Callable[[nn.Module], bool] = False,
    weight_offset: float = 0.0,
    overwrite: bool = False,
    layout: LayoutFn | None = None,
) -> None:
    """Teach normscope a custom normalization class in one call.

    Args:
        cls: the module class; its subclasses are recognised too.
        kind: one of ``batchnorm``, ``layernorm``, ``groupnorm``, ``instancenorm``, ``rmsnorm``.
        eps, weight, bias: attribute names of eps and the affine parameters (``None``: absent).
        normalized_ndim: trailing dims normalized by layer/RMS norms. Default: 1.
        groups: number of groups, or the attribute holding it (group norms). Default: 1.
        channels_first: the layer norm normalizes over dim 1 (ConvNeXt); a function of the
            module for a per-instance layout, e.g. ``lambda m: m.data_format == "channels_first"``.
            Default: False.
        weight_offset: 1.0 for norms that scale by ``1 + weight``. Default: 0.
        overwrite: replace an existing entry for ``cls`` instead of raising. Default: False.
        layout: ``layout(module, x) -> Layout``, the reading of one call, for an op the options
            above cannot describe (its own statistics, ``center``/``scale``; an effective affine;
            a backward that is not the residual). Default: None (read from the options).

    Example:
        >>> register_norm(MyRMSNorm, "rmsnorm", eps="variance_epsilon", bias=None)
    """
    if kind not in KINDS or kind == "weightnorm":
        raise UnknownNameError("norm kind", kind, [k for k in KINDS if k != "weightnorm"])
    if cls in _REGISTRY and not overwrite:
        raise NormscopeError(f"{cls.__name__} is already registered; pass overwrite=True to replace it")
    norm_kind = KINDS[kind]
    if layout is not None:
        _REGISTRY[cls] = Recognized(norm_kind, layout)
        _REGISTERED.add(cls)
        return

    def reading(m: nn.Module, x: torch.Tensor) -> Layout:
        first = channels_first(m) if callable(channels_first) else channels_first
        base = Layout(
            norm_kind, "sample_channel" if first else norm_kind.rule, _eps(getattr(m, eps, None), x.dtype),
            getattr(m, weight) if weight else None, getattr(m, bias) if bias else None,
            weight_offset=weight_offset, normalized_ndim=normalized_ndim,
            groups=groups if isinstance(groups, int) else int(getattr(m, groups)),
        )
        if kind == "batchnorm" and not m.training and getattr(m, "running_mean", None) is not None:
            return running_stats_layout("batchnorm", base.eps, base.weight, base.bias, False, m.running_mean, m.running_var)
        return base

    _REGISTRY[cls] = Recognized(norm_kind, reading)
    _REGISTERED.add(cls)


def unregister_norm(cls: type[nn.Module]) -> None:
    """Remove a class added with :func:`register_norm` (built-in kinds cannot be removed)."""
    if cls in _REGISTERED:
        _REGISTRY.pop(cls, None)
        _REGISTERED.discard(cls)


def _scales_by_one_plus_weight(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return re.search(r"\(\s*1(\.0)?\s*\+\s*self\.weight", source) is not None


def _norm_param(m: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(m, name, None)
    return p if isinstance(p, torch.Tensor) else None


def _data_format_layernorm(module: nn.Module) -> Recognized | None:
    """A module with ``data_format`` in (``channels_first``, ``channels_last``),
    ``normalized_shape`` and ``eps`` is a (ConvNeXt) LayerNorm over dim 1 or the trailing dims,
    read per instance."""
    if getattr(module, "data_format", None) not in ("channels_first", "channels_last"):
        return None
    if not (hasattr(module, "normalized_shape") and hasattr(module, "eps")):
        return None

    def layout(m: nn.Module, x: torch.Tensor) -> Layout:
        first = m.data_format == "channels_first"
        ndim = 1 if first else len(tuple(m.normalized_shape)) if isinstance(m.normalized_shape, (tuple, list, torch.Size)) else 1
        return Layout(KINDS["layernorm"], "sample_channel" if first else "sample_last", float(m.eps),
                      _norm_param(m, "weight"), _norm_param(m, "bias"), normalized_ndim=ndim)

    return Recognized(KINDS["layernorm"], layout)


def recognize(module: nn.Module) -> Recognized | None:
    """How to read ``module``: :func:`register_norm` entries (along the MRO), then the module's
    ``data_format``, then torch's norm classes (along the MRO), then structure.

    Structural rules, each unambiguous: a module with ``variance_epsilon`` and a 1-D weight and no
    bias is a Llama-style RMSNorm; a class named ``*RMSNorm`` with ``eps`` and a 1-D weight is an
    RMSNorm, scaled by ``1 + weight`` when its ``forward`` says so.
    """
    mro = type(module).__mro__
    registered = next((cls for cls in mro if cls in _REGISTERED), None)
    if registered is not None:
        return _REGISTRY[registered]
    by_format = _data_format_layernorm(module)
    if by_format is not None:
        return by_format
    for cls in mro:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    weight = _norm_param(module, "weight")
    one_d_weight = weight is not None and weight.dim() == 1
    name = type(module).__name__
    if hasattr(module, "variance_epsilon") and one_d_weight and _norm_param(module, "bias") is None:
        offset = 1.0 if _scales_by_one_plus_weight(type(module)) else 0.0
        return Recognized(KINDS["rmsnorm"], lambda m, x: Layout(
            KINDS["rmsnorm"], "sample_last", float(m.variance_epsilon), m.weight, None, weight_offset=offset))
    if name.lower().endswith("rmsnorm") and hasattr(module, "eps") and one_d_weight:
        offset = 1.0 if _scales_by_one_plus_weight(type(module)) else 0.0
        return Recognized(KINDS["rmsnorm"], lambda m, x: Layout(
            KINDS["rmsnorm"], "sample_last", float(m.eps), m.weight, None, weight_offset=offset))
    return None


def looks_like_norm(module: nn.Module) -> bool:
    """True for a class that is named like a normalization but is not recognised.

    Containers whose children are recognised norms (e.g. a ``Sequential`` named ``norms``)
    do not count, nor a class with ``read_by_functional_calls = True`` (its ``F.batch_norm``/
    ``F.layer_norm`` calls are the sites, e.g. BN then LN in series); the check is on the class
    name, never silently on nothing.
    """
    name = type(module).__name__.lower()
    if "norm" not in name or recognize(module) is not None or getattr(module, "read_by_functional_calls", False):
        return False
    return not any(recognize(child) is not None for child in module.children())
