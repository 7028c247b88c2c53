"""BatchNorm as a reparameterization of the weights that feed it (Deb, "Batch Normalization" (notes), MATH.md §6).

For a Linear layer ``u = x W^T + b`` followed by training-mode BatchNorm, with ``S`` the biased
covariance of the layer input over the batch and ``x_c = x - mean(x)``::

    BN(u)_j = gamma_j (u_j - mean u_j) / sqrt(var u_j + eps) + beta_j = x_c^T W_hat_j + beta_j,
    W_hat_j = gamma_j W_j / sqrt(W_j^T S W_j + eps)

because ``var u_j = W_j^T S W_j`` exactly; Deb, "Batch Normalization" (notes) states it with eps = 0 (weight normalization
is the same with ``S = I``). In the normalized parameterization the loss sees ``W_j`` only through
``n(W_j) = W_j / ||W_j||_S``; the Gauss-Newton curvature of a squared loss through ``n`` at ``w``
is ``J^T S J = (S - S w w^T S / q) / q`` with ``q = w^T S w`` (:func:`reparam_hessian`), which
has zero curvature along ``w`` and, by interlacing, a spread of eigenvalues no wider than ``S``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from normscope.batch import forward
from normscope.errors import InvalidArgumentError


def input_covariance(x: Tensor) -> Tensor:
    """The biased covariance ``S = x_c^T x_c / N`` of a batch ``x`` of shape ``(N, n)``."""
    xc = x - x.mean(dim=0)
    return xc.T @ xc / x.shape[0]


def reparameterize(weight: Tensor, S: Tensor, gamma: Tensor, eps: float = 0.0) -> Tensor:
    """``W_hat_j = gamma_j W_j / sqrt(W_j^T S W_j + eps)`` for ``weight`` of shape ``(out, in)``
    (Deb, "Batch Normalization" (notes); eps = 0 in the seed)."""
    q = torch.einsum("ji,ik,jk->j", weight, S, weight)
    return gamma[:, None] * weight / torch.sqrt(q + eps)[:, None]


def reparam_hessian(S: Tensor, w: Tensor) -> Tensor:
    """``(S - S w w^T S / q) / q`` with ``q = w^T S w``: the Hessian at zero residual of
    ``0.5 mean((x_c^T (n(w) - n(w0)))^2)``, ``n(w) = w / sqrt(w^T S w)`` (Deb, "Batch Normalization" (notes), MATH.md §6)."""
    Sw = S @ w
    q = w @ Sw
    return (S - torch.outer(Sw, Sw) / q) / q


def condition_number(matrix: Tensor, rtol: float = 1e-10) -> float:
    """``lambda_max / lambda_min`` of a symmetric PSD matrix over the eigenvalues above
    ``rtol * lambda_max`` (its range: a constant input feature or the scale direction of the
    reparameterization has zero curvature and is left out)."""
    values = torch.linalg.eigvalsh(matrix.double())
    top = float(values[-1])
    if top <= 0:
        return float("nan")
    kept = values[values > rtol * top]
    return top / float(kept[0])


def no_grad_forward(model: nn.Module, inputs: Tensor, handles: list) -> None:
    """One forward of ``model`` without autograd, for the hooks in ``handles``, which are removed
    afterwards (also on error)."""
    try:
        with torch.no_grad():
            forward(model, inputs)
    finally:
        for h in handles:
            h.remove()


def layer_batch(model: nn.Module, inputs: Tensor, linear: str, norm: str) -> tuple[Tensor, Tensor]:
    """The input of module ``linear`` and the output of module ``norm`` in one forward of ``model``
    (which should be a private copy: its forward runs as it is)."""
    seen: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(linear).register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach())),
        model.get_submodule(norm).register_forward_hook(lambda m, a, o: seen.__setitem__("y", o.detach().clone())),
    ]
    no_grad_forward(model, inputs, handles)
    return seen["x"], seen["y"]


def reparam_check(model: nn.Module, inputs: Tensor, linear: str, norm: str) -> dict[str, float]:
    """For the Linear ``linear`` feeding the training-mode BatchNorm ``norm`` of ``model``:
    ``max_abs_error = max |BN output - (x_c W_hat^T + beta)|`` on this batch, ``cond_s`` =
    :func:`condition_number` of ``S``, and ``cond_reparam`` = the largest over output units of
    the condition number of :func:`reparam_hessian` (all in float64)."""
    lin, bn = model.get_submodule(linear), model.get_submodule(norm)
    if not isinstance(lin, nn.Linear):
        raise InvalidArgumentError(f"{linear!r} is a {type(lin).__name__}; the reparameterization needs an nn.Linear")
    x, y = layer_batch(model, inputs, linear, norm)
    x, y = x.double().flatten(1), y.double()
    S = input_covariance(x)
    weight = lin.weight.detach().double()
    gamma = torch.ones(weight.shape[0], dtype=torch.float64) if bn.weight is None else bn.weight.detach().double()
    beta = torch.zeros_like(gamma) if bn.bias is None else bn.bias.detach().double()
    w_hat = reparameterize(weight, S, gamma, bn.eps)
    predicted = (x - x.mean(dim=0)) @ w_hat.T + beta
    conds = [condition_number(reparam_hessian(S, w)) for w in weight]
    return {
        "max_abs_error": float((y - predicted).abs().max()),
        "cond_s": condition_number(S),
        "cond_reparam": float(np.nanmax(conds)),
    }
