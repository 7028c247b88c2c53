"""Shared base of normscope's BatchNorm-style ops: torch BatchNorm's attributes and running-stat rules.

Every op takes the channel count first and has the attributes of ``torch.nn.BatchNorm*``
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``, ``eps``,
``momentum``), ``reset_parameters()``, ``reset_running_stats()`` and ``extra_repr()``, so any op
can stand in for a BatchNorm and load its state dict. Statistics are per channel (dim 1) over the
batch and every spatial position (MATH.md §1), for inputs ``(N, C)`` or ``(N, C, *)``.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _NormBase

from normscope.errors import DataShapeError

LOW_PRECISION = (torch.float16, torch.bfloat16)


def reduce_dims(x: torch.Tensor) -> list[int]:
    """The dims a BatchNorm reduces over: every dim except the channel dim 1."""
    return [0, *range(2, x.dim())]


def channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against ``x`` of shape ``(N, C, *)``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (statistics are accumulated in it), else ``x.dtype``."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` ``(N, C, *)``, two-pass:
    ``mean(x)`` then ``mean((x - mean)^2)`` (on CPU several times faster than ``torch.var_mean``
    over strided dims)."""
    dims = reduce_dims(x)
    mean = x.mean(dims)
    centered = x - channel_view(mean, x)
    return mean, (centered * centered).mean(dims)


@torch.no_grad()
def update_running(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    x: torch.Tensor,
    factor: float,
) -> None:
    """Move the running buffers (when there are any) toward the batch ``mean`` and the unbiased
    ``var * m / (m - 1)`` with weight ``factor``, ``m`` the values per channel of ``x`` (torch's BatchNorm rule)."""
    if running_mean is None or running_var is None:
        return
    count = x.numel() // x.shape[1]
    running_mean.lerp_(mean.detach().to(running_mean.dtype), factor)
    running_var.lerp_((var.detach() * count / (count - 1)).to(running_var.dtype), factor)


class ChannelNorm(_NormBase):
    """Base class: BatchNorm's parameters, buffers and momentum rule; subclasses write ``forward``."""

    statistics_frozen = False

    def freeze_statistics(self) -> None:
        """Training calls from now on move no running statistic and count no batch, so the
        training-mode function stays the one at the current state (renorm's r, d and its schedule
        read them): what the curvature analyzers' private copies need, whose every forward would
        otherwise change the function being differentiated."""
        self.statistics_frozen = True

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise DataShapeError(f"{type(self).__name__} expected 2D or more input (N, C, *) (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise DataShapeError(
                f"{type(self).__name__} expected {self.num_features} channels in dim 1 (got input of shape {tuple(x.shape)})"
            )

    def _check_batch(self, x: torch.Tensor) -> None:
        if self._use_batch_stats() and x.numel() // x.shape[1] < 2:
            raise DataShapeError(
                f"{type(self).__name__} expected more than 1 value per channel when training (got input of shape {tuple(x.shape)})"
            )

    def _use_batch_stats(self) -> bool:
        """Batch statistics in training mode, or in eval mode without running statistics (torch's rule)."""
        return self.training or self.running_mean is None

    def _average_factor(self) -> float:
        """Count this batch and return the weight of its statistics in the running average.

        torch's rule: ``momentum``, or ``1 / num_batches_tracked`` (a cumulative average) when
        ``momentum`` is None; 0.0 when nothing is tracked, in eval mode or with the statistics frozen.
        """
        if self.statistics_frozen or not (self.training and self.track_running_stats and self.num_batches_tracked is not None):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return float(self.momentum)

    def _begin_call(self, x: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
        """Check the input, count the batch and return ``(factor, running_mean, running_var)``
        as every op's ``forward`` needs them."""
        self._check_input_dim(x)
        self._check_batch(x)
        factor = self._average_factor()
        running_mean, running_var = self._running()
        return factor, running_mean, running_var

    def _running(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The running buffers to use or update in this call, as torch's BatchNorm chooses them."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None
