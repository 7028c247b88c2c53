"""Curvature spectrum from Hessian-vector products: top eigenvalues and the trace (MATH.md §5).

* :func:`top_eigenvalues`: the k largest eigenvalues of ``H`` (or a layer's block ``H_gg``) by
  implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh`` on a float64 ``LinearOperator``
  of products; ``2 / lambda_max`` is the stability limit of plain gradient descent on the
  quadratic model (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5).
* :func:`hutchinson_trace`: ``tr H = E[v^T H v]`` for Rademacher ``v`` (Hutchinson 1989), the
  mean of ``n`` samples with its standard error ``std / sqrt(n)``; the same products give every
  layer's block trace, ``tr H_gg = E[v_g^T (H v)_g]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse.linalg import eigsh

from normscope.analyzers.hvp import HessianOperator
from normscope.errors import InvalidArgumentError


def dense_hessian(op: HessianOperator) -> np.ndarray:
    """``H`` as a dense float64 matrix from ``n`` products with the unit vectors (small blocks only)."""
    eye = torch.eye(op.numel, dtype=op.dtype, device=op.device)
    return np.stack([op(e).detach().double().cpu().numpy() for e in eye], axis=1)


def top_eigenvalues(op: HessianOperator, k: int = 5, tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The ``k`` largest (algebraic) eigenvalues of ``H``, descending.

    Lanczos (``eigsh(which="LA")``, seeded start vector, relative tolerance ``tol``); a block with
    at most ``k + 1`` parameters is formed densely and solved with ``numpy.linalg.eigvalsh``
    (returning at most ``n`` values). Products used: ``op.products``.
    """
    if k < 1:
        raise InvalidArgumentError(f"k must be a positive number of eigenvalues (got {k})")
    if op.numel <= k + 1:
        values = np.linalg.eigvalsh(_symmetric(dense_hessian(op)))
        return values[::-1][: min(k, op.numel)].copy()
    v0 = np.random.default_rng(seed).standard_normal(op.numel)
    values = eigsh(op.linear_operator(), k=k, which="LA", v0=v0, tol=tol, return_eigenvectors=False)
    return np.sort(values)[::-1].copy()


def hutchinson_trace(
    op: HessianOperator, n_samples: int = 32, seed: int = 0, blocks: dict[str, list[str]] | None = None
) -> dict[str, tuple[float, float]]:
    """Hutchinson's estimate of ``tr H``: the mean of ``v^T H v`` over ``n_samples`` Rademacher
    vectors ``v`` (seeded) and its standard error ``std(ddof=1) / sqrt(n_samples)``, under key
    ``"total"``; and, for each block ``g`` of ``blocks`` (parameter names of ``op``), the trace of
    the diagonal block ``H_gg`` from the same products, ``E[v_g^T (H v)_g] = tr H_gg``."""
    if n_samples < 2:
        raise InvalidArgumentError(f"n_samples must be at least 2 for a standard error (got {n_samples})")
    offsets = dict(zip(op.names, np.cumsum([0] + op.sizes[:-1]).tolist()))
    index = {"total": torch.arange(op.numel)}
    for block, names in (blocks or {}).items():
        index[block] = torch.cat([torch.arange(offsets[n], offsets[n] + size)
                                  for n, size in zip(op.names, op.sizes) if n in names])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples: dict[str, list[float]] = {block: [] for block in index}
    for _ in range(n_samples):
        v = torch.randint(0, 2, (op.numel,), generator=generator).double().mul_(2).sub_(1)
        product = v * op(v.to(device=op.device, dtype=op.dtype)).double().cpu()
        for block, idx in index.items():
            samples[block].append(float(product[idx].sum()))
    return {block: (float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(n_samples)))
            for block, values in samples.items()}


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2
