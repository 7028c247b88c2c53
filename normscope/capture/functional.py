"""Layouts of the functional normalization calls (``F.batch_norm`` and friends)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from normscope.registry import KINDS, Layout, running_stats_layout


def _batch_norm(a: dict[str, Any]) -> Layout:
    batch_stats = bool(a["training"]) or a["running_mean"] is None
    return running_stats_layout("batchnorm", a["eps"], a["weight"], a["bias"], batch_stats, a["running_mean"], a["running_var"])


def _instance_norm(a: dict[str, Any]) -> Layout:
    batch_stats = bool(a["use_input_stats"]) or a["running_mean"] is None
    return running_stats_layout("instancenorm", a["eps"], a["weight"], a["bias"], batch_stats, a["running_mean"], a["running_var"])


def _layer_norm(a: dict[str, Any]) -> Layout:
    return Layout(KINDS["layernorm"], "sample_last", float(a["eps"]), a["weight"], a["bias"],
                  normalized_ndim=len(tuple(a["normalized_shape"])))


def _group_norm(a: dict[str, Any]) -> Layout:
    return Layout(KINDS["groupnorm"], "group", float(a["eps"]), a["weight"], a["bias"], groups=int(a["num_groups"]))


def _rms_norm(a: dict[str, Any]) -> Layout:
    eps = a["eps"] if a["eps"] is not None else torch.finfo(a["input"].dtype).eps
    return Layout(KINDS["rmsnorm"], "sample_last", float(eps), a["weight"], None,
                  normalized_ndim=len(tuple(a["normalized_shape"])))


FUNCTIONAL_NORMS: dict[Callable, Callable[[dict[str, Any]], Layout]] = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.rms_norm: _rms_norm,
}

RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)


def bind_call(func: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a functional norm call's arguments to its parameter names, defaults applied."""
    bound = inspect.signature(func).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    return bound
