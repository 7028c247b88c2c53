"""The built-in default training (:func:`normscope.train.train_loop`, as ``train_reference``) with the monitor on."""

from __future__ import annotations

import os

import torch

from normscope.data import digits_loader
from normscope.models import DEFAULT_MODEL, build_model
from normscope.monitor.monitor import Monitor
from normscope.train import epoch_batches, progress, train_loop


def train_monitored(out: str | os.PathLike, name: str = DEFAULT_MODEL, epochs: int = 8, batch_size: int = 64,
                    seed: int = 0, lr: float = 0.05, every: int = 5, every_curvature: int | None = 50,
                    show_progress: bool = False) -> int:
    """Train reference model ``name`` on the digits (SGD, momentum 0.9) under :class:`Monitor`
    writing to ``out``; returns the number of steps. The global random state is left as it was.
    ``show_progress``: a bar on a terminal, one line per epoch elsewhere (:func:`normscope.train.progress`)."""
    model = build_model(name, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = digits_loader(batch_size=batch_size, seed=seed, split="train", drop_last=True)
    with torch.random.fork_rng(), Monitor(model, out, every=every, every_curvature=every_curvature,
                                          optimizer=optimizer) as monitor, \
            progress(f"training {name}", show_progress) as shown:
        torch.manual_seed(seed)
        train_loop(model, epoch_batches(loader, epochs), epochs * len(loader), lr, per_epoch=len(loader),
                   optimizer=optimizer, step_context=monitor.step, **shown)
    return monitor.steps
