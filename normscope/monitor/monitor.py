"""``normscope.Monitor``: watch the normalization sites of a model while it trains."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from normscope.capture import capture
from normscope.errors import InvalidArgumentError
from normscope.monitor import distributed
from normscope.monitor.curvature import MODEL_SITE, curvature_step
from normscope.monitor.metrics import running_stats, step_rows, steps_rows
from normscope.monitor.store import RecordStore

TENSORBOARD_DIR = "_tensorboard"  # "_": Parquet readers of the run folder skip it
WAITING_PARTITIONS = 2**16  # captured partitions whose rows may wait for the next flush (about 6 MB of sums)


class Monitor:
    """Context manager around a training loop that records normalization diagnostics per step.

    Every ``every``-th call of :meth:`step`, the step's own forward and backward run under
    :func:`normscope.capture` with ``storage="reductions"`` (no extra pass): per-site norm
    statistics and gradient least squares (:mod:`normscope.monitor.metrics`), computed from the
    captured sums of all steps since the last flush at once (in one process; per step under
    ``torch.distributed``). Every
    ``every_curvature``-th step, on that step's batch: a_crit of the step and of the layers it moves
    most against the lr, lambda_max (warm-started from the previous curvature step) and the trace,
    with the Hessian-vector products spent (:mod:`normscope.monitor.curvature`); this needs the batch, passed to
    :meth:`step`. Rows ``(step, rank, site, metric, value)`` go to a Parquet dataset in ``out``
    (``pandas.read_parquet(out)``), flushed as complete files every ``flush_seconds`` and on exit,
    and, with ``tensorboard=True``, to ``out/_tensorboard`` as ``normscope/<metric>/<site>``.

    The monitor never changes training: the capture keeps only sums, the curvature works on a
    private copy with the random state forked, and nothing is written to parameters, buffers,
    ``.grad`` or the optimizer.

    Args:
        model: the module being trained (the one whose forward runs inside :meth:`step`).
        out: the run folder. Created if missing.
        every: statistics and GLS every ``every`` steps (0: never). Default: 10.
        every_curvature: curvature every ``m`` steps (``None``: never). Default: None.
        optimizer: read its learning rate, and check its update direction, on curvature steps.
        lr: the learning rate to check against when no optimizer is given.
        loss_fn: ``loss_fn(model(inputs), targets)`` for the curvature. Default: cross-entropy.
        sites, kinds: which sites to record (as in :func:`normscope.capture`).
        functional: also record functional norm calls (costs a Python dispatch per torch call).
            Default: False.
        curvature_layers: which layers' a_crit to compute, one Hessian-vector product (2-3
            training steps) each: fnmatch patterns on layer names, an int ``k`` for the ``k``
            layers the step moves most (largest ``||d_g||``, so the layers can change from one
            curvature step to the next) or ``None`` for every layer. Default: 2.
        curvature_samples: Hutchinson products for the trace (0: no trace). Default: 4. A product costs
            about two training steps (the reference ResNet: 46-62 ms against 25 ms); with the defaults a
            curvature step spends about 9 (2 for lambda_max warm-started, 1 + 2 for a_crit, 4 for the trace).
        tensorboard: also write TensorBoard scalars. Default: False.
        flush_seconds: write buffered rows at most this often (0: every recorded step). Default: 10.
        rank: the process rank written with each row. Under ``torch.distributed`` with more than one
            rank, rank 0 gathers and writes every rank's rows and the spread of running statistics
            between ranks (:mod:`normscope.monitor.distributed`); the other ranks write nothing.

    Example:
        >>> with normscope.Monitor(model, out="runs/m1", every=10, every_curvature=100, optimizer=opt) as monitor:
        ...     for x, y in loader:
        ...         with monitor.step((x, y)):
        ...             F.cross_entropy(model(x), y).backward()
        ...         opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | os.PathLike,
        every: int = 10,
        every_curvature: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        loss_fn: Callable = F.cross_entropy,
        sites: str | Iterable[str] | None = None,
        kinds: str | Iterable[str] | None = None,
        functional: bool = False,
        curvature_layers: str | Iterable[str] | int | None = 2,
        curvature_samples: int = 4,
        tensorboard: bool = False,
        flush_seconds: float = 10.0,
        rank: int = 0,
    ) -> None:
        if every < 0 or (every_curvature is not None and every_curvature < 1):
            raise InvalidArgumentError(f"every must be >= 0 and every_curvature >= 1 (got {every}, {every_curvature})")
        if curvature_samples == 1 or curvature_samples < 0:
            raise InvalidArgumentError(f"curvature_samples must be 0 (no trace) or at least 2 for a standard error (got {curvature_samples})")
        self.model, self.out = model, Path(out)
        self.every, self.every_curvature = every, every_curvature
        self.optimizer, self.lr, self.loss_fn = optimizer, lr, loss_fn
        self.sites, self.kinds, self.functional = sites, kinds, functional
        self.curvature_layers, self.curvature_samples = curvature_layers, curvature_samples
        self.tensorboard, self.flush_seconds, self.rank = tensorboard, flush_seconds, rank
        self.gathering = distributed.active()
        if self.gathering:
            self.rank = distributed.dist.get_rank()
        self.steps = 0
        self._lr_step: int | None = None  # the last step whose lr row is written
        self._waiting: list[tuple[int, list, dict]] = []  # captured steps whose rows are computed at the next flush
        self._waiting_partitions = 0
        self._ritz: torch.Tensor | None = None  # lambda_max's last Ritz vector: the next curvature step starts there
        # one capture entered on every statistics step: the sites are found and their readings
        # verified once; steps that record nothing install no hooks
        self._capture = capture(model, sites=sites, kinds=kinds, storage="reductions", functional=functional, preserve=False)
        self.store: RecordStore | None = None
        self._entered = False
        self._writer = None

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> "Monitor":
        self.store = RecordStore(self.out, self.flush_seconds, self.rank) if self.rank == 0 or not self.gathering else None
        self._entered = True
        if self.tensorboard and self.store is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out / TENSORBOARD_DIR / f"rank{self.rank}"))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write what is buffered and close TensorBoard."""
        self._compute_waiting()
        if self.store is not None:
            self.store.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- one step --------------------------------------------------------------------------
    def wants_stats(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def wants_curvature(self, step: int) -> bool:
        return self.every_curvature is not None and step % self.every_curvature == 0

    @contextlib.contextmanager
    def step(self, batch: tuple | None = None, loss_fn: Callable | None = None, step: int | None = None) -> Iterator[None]:
        """Wrap one training step's forward and backward.

        ``batch``: ``(inputs, targets)`` of the step, needed on curvature steps (the curvature is
        measured on this batch, at the parameters before the optimizer's step). ``loss_fn``
        overrides the monitor's for this step. ``step``: the step number to record (default: the
        count of calls so far, from 0).
        """
        if not self._entered:
            raise InvalidArgumentError("use the monitor as a context manager: with normscope.Monitor(...) as monitor")
        index = self.steps if step is None else int(step)
        self.steps += 1
        curvature, stats = self.wants_curvature(index), self.wants_stats(index)
        if curvature or stats:
            self._record_lr(index)
        if curvature:
            if batch is None:
                raise InvalidArgumentError(f"step {index} measures curvature (every_curvature={self.every_curvature}): "
                                           "pass the batch, monitor.step((inputs, targets))")
            self.curvature(batch, loss_fn, step=index)
        if not stats:
            yield
            return
        running = running_stats(self.model)
        with self._capture as cap:
            yield
        if self.gathering:  # every rank computes and gathers now: the collectives run in step
            after = distributed.gather(running_stats(self.model))
            eps = {r.site.name: r.layout.eps for r in cap.records}
            if self.rank == 0:
                self.store.append(index, distributed.running_spread_rows(after, eps), rank=distributed.ALL_RANKS)
            self.record(index, step_rows(cap.records, running))
            return
        self._waiting.append((index, cap.records, running))
        self._waiting_partitions += sum(r.reductions["n"].numel() for r in cap.records)
        if self.store.due() or self._waiting_partitions > WAITING_PARTITIONS:
            self._compute_waiting()

    def _compute_waiting(self) -> None:
        """The rows of the captured steps waiting since the last flush, in one computation
        (:func:`~normscope.monitor.metrics.steps_rows`: the same rows as step by step)."""
        if not self._waiting:
            return
        for index, rows in steps_rows(self._waiting).items():
            self.record(index, rows)
        self._waiting, self._waiting_partitions = [], 0

    def curvature(self, batch: tuple, loss_fn: Callable | None = None, step: int | None = None) -> None:
        """Record the curvature rows of ``batch = (inputs, targets)`` at the model's parameters now
        (:func:`~normscope.monitor.curvature.curvature_step`), with the lr, as step ``step`` (default:
        the last step). :meth:`step` calls it on every ``every_curvature``-th step before the forward;
        an integration that sees the batch only in the forward (the Hugging Face Trainer) calls it
        before the optimizer's step. ``inputs`` may be a dict of keyword arguments, and ``targets``
        ``None`` for a ``loss_fn`` that reads the model's own loss (:func:`normscope.losses.model_loss`)."""
        index = self.steps - 1 if step is None else int(step)
        self._record_lr(index)
        rows, self._ritz = curvature_step(self.model, batch[0], batch[1], loss_fn or self.loss_fn, self.optimizer,
                                          self.current_lr(), self.curvature_layers, self.curvature_samples, seed=index,
                                          start=self._ritz)
        self.record(index, rows)

    def _record_lr(self, step: int) -> None:
        """The lr row of ``step``, once per step."""
        lr = self.current_lr()
        if lr is not None and step != self._lr_step:
            self._lr_step = step
            self.record(step, [(MODEL_SITE, "lr", lr)])

    def current_lr(self) -> float | None:
        """The optimizer's learning rate (first parameter group), else the monitor's ``lr``."""
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return self.lr

    def record(self, step: int, rows: list[tuple[str, str, float]]) -> None:
        """Append rows of one step to the dataset (and TensorBoard); under ``torch.distributed``
        every rank's rows go to rank 0's dataset (a collective: all ranks call it alike)."""
        if self.gathering:
            per_rank = distributed.gather(rows)
            if self.store is not None:
                for rank, part in enumerate(per_rank):
                    self.store.append(step, part, rank=rank)
        else:
            self.store.append(step, rows)
        if self._writer is not None:
            for site, metric, value in rows:
                self._writer.add_scalar(f"normscope/{metric}/{site}", value, step)
