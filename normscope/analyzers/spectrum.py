"""Curvature spectrum from Hessian-vector products: top eigenvalues and the trace (MATH.md §5).

* :func:`lanczos`: the k largest eigenvalues of ``H`` (or a layer's block ``H_gg``) by Lanczos
  with full reorthogonalization, stopped as soon as every wanted Ritz value is accurate to a
  relative tolerance: for a Ritz pair ``(theta, y)`` of the tridiagonal ``T_m = V_m^T H V_m`` the
  residual is ``r = ||H y - theta y|| = beta_m |s_m|`` (no extra product), and some eigenvalue of
  ``H`` lies within ``r`` of ``theta`` (Kahan's residual bound, which holds at every iteration);
  once the gap is certified (:func:`ritz_errors`: the neighbouring Ritz values have converged and
  stay clear of ``theta``'s interval) within ``min(r, r^2 / gap)`` (Kahan-Parlett-Jiang; Parlett,
  "The Symmetric Eigenvalue Problem", 1998, §11.7; Saad, "Numerical Methods for Large Eigenvalue
  Problems", 2011, §4.3). Each value says which bound it carries. One product per iteration. ``2 / lambda_max`` is the stability
  limit of plain gradient descent on the quadratic model (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5).
* :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic
  Trace Estimation", SOSA 2021). With ``Q`` an orthonormal basis of ``H S`` for a Rademacher
  sketch ``S``, ``tr H = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))``: the first term is exact from
  ``H Q``, the second is Hutchinson's estimate on the deflated matrix, with standard error
  ``std / sqrt(n)``. Every layer's block trace comes from the same products:
  ``tr H_gg = <Q, HQ>_g + <(I - QQ^T) H Q, Q>_g + E[w_g^T ((I - QQ^T) H w)_g]``,
  ``w = (I - QQ^T) v`` (the three terms of ``tr(P_g H)`` split by ``I = QQ^T + (I - QQ^T)``).
* :func:`hutchinson_trace`: plain Hutchinson (1989), ``tr H = E[v^T H v]`` for Rademacher ``v``.
* :func:`trace_interval`: the Student-t confidence interval of an estimate from ``n`` samples,
  ``mean +- t_{(1+level)/2, n-1} se`` (the random part's mean over ``n`` independent samples,
  its spread estimated from the same samples; ``n - 1`` degrees of freedom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import t as student_t
from torch import Tensor

from normscope.analyzers.hvp import HessianOperator
from normscope.distributed import current, merge_owned
from normscope.errors import InvalidArgumentError

Traces = dict[str, tuple[float, float, int]]
"""``{block: (trace, standard error of the random part, Hutchinson samples)}`` (``"total"`` for the whole)."""
LEVEL = 0.95
MIN_TRACE_SAMPLES = 6
"""Fewer Hutchinson samples than this give no trace: the spread of 2-5 samples of ``v^T H v`` is too
unreliable for an interval (one cut run put a layer's trace 266 standard errors from the truth)."""


@dataclass
class Eigenvalues:
    """What :func:`lanczos` found: ``values`` (descending), their ``residuals`` ``||H y - theta y||``
    and error bounds (some eigenvalue of ``H`` lies within ``errors[i]`` of ``values[i]``), which
    bound each is (``bounds``: ``residual``, ``gap`` or ``exact``; :func:`ritz_errors`), the
    ``products`` spent and whether every value reached the tolerance (``converged``; False when
    ``max_products`` stopped it first), and the unit Ritz vector of the top value (``top_vector``,
    float64: a warm start for a later call)."""

    values: np.ndarray
    residuals: np.ndarray
    errors: np.ndarray
    products: int
    converged: bool
    top_vector: Tensor | None = None
    bounds: tuple[str, ...] = ()


def trace_interval(mean: float, stderr: float, n_samples: int, level: float = LEVEL) -> tuple[float, float]:
    """``mean -+ t_{(1 + level)/2, n - 1} stderr``: the Student-t interval of a mean of
    ``n_samples`` independent samples whose standard error ``stderr`` comes from the same samples;
    ``(nan, nan)`` below :data:`MIN_TRACE_SAMPLES` (the trace is then not measured)."""
    if n_samples < MIN_TRACE_SAMPLES:
        return math.nan, math.nan
    half = float(student_t.ppf((1 + level) / 2, n_samples - 1)) * stderr
    return mean - half, mean + half


def dense_hessian(op: HessianOperator) -> np.ndarray:
    """``H`` as a dense float64 matrix from ``n`` products with the unit vectors (small blocks only)."""
    eye = torch.eye(op.numel, dtype=op.dtype, device=op.device)
    return np.stack([op(e).detach().double().cpu().numpy() for e in eye], axis=1)


def _rademacher(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double().mul_(2).sub_(1)


def ritz_errors(values: np.ndarray, residuals: np.ndarray, tol: float) -> tuple[np.ndarray, list[str]]:
    """Error bounds of the Ritz values ``values`` (descending, all of the run's) with residuals
    ``residuals``, and which bound each is.

    ``residual``: ``r_i`` (Kahan: some eigenvalue lies within ``r_i`` of ``theta_i``; holds however
    short the run). ``gap``: ``r_i^2 / gap_i`` (Kahan-Parlett-Jiang) where the gap is certified:
    every neighbouring Ritz value (the next above and below) has converged, ``r_j <= tol |theta_j|``,
    so an eigenvalue lies within ``r_j`` of it, and ``gap_i = min_j (|theta_i - theta_j| - r_j)``
    exceeds ``r_i``. Before convergence the other Ritz values can sit far from any eigenvalue, and a
    gap taken from them overstates the distance to the rest of the spectrum (a cut run reported
    0.126 where the error was 0.250), so only converged neighbours count."""
    errors, bounds = residuals.copy(), ["residual"] * len(values)
    for i in range(len(values)):
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(values)]
        if not neighbours or any(residuals[j] > tol * abs(values[j]) for j in neighbours):
            continue
        gap = min(abs(values[j] - values[i]) - residuals[j] for j in neighbours)
        if gap > residuals[i] and residuals[i] ** 2 / gap < residuals[i]:
            errors[i], bounds[i] = residuals[i] ** 2 / gap, "gap"
    return errors, bounds


def lanczos(
    op: HessianOperator, k: int = 1, tol: float = 1e-3, seed: int = 0, max_products: int | None = None,
    start: Tensor | None = None, stop: Callable[[], bool] | None = None,
) -> Eigenvalues:
    """The ``k`` largest (algebraic) eigenvalues of ``H``, each to relative accuracy ``tol``.

    Lanczos from ``start`` (e.g. an earlier call's ``top_vector``) or a seeded Gaussian start
    vector, every new vector reorthogonalized twice against
    the basis (float64, on ``op``'s device, whatever the products' dtype), stopping when each of
    the top ``k`` Ritz values has an error bound (:func:`ritz_errors`) ``<= tol |theta|``, when the
    Krylov space is invariant (exact), after ``n`` products, after ``max_products`` or when
    ``stop()`` (called after each product that did not finish it: a time budget's
    :class:`~normscope.budget.Deadline`) says so; a stopped run is not ``converged`` and its values
    carry the bounds they reached. A block with at most ``k + 1`` parameters is formed densely and
    solved exactly.
    """
    if k < 1:
        raise InvalidArgumentError(f"k must be a positive number of eigenvalues (got {k})")
    n = op.numel
    if n <= k + 1:
        values, vectors = np.linalg.eigh(_symmetric(dense_hessian(op)))
        values = values[::-1][: min(k, n)].copy()
        top = torch.as_tensor(vectors[:, -1].copy(), dtype=torch.float64, device=op.device)
        return Eigenvalues(values, np.zeros_like(values), np.zeros_like(values), n, True, top, ("exact",) * len(values))
    limit = n if max_products is None else max(1, min(n, int(max_products)))
    if start is None:
        start = torch.randn(n, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float64)
    v = start.detach().to(device=op.device, dtype=torch.float64)
    basis = [v / v.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    while True:
        w = op(basis[-1].to(op.dtype)).double()
        alphas.append(float(w @ basis[-1]))
        V = torch.stack(basis, dim=1)
        for _ in range(2):
            w -= V @ (V.T @ w)
        beta = float(w.norm())
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, s = np.linalg.eigh(T)
        order = np.argsort(theta)[::-1]
        theta, s = theta[order], s[:, order]
        residuals = beta * np.abs(s[-1, :])
        errors, bounds = ritz_errors(theta, residuals, tol)
        m = len(alphas)
        wanted = min(k, m)
        invariant = beta <= 1e-12 * max(abs(theta[0]), 1e-300)
        done = m >= k and bool(np.all(errors[:k] <= tol * np.abs(theta[:k])))
        if done or invariant or m >= limit or (stop is not None and stop()):
            converged = done or invariant
            if invariant:
                residuals, errors, bounds = np.zeros_like(residuals), np.zeros_like(errors), ["exact"] * m
            top = V @ torch.as_tensor(s[:, 0].copy(), dtype=torch.float64, device=V.device)
            return Eigenvalues(theta[:wanted].copy(), residuals[:wanted].copy(), errors[:wanted].copy(), m, converged, top,
                               tuple(bounds[:wanted]))
        betas.append(beta)
        basis.append(w / beta)


def top_eigenvalues(op: HessianOperator, k: int = 5, tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The values of :func:`lanczos` (descending)."""
    return lanczos(op, k, tol, seed).values


def _block_index(op: HessianOperator, blocks: dict[str, list[str]] | None) -> dict[str, Tensor]:
    offsets = dict(zip(op.names, np.cumsum([0] + op.sizes[:-1]).tolist()))
    index = {}
    for block, names in (blocks or {}).items():
        index[block] = torch.cat([torch.arange(offsets[n], offsets[n] + size)
                                  for n, size in zip(op.names, op.sizes) if n in names]).to(op.device)
    return index


def _block_sums(product: Tensor, index: dict[str, Tensor]) -> dict[str, float]:
    """``{"total": sum(product), block: sum over the block's entries}``."""
    sums = {"total": float(product.sum())}
    sums.update({block: float(product[idx].sum()) for block, idx in index.items()})
    return sums


def hutchinson_trace(
    op: HessianOperator, n_samples: int = 32, seed: int = 0, blocks: dict[str, list[str]] | None = None
) -> dict[str, tuple[float, float]]:
    """Hutchinson's estimate of ``tr H``: the mean of ``v^T H v`` over ``n_samples`` Rademacher
    vectors ``v`` (seeded) and its standard error ``std(ddof=1) / sqrt(n_samples)``, under key
    ``"total"``; and, for each block ``g`` of ``blocks`` (parameter names of ``op``), the trace of
    the diagonal block ``H_gg`` from the same products, ``E[v_g^T (H v)_g] = tr H_gg``."""
    if n_samples < 2:
        raise InvalidArgumentError(f"n_samples must be at least 2 for a standard error (got {n_samples})")
    index = _block_index(op, blocks)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_samples):
        v = _rademacher(op.numel, generator).to(op.device)
        for block, value in _block_sums(v * op(v.to(op.dtype)).double(), index).items():
            samples.setdefault(block, []).append(value)
    return {block: (float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(n_samples)))
            for block, values in samples.items()}


def hutchpp_split(n_products: int) -> tuple[int, int]:
    """``(sketch, samples)`` of a Hutch++ run of ``n_products`` products: ``sketch`` columns of
    ``S`` (each costs two products, ``H S`` and ``H Q``) and at least 2 Hutchinson samples."""
    if n_products < 2:
        raise InvalidArgumentError(f"Hutch++ needs at least 2 products for a standard error (got {n_products})")
    sketch = max(0, (n_products - 2) // 3) if n_products < 8 else n_products // 3
    return sketch, n_products - 2 * sketch


def hutchpp_trace(
    op: HessianOperator, n_products: int = 32, seed: int = 0, blocks: dict[str, list[str]] | None = None
) -> Traces:
    """Hutch++'s estimate of ``tr H`` and of every block trace ``tr H_gg`` of ``blocks``, with the
    standard error of its random part, ``std(ddof=1) / sqrt(samples)``, from ``n_products``
    products: ``sketch`` for ``H S``, ``sketch`` for ``H Q`` and the rest for Hutchinson samples on
    ``(I - QQ^T) H (I - QQ^T)`` (:func:`hutchpp_split`). Seeded; float64 on ``op``'s device."""
    sketch, n_samples = hutchpp_split(n_products)
    index = _block_index(op, blocks)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    exact = {block: 0.0 for block in ["total", *index]}
    Q = torch.zeros(op.numel, 0, dtype=torch.float64, device=op.device)
    if sketch:
        Y = torch.stack([op(_rademacher(op.numel, generator).to(op.device, op.dtype)).double() for _ in range(sketch)], dim=1)
        Q = torch.linalg.qr(Y).Q
        del Y
        HQ = torch.stack([op(q.to(op.dtype)).double() for q in Q.T], dim=1)
        deflated = HQ - Q @ (Q.T @ HQ)
        for block, value in _block_sums((Q * (HQ + deflated)).sum(dim=1), index).items():
            exact[block] = value
        del HQ, deflated
    return _plus_deflated_samples(op, Q, exact, n_samples, generator, index)


def _plus_deflated_samples(op: HessianOperator, Q: Tensor, exact: dict[str, float], n_samples: int,
                           generator: torch.Generator, index: dict, stop: Callable[[], bool] | None = None) -> Traces:
    """``exact`` plus Hutchinson's estimate on the deflated rest, per block, with its standard
    error and the number of samples: the mean of ``w_g^T ((I - QQ^T) H w)_g`` over ``w = (I - QQ^T) v``, Rademacher ``v``.

    Under :func:`normscope.distributed.session` the samples are shared out over the ranks (sample
    ``i`` on rank ``i % W``; every rank draws every ``v`` from the same seeded generator) and
    merged exactly (:func:`normscope.distributed.merge_owned`), so each rank holds the values one
    process would compute, from ``1/W`` of the products. A sample runs on its owner alone, so an
    operator split over the ranks computes it with its unsplit twin (:meth:`HessianOperator.local`;
    the split operator's graphs are released first: one graph at a time). ``stop()`` (one process
    only), called after each sample, keeps the samples taken so far; with fewer than 2 the
    standard error is NaN."""
    world = current()
    sampler = op.local()
    if sampler is not op:
        op.release()
    blocks = ["total", *index]
    values = torch.zeros(n_samples, len(blocks), dtype=torch.float64)
    for i in range(n_samples):
        v = _rademacher(op.numel, generator).to(op.device)
        if not world.owns(i):
            continue
        w = v - Q @ (Q.T @ v)
        hw = sampler(w.to(op.dtype)).double()
        sums = _block_sums(w * (hw - Q @ (Q.T @ hw)), index)
        values[i] = torch.tensor([sums[block] for block in blocks], dtype=torch.float64)
        if stop is not None and i + 1 < n_samples and stop():
            values = values[: i + 1]
            break
    if sampler is not op:
        sampler.release()
    values = merge_owned(values).numpy()
    taken = len(values)
    return {block: (exact[block] + (float(np.mean(values[:, j])) if taken else 0.0),
                    float(np.std(values[:, j], ddof=1) / math.sqrt(taken)) if taken > 1 else math.nan, taken)
            for j, block in enumerate(blocks)}


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2



def lanczos_basis(op: HessianOperator, m: int, seed: int, stop: Callable[[], bool] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(V, C, r)`` after ``m`` Lanczos steps from a seeded Gaussian vector, each new vector
    orthogonalized twice against all before: ``H V = V C + r e_m^T`` exactly (to rounding), with
    ``V`` orthonormal (``n x m``, float64), ``C`` the projection coefficients (tridiagonal up to
    rounding, ``C = V^T H V``) and ``r`` orthogonal to ``V``. ``m`` products (fewer if the
    Krylov space is invariant or ``stop()``, called after each product, says so)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(op.numel, generator=generator, dtype=torch.float64).to(op.device)
    V = torch.empty(op.numel, m, dtype=torch.float64, device=op.device)
    C = torch.zeros(m, m, dtype=torch.float64, device=op.device)
    V[:, 0] = v / v.norm()
    for j in range(m):
        w = op(V[:, j].to(op.dtype)).double()
        for _ in range(2):
            c = V[:, : j + 1].T @ w
            w -= V[:, : j + 1] @ c
            C[: j + 1, j] += c
        beta = float(w.norm())
        if j + 1 == m or beta <= 1e-12 * float(C.abs().max()) or (stop is not None and stop()):
            return V[:, : j + 1], C[: j + 1, : j + 1], w
        V[:, j + 1] = w / beta
        C[j + 1, j] = beta
    raise AssertionError("unreachable")


def krylov_trace(
    op: HessianOperator, n_products: int = 32, seed: int = 0, blocks: dict[str, list[str]] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Traces:
    """Hutch++ with a Lanczos basis: ``tr H`` and every block trace ``tr H_gg`` from ``n_products``
    products, with the standard error of the random part.

    ``Q = V`` from :func:`lanczos_basis` (``2/3`` of the products; a Krylov space holds the top
    eigenvectors far better than Hutch++'s single sketch ``H S``, and ``H V = V C + r e_m^T``
    comes with it, one product per column instead of two). Then, as in :func:`hutchpp_trace`,
    ``tr(P_g H) = <V, HV>_g + <(I - VV^T) H V, V>_g + E[w_g^T ((I - VV^T) H w)_g]`` with
    ``(I - VV^T) H V = r e_m^T`` and ``w = (I - VV^T) v`` for Rademacher ``v`` (the rest of the
    products). The basis is drawn independently of the samples, so the estimate is unbiased
    (Chen and Hallman, "Krylov-aware stochastic trace estimation", SIMAX 2023, for the idea).
    ``stop()`` (a time budget's :class:`~normscope.budget.Deadline`), called after each product,
    ends the basis and the samples early: the estimate then holds the samples taken (its interval
    is wider; below :data:`MIN_TRACE_SAMPLES` samples the trace is not measured).
    """
    sketch, n_samples = hutchpp_split(n_products)
    index = _block_index(op, blocks)
    exact = {block: 0.0 for block in ["total", *index]}
    V = torch.zeros(op.numel, 0, dtype=torch.float64, device=op.device)
    if sketch:
        V, C, r = lanczos_basis(op, 2 * sketch, seed + 7919, stop)
        if getattr(stop, "stopped", False):  # the deadline came during the basis: no time for samples
            n_samples = 0
        else:
            n_samples += 2 * sketch - V.shape[1]
        HV = V @ C
        HV[:, -1] += r
        cross = 2 * V[:, -1] * r
        for block, value in _block_sums((V * HV).sum(dim=1) + cross, index).items():
            exact[block] = value
        del HV
    return _plus_deflated_samples(op, V, exact, n_samples, torch.Generator(device="cpu").manual_seed(seed), index, stop)
