"""Curvature of one training step's batch: a_crit per layer against the lr, lambda_max and the trace.

On a private copy of the model in training mode (batch statistics, running statistics untouched;
:class:`~normscope.analyzers.hvp.BatchLoss`), along the direction the step takes: the optimizer's
update per unit of its learning rate (:func:`~normscope.analyzers.descent.optimizer_direction`)
when an optimizer is given, else ``d = -dL/dtheta`` with the monitor's ``lr``. As in the snapshot's
``descent_*`` tables (MATH.md §5; "Normalization Gradients are Least-Squares Residuals" and the
descent analysis of batch normalization it builds on):

* ``a_crit = 2 (-g_g^T d_g) / d_g^T H_gg d_g`` (``2 ||d_g||^2 / d_g^T H_gg d_g`` for ``d = -g``;
  :func:`~normscope.analyzers.descent.critical_step`) for every layer ``g`` and for all parameters
  (``site="model"``), with ``lr_below_a_crit`` (1.0 or 0.0) against the optimizer's (or given) lr;
* ``lambda_max``, the largest eigenvalue of ``H`` (Lanczos to relative tolerance ``tol``), and
  ``stability_limit = 2 / lambda_max``;
* ``trace``, Hutchinson's estimate of ``tr H`` from ``samples`` Rademacher products, with
  ``trace_stderr``; the same products give each layer's ``trace`` (its block ``H_gg``).

The global random state is forked, so dropout in the copy draws nothing from the user's stream.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from normscope.analyzers.descent import critical_step, negative_gradient, optimizer_direction
from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import hutchinson_trace

MODEL_SITE = "model"


def _chosen(groups: dict[str, list[str]], patterns: str | Iterable[str] | None) -> dict[str, list[str]]:
    if patterns is None:
        return groups
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return {g: names for g, names in groups.items() if any(fnmatch.fnmatchcase(g, p) for p in patterns)}


def lambda_max(op: HessianOperator, tol: float = 1e-2, seed: int = 0, ncv: int = 6) -> float:
    """The largest eigenvalue of ``H`` by Lanczos (``eigsh``, ``which="LA"``) with a short basis of
    ``ncv`` vectors: a monitor needs a few products per step, not the snapshot's 20-vector basis."""
    v0 = np.random.default_rng(seed).standard_normal(op.numel)
    return float(eigsh(op.linear_operator(), k=1, which="LA", v0=v0, tol=tol, ncv=min(ncv, op.numel - 1),
                       return_eigenvectors=False)[0])


def curvature_rows(
    model: nn.Module,
    inputs,
    targets,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    layers: str | Iterable[str] | None = None,
    samples: int = 4,
    tol: float = 1e-2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> list[tuple[str, str, float]]:
    """``(site, metric, value)`` rows of the curvature of ``loss_fn(model(inputs), targets)``.

    ``layers``: fnmatch patterns on layer names (module paths) whose block ``a_crit`` to compute
    (one Hessian-vector product each; default all). ``dtype``: arithmetic of the copy (default:
    the model's). ``model`` and ``optimizer`` are not touched.
    """
    devices = [inputs.device] if isinstance(inputs, torch.Tensor) and inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss = BatchLoss(model, inputs, targets, loss_fn, "train", dtype)
        total = HessianOperator(loss, backend="double_backward")
        if optimizer is not None:
            d, lr = optimizer_direction(model, optimizer, loss)
        else:
            d = negative_gradient(loss)
        groups = loss.layers()
        gradient = loss.gradient()
        rows: list[tuple[str, str, float]] = []
        chosen = {MODEL_SITE: None, **_chosen(groups, layers)}
        for group, names in chosen.items():
            op = total if names is None else total.block(names)
            flat = op.flatten(d)
            slope = float(torch.dot(op.flatten(gradient).double(), flat.double()))
            a_crit = critical_step(slope, op.quadratic_form(flat))
            rows.append((group, "a_crit", a_crit))
            if lr is not None:
                rows.append((group, "lr_below_a_crit", float(lr < a_crit)))
        lam = lambda_max(total, tol, seed)
        rows += [(MODEL_SITE, "lambda_max", lam), (MODEL_SITE, "stability_limit", 2.0 / lam if lam > 0 else math.nan)]
        traces = hutchinson_trace(total, samples, seed, groups)
        rows += [(MODEL_SITE, "trace", traces["total"][0]), (MODEL_SITE, "trace_stderr", traces["total"][1])]
        rows += [(g, "trace", t) for g, (t, _) in traces.items() if g != "total"]
    return rows
