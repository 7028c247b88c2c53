"""Batch renormalization (Ioffe 2017, "Batch Renormalization"; discussed in seeds 002 App. C and 004 §3.1).

.. math::
    r = \\operatorname{clip}_{[1/r_{max}, r_{max}]}\\Big(\\frac{\\sigma_B}{\\sigma}\\Big), \\quad
    d = \\operatorname{clip}_{[-d_{max}, d_{max}]}\\Big(\\frac{\\mu_B - \\mu}{\\sigma}\\Big), \\quad
    y = \\gamma \\Big(\\frac{x - \\mu_B}{\\sigma_B} r + d\\Big) + \\beta

with batch moments ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` and running ``mu``,
``sigma = sqrt(running_var + eps)``; ``r`` and ``d`` are constants for the backward pass. With
``r = 1, d = 0`` (``rmax = 1, dmax = 0``) this is BatchNorm, forward, backward and running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from normscope.errors import InvalidArgumentError
from normscope.ops.base import ChannelNorm, mean_var, stats_dtype

Limit = Union[float, Callable[[int], float]]


@dataclass(frozen=True)
class LinearWarmup:
    """A limit that stays at ``start`` for ``delay`` steps, then moves linearly to ``end`` over
    ``steps`` steps (Ioffe 2017 §4: rmax 1 -> 3 and dmax 0 -> 5 after a BatchNorm phase)."""

    start: float
    end: float
    steps: int
    delay: int = 0

    def __call__(self, step: int) -> float:
        progress = min(max(step - self.delay, 0) / max(self.steps, 1), 1.0)
        return self.start + (self.end - self.start) * progress


def _limit(value: Limit, step: int, name: str, least: float) -> float:
    limit = float(value(step) if callable(value) else value)
    if not limit >= least:
        raise InvalidArgumentError(f"batch renorm {name} must be >= {least} (got {limit} at step {step})")
    return limit


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> Tensor:
    """Batch renormalization of ``x`` ``(N, C, *)`` per channel (Ioffe 2017, Algorithm 1).

    In training: ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` with ``r``, ``d`` as in
    the module docstring, detached, and the running buffers then updated as ``F.batch_norm`` does
    (``momentum`` toward ``mu_B`` and the unbiased batch variance). It is computed as one
    ``F.batch_norm`` call with weight ``weight * r`` and bias ``weight * d + bias``. In eval:
    ``F.batch_norm`` with the running statistics.
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    with torch.no_grad():
        mean_b, var_b = mean_var(x.to(stats_dtype(x)))
        sigma = (running_var + eps).sqrt()
        r = ((var_b + eps).sqrt() / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean_b - running_mean) / sigma).clamp(-dmax, dmax)
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    if bias is not None:
        shift = shift + bias
    return F.batch_norm(x, running_mean, running_var, scale.to(x.dtype), shift.to(x.dtype), True, momentum, eps)


class BatchRenorm(ChannelNorm):
    """Batch renormalization (Ioffe 2017), a drop-in for ``BatchNorm1d/2d/3d``.

    .. math::
        y = \\gamma \\Big(\\frac{x - \\mu_B}{\\sigma_B} r + d\\Big) + \\beta

    Moments per channel over the batch and spatial dims; ``r`` and ``d`` correct the batch
    moments toward the running ones (clipped by ``rmax``, ``dmax``) and get no gradient. The
    running statistics are ``running_mean`` and ``running_var`` (the running std is
    ``sqrt(running_var + eps)``), updated like torch's BatchNorm, so eval mode equals BatchNorm's.
    Without running statistics (``track_running_stats=False``) ``r = 1, d = 0``: plain BatchNorm.

    Args:
        num_features: C, the number of channels. Required.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the batch in the running statistics; None for a cumulative average. Default: 0.1.
        affine: learnable per-channel ``gamma`` and ``beta``. Default: True.
        track_running_stats: keep running statistics. Default: True.
        rmax: clip of ``r`` to ``[1/rmax, rmax]``: a number >= 1 or a callable of the step
            (``num_batches_tracked`` before this batch), e.g. :class:`LinearWarmup`. Default: 3.0.
        dmax: clip of ``d`` to ``[-dmax, dmax]``, a number >= 0 or a callable of the step. Default: 5.0.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same shape.

    Example:
        >>> norm = BatchRenorm(16, rmax=LinearWarmup(1.0, 3.0, 5000, delay=5000))
        >>> y = norm(torch.randn(8, 16, 4, 4))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        rmax: Limit = 3.0,
        dmax: Limit = 5.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.rmax = rmax
        self.dmax = dmax
        _limit(rmax, 0, "rmax", 1.0)
        _limit(dmax, 0, "dmax", 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax!r}, dmax={self.dmax!r}"

    def forward(self, x: Tensor) -> Tensor:
        scheduled = callable(self.rmax) or callable(self.dmax)
        step = int(self.num_batches_tracked) if scheduled and self.num_batches_tracked is not None else 0
        factor, running_mean, running_var = self._begin_call(x)
        if running_mean is None or running_var is None:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return batch_renorm(
            x, running_mean, running_var, self.weight, self.bias, self._use_batch_stats(), factor, self.eps,
            _limit(self.rmax, step, "rmax", 1.0), _limit(self.dmax, step, "dmax", 0.0),
        )
