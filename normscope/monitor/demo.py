"""The built-in default training (:func:`normscope.train.train_reference`'s loop) with the monitor on."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from normscope.data import digits_loader
from normscope.models import DEFAULT_MODEL, build_model
from normscope.monitor.monitor import Monitor


def train_monitored(out: str | os.PathLike, name: str = DEFAULT_MODEL, epochs: int = 8, batch_size: int = 64,
                    seed: int = 0, lr: float = 0.05, every: int = 5, every_curvature: int | None = 50) -> int:
    """Train reference model ``name`` on the digits (SGD, momentum 0.9) under :class:`Monitor`
    writing to ``out``; returns the number of steps. The global random state is left as it was."""
    model = build_model(name, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = digits_loader(batch_size=batch_size, seed=seed, split="train", drop_last=True)
    model.train()
    with torch.random.fork_rng(), Monitor(model, out, every=every, every_curvature=every_curvature,
                                          optimizer=optimizer) as monitor:
        torch.manual_seed(seed)
        for _ in range(epochs):
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                with monitor.step((images, labels)):
                    F.cross_entropy(model(images), labels).backward()
                optimizer.step()
    return monitor.steps
