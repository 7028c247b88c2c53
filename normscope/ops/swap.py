"""Swap a model's BatchNorms for another normalization op, on a copy (like ``convert_sync_batchnorm``)."""

from __future__ import annotations

import copy
import inspect
from fnmatch import fnmatchcase
from typing import Any, Iterable

import torch
from torch import nn

from normscope.errors import InvalidArgumentError, NoNormSitesError
from normscope.ops.factory import BatchNorm, NormSpec, get_norm

BatchNormBase = nn.modules.batchnorm._BatchNorm


def batchnorm_sites(model: nn.Module, sites: str | Iterable[str] | None = None) -> list[str]:
    """Module paths of the BatchNorms (any ``torch.nn.modules.batchnorm._BatchNorm``) in ``model``,
    all of them or those matching a name or ``fnmatch`` pattern of ``sites``.

    Raises :class:`NoNormSitesError` naming the BatchNorm sites when nothing is selected.
    """
    found = [name for name, m in model.named_modules() if isinstance(m, BatchNormBase)]
    if sites is None:
        selected = found
    else:
        patterns = [sites] if isinstance(sites, str) else list(sites)
        selected = [name for name in found if any(fnmatchcase(name, p) for p in patterns)]
    if not found:
        raise NoNormSitesError("the model has no BatchNorm (torch.nn.BatchNorm1d/2d/3d or SyncBatchNorm) to replace")
    if not selected:
        raise NoNormSitesError(f"no BatchNorm matching {sites!r} in the model; its BatchNorm sites: {', '.join(found)}")
    return selected


def _options(constructor: Any) -> list[str] | None:
    """The keyword options ``constructor`` takes after the channel count, None when it takes ``**kwargs``
    or has no readable signature."""
    try:
        parameters = list(inspect.signature(constructor).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    names = [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return names[1:]


def check_options(op: NormSpec, kwargs: dict[str, Any]) -> None:
    """Raise :class:`InvalidArgumentError` naming the op's options when ``kwargs`` has one it does not take."""
    accepted = _options(get_norm(op))
    unknown = [] if accepted is None else [k for k in kwargs if k not in accepted]
    if unknown:
        name = op if isinstance(op, str) else getattr(getattr(op, "func", op), "__name__", repr(op))
        raise InvalidArgumentError(
            f"op {name!r} takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}"
        )


def _keeps_model_class(constructor: Any) -> bool:
    """``"bn"`` (normscope's BatchNorm) stands for "the model's own BatchNorm class"; any other
    class, a BatchNorm subclass included, is swapped in as given."""
    return constructor is BatchNorm


@torch.no_grad()
def convert_batchnorm(bn: nn.Module, op: NormSpec, **kwargs: Any) -> nn.Module:
    """A new ``op`` module standing in for the BatchNorm ``bn``: same channel count, ``eps``,
    ``momentum`` (unless the op keeps its own EMA rate, ``own_momentum``, as PopulationNorm does),
    ``affine`` (and ``track_running_stats`` where the op takes it), then ``bn``'s affine
    parameters (values and ``requires_grad``), running statistics, ``num_batches_tracked``,
    device, dtype and train/eval flag copied over. ``kwargs`` go to the op's constructor; one it
    does not take raises :class:`InvalidArgumentError` naming the options it does take.

    For ``op="bn"`` the new module has ``bn``'s own class; a class passed as ``op`` (a BatchNorm
    subclass included) is used as given.
    """
    check_options(op, kwargs)
    constructor = get_norm(op)
    if _keeps_model_class(constructor):
        constructor = type(bn)
    accepted = _options(constructor)
    options = {"eps": bn.eps, "affine": bn.affine}
    if not getattr(constructor, "own_momentum", False):
        options["momentum"] = bn.momentum
    if accepted is None or "track_running_stats" in accepted:
        options["track_running_stats"] = bn.track_running_stats
    new = constructor(bn.num_features, **{**options, **kwargs})
    _move_like(new, bn)
    for name in ("weight", "bias"):
        source, target = getattr(bn, name, None), getattr(new, name, None)
        if isinstance(source, nn.Parameter) and isinstance(target, nn.Parameter):
            target.copy_(source)
            target.requires_grad_(source.requires_grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        source, target = getattr(bn, name, None), getattr(new, name, None)
        if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor) and source.shape == target.shape:
            target.copy_(source)
    return new.train(bn.training)


def _move_like(new: nn.Module, old: nn.Module) -> None:
    """Put ``new`` on ``old``'s device, and in its floating dtype when ``old`` has a weight."""
    reference = next(iter([*old.parameters(), *old.buffers()]), None)
    if reference is not None:
        new.to(device=reference.device)
        weight = getattr(old, "weight", None)
        if isinstance(weight, torch.Tensor):
            new.to(dtype=weight.dtype)


LAYER_SITE_OPS = ("layernorm", "rmsnorm", "bn_ln", "ln_bn")
LAYER_SITES = (nn.LayerNorm, nn.RMSNorm)


def layer_sites(model: nn.Module) -> list[str]:
    """Module paths of the ``nn.LayerNorm`` and ``nn.RMSNorm`` sites over one last dim."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, LAYER_SITES) and len(m.normalized_shape) == 1
    ]


@torch.no_grad()
def convert_layer_norm(norm: nn.Module, op: str, **kwargs: Any) -> nn.Module:
    """A new module for the LayerNorm/RMSNorm site ``norm`` over the last dim D: ``"layernorm"``
    (``nn.LayerNorm``), ``"rmsnorm"`` (``nn.RMSNorm``) or the chains ``"bn_ln"``/``"ln_bn"`` over
    tokens (:class:`~normscope.ops.layer_norm.TokenNorm`), with ``norm``'s eps (RMSNorm's None:
    torch's default for the dtype, 1e-5 elsewhere), weight and, where both have one, bias."""
    from normscope.ops.chain import BatchLayerNorm
    from normscope.ops.layer_norm import TokenNorm

    width = norm.normalized_shape[0]
    eps = 1e-5 if norm.eps is None else norm.eps
    affine = norm.weight is not None
    if op == "layernorm":
        new: nn.Module = nn.LayerNorm(width, eps=eps, elementwise_affine=affine, **kwargs)
    elif op == "rmsnorm":
        new = nn.RMSNorm(width, eps=norm.eps, elementwise_affine=affine, **kwargs)
    else:
        new = TokenNorm(BatchLayerNorm(width, eps=eps, affine=affine, order=op, **kwargs))
    _move_like(new, norm)
    for name in ("weight", "bias"):
        source, target = getattr(norm, name, None), getattr(new, name, None)
        if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor):
            target.copy_(source)
            target.requires_grad_(source.requires_grad)
    return new.train(norm.training)


def _key(op: NormSpec) -> str | None:
    return op.strip().lower().replace("-", "_") if isinstance(op, str) else None


def swap_norms(model: nn.Module, op: NormSpec, sites: str | Iterable[str] | None = None, **kwargs: Any) -> nn.Module:
    """Return a deep copy of ``model`` with every normalization site the op applies to, or those
    whose module path matches a name or ``fnmatch`` pattern in ``sites``, replaced by ``op``.
    ``model`` itself is not touched.

    * BatchNorm sites (any ``_BatchNorm``) take every op of :data:`normscope.ops.factory.NORMS`,
      a class or a partial, via :func:`convert_batchnorm`.
    * LayerNorm and RMSNorm sites over the last dim take ``layernorm``, ``rmsnorm``, ``bn_ln`` and
      ``ln_bn`` (:func:`convert_layer_norm`).
    * A swapped-in op that takes the layer feeding it (PopulationNorm, "Extreme Normalization"
      Algorithm 1) gets the Linear/Conv before it where ``model`` traces with ``torch.fx``
      (:func:`attach_producers`).

    Raises :class:`NoNormSitesError` when the model has no site the op applies to.

    Example:
        >>> swapped = swap_norms(build_model("resnet_bn"), "median", sites="layer1.*", backward="smoothed")
        >>> rms = swap_norms(build_model("transformer_ln"), "rmsnorm")
    """
    key = _key(op)
    layer_targets = layer_sites(model) if key in LAYER_SITE_OPS else []
    if key != "rmsnorm":
        get_norm(op)
    has_bn = any(isinstance(m, BatchNormBase) for m in model.modules())
    if key == "rmsnorm" or (layer_targets and not has_bn):
        if not layer_targets:
            raise NoNormSitesError(
                f"op {op!r} replaces LayerNorm/RMSNorm sites over the last dim and the model has none"
            )
        names, convert = _select(layer_targets, sites, "LayerNorm/RMSNorm"), convert_layer_norm
    else:
        if kwargs:
            check_options(op, kwargs)
        names, convert = batchnorm_sites(model, sites), convert_batchnorm
    new = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, convert(getattr(parent, child), key if convert is convert_layer_norm else op, **kwargs))
    attach_producers(model, new, names)
    return new


def attach_producers(model: nn.Module, new: nn.Module, names: list[str]) -> None:
    """Hand each swapped site that takes one (``attach_producer``, PopulationNorm's Algorithm 1)
    the Linear/Conv feeding it in ``model``'s trace (:func:`normscope.ops.producers.feeding_layers`)."""
    takers = [name for name in names if callable(getattr(new.get_submodule(name), "attach_producer", None))]
    if not takers:
        return
    from normscope.ops.producers import feeding_layers

    for site, layer in feeding_layers(model, takers).items():
        new.get_submodule(site).attach_producer(new.get_submodule(layer))


def _select(found: list[str], sites: str | Iterable[str] | None, kind: str) -> list[str]:
    if sites is None:
        return found
    patterns = [sites] if isinstance(sites, str) else list(sites)
    selected = [name for name in found if any(fnmatchcase(name, p) for p in patterns)]
    if not selected:
        raise NoNormSitesError(f"no {kind} matching {sites!r} in the model; its {kind} sites: {', '.join(found)}")
    return selected
