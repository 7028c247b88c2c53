"""A Hugging Face ``TrainerCallback`` that runs :class:`normscope.Monitor` on every optimizer step.

Install with ``pip install "normscope[transformers]"``::

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[NormscopeCallback("runs/m1", every=10, every_curvature=100)])

One monitor step is one optimizer step of the ``Trainer`` (numbered by ``state.global_step``): it
opens at ``on_step_begin`` and closes at ``on_pre_optimizer_step``, so it covers the forward and
backward of every micro-batch of a gradient-accumulation group and reads the lr of the Trainer's
optimizer. The Trainer does not hand its batches to callbacks, so on a curvature step
(``every_curvature``) a forward pre-hook on the model keeps the keyword arguments of the step's
first forward (its first micro-batch, labels included) and is removed at once; before the
optimizer's step the monitor measures the curvature of the model's own loss (``outputs.loss``,
:func:`normscope.losses.model_loss`) on that micro-batch, at the parameters the step starts from.
Steps keep the Trainer's numbers, so a second ``trainer.train()`` from step 0 on the same folder adds
rows under the same step numbers (a segment of its own; :mod:`normscope.monitor.store`). The
monitor's own failures are error rows, never exceptions in the training (:class:`normscope.Monitor`).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from normscope.errors import InvalidArgumentError
from normscope.losses import model_loss
from normscope.monitor import Monitor


class NormscopeCallback(TrainerCallback):
    """Runs :class:`normscope.Monitor` (``out``, ``every``, ``every_curvature`` and the other keyword
    arguments as there; ``loss_fn`` defaults to the model's own loss) around each optimizer step of a
    ``transformers.Trainer``."""

    def __init__(self, out: str | os.PathLike, every: int = 10, every_curvature: int | None = None, **monitor_kwargs: Any) -> None:
        if every_curvature is not None and every_curvature < 1:
            raise InvalidArgumentError(f"every_curvature must be >= 1 (got {every_curvature})")
        self.out, self.every, self.every_curvature, self.monitor_kwargs = out, every, every_curvature, monitor_kwargs
        self.monitor: Monitor | None = None
        self._step = None
        self._hook = None
        self._batch: dict | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.model = model
        self.monitor = Monitor(model, self.out, every=self.every, optimizer=optimizer, rank=args.process_index,
                               **{"loss_fn": model_loss, **self.monitor_kwargs}).__enter__()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        if optimizer is not None and self.monitor.optimizer is None:
            self.monitor.optimizer = optimizer
        self._step = self.monitor.step(step=state.global_step)
        self._step.__enter__()
        if self.every_curvature is not None and state.global_step % self.every_curvature == 0:
            self._hook = self.model.register_forward_pre_hook(self._keep_batch, with_kwargs=True)

    def _keep_batch(self, module, args, kwargs) -> None:
        self._remove_hook()
        self._batch = dict(kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self._close_step()
        batch, self._batch = self._batch, None
        if batch is not None:
            self.monitor.curvature((batch, None), step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._close_step()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _close_step(self) -> None:
        self._remove_hook()
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)
