"""BatchNorm and LayerNorm in series on the same tensor, one affine after both ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1).

.. math::
    y = \\gamma \\cdot \\mathrm{LN}(\\mathrm{BN}(x)) + \\beta \\quad (\\text{order } \\texttt{"bn\\_ln"}), \\qquad
    y = \\gamma \\cdot \\mathrm{BN}(\\mathrm{LN}(x)) + \\beta \\quad (\\text{order } \\texttt{"ln\\_bn"})

BN normalizes each channel over ``(N, *)``, LN each sample over ``(C, *)``, both without affine.
In the backward pass the gradient goes through two least-squares regressions on two
partitionings, the second explaining part of the first one's residual ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1, MATH.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normscope.errors import UnknownNameError
from normscope.ops.base import ChannelNorm, channel_view

ORDERS = ("bn_ln", "ln_bn")


def batch_layer_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    order: str = "bn_ln",
) -> Tensor:
    """``weight * LN(BN(x)) + bias`` (or ``BN(LN(x))`` for ``order="ln_bn"``) per "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1.

    BN is ``F.batch_norm`` without affine (batch statistics when ``training``, running
    statistics otherwise, updated as torch does); LN is ``F.layer_norm`` over every dim but the
    first, without affine; both use ``eps``. ``weight`` and ``bias`` are per channel ``(C,)``.
    """
    if order not in ORDERS:
        raise UnknownNameError("norm chain order", order, ORDERS)

    def bn(t: Tensor) -> Tensor:
        return F.batch_norm(t, running_mean, running_var, None, None, training, momentum, eps)

    def ln(t: Tensor) -> Tensor:
        return F.layer_norm(t, t.shape[1:], None, None, eps)

    z = ln(bn(x)) if order == "bn_ln" else bn(ln(x))
    if weight is None:
        return z
    return torch.addcmul(channel_view(bias, x), z, channel_view(weight, x))


class BatchLayerNorm(ChannelNorm):
    """BatchNorm and LayerNorm in series with one per-channel affine after both ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1).

    .. math::
        y = \\gamma \\cdot \\mathrm{LN}(\\mathrm{BN}(x)) + \\beta \\quad \\text{or} \\quad \\gamma \\cdot \\mathrm{BN}(\\mathrm{LN}(x)) + \\beta

    The running statistics (``running_mean``, ``running_var``) are those of the BN stage, of
    ``x`` for ``"bn_ln"`` and of ``LN(x)`` for ``"ln_bn"``; the LN stage has none and acts the same
    in train and eval mode. Same parameter count as a BatchNorm.

    Args:
        num_features: C, the number of channels. Required.
        eps: added to the variance in both stages. Default: 1e-5.
        momentum: weight of the batch in the running statistics; None for a cumulative average. Default: 0.1.
        affine: learnable per-channel ``gamma`` and ``beta``. Default: True.
        track_running_stats: keep running statistics for the BN stage. Default: True.
        order: ``"bn_ln"`` (BN first) or ``"ln_bn"``. Default: ``"bn_ln"``.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same shape.

    Example:
        >>> norm = BatchLayerNorm(16, order="ln_bn")
        >>> y = norm(torch.randn(8, 16, 4, 4))
    """

    read_by_functional_calls = True  # the analyzers read its F.batch_norm and F.layer_norm calls: two sites in series

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        order: str = "bn_ln",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if order not in ORDERS:
            raise UnknownNameError("norm chain order", order, ORDERS)
        self.order = order

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order!r}"

    def forward(self, x: Tensor) -> Tensor:
        factor, running_mean, running_var = self._begin_call(x)
        return batch_layer_norm(
            x, running_mean, running_var, self.weight, self.bias, self._use_batch_stats(), factor, self.eps, self.order
        )
