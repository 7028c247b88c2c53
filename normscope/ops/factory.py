"""Normalization ops by name, timm-style (``timm/layers/create_norm.py``), with a clear unknown-name error.

Every op takes the channel count first and has torch BatchNorm's attribute names, so any of
them can stand in for a BatchNorm (:func:`normscope.ops.swap.swap_norms`).

=================  ==============================================================  ============
name               op                                                               source
=================  ==============================================================  ============
``bn``             torch's BatchNorm, any input ``(N, C, *)``                       baseline
``median``         :class:`~normscope.ops.median.MedianBatchNorm`                   King, "Median Batch Normalization" (2022)
``renorm``         :class:`~normscope.ops.renorm.BatchRenorm`                       Ioffe 2017
``ghost_bn``       :class:`~normscope.ops.renorm.GhostBatchNorm`, ghost batches of 4  Ioffe 2017 §4.2
``ghost_renorm``   ``BatchRenorm`` over ghost batches of 4                          Ioffe 2017 §4.2
``layernorm``      :class:`~normscope.ops.layer_norm.ChannelLayerNorm`              "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Table 1
``lsbn``           :class:`~normscope.ops.ls_bn.LSBatchNorm`                        "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) App. C
``bn_ln``          :class:`~normscope.ops.chain.BatchLayerNorm`, BN then LN         "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1
``ln_bn``          :class:`~normscope.ops.chain.BatchLayerNorm`, LN then BN         "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1
``population``     ``normscope.ops.population.PopulationNorm``, per example         "Extreme Normalization" (under review) §3.1
``microbatch``     ``PopulationNorm`` with microbatches of 4                        "Extreme Normalization" (under review) §5
=================  ==============================================================  ============

The seeds are "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission,
"Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) above) and "Extreme Normalization: Approximating Full-Data Batch Normalization with
Single Examples" ("Extreme Normalization" (under review)); Ioffe 2017 is "Batch Renormalization". Every op's defaults follow its
paper where the paper states one (see each docstring). ``microbatch`` is the improved batch
renormalization of "Extreme Normalization" (under review) §5, ``ghost_renorm`` Ioffe's own at the same microbatch size.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any, Callable, Union

import torch
from torch import nn

from normscope.errors import DataShapeError, UnknownNameError
from normscope.ops.chain import BatchLayerNorm
from normscope.ops.layer_norm import ChannelLayerNorm
from normscope.ops.ls_bn import LSBatchNorm
from normscope.ops.median import MedianBatchNorm
from normscope.ops.renorm import BatchRenorm, GhostBatchNorm


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's BatchNorm (``F.batch_norm``) for any input ``(N, C)`` or ``(N, C, *)``, the ``bn`` baseline."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise DataShapeError(f"BatchNorm expected 2D or more input (N, C, *) (got {x.dim()}D input)")


NormSpec = Union[str, type, Callable[..., nn.Module]]

NORMS: dict[str, Callable[..., nn.Module] | tuple[str, dict[str, Any]]] = {
    "bn": BatchNorm,
    "median": MedianBatchNorm,
    "renorm": BatchRenorm,
    "ghost_bn": GhostBatchNorm,
    "ghost_renorm": partial(BatchRenorm, ghost=4),
    "layernorm": ChannelLayerNorm,
    "lsbn": LSBatchNorm,
    "bn_ln": partial(BatchLayerNorm, order="bn_ln"),
    "ln_bn": partial(BatchLayerNorm, order="ln_bn"),
    "population": ("normscope.ops.population:PopulationNorm", {}),
    "microbatch": ("normscope.ops.population:PopulationNorm", {"microbatch": 4}),
}


def norm_names() -> list[str]:
    """The valid op names, in table order."""
    return list(NORMS)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get_norm(name_or_class_or_partial: NormSpec) -> Callable[..., nn.Module]:
    """The constructor for ``name_or_class_or_partial``: a name from :data:`NORMS` (case and
    ``-``/``_`` insensitive), or a class or ``functools.partial`` returned as given.

    Ops from modules that are imported lazily (``population``) are imported here.
    """
    if not isinstance(name_or_class_or_partial, str):
        if not callable(name_or_class_or_partial):
            raise UnknownNameError("normalization op", repr(name_or_class_or_partial), NORMS)
        return name_or_class_or_partial
    key = _key(name_or_class_or_partial)
    if key not in NORMS:
        raise UnknownNameError("normalization op", name_or_class_or_partial, NORMS)
    entry = NORMS[key]
    if not isinstance(entry, tuple):
        return entry
    target, defaults = entry
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return partial(cls, **defaults) if defaults else cls


def create_norm(name_or_class_or_partial: NormSpec, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the op ``name_or_class_or_partial`` for ``num_features`` channels: ``op(num_features, **kwargs)``.

    Example:
        >>> create_norm("median", 64, backward="smoothed")
        MedianBatchNorm(64, eps=1e-05, ..., backward='smoothed', delta=0.01)
    """
    return get_norm(name_or_class_or_partial)(num_features, **kwargs)
