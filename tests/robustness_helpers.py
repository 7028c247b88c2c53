"""Inputs of the robustness corpus (tests/test_robustness_corpus.py), named on the command line
as ``tests.robustness_helpers:NAME``: models and loaders a user could really pass."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.data import load_digits


def bn_net(**bn_options) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16, **bn_options), nn.ReLU(), nn.Linear(16, 10))


def bn_no_affine() -> nn.Module:
    return bn_net(affine=False)


def bn_no_running_stats() -> nn.Module:
    return bn_net(track_running_stats=False)


def weight_norm_net() -> nn.Module:
    model = bn_net()
    nn.utils.parametrizations.weight_norm(model[1])
    return model


class NestedModule(nn.Module):
    """A model whose own child is called ``module`` (its keys start with ``module.``)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = bn_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def nested_module_net() -> nn.Module:
    return NestedModule()


def backward_hooked_net() -> nn.Module:
    model = bn_net()
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model


def data_parallel_net() -> nn.Module:
    return nn.DataParallel(bn_net())


class Warns(nn.Module):
    """Emits a torch-style UserWarning and a NumPy RuntimeWarning in every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("a library's user warning", UserWarning)
        np.log(np.zeros(1))
        return x


def warning_net() -> nn.Module:
    return nn.Sequential(Warns(), *bn_net())


def digits_loader(batch_size: int = 16, count: int = 64) -> DataLoader:
    images, labels = load_digits(split="test")
    return DataLoader(TensorDataset(images[:count], labels[:count]), batch_size=batch_size)


def one_example_loader(batch_size: int = 16) -> DataLoader:
    return digits_loader(batch_size=1, count=8)


def overflow_loader(batch_size: int = 16) -> DataLoader:
    images, labels = load_digits(split="test")
    return DataLoader(TensorDataset(images[:64] * 1e38, labels[:64]), batch_size=batch_size)


class RaisesAfter(Dataset):
    """The digits, but reading item ``limit`` or later raises OSError (a file system going away)."""

    def __init__(self, limit: int) -> None:
        self.images, self.labels = load_digits(split="test")
        self.limit = limit

    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int):
        if index >= self.limit:
            raise OSError("disk went away")
        return self.images[index], self.labels[index]


def raising_loader(batch_size: int = 16) -> DataLoader:
    """Yields two batches, then raises while reading the third (streamed passes read on)."""
    return DataLoader(RaisesAfter(2 * batch_size), batch_size=batch_size)


def slow_loader(batch_size: int = 16) -> DataLoader:
    """Touches $NORMSCOPE_READY, then each batch takes a second: time to send a signal."""
    Path(os.environ["NORMSCOPE_READY"]).touch()

    class Slow(RaisesAfter):
        def __getitem__(self, index: int):
            time.sleep(0.1)
            return super().__getitem__(index)

    return DataLoader(Slow(10_000), batch_size=batch_size)


def racing_loader(batch_size: int = 16) -> DataLoader:
    """Another run's output appears at $NORMSCOPE_RACE while this run is analysing."""
    out = Path(os.environ["NORMSCOPE_RACE"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text("{}\n")
    return digits_loader(batch_size)


def exits_on_call() -> nn.Module:
    raise SystemExit(3)


def failing_analyzer(ctx: AnalysisContext) -> AnalyzerOutput:
    """An analyzer with a bug."""
    raise RuntimeError("analyzer bug")


def _raising(error: type[Exception]):
    def analyzer(ctx: AnalysisContext) -> AnalyzerOutput:
        raise error("analyzer bug")

    return analyzer


RAISED = (RuntimeError, ValueError, ZeroDivisionError, IndexError, KeyError, FloatingPointError)
for _error in RAISED:
    globals()[f"fails_with_{_error.__name__}"] = _raising(_error)
