"""Swap a model's BatchNorms for another normalization op, on a copy (like ``convert_sync_batchnorm``)."""

from __future__ import annotations

import copy
import inspect
from fnmatch import fnmatchcase
from typing import Any, Iterable

import torch
from torch import nn

from normscope.errors import NoNormSitesError
from normscope.ops.factory import NormSpec, get_norm

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


def _accepts(constructor: Any, name: str) -> bool:
    try:
        return name in inspect.signature(constructor).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def convert_batchnorm(bn: nn.Module, op: NormSpec, **kwargs: Any) -> nn.Module:
    """A new ``op`` module standing in for the BatchNorm ``bn``: same channel count, ``eps``,
    ``momentum``, ``affine`` (and ``track_running_stats`` where the op takes it), then ``bn``'s
    affine parameters (values and ``requires_grad``), running statistics, ``num_batches_tracked``,
    device, dtype and train/eval flag copied over. ``kwargs`` go to the op's constructor.

    For ``op="bn"`` (or any torch BatchNorm class) the new module has ``bn``'s own class.
    """
    constructor = get_norm(op)
    if isinstance(constructor, type) and issubclass(constructor, BatchNormBase):
        constructor = type(bn)
    options = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine}
    if _accepts(constructor, "track_running_stats"):
        options["track_running_stats"] = bn.track_running_stats
    new = constructor(bn.num_features, **{**options, **kwargs})
    reference = next(iter([*bn.parameters(), *bn.buffers()]), None)
    if reference is not None:
        new = new.to(device=reference.device)
        if bn.weight is not None:
            new = new.to(dtype=bn.weight.dtype)
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


def swap_norms(model: nn.Module, op: NormSpec, sites: str | Iterable[str] | None = None, **kwargs: Any) -> nn.Module:
    """Return a deep copy of ``model`` with every BatchNorm, or those whose module path matches
    a name or ``fnmatch`` pattern in ``sites``, replaced by ``op`` (a name of
    :data:`normscope.ops.factory.NORMS`, a class or a partial) via :func:`convert_batchnorm`.
    ``model`` itself is not touched.

    Example:
        >>> swapped = swap_norms(build_model("resnet_bn"), "median", sites="layer1.*", backward="smoothed")
    """
    get_norm(op)
    names = batchnorm_sites(model, sites)
    new = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, convert_batchnorm(getattr(parent, child), op, **kwargs))
    return new
