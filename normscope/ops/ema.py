"""EMA-only steps: forward passes that move the population moments and leave the weights alone.

Extreme Normalization ("Extreme Normalization" (under review) §5) initializes the moving averages "by using the first 200 steps
to only update the EMAs but not the weights", and "for 50 updates after that, each weight update
is followed by 50 steps of only updating the EMAs, to avoid their staleness very early in training".
The op carries these numbers (``PopulationNorm.warmup``, ``refresh``, ``refresh_updates``);
:func:`ema_schedule` reads them from a model and :func:`ema_only_step` runs one such step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class EmaSchedule:
    """EMA-only steps around the weight updates of one training run.

    Attributes:
        warmup: EMA-only steps before the first weight update.
        refresh: EMA-only steps after each of the first ``refresh_updates`` weight updates.
        refresh_updates: how many weight updates are followed by ``refresh`` EMA-only steps.
    """

    warmup: int = 0
    refresh: int = 0
    refresh_updates: int = 0

    def after(self, update: int) -> int:
        """EMA-only steps due after weight update number ``update`` (counted from 1)."""
        return self.refresh if update <= self.refresh_updates else 0

    def total(self, updates: int) -> int:
        """All EMA-only steps of a run of ``updates`` weight updates."""
        return self.warmup + self.refresh * min(updates, self.refresh_updates)


def ema_schedule(model: nn.Module) -> EmaSchedule:
    """The schedule the model's ops ask for: the largest ``warmup``, ``refresh`` and
    ``refresh_updates`` over its modules that carry them (PopulationNorm), zeros when none does."""
    found = [m for m in model.modules() if all(hasattr(m, a) for a in ("warmup", "refresh", "refresh_updates"))]
    if not found:
        return EmaSchedule()
    return EmaSchedule(
        max(m.warmup for m in found), max(m.refresh for m in found), max(m.refresh_updates for m in found)
    )


@torch.no_grad()
def ema_only_step(model: nn.Module, forward: Callable[[nn.Module], object]) -> None:
    """One EMA-only step: ``forward(model)`` in training mode without autograd, so every
    normalization layer moves its running moments and no parameter, ``.grad`` or optimizer state
    changes. The caller's train/eval flags are put back."""
    flags = {m: m.training for m in model.modules()}
    model.train()
    try:
        forward(model)
    finally:
        for m, flag in flags.items():
            m.train(flag)
