"""Normalization ops from the seeds, swappable into any model in place of its BatchNorms.

This module is the one list of normscope's ops. Population normalization, two-stage backprop and
inference folding ("Extreme Normalization" (under review)) are imported on first access, so that importing the ops stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from normscope.ops.chain import BatchLayerNorm, batch_layer_norm
from normscope.ops.ema import EmaSchedule, ema_only_step, ema_schedule
from normscope.ops.factory import NORMS, BatchNorm, create_norm, get_norm, norm_names
from normscope.ops.ls_bn import LSBatchNorm, regularized_moments
from normscope.ops.median import MedianBatchNorm, batch_median, median_batch_norm, pseudo_huber_median
from normscope.ops.layer_norm import ChannelLayerNorm, TokenNorm
from normscope.ops.renorm import BatchRenorm, GhostBatchNorm, LinearWarmup, batch_renorm, ghost_batch_renorm
from normscope.ops.swap import batchnorm_sites, convert_batchnorm, convert_layer_norm, layer_sites, swap_norms
from normscope.ops.readings import register_ops

register_ops()  # every op is a registered kind, read in place by the analyzers (normscope.ops.readings)

_LAZY = {
    "PopulationNorm": "normscope.ops.population",
    "population_norm": "normscope.ops.population",
    "scale_grad": "normscope.ops.population",
    "rotation_matrix": "normscope.ops.population",
    "TwoStageResult": "normscope.ops.two_stage",
    "two_stage_gradient": "normscope.ops.two_stage",
    "two_tower_gradient": "normscope.ops.two_stage",
    "two_stage_step": "normscope.ops.two_stage",
    "fold": "normscope.ops.folding",
    "fold_model": "normscope.ops.folding",
}

__all__ = [
    "NORMS",
    "BatchLayerNorm",
    "BatchNorm",
    "BatchRenorm",
    "ChannelLayerNorm",
    "EmaSchedule",
    "GhostBatchNorm",
    "TokenNorm",
    "LSBatchNorm",
    "LinearWarmup",
    "MedianBatchNorm",
    "batch_layer_norm",
    "batch_median",
    "batch_renorm",
    "batchnorm_sites",
    "convert_batchnorm",
    "convert_layer_norm",
    "ema_only_step",
    "ema_schedule",
    "ghost_batch_renorm",
    "layer_sites",
    "create_norm",
    "get_norm",
    "median_batch_norm",
    "norm_names",
    "pseudo_huber_median",
    "regularized_moments",
    "swap_norms",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import the seed-004 names (``PopulationNorm``, ``two_stage_gradient``, ``fold``, ...) on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module 'normscope.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
