"""Least-squares-regularized BatchNorm ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.2 and Appendix C; MATH.md §2).

The forward pass is BatchNorm's. The backward pass, which keeps the residual of a least-squares
fit of ``g = dL/dz`` on ``z`` per channel ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Theorem 1), fits on the batch plus two
virtual items at ``z = +1`` and ``z = -1`` with virtual gradients ``alpha* + beta*`` and
``alpha* - beta*``, each with weight ``w`` batch items:

.. math::
    \\tilde\\alpha = \\frac{N \\alpha + 2 w \\alpha^*}{N + 2 w}, \\quad
    \\tilde\\beta = \\frac{N \\beta + 2 w \\beta^*}{N + 2 w}, \\quad
    \\frac{\\partial L}{\\partial x} = \\frac{g - \\tilde\\alpha - \\tilde\\beta z}{\\sqrt{\\sigma^2 + \\epsilon}}

with ``alpha = mean(g)``, ``beta = mean(g z)`` over the batch and spatial dims, N the batch size
(a virtual item is broadcast over the spatial dims like a real one), and ``alpha*``, ``beta*``
running averages of ``alpha``, ``beta`` over past batches. ``w = 0`` is BatchNorm. The virtual
items leave the forward pass and the gradients of ``gamma``, ``beta`` unchanged. ``w`` counts
batch items, never spatial positions (MATH.md §2); the gls analyzer's ``gls_regularization``
uses the same :func:`regularized_moments`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from normscope.errors import InvalidArgumentError, UnknownNameError
from normscope.ops.base import ChannelNorm, channel_view, mean_var, reduce_dims, stats_dtype, update_running


def regularized_moments(
    alpha: Tensor, beta: Tensor, alpha_star: Tensor, beta_star: Tensor, batch_size: int, weight: float
) -> tuple[Tensor, Tensor]:
    """The fit of ``g`` on ``z`` with the two virtual items appended ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) App. C, eqs. 53-54).

    Returns ``((N alpha + 2 w alpha*) / (N + 2 w), (N beta + 2 w beta*) / (N + 2 w))``: the
    weighted means of ``g`` and ``g z`` over the batch and the items ``(z, g) = (+1, alpha* + beta*)``,
    ``(-1, alpha* - beta*)`` of weight ``w``.
    """
    total = batch_size + 2 * weight
    return (batch_size * alpha + 2 * weight * alpha_star) / total, (batch_size * beta + 2 * weight * beta_star) / total


GRAD_INITS = ("first", "zero")


class _RegularizedNormalize(torch.autograd.Function):
    """``z = (x - mean) / sqrt(var + eps)`` per channel; backward with the virtual items."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, state: Tensor, count: Tensor, weight: float, grad_momentum: float, from_first: bool):
        acc = x.to(stats_dtype(x))
        mean, var = mean_var(acc)
        inv_std = torch.rsqrt(var + eps)
        z = ((acc - channel_view(mean, x)) * channel_view(inv_std, x)).to(x.dtype)
        ctx.save_for_backward(z, inv_std)
        ctx.state, ctx.count, ctx.weight, ctx.grad_momentum, ctx.from_first = state, count, weight, grad_momentum, from_first
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _mean: Tensor, _var: Tensor):
        z, inv_std = ctx.saved_tensors
        state, count = ctx.state, ctx.count
        dims = reduce_dims(z)
        gz = g.to(inv_std.dtype)
        alpha, beta = gz.mean(dims), (gz * z).mean(dims)
        if int(count) == 0 and ctx.from_first:
            state.copy_(torch.stack([alpha, beta]).to(state.dtype))
        alpha_t, beta_t = regularized_moments(alpha, beta, state[0], state[1], z.shape[0], ctx.weight)
        state.lerp_(torch.stack([alpha, beta]).to(state.dtype), ctx.grad_momentum)
        count.add_(1)
        grad_x = (gz - channel_view(alpha_t, z) - channel_view(beta_t, z) * z) * channel_view(inv_std, z)
        return grad_x.to(g.dtype), None, None, None, None, None, None


class LSBatchNorm(ChannelNorm):
    """Least-squares-regularized BatchNorm ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Appendix C), a drop-in for ``BatchNorm1d/2d/3d``.

    .. math::
        y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}} + \\beta, \\qquad
        \\frac{\\partial L}{\\partial x} = \\frac{g - \\tilde\\alpha - \\tilde\\beta z}{\\sqrt{\\sigma_B^2 + \\epsilon}}

    Forward and running statistics are BatchNorm's (eval mode is exactly BatchNorm's). In training, the backward pass regresses
    ``g = gamma * dL/dy`` on ``z`` with two virtual items (see :mod:`normscope.ops.ls_bn`); the
    running ``alpha*``, ``beta*`` (buffer ``grad_moments`` of shape ``(2, C)``) are initialised
    from the first batch's ``alpha``, ``beta`` and then move toward each batch's with weight
    ``grad_momentum``; each batch uses the averages before its own update. Because the backward
    pass is deliberately not the derivative of the forward pass, it fails gradcheck unless
    ``virtual_weight = 0``, and double backward is not supported.

    The virtual items are constants of the backward pass. Appendix C appends them as
    ``x+- = mu_B +- sigma_B``; if gradients flowed through ``mu_B`` and ``sigma_B`` into the real
    items, the composite would be exactly BatchNorm (its statistics and ``z+- = +-1`` do not change),
    so the regularization needs them held constant, as here.

    The paper's grid (Appendix C): momentum of ``alpha*``, ``beta*`` in {.997, .5}, which in this
    op's convention (weight of the new batch) is ``grad_momentum`` in {0.003, 0.5}, and virtual
    item weights in {1, 2, 4, 8}. The paper does not say how ``alpha*``, ``beta*`` start:
    ``grad_init="first"`` copies the first batch's values, ``"zero"`` starts them at 0 as a
    TensorFlow moving average would.

    Args:
        num_features: C, the number of channels. Required.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the batch in the running statistics; None for a cumulative average. Default: 0.1.
        affine: learnable per-channel ``gamma`` and ``beta``. Default: True.
        track_running_stats: keep running statistics. Default: True.
        virtual_weight: weight ``w`` of each virtual item, in batch items (paper grid: 1, 2, 4, 8). Default: 1.0.
        grad_momentum: weight of the batch in ``alpha*``, ``beta*`` (paper grid: momentum .997 or .5,
            i.e. 0.003 or 0.5). Default: 0.5.
        grad_init: ``"first"`` (the first batch's ``alpha``, ``beta``) or ``"zero"``. Default: ``"first"``.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same shape.

    Example:
        >>> norm = LSBatchNorm(16, virtual_weight=2.0)
        >>> norm(torch.randn(2, 16, 4, 4)).square().sum().backward()
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        virtual_weight: float = 1.0,
        grad_momentum: float = 0.5,
        grad_init: str = "first",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if not virtual_weight >= 0:
            raise InvalidArgumentError(f"virtual_weight must be >= 0 (got {virtual_weight})")
        if not 0 <= grad_momentum <= 1:
            raise InvalidArgumentError(f"grad_momentum must be in [0, 1] (got {grad_momentum})")
        if grad_init not in GRAD_INITS:
            raise UnknownNameError("grad_init", grad_init, GRAD_INITS)
        self.grad_init = grad_init
        self.virtual_weight = float(virtual_weight)
        self.grad_momentum = float(grad_momentum)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("grad_moments", torch.zeros(2, num_features, **factory))
        self.register_buffer("grad_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Reset the running moments and the running ``alpha*``, ``beta*``."""
        super().reset_running_stats()
        if hasattr(self, "grad_moments"):
            self.grad_moments.zero_()
            self.grad_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, virtual_weight={self.virtual_weight}, grad_momentum={self.grad_momentum}, "
            f"grad_init={self.grad_init!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        factor, running_mean, running_var = self._begin_call(x)
        if not self.training:
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, running_mean is None, 0.0, self.eps)
        frozen = self.statistics_frozen  # alpha*, beta* kept as they are (freeze_statistics)
        z, mean, var = _RegularizedNormalize.apply(
            x, self.eps, self.grad_moments, self.grad_batches_tracked, self.virtual_weight,
            0.0 if frozen else self.grad_momentum, self.grad_init == "first" and not frozen,
        )
        update_running(running_mean, running_var, mean, var, x, factor)
        if self.weight is None:
            return z
        return torch.addcmul(channel_view(self.bias, x), z, channel_view(self.weight, x))
