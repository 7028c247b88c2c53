"""Layouts of the functional normalization calls (``F.batch_norm`` and friends)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def _storage(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, through torch.func's wrappers (grad, vmap); None if it has none."""
    try:
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            t = torch._C._functorch.get_unwrapped(t)
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def on_parameter(x: Any, owner: nn.Module) -> bool:
    """Is ``x`` (a functional norm's input) a parameter of ``owner``, the module whose forward
    makes the call, or a view of one? Then the call normalizes weights, not activations: weight
    standardization (Qiao et al. (2019), "Micro-Batch Training with Batch-Channel Normalization
    and Weight Standardization"; BiT's ``F.batch_norm`` on its conv weights) is no site. Compared
    by storage, so it holds for the tensors :func:`torch.func.functional_call` swaps in."""
    if isinstance(x, nn.Parameter):
        return True
    if not isinstance(x, torch.Tensor):
        return False
    address = _storage(x)
    return address is not None and address != 0 and any(
        p is not None and _storage(p) == address for p in owner._parameters.values())


def bind_call(func: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a functional norm call's arguments to its parameter names, defaults applied."""
    bound = inspect.signature(func).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    return bound
