"""Batch renormalization (Ioffe 2017, "Batch Renormalization"; discussed in "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) App. C and "Extreme Normalization" (under review) §3.1).

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

from normscope.errors import DataShapeError, InvalidArgumentError
from normscope.ops.base import ChannelNorm, channel_view, mean_var, stats_dtype

Limit = Union[float, Callable[[int], float]]


@dataclass(frozen=True)
class LinearWarmup:
    """A limit that stays at ``start`` for ``delay`` steps, then moves linearly to ``end`` over
    ``steps`` steps (jumps to ``end`` at ``delay`` when ``steps`` is 0). Ioffe 2017 §4: rmax 1 -> 3
    and dmax 0 -> 5 after a BatchNorm phase."""

    start: float
    end: float
    steps: int
    delay: int = 0

    def __call__(self, step: int) -> float:
        if self.steps <= 0:
            return self.end if step >= self.delay else self.start
        progress = min(max(step - self.delay, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * progress


def ioffe_schedule(rmax: float, dmax: float, bn_steps: int, rmax_steps: int, dmax_steps: int) -> tuple[Limit, Limit]:
    """The limits of Ioffe 2017 §4 as schedules: ``rmax = 1, dmax = 0`` (BatchNorm) for ``bn_steps``
    steps, then linear to ``rmax`` over ``rmax_steps`` and to ``dmax`` over ``dmax_steps``. The paper's
    numbers: 5000, then rmax = 3 at 40k steps and dmax = 5 at 25k. Constants when all steps are 0."""
    if bn_steps == rmax_steps == dmax_steps == 0:
        return rmax, dmax
    return LinearWarmup(1.0, rmax, rmax_steps, bn_steps), LinearWarmup(0.0, dmax, dmax_steps, bn_steps)


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
    running_std: bool = False,
) -> Tensor:
    """Batch renormalization of ``x`` ``(N, C, *)`` per channel (Ioffe 2017, Algorithm 1).

    In training: ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` with ``r``, ``d`` as in
    the module docstring, detached, and the running buffers then updated as ``F.batch_norm`` does
    (``momentum`` toward ``mu_B`` and the unbiased batch variance). It is computed as one
    ``F.batch_norm`` call with weight ``weight * r`` and bias ``weight * d + bias``. In eval:
    ``F.batch_norm`` with the running statistics. ``running_std``: the running statistics move as
    in Ioffe's Algorithm 1 instead, :func:`update_running_std`.
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
    if running_std:
        update_running_std(running_mean, running_var, mean_b, var_b, momentum, eps)
        return F.batch_norm(x, None, None, scale.to(x.dtype), shift.to(x.dtype), True, 0.0, eps)
    return F.batch_norm(x, running_mean, running_var, scale.to(x.dtype), shift.to(x.dtype), True, momentum, eps)


@torch.no_grad()
def update_running_std(running_mean: Tensor, running_var: Tensor, mean_b: Tensor, var_b: Tensor, rate: float, eps: float) -> None:
    """Ioffe 2017, Algorithm 1: ``mu <- mu + rate (mu_B - mu)``, ``sigma <- sigma + rate (sigma_B - sigma)``
    with ``sigma_B = sqrt(var_B + eps)`` (biased batch variance) and ``sigma = sqrt(running_var + eps)``;
    ``running_var`` is then stored as ``sigma^2 - eps``, so eval mode stays BatchNorm's formula."""
    sigma = (running_var + eps).sqrt().lerp_((var_b + eps).sqrt().to(running_var.dtype), rate)
    running_mean.lerp_(mean_b.to(running_mean.dtype), rate)
    running_var.copy_(sigma.square() - eps)


def ghost_batch_renorm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    rmax: float,
    dmax: float,
    ghost: int,
    running_std: bool = False,
) -> Tensor:
    """Training-mode batch renormalization over ghost batches (Ioffe 2017 §4.2, "microbatches"):
    the examples, in order, form groups of ``ghost``; each group g is normalized with its own
    moments ``mu_g``, ``sigma_g = sqrt(var_g + eps)`` (with gradients) and its own detached
    corrections ``r_g = clip(sigma_g / sigma)``, ``d_g = clip((mu_g - mu) / sigma)``:

    .. math:: y = \\gamma \\Big(\\frac{x - \\mu_g}{\\sigma_g} r_g + d_g\\Big) + \\beta

    ``rmax = 1, dmax = 0`` is ghost-batch BatchNorm. The running mean and variance move with
    weight ``momentum`` toward the mean over groups of ``mu_g`` and of the unbiased ``var_g``.
    Without running statistics r = 1, d = 0. ``N`` must be a multiple of ``ghost``.
    ``running_std``: the running mean and std move toward the mean over groups of ``mu_g`` and of
    ``sigma_g`` (Ioffe 2017, Algorithm 1; :func:`update_running_std`).
    """
    n, c = x.shape[0], x.shape[1]
    if n % ghost:
        raise DataShapeError(f"ghost batches of {ghost} need a batch size that is a multiple of {ghost} (got {n})")
    compute = stats_dtype(x)
    groups = x.to(compute).reshape(n // ghost, ghost, c, -1)
    mean = groups.mean(dim=(1, 3), keepdim=True)
    var = (groups - mean).pow(2).mean(dim=(1, 3), keepdim=True)
    std = (var + eps).sqrt()
    z = (groups - mean) / std
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            sigma = (running_var.to(compute) + eps).sqrt().view(1, 1, c, 1)
            r = (std / sigma).clamp(1.0 / rmax, rmax)
            d = ((mean - running_mean.to(compute).view(1, 1, c, 1)) / sigma).clamp(-dmax, dmax)
            count = ghost * groups.shape[-1]
            if running_std:
                sigma_g = std.mean(dim=0).flatten()
                update_running_std(running_mean, running_var, mean.mean(dim=0).flatten(), sigma_g.square() - eps, momentum, eps)
            else:
                running_mean.lerp_(mean.mean(dim=0).flatten().to(running_mean.dtype), momentum)
                unbiased = var.mean(dim=0).flatten() * count / max(count - 1, 1)
                running_var.lerp_(unbiased.to(running_var.dtype), momentum)
        z = z * r + d
    y = z.reshape(x.shape)
    if weight is not None:
        y = y * channel_view(weight.to(compute), y)
    if bias is not None:
        y = y + channel_view(bias.to(compute), y)
    return y.to(x.dtype)


class BatchRenorm(ChannelNorm):
    """Batch renormalization (Ioffe 2017), a drop-in for ``BatchNorm1d/2d/3d``.

    .. math::
        y = \\gamma \\Big(\\frac{x - \\mu_B}{\\sigma_B} r + d\\Big) + \\beta

    Moments per channel over the batch (or each ghost batch) and spatial dims; ``r`` and ``d``
    correct the batch moments toward the running ones (clipped by ``rmax``, ``dmax``) and get no
    gradient. The running statistics are ``running_mean`` and ``running_var`` (the running std is
    ``sqrt(running_var + eps)``), updated like torch's BatchNorm, so eval mode equals BatchNorm's.
    Without running statistics (``track_running_stats=False``) ``r = 1, d = 0``: plain BatchNorm.

    By default the limits follow Ioffe 2017 §4: ``rmax = 1, dmax = 0`` for the first 5000 steps
    (so a fresh module *is* BatchNorm), then relaxed linearly to ``rmax = 3`` at 40k steps and
    ``dmax = 5`` at 25k steps. Short runs scale ``bn_steps``, ``rmax_steps`` and ``dmax_steps``
    down; all three 0 makes ``rmax`` and ``dmax`` constants from step 0.

    Args:
        num_features: C, the number of channels. Required.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the batch in the running statistics; None for a cumulative average. Default: 0.1.
        affine: learnable per-channel ``gamma`` and ``beta``. Default: True.
        track_running_stats: keep running statistics. Default: True.
        rmax: final clip of ``r`` to ``[1/rmax, rmax]`` (a number >= 1), or a callable of the step
            (``num_batches_tracked`` before this batch) such as :class:`LinearWarmup`, used as given. Default: 3.0.
        dmax: final clip of ``d`` to ``[-dmax, dmax]`` (a number >= 0), or a callable of the step. Default: 5.0.
        bn_steps: steps at ``rmax = 1, dmax = 0`` before relaxing. Default: 5000 (Ioffe 2017).
        rmax_steps: steps from 1 to ``rmax`` after ``bn_steps``. Default: 35000 (Ioffe 2017).
        dmax_steps: steps from 0 to ``dmax`` after ``bn_steps``. Default: 20000 (Ioffe 2017).
        ghost: normalize over ghost batches (microbatches) of this many examples inside each batch;
            None: the whole batch. Default: None.
        running_std: keep a running average of sigma_B, as Ioffe 2017's Algorithm 1 does
            (``sigma <- sigma + momentum (sigma_B - sigma)``, stored as ``running_var = sigma^2 - eps``),
            instead of torch's running unbiased variance. Default: False.

    The running-statistics rate (``momentum``) matters at small batches: the running moments are
    what r and d correct toward, and at batch 2 a rate of 0.1 follows single noisy batches. At
    batch 2 on the digits (issue 22's measurement, ResNet, 3 seeds) rate 0.1 gave 0.753 test
    accuracy and rate 0.01 gave 0.828; for batches of 8 or fewer use ``momentum=0.01``, which
    ``benchmarks/papers.py`` does at batch 2.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same shape.

    Example:
        >>> norm = BatchRenorm(16, bn_steps=50, rmax_steps=200, dmax_steps=100, ghost=4)
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
        bn_steps: int = 5000,
        rmax_steps: int = 35000,
        dmax_steps: int = 20000,
        ghost: int | None = None,
        running_std: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.running_std = bool(running_std)
        for name, value in (("bn_steps", bn_steps), ("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
            if not (isinstance(value, int) and value >= 0):
                raise InvalidArgumentError(f"batch renorm {name} must be an integer >= 0 (got {value!r})")
        if ghost is not None and not (isinstance(ghost, int) and ghost >= 1):
            raise InvalidArgumentError(f"ghost must be an integer >= 1 or None (got {ghost!r})")
        _limit(rmax, 0, "rmax", 1.0)
        _limit(dmax, 0, "dmax", 0.0)
        self.bn_steps, self.rmax_steps, self.dmax_steps, self.ghost = bn_steps, rmax_steps, dmax_steps, ghost
        if callable(rmax) or callable(dmax):
            self.rmax, self.dmax = rmax, dmax
        else:
            self.rmax, self.dmax = ioffe_schedule(float(rmax), float(dmax), bn_steps, rmax_steps, dmax_steps)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, rmax={self.rmax!r}, dmax={self.dmax!r}"
        text = text if not self.running_std else f"{text}, running_std=True"
        return text if self.ghost is None else f"{text}, ghost={self.ghost}"

    def limits(self, step: int) -> tuple[float, float]:
        """``(rmax, dmax)`` at ``step`` (batches tracked before this one)."""
        return _limit(self.rmax, step, "rmax", 1.0), _limit(self.dmax, step, "dmax", 0.0)

    def forward(self, x: Tensor) -> Tensor:
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        factor, running_mean, running_var = self._begin_call(x)
        rmax, dmax = self.limits(step)
        training = self._use_batch_stats()
        if training and self.ghost is not None and self.ghost < x.shape[0]:
            return ghost_batch_renorm(
                x, running_mean, running_var, self.weight, self.bias, factor, self.eps, rmax, dmax, self.ghost,
                self.running_std,
            )
        if running_mean is None or running_var is None:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return batch_renorm(
            x, running_mean, running_var, self.weight, self.bias, training, factor, self.eps, rmax, dmax, self.running_std
        )


class GhostBatchNorm(BatchRenorm):
    """Ghost-batch BatchNorm (Hoffer et al. 2017; Ioffe 2017 §4.2's microbatch baseline): BatchNorm
    whose training-mode statistics come from each ghost batch of ``ghost`` examples inside the
    batch; eval mode uses the running statistics, which average the ghost batches' moments.
    It is :class:`BatchRenorm` with ``rmax = 1, dmax = 0``; ``ghost >= N`` is torch's BatchNorm.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as torch's BatchNorm.
        ghost: examples per ghost batch. Default: 4 (Ioffe 2017's microbatches of 4).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        ghost: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, rmax=1.0, dmax=0.0,
            bn_steps=0, rmax_steps=0, dmax_steps=0, ghost=ghost, device=device, dtype=dtype,
        )

    def extra_repr(self) -> str:
        return f"{ChannelNorm.extra_repr(self)}, ghost={self.ghost}"
