"""Median batch normalization (King, "Median Batch Normalization" (2022); MATH.md §3): the per-channel batch median replaces the mean.

.. math::
    M = \\operatorname{median}_{(N, *)}(x), \\quad
    \\sigma^2 = \\operatorname{mean}_{(N, *)}\\big((x - M)^2\\big), \\quad
    y = \\gamma \\frac{x - M}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

The variance is taken about M, so ``d sigma^2 / d M = -2 mean(x - M)`` is not zero and the
backward pass needs ``dM/dx``. Three choices of that derivative (the ``backward`` argument):

``exact``
    The indicator of the element chosen as the median (torch picks the lower middle element for
    an even count): the true derivative almost everywhere, what autograd through ``torch.median``
    gives. Passes gradcheck.
``smoothed``
    M is the pseudo-Huber median ``argmin_y sum_i sqrt((x_i - y)^2 + delta^2)`` (the forward pass
    uses it too) and, by the implicit function theorem, ``dM/dx_k = w_k / sum_i w_i`` with
    ``w_i = delta^2 / ((x_i - M)^2 + delta^2)^(3/2)``: positive weights summing to 1. Passes gradcheck.
``seed``
    King, "Median Batch Normalization" (2022) §3.1's literal closed form ``dM/dx_k = -|x_k - M|^-3 / sum_i |x_i - M|^-3``, for
    reproducing the document only. It is wrong: it is negative for every k and sums to -1, while
    any derivative of a median sums to +1 (``M(x + c) = M(x) + c``). The error comes from
    differentiating ``|x - y|`` as if it were ``1/|x - y|``. It is infinite at the median element
    itself; distances are floored at ``delta`` so that it can be evaluated. It warns, and fails gradcheck.

Double backward (Hessian-vector products) treats ``dM/dx`` as locally constant: exact for ``exact``
(the median is piecewise linear), an approximation for ``smoothed``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from normscope.errors import InvalidArgumentError, UnknownNameError
from normscope.ops.base import ChannelNorm, channel_view, reduce_dims, stats_dtype, update_running

BACKWARD_MODES = ("exact", "smoothed", "seed")
SEED_WARNING = (
    "median batch norm backward='seed' uses King's (2022) closed form dM/dx_k = -|x_k - M|^-3 / sum |x_i - M|^-3, "
    "which sums to -1 instead of +1 and is not the derivative of the median; use 'exact' or 'smoothed'"
)


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``(C, N * S)`` with each channel's values contiguous (fast selection along dim 1)."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1)


def _to_input_layout(rows: Tensor, x: Tensor) -> Tensor:
    """Inverse of :func:`_rows`: ``(C, N * S)`` back to the layout of ``x``."""
    n, c = x.shape[:2]
    return rows.reshape(c, n, *x.shape[2:]).transpose(0, 1)


def pseudo_huber_median(rows: Tensor, delta: float, max_iter: int = 100) -> Tensor:
    """Row-wise ``argmin_y sum_i sqrt((x_i - y)^2 + delta^2)`` of ``rows`` ``(C, m)`` (MATH.md §3).

    Safeguarded Newton from the median: the objective is strictly convex, the root of its
    derivative ``-sum_i u_i`` (``u_i = (x_i - y) / sqrt((x_i - y)^2 + delta^2)``) lies between the
    row's min and max, and a Newton step that leaves the current bracket is replaced by bisection.
    Stops after the first Newton step below 16 ulp of the row's scale (or ``max_iter`` steps).
    """
    y = rows.median(dim=1).values
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    tol = 16 * torch.finfo(rows.dtype).eps * rows.abs().amax(dim=1).clamp_min(delta)
    d2 = delta * delta
    for _ in range(max_iter):
        r = rows - y[:, None]
        root = (r.square() + d2).sqrt()
        slope = (r / root).sum(dim=1)
        step = slope / (d2 / root.pow(3)).sum(dim=1)
        if bool((step.abs() <= tol).all()):
            return y + step
        lo = torch.where(slope > 0, y, lo)
        hi = torch.where(slope < 0, y, hi)
        new = y + step
        y = torch.where((new < lo) | (new > hi), (lo + hi) / 2, new)
    return y


def median_weights(rows: Tensor, median: Tensor, mode: str, delta: float) -> Tensor:
    """``dM/dx`` per row of ``rows`` ``(C, m)`` for the ``smoothed`` or ``seed`` mode (MATH.md §3).

    ``smoothed``: ``w_k / sum_i w_i`` with ``w_i = delta^2 / ((x_i - M)^2 + delta^2)^(3/2)``.
    ``seed``: ``-v_k / sum_i v_i`` with ``v_i = max(|x_i - M|, delta)^-3`` (King, "Median Batch Normalization" (2022) §3.1, wrong).
    """
    r = rows - median[:, None]
    if mode == "smoothed":
        w = delta * delta / (r.square() + delta * delta).pow(1.5)
        return w / w.sum(dim=1, keepdim=True)
    v = r.abs().clamp_min(delta).pow(-3)
    return -v / v.sum(dim=1, keepdim=True)


class _BatchMedian(torch.autograd.Function):
    """Per-channel batch median ``(C,)`` of ``x`` ``(N, C, *)`` with the chosen ``dM/dx``."""

    @staticmethod
    def forward(ctx, x: Tensor, mode: str, delta: float) -> Tensor:
        rows = _rows(x).to(stats_dtype(x))
        ctx.shape = x.shape
        if mode == "exact":
            median, column = rows.median(dim=1)
            spatial = rows.shape[1] // x.shape[0]
            sample, position = column // spatial, column % spatial
            channel = torch.arange(x.shape[1], device=x.device)
            ctx.save_for_backward((sample * x.shape[1] + channel) * spatial + position, None)
            return median
        median = pseudo_huber_median(rows, delta) if mode == "smoothed" else rows.median(dim=1).values
        weights = _to_input_layout(median_weights(rows, median, mode, delta), x)
        ctx.save_for_backward(None, weights)
        return median

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        flat_index, weights = ctx.saved_tensors
        if weights is not None:
            return (weights * channel_view(grad, weights)).to(grad.dtype), None, None
        grad_x = grad.new_zeros(ctx.shape.numel()).index_put((flat_index,), grad)
        return grad_x.view(ctx.shape), None, None


class _CenteredNormalize(torch.autograd.Function):
    """``z = (x - c) / sqrt(var + eps)``, ``var = mean((x - c)^2)`` per channel; returns ``z``,
    ``inv = 1 / sqrt(var + eps)`` and ``var`` (not differentiable).

    Backward (``g = dL/dz``, ``h = dL/dinv``, m values per channel):
    ``dL/dx = (g - z mean(g z)) inv - h inv^2 z / m`` and ``dL/dc = -sum dL/dx``; it is written
    with differentiable ops on the saved outputs, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: Tensor, center: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        z = x - channel_view(center, x)
        var = (z * z).mean(reduce_dims(x))
        inv = torch.rsqrt(var + eps)
        z.mul_(channel_view(inv, x))
        ctx.save_for_backward(z, inv)
        ctx.mark_non_differentiable(var)
        return z, inv, var

    @staticmethod
    def backward(ctx, g: Tensor | None, h: Tensor | None, _var: Tensor | None) -> tuple[Tensor, Tensor, None]:
        z, inv = ctx.saved_tensors
        dims = reduce_dims(z)
        grad_x = torch.zeros_like(z)
        if g is not None:
            grad_x = torch.addcmul(g, z, channel_view(-(g * z).mean(dims), z)) * channel_view(inv, z)
        if h is not None:
            grad_x = grad_x - z * channel_view(h * inv.square() / (z.numel() // z.shape[1]), z)
        return grad_x, -grad_x.sum(dims), None


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`BACKWARD_MODES`, else raise :class:`UnknownNameError`."""
    if mode not in BACKWARD_MODES:
        raise UnknownNameError("median backward mode", mode, BACKWARD_MODES)
    return mode


def batch_median(x: Tensor, backward: str = "exact", delta: float = 1e-2) -> Tensor:
    """Per-channel median of ``x`` ``(N, C, *)`` over ``(N, *)``, shape ``(C,)``, differentiable
    with the ``dM/dx`` of the ``backward`` mode (King, "Median Batch Normalization" (2022) §2-3, MATH.md §3)."""
    if check_mode(backward) == "seed":
        warnings.warn(SEED_WARNING, UserWarning, stacklevel=2)
    return _BatchMedian.apply(x, backward, delta).to(x.dtype)


def median_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backward: str = "exact",
    delta: float = 1e-2,
) -> Tensor:
    """Median batch normalization of ``x`` ``(N, C, *)``, per channel (King, "Median Batch Normalization" (2022) §2; MATH.md §3).

    ``y = weight * (x - M) / sqrt(var_M + eps) + bias`` with ``M`` the batch median and
    ``var_M = mean((x - M)^2)``. In training (or without running
    statistics) ``M`` and ``var_M`` come from the batch and the running buffers move toward
    ``M`` and the unbiased ``var_M * m / (m - 1)`` with weight ``momentum`` (torch's BatchNorm rule,
    ``m`` values per channel); otherwise the running buffers normalize, exactly as ``F.batch_norm``.
    """
    if check_mode(backward) == "seed":
        warnings.warn(SEED_WARNING, UserWarning, stacklevel=2)
    return _normalize(x, running_mean, running_var, weight, bias, training, momentum, eps, backward, delta)


def _normalize(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    backward: str,
    delta: float,
) -> Tensor:
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    acc = x.to(stats_dtype(x))
    median = _BatchMedian.apply(acc, backward, delta)
    z, _, var_m = _CenteredNormalize.apply(acc, median, eps)
    update_running(running_mean, running_var, median, var_m, x, momentum)
    if weight is None:
        return z.to(x.dtype)
    return torch.addcmul(channel_view(bias, x), z, channel_view(weight, x)).to(x.dtype)


class MedianBatchNorm(ChannelNorm):
    """Median batch normalization (King, "Median Batch Normalization" (2022); MATH.md §3), a drop-in for ``BatchNorm1d/2d/3d``.

    .. math::
        y = \\frac{x - \\operatorname{median}[x]}{\\sqrt{\\operatorname{mean}[(x - \\operatorname{median}[x])^2] + \\epsilon}} \\gamma + \\beta

    Median and variance are per channel over the batch and spatial dims. Running statistics
    (median and unbiased variance about it) are kept and used in eval mode as torch's BatchNorm does.

    Args:
        num_features: C, the number of channels. Required.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the batch in the running statistics; None for a cumulative average. Default: 0.1.
        affine: learnable per-channel ``gamma`` and ``beta``. Default: True.
        track_running_stats: keep running statistics. Default: True.
        backward: ``"exact"``, ``"smoothed"`` or ``"seed"`` (see :mod:`normscope.ops.median`). Default: ``"exact"``.
        delta: pseudo-Huber width of ``smoothed`` (and distance floor of ``seed``), in input units. Default: 1e-2.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same shape.

    Example:
        >>> norm = MedianBatchNorm(16, backward="smoothed")
        >>> y = norm(torch.randn(8, 16, 4, 4))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backward: str = "exact",
        delta: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.backward = check_mode(backward)
        if not delta > 0:
            raise InvalidArgumentError(f"median batch norm delta must be > 0 (got {delta})")
        self.delta = float(delta)
        if backward == "seed":
            warnings.warn(SEED_WARNING, UserWarning, stacklevel=2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backward={self.backward!r}, delta={self.delta}"

    def forward(self, x: Tensor) -> Tensor:
        factor, running_mean, running_var = self._begin_call(x)
        return _normalize(
            x, running_mean, running_var, self.weight, self.bias,
            self._use_batch_stats(), factor, self.eps, self.backward, self.delta,
        )
