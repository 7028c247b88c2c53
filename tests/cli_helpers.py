"""A user's own code for the CLI and API tests: model factories and data loaders named as
``tests.cli_helpers:NAME`` on the command line (``--model``, ``--data``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from normscope.data import load_digits


def small_bn_net() -> nn.Module:
    """A user's model: Linear -> BatchNorm1d -> ReLU -> Linear on flattened digits."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def wide_bn_net() -> nn.Module:
    """The same layers as :func:`small_bn_net`, 32 units wide: its state dict has the same keys."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def no_norm_net() -> nn.Module:
    """A model without any normalization."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class UsesFunctionalLN(nn.Module):
    """Calls ``F.layer_norm`` inside its own forward (a functional site)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.layer_norm(x.flatten(1), (64,)))


def functional_ln_net() -> nn.Module:
    return UsesFunctionalLN()


class ZNorm(nn.Module):
    """Named like a normalization, but not one normscope knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True)


def bn_and_unknown_norm_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), ZNorm(), nn.Linear(16, 10))


def not_a_model() -> str:
    return "not a model"


def wrong_shape_loader(batch_size: int = 32) -> DataLoader:
    """Inputs of shape (N, 3, 5, 5), which the digits models do not take."""
    return DataLoader(TensorDataset(torch.randn(64, 3, 5, 5), torch.zeros(64, dtype=torch.int64)), batch_size=batch_size)


class InterruptAfter(Dataset):
    """The digits, but reading past the first ``limit`` items raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, limit: int) -> None:
        self.images, self.labels = load_digits(split="train")
        self.limit = limit

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index >= self.limit:
            raise KeyboardInterrupt
        return self.images[index], self.labels[index]


def interrupting_loader(batch_size: int = 32) -> DataLoader:
    """Yields one batch, then is interrupted while reading the second."""
    return DataLoader(InterruptAfter(batch_size), batch_size=batch_size)


def nan_pixel_loader(batch_size: int = 32) -> DataLoader:
    """The digits with one NaN pixel in the first image: NaN activations from the first layer on."""
    images, labels = load_digits(split="test")
    images = images[:64].clone()
    images[0, 0, 3, 3] = float("nan")
    return DataLoader(TensorDataset(images, labels[:64]), batch_size=batch_size)
