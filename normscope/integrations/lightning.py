"""A Lightning ``Callback`` that runs :class:`normscope.Monitor` on every training batch.

Install with ``pip install "normscope[lightning]"``::

    trainer = lightning.Trainer(callbacks=[NormscopeCallback("runs/m1", every=10, every_curvature=100)])

Each training batch is one monitor step (numbered from 0 in the order Lightning runs them): the
capture spans the batch's forward, backward and optimizer step, and curvature steps measure
``loss_fn(pl_module(inputs), targets)`` on the batch ``(inputs, targets)`` at the parameters before
the update, against the lr of the trainer's first optimizer. Each process writes its own rows
(``rank`` = the trainer's global rank). A second ``trainer.fit`` with the same callback (or on the
same folder) resumes the run: its rows are added, its steps numbered on from the last recorded one.
The monitor's own failures are error rows, never exceptions in the training (:class:`normscope.Monitor`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from normscope.monitor import Monitor


class NormscopeCallback(Callback):
    """Runs :class:`normscope.Monitor` (``out``, ``every``, ``every_curvature`` and the other keyword
    arguments as there) around each training batch of a Lightning ``Trainer``."""

    def __init__(self, out: str | os.PathLike, every: int = 10, every_curvature: int | None = None,
                 loss_fn: Callable = F.cross_entropy, **monitor_kwargs: Any) -> None:
        self.out, self.every, self.every_curvature = out, every, every_curvature
        self.loss_fn, self.monitor_kwargs = loss_fn, monitor_kwargs
        self.monitor: Monitor | None = None
        self._step = None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = Monitor(pl_module, self.out, every=self.every, every_curvature=self.every_curvature,
                               optimizer=optimizer, loss_fn=self.loss_fn, rank=trainer.global_rank,
                               **self.monitor_kwargs).__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step = self.monitor.step(batch if self.every_curvature else None)
        self._step.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
