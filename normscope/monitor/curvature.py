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
* ``lambda_max``, the largest eigenvalue of ``H`` by Lanczos (:func:`~normscope.analyzers.spectrum.lanczos`), stopped when
  its error estimate ``lambda_max_error`` (``min(r, r^2/gap)``) is at most ``tol lambda_max``, with
  the residual ``lambda_max_residual`` (``r``: an eigenvalue lies within it) and the products it spent
  (``lambda_max_products``); started from ``start`` (the monitor passes the previous curvature
  step's Ritz vector plus a seeded random part, so a slowly turning top eigenvector costs a few
  products), and ``stability_limit = 2 / lambda_max``;
* ``trace``, Hutchinson's estimate of ``tr H`` from ``samples`` Rademacher products (at least 2;
  0: no trace), with ``trace_stderr``; the same products give each layer's ``trace`` (its block ``H_gg``);
* ``products``: the Hessian-vector products the step spent in all: 1 for the step's a_crit, 1 per
  layer of ``layers``, lambda_max's and ``samples``. :class:`normscope.Monitor` asks for the layers
  and the trace only on every ``curvature_full_every``-th curvature step (``layers=0, samples=0``
  on the others: lambda_max and the step's a_crit, 3 products once lambda_max's warm start settles).

A gradient that is not finite (a NaN or an infinity in the batch, the loss or the parameters) stops
the step with a ``FloatingPointError`` before any product (the monitor records it as an error row).
The global random state is forked, so dropout in the copy draws nothing from the user's stream.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from normscope.analyzers.descent import critical_step, negative_gradient, optimizer_direction
from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import hutchinson_trace, lanczos

MODEL_SITE = "model"
MAX_LANCZOS_PRODUCTS = 30
WARM_NOISE = 0.1  # norm of the random part added to a warm start (which alone could miss a new top direction)

Row = tuple[str, str, float]


def _chosen(groups: dict[str, list[str]], layers: str | Iterable[str] | int | None,
            d: dict[str, Tensor]) -> dict[str, list[str]]:
    """The layers whose a_crit to compute: all (``None``), those matching fnmatch patterns, or the
    ``k`` (an int) that the step moves most, by ``||d_g||``."""
    if layers is None:
        return groups
    if isinstance(layers, int) and layers <= 0:
        return {}
    if isinstance(layers, int):
        size = {g: sum(float(d[n].double().pow(2).sum()) for n in names) for g, names in groups.items()}
        return {g: groups[g] for g in sorted(groups, key=size.get, reverse=True)[:layers]}
    patterns = [layers] if isinstance(layers, str) else list(layers)
    return {g: names for g, names in groups.items() if any(fnmatch.fnmatchcase(g, p) for p in patterns)}


def _start(n: int, seed: int, previous: Tensor | None) -> Tensor:
    """A seeded Gaussian unit vector, or ``previous`` (unit) plus ``WARM_NOISE`` of it."""
    noise = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise /= noise.norm()
    if previous is None or previous.numel() != n:
        return noise
    return previous.detach().double().cpu() / previous.norm() + WARM_NOISE * noise


def curvature_step(
    model: nn.Module,
    inputs,
    targets,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    layers: str | Iterable[str] | int | None = None,
    samples: int = 4,
    tol: float = 1e-2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    start: Tensor | None = None,
) -> tuple[list[Row], Tensor]:
    """``(site, metric, value)`` rows of the curvature of ``loss_fn(model(inputs), targets)``, and
    the Ritz vector of ``lambda_max`` (a warm ``start`` for the next call).

    ``layers``: which layers' block ``a_crit`` to compute (one Hessian-vector product each): fnmatch
    patterns on layer names (module paths), an int ``k`` for the ``k`` layers with the largest
    ``||d_g||``, or ``None`` for all. ``dtype``: arithmetic of the copy (default: the model's).
    ``start``: the previous Ritz vector (``None``: a seeded random start). ``model`` and
    ``optimizer`` are not touched.
    """
    devices = [inputs.device] if isinstance(inputs, torch.Tensor) and inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss = BatchLoss(model, inputs, targets, loss_fn, "train", dtype)
        total = HessianOperator(loss, backend="double_backward")
        flat_gradient = total.gradient()  # from the graph the products below reuse
        if not bool(flat_gradient.isfinite().all()):
            raise FloatingPointError("the gradient of the loss on the step's batch is not finite (a NaN or an "
                                     "infinity in the batch, the loss or the parameters): no curvature at this step")
        gradient = total.split(flat_gradient)
        if optimizer is not None:
            d, lr = optimizer_direction(model, optimizer, loss, gradient)
        else:
            d = negative_gradient(loss, gradient)
        groups = loss.layers()
        rows: list[Row] = []
        ops = {group: total if names is None else total.block(names)
               for group, names in {MODEL_SITE: None, **_chosen(groups, layers, d)}.items()}
        for group, op in ops.items():
            flat = op.flatten(d)
            slope = float(torch.dot(op.flatten(gradient).double(), flat.double()))
            a_crit = critical_step(slope, op.quadratic_form(flat))
            rows.append((group, "a_crit", a_crit))
            if lr is not None:
                rows.append((group, "lr_below_a_crit", float(lr < a_crit)))
        top = lanczos(total, 1, tol, max_products=MAX_LANCZOS_PRODUCTS, start=_start(total.numel, seed, start))
        lam, ritz = float(top.values[0]), top.top_vector
        rows += [(MODEL_SITE, "lambda_max", lam), (MODEL_SITE, "lambda_max_residual", float(top.residuals[0])),
                 (MODEL_SITE, "lambda_max_error", float(top.errors[0])),
                 (MODEL_SITE, "lambda_max_products", float(top.products)),
                 (MODEL_SITE, "stability_limit", 2.0 / lam if lam > 0 else math.nan)]
        if samples:
            traces = hutchinson_trace(total, samples, seed, groups)
            rows += [(MODEL_SITE, "trace", traces["total"][0]), (MODEL_SITE, "trace_stderr", traces["total"][1])]
            rows += [(g, "trace", t) for g, (t, _) in traces.items() if g != "total"]
        rows.append((MODEL_SITE, "products", float(sum(op.products for op in ops.values()))))
    return rows, ritz


def curvature_rows(model: nn.Module, inputs, targets, loss_fn: Callable, optimizer: torch.optim.Optimizer | None = None,
                   lr: float | None = None, layers: str | Iterable[str] | int | None = None, samples: int = 4,
                   tol: float = 1e-2, seed: int = 0, dtype: torch.dtype | None = None) -> list[Row]:
    """The rows of :func:`curvature_step` from a random start."""
    return curvature_step(model, inputs, targets, loss_fn, optimizer, lr, layers, samples, tol, seed, dtype)[0]
