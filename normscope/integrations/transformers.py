"""A Hugging Face ``TrainerCallback`` that runs :class:`normscope.Monitor` on every optimizer step.

Install with ``pip install "normscope[transformers]"``::

    trainer = Trainer(model, args, train_dataset=data, callbacks=[NormscopeCallback("runs/m1", every=10)])

One monitor step is one optimizer step of the ``Trainer`` (numbered by ``state.global_step``): it
opens at ``on_step_begin`` and closes at ``on_pre_optimizer_step``, so it covers the forward and
backward of every micro-batch of a gradient-accumulation group and reads the lr of the Trainer's
optimizer. Statistics and gradient least squares only: the Trainer does not hand its batches to
callbacks, so curvature (``every_curvature``) is not available here; use
:class:`normscope.Monitor` in your own loop for it.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from normscope.errors import InvalidArgumentError
from normscope.monitor import Monitor


class NormscopeCallback(TrainerCallback):
    """Runs :class:`normscope.Monitor` (``out``, ``every`` and the other keyword arguments as there)
    around each optimizer step of a ``transformers.Trainer``."""

    def __init__(self, out: str | os.PathLike, every: int = 10, **monitor_kwargs: Any) -> None:
        if monitor_kwargs.get("every_curvature") is not None:
            raise InvalidArgumentError("the Trainer does not pass batches to callbacks: curvature needs "
                                       "normscope.Monitor in your own loop (monitor.step((inputs, targets)))")
        self.out, self.every, self.monitor_kwargs = out, every, monitor_kwargs
        self.monitor: Monitor | None = None
        self._step = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.monitor = Monitor(model, self.out, every=self.every, optimizer=optimizer,
                               rank=args.process_index, **self.monitor_kwargs).__enter__()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        if optimizer is not None and self.monitor.optimizer is None:
            self.monitor.optimizer = optimizer
        self._step = self.monitor.step(step=state.global_step)
        self._step.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self._close_step()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._close_step()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def _close_step(self) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.__exit__(None, None, None)
