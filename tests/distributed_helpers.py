"""A small float64 model and data for the distributed tests, named on the command line as
``tests.distributed_helpers:NAME`` (``--model``, ``--data``)."""

from __future__ import annotations

import torch
from torch import nn

EXAMPLES = 101  # odd: two ranks get 50 and 51 examples


def two_level_net() -> nn.Module:
    """Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d -> ReLU -> Linear in float64: two
    normalization levels in series (the streamed g* needs its adjoint passes)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # stale running statistics, so that recalibration changes something
        for module in net:
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """``EXAMPLES`` float64 inputs of 6 features with 3 classes."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(EXAMPLES, 6, generator=generator, dtype=torch.float64) * 2 + 1
    return inputs, torch.randint(0, 3, (EXAMPLES,), generator=generator)
