"""Curvature of one training step's batch: a_crit per layer against the lr, lambda_max and the trace.

On a private copy of the model in training mode (batch statistics, running statistics untouched;
:class:`~normscope.analyzers.hvp.BatchLoss`), in the model's dtype (products in it, every sum in
float64), along the direction the step takes: the optimizer's update per unit of its learning rate
(:func:`~normscope.analyzers.descent.optimizer_direction`) when an optimizer is given, else
``d = -dL/dtheta`` with the monitor's ``lr``. As in the snapshot's ``descent_*`` tables (MATH.md §5;
"Normalization Gradients are Least-Squares Residuals" and the descent analysis of batch
normalization it builds on), from Hessian-vector products of one gradient graph that all quantities share:

* ``a_crit = 2 (-g_g^T d_g) / d_g^T H_gg d_g`` (``2 ||d_g||^2 / d_g^T H_gg d_g`` for ``d = -g``;
  :func:`~normscope.analyzers.descent.critical_step`) for every chosen layer ``g`` and for all
  parameters (``site="model"``), with ``lr_below_a_crit`` (1.0 or 0.0) against the lr: one product
  each, ``H d`` and ``H [d_g; 0]`` (whose ``g`` part is ``H_gg d_g``);
* ``lambda_max``, the largest Ritz value of ``H`` on the span ``Q`` of every vector multiplied so far
  (Rayleigh-Ritz: ``Q^T H Q`` from the products, so the directions of the a_crit cost nothing more),
  grown by the previous curvature step's Ritz vector plus seeded noise (``start``) and then by the
  top Ritz pair's residual ``H y - theta y`` (one product each: Lanczos when ``Q`` holds one vector;
  Saad, "Numerical Methods for Large Eigenvalue Problems", 2011, §4.3) until its error bound
  ``lambda_max_error = min(r, r^2/gap)`` (:func:`~normscope.analyzers.spectrum.ritz_errors`) is at
  most ``tol lambda_max``; ``lambda_max_residual`` is ``r = ||H y - theta y||`` (an eigenvalue of
  ``H`` lies within it), ``lambda_max_products`` the products beyond the a_crit's, and
  ``stability_limit = 2 / lambda_max``;
* ``trace``: ``tr H = tr(Q^T H Q) + tr(P H P)`` with ``P = I - QQ^T``; the first term is exact from the
  products above, the second Hutchinson's estimate from ``samples`` Rademacher vectors ``v``
  projected, ``w = P v`` (at least 2; 0: no trace), with ``trace_stderr`` the standard error of
  that part. ``Q`` does not depend on the ``v``, so the estimate is unbiased (Hutch++'s split of
  Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021, with
  ``Q`` from the products already paid for, as in Chen and Hallman, "Krylov-aware stochastic trace
  estimation", SIMAX 2023). Every layer's ``trace`` (its block ``H_gg``) comes from the same products:
  ``tr(E_g H) = <Q, HQ>_g + <P H Q, Q>_g + E[w_g^T (P H w)_g]``;
* ``products``: the Hessian-vector products the step spent in all.

A gradient that is not finite (a NaN or an infinity in the batch or the parameters) stops the
step with a ``FloatingPointError`` (the monitor records it as an error row). The global random
state is forked, so dropout in the copy draws nothing from the user's stream.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from normscope.analyzers.descent import critical_step, negative_gradient, optimizer_direction
from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import ritz_errors

MODEL_SITE = "model"
MAX_LANCZOS_PRODUCTS = 30
WARM_NOISE = 0.1  # norm of the random part added to a warm start (which alone could miss a new top direction)
START_SEED = 7919  # offset of the start's seed from the trace samples' (independent draws)
DEPENDENT = 1e-3  # a vector whose part outside the span is below this share of its norm adds nothing

Row = tuple[str, str, float]


def _chosen(groups: dict[str, list[str]], layers: str | Iterable[str] | int | None,
            d: dict[str, Tensor]) -> dict[str, list[str]]:
    """The layers whose a_crit to compute: all (``None``), those matching fnmatch patterns, or the
    ``k`` (an int) that the step moves most, by ``||d_g||``."""
    if layers is None:
        return groups
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


class Span:
    """An orthonormal basis ``Q`` (float64) of vectors whose Hessian-vector products are known, with
    ``HQ``: each new vector ``v`` with ``h = H v`` is orthogonalized twice against ``Q`` and ``h``
    combined alike (``H (v - Q c) = h - HQ c``, exact by linearity)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.Q = torch.zeros(n, 0, dtype=torch.float64, device=device)
        self.HQ = torch.zeros(n, 0, dtype=torch.float64, device=device)

    def add(self, v: Tensor, hv: Tensor) -> bool:
        """Add ``v`` (with ``hv = H v``) unless it lies in the span to within :data:`DEPENDENT`."""
        v, hv = v.double(), hv.double()
        size = float(v.norm())
        for _ in range(2):
            c = self.Q.T @ v
            v, hv = v - self.Q @ c, hv - self.HQ @ c
        norm = float(v.norm())
        if not norm > DEPENDENT * size:
            return False
        self.Q = torch.cat([self.Q, (v / norm)[:, None]], dim=1)
        self.HQ = torch.cat([self.HQ, (hv / norm)[:, None]], dim=1)
        return True

    def top(self) -> tuple[float, float, float, Tensor, Tensor]:
        """The top Ritz pair of ``Q^T H Q`` (symmetrized): ``(theta, r, error bound, y, H y - theta y)``."""
        C = self.Q.T @ self.HQ
        theta, S = torch.linalg.eigh((C + C.T) / 2)
        theta, S = theta.flip(0), S.flip(1)
        R = self.HQ @ S - (self.Q @ S) * theta
        residuals = R.norm(dim=0)
        errors = ritz_errors(theta.cpu().numpy(), residuals.cpu().numpy())
        return float(theta[0]), float(residuals[0]), float(errors[0]), self.Q @ S[:, 0], R[:, 0]


def _layer_sums(vector: Tensor, layer_of: Tensor, layers: int) -> Tensor:
    """The sums of ``vector`` (float64) over each layer's entries (``layer_of``: the layer of each entry)."""
    return torch.zeros(layers, dtype=torch.float64, device=vector.device).index_add_(0, layer_of, vector)


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
        layer_names = list(groups)
        layer_index = {name: i for i, names in enumerate(groups.values()) for name in names}
        layer_of = torch.cat([torch.full((size,), layer_index[name], dtype=torch.long)
                              for name, size in zip(total.names, total.sizes)]).to(total.device)
        span = Span(total.numel, total.device)

        def multiplied(v: Tensor) -> Tensor:
            hv = total(v.to(total.dtype)).double()
            span.add(v, hv)
            return hv

        flat_d = total.flatten(d).double()
        g64 = flat_gradient.double()
        rows: list[Row] = []
        chosen = _chosen(groups, layers, d)
        for group in (MODEL_SITE, *chosen):
            inside = None if group == MODEL_SITE else torch.isin(layer_of, torch.tensor([layer_index[n] for n in chosen[group]],
                                                                                       device=layer_of.device))
            direction = flat_d if inside is None else flat_d.where(inside, 0.0)
            a_crit = critical_step(float(g64 @ direction), float(direction @ multiplied(direction)))
            rows.append((group, "a_crit", a_crit))
            if lr is not None:
                rows.append((group, "lr_below_a_crit", float(lr < a_crit)))
        spent = total.products
        multiplied(_start(total.numel, seed + START_SEED, start).to(total.device))
        while True:
            lam, residual, error, ritz, growth = span.top()
            if error <= tol * abs(lam) or total.products - spent >= MAX_LANCZOS_PRODUCTS:
                break
            before = span.Q.shape[1]
            multiplied(growth)
            if span.Q.shape[1] == before:  # the residual lies in the span: the span is invariant, theta exact
                residual = error = 0.0
                break
        rows += [(MODEL_SITE, "lambda_max", lam), (MODEL_SITE, "lambda_max_residual", residual),
                 (MODEL_SITE, "lambda_max_error", error),
                 (MODEL_SITE, "lambda_max_products", float(total.products - spent)),
                 (MODEL_SITE, "stability_limit", 2.0 / lam if lam > 0 else math.nan)]
        if samples:
            traces, errors = _trace(total, span, samples, seed, layer_of, len(layer_names))
            rows += [(MODEL_SITE, "trace", float(traces.sum())), (MODEL_SITE, "trace_stderr", errors)]
            rows += [(name, "trace", float(t)) for name, t in zip(layer_names, traces)]
        rows.append((MODEL_SITE, "products", float(total.products)))
    return rows, ritz


def _trace(total: HessianOperator, span: Span, samples: int, seed: int, layer_of: Tensor, layers: int) -> tuple[Tensor, float]:
    """Every layer's block trace (float64) and the standard error of their sum (see the module docstring):
    the exact part on the span, plus the mean of ``samples`` deflated Hutchinson terms."""
    Q, HQ = span.Q, span.HQ
    outside = HQ - Q @ (Q.T @ HQ)  # P H Q
    exact = _layer_sums((Q * (HQ + outside)).sum(dim=1), layer_of, layers)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    terms = []
    for _ in range(samples):
        v = torch.randint(0, 2, (total.numel,), generator=generator).double().mul_(2).sub_(1).to(Q.device)
        w = v - Q @ (Q.T @ v)
        hw = total(w.to(total.dtype)).double()
        terms.append(_layer_sums(w * (hw - Q @ (Q.T @ hw)), layer_of, layers))
    terms = torch.stack(terms)
    return exact + terms.mean(dim=0), float(terms.sum(dim=1).std() / math.sqrt(samples))


def curvature_rows(model: nn.Module, inputs, targets, loss_fn: Callable, optimizer: torch.optim.Optimizer | None = None,
                   lr: float | None = None, layers: str | Iterable[str] | int | None = None, samples: int = 4,
                   tol: float = 1e-2, seed: int = 0, dtype: torch.dtype | None = None) -> list[Row]:
    """The rows of :func:`curvature_step` from a random start."""
    return curvature_step(model, inputs, targets, loss_fn, optimizer, lr, layers, samples, tol, seed, dtype)[0]
