"""``normscope.Monitor``: watch the normalization sites of a model while it trains."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from normscope.capture import capture
from normscope.capture.sites import matches, module_sites
from normscope.errors import InvalidArgumentError
from normscope.monitor import distributed
from normscope.monitor.curvature import MODEL_SITE, curvature_step
from normscope.monitor.metrics import running_stats, step_rows, steps_rows
from normscope.monitor.store import RecordStore

TENSORBOARD_DIR = "_tensorboard"  # "_": Parquet readers of the run folder skip it
WAITING_PARTITIONS = 2**16  # captured partitions whose rows may wait for the next flush (about 6 MB of sums)
ERROR_METRIC = "error"
MESSAGE_CHARS = 500  # an error row's message (its ``site``) is cut to this length


class Monitor:
    """Context manager around a training loop that records normalization diagnostics per step.

    Every ``every``-th call of :meth:`step`, the step's own forward and backward run under
    :func:`normscope.capture` with ``storage="reductions"`` (no extra pass): per-site norm
    statistics and gradient least squares (:mod:`normscope.monitor.metrics`), computed from the
    captured sums of all steps since the last flush at once (in one process; per step under
    ``torch.distributed``). Every
    ``every_curvature``-th step, on that step's batch: a_crit of the step against the lr and lambda_max
    (warm-started from the previous curvature step), and on every ``curvature_full_every``-th
    curvature step also the trace and the a_crit of the layers the step moves most, with the
    Hessian-vector products spent and a row ``curvature_full`` (1.0 on full steps, 0.0 else)
    (:mod:`normscope.monitor.curvature`); this needs the batch, passed to :meth:`step`. Rows ``(step, rank, site, metric, value)`` go to a Parquet dataset in ``out``
    (``pandas.read_parquet(out)``), flushed as complete files every ``flush_seconds`` and on exit,
    and, with ``tensorboard=True``, to ``out/_tensorboard`` as ``normscope/<metric>/<site>``.

    The monitor never changes training: the capture keeps only sums, the curvature works on a
    private copy with the random state forked, and nothing is written to parameters, buffers,
    ``.grad`` or the optimizer.

    The monitor never raises into the training loop for its own failures (a curvature that does not
    converge, rows that cannot be computed or written): each is a row ``metric="error"`` whose
    ``site`` is the message (``"<part>: <exception>: <text>"``, value 1.0), with a warning the first
    time a part fails, and training goes on. Misuse (a curvature step without its batch) still raises.
    On every recorded step it also looks for

    * non-finite gradients: a row ``(layer, "nonfinite_gradient", 1.0)`` for every layer whose ``.grad``
      holds a NaN or an infinity (the first such step is where they started, to within ``every``);
    * normalization sites added, removed or replaced (a module swapped in under the same name, e.g.
      ``model[2] = nn.BatchNorm1d(16)``): rows ``site_added``, ``site_removed``, ``site_replaced``
      (1.0) at the first recorded step after the change, a warning, and the sites now there recorded from then on.

    A run folder only ever gains rows. Entering a monitor again (the same one, or a new one on the
    same folder: a second ``with``, a second ``trainer.fit``, a notebook cell run twice) resumes the
    run: its rows go to a fresh segment of part files (:mod:`normscope.monitor.store`), and, unless
    :meth:`step` is given the step, a new monitor numbers its steps on from the last step in the folder.

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
        curvature_layers: which layers' a_crit to compute on full curvature steps, one
            Hessian-vector product each: fnmatch patterns on layer names, an int ``k`` for the ``k``
            layers the step moves most (largest ``||d_g||``, so the layers can change from one
            curvature step to the next) or ``None`` for every layer. Default: 2.
        curvature_samples: Hutchinson products for the trace on full curvature steps (0: no trace). Default: 4.
        curvature_full_every: every ``k``-th curvature step this monitor measures, from its first
            (steps ``0, k m, 2 k m, ...`` for ``every_curvature=m`` from step 0), is full: the trace
            and the layers' a_crit besides lambda_max and the step's a_crit (``1``: every curvature
            step full). Default: 10.
        curvature_tol: lambda_max's Lanczos run stops when its error bound is at most
            ``curvature_tol * lambda_max`` (the bound is the ``lambda_max_error`` row). Default: 0.05,
            ample against the lr for ``2 / lambda_max``.
        tensorboard: also write TensorBoard scalars. Default: False.
        flush_seconds: write buffered rows at most this often (0: every recorded step). Default: 10.
        rank: the process rank written with each row. Under ``torch.distributed`` with more than one
            rank, rank 0 gathers and writes every rank's rows and the spread of running statistics
            between ranks (:mod:`normscope.monitor.distributed`); the other ranks write nothing.

    Cost of a curvature step, in Hessian-vector products (the ``products`` row): one gradient
    with its graph kept, then lambda_max (warm-started: 2 once the top direction settles, 4-6 while
    it moves fast early in training, about 12 from a cold start; the ``lambda_max_products`` row) and
    1 for the step's a_crit; a full step also ``curvature_layers`` + ``curvature_samples`` (2 + 4).
    On the reference ResNet at batch 128 on CPU a product costs about 2.8 forward-backward passes
    (double backward through its convolutions and training-mode BatchNorms), so a settled default
    curvature step (3 products) costs about 10 training steps and a full one (9) about 29 (measured
    at 1 thread, CPU time: 12.8 steps with 4 products, 31.9 with 10).

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
        curvature_full_every: int = 10,
        curvature_tol: float = 0.05,
        tensorboard: bool = False,
        flush_seconds: float = 10.0,
        rank: int = 0,
    ) -> None:
        if every < 0 or (every_curvature is not None and every_curvature < 1):
            raise InvalidArgumentError(f"every must be >= 0 and every_curvature >= 1 (got {every}, {every_curvature})")
        if not 0 < curvature_tol < 1:
            raise InvalidArgumentError(f"curvature_tol must be in (0, 1) (got {curvature_tol})")
        if curvature_full_every < 1:
            raise InvalidArgumentError(f"curvature_full_every must be >= 1 (got {curvature_full_every})")
        if curvature_samples == 1 or curvature_samples < 0:
            raise InvalidArgumentError(f"curvature_samples must be 0 (no trace) or at least 2 for a standard error (got {curvature_samples})")
        self.model, self.out = model, Path(out)
        self.every, self.every_curvature = every, every_curvature
        self.optimizer, self.lr, self.loss_fn = optimizer, lr, loss_fn
        self.sites, self.kinds, self.functional = sites, kinds, functional
        self.curvature_layers, self.curvature_samples = curvature_layers, curvature_samples
        self.curvature_full_every, self.curvature_tol = curvature_full_every, curvature_tol
        self.tensorboard, self.flush_seconds, self.rank = tensorboard, flush_seconds, rank
        self.gathering = distributed.active()
        if self.gathering:
            self.rank = distributed.dist.get_rank()
        self.steps = 0
        self._lr_step: int | None = None  # the last step whose lr row is written
        self._waiting: list[tuple[int, list, dict]] = []  # captured steps whose rows are computed at the next flush
        self._waiting_partitions = 0
        self._curvatures = 0  # curvature steps measured: every curvature_full_every-th is full
        self._ritz: torch.Tensor | None = None  # lambda_max's last Ritz vector: the next curvature step starts there
        # one capture entered on every statistics step: the sites are found and their readings
        # verified once; steps that record nothing install no hooks
        self._capture = capture(model, sites=sites, kinds=kinds, storage="reductions", functional=functional, preserve=False,
                                links=False)
        self._modules: dict[str, int] = {}  # module path -> id of the module, when the sites were last read
        self._sites: dict[str, int] = {}  # site name -> id of its module
        self._warned: set[str] = set()
        self.store: RecordStore | None = None
        self._entered = False
        self._writer = None

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> "Monitor":
        self.store = RecordStore(self.out, self.flush_seconds, self.rank) if self.rank == 0 or not self.gathering else None
        if self.steps == 0:
            self.steps = self._resumed_steps()
        self._entered = True
        if self.tensorboard and self.store is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out / TENSORBOARD_DIR / f"rank{self.rank}"))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Write what is buffered and close TensorBoard (a failure to write is a warning, not an error)."""
        self._compute_waiting()
        if self.store is not None:
            with self._own(None, "store"):
                self.store.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._entered = False

    def _resumed_steps(self) -> int:
        """Where a new monitor's step count starts: after the last step already in the folder (0 for
        a new folder); under ``torch.distributed`` rank 0's count, on every rank."""
        last = self.store.last_step() if self.store is not None else None
        start = 0 if last is None else last + 1
        if self.gathering:
            shared = [start]
            distributed.dist.broadcast_object_list(shared, src=0)
            start = shared[0]
        return start

    # -- the monitor's own failures ----------------------------------------------------------
    @contextlib.contextmanager
    def _own(self, step: int | None, part: str) -> Iterator[None]:
        """Run a part of the monitor's own work: an ``Exception`` in it becomes an error row of
        ``step`` (:meth:`failed`) instead of reaching the training loop."""
        try:
            yield
        except Exception as exc:  # the monitor's own failure: recorded, training goes on
            self.failed(step, part, exc)

    def failed(self, step: int | None, part: str, exc: BaseException) -> None:
        """Record ``exc`` from ``part`` of the monitor as the row ``(message, "error", 1.0)`` of
        ``step`` (the last step when ``None``) and warn the first time ``part`` fails."""
        message = f"{part}: {type(exc).__name__}: {exc}"[:MESSAGE_CHARS]
        if part not in self._warned:
            self._warned.add(part)
            warnings.warn(f"normscope.Monitor: {message} (recorded as an error row; training goes on; "
                          "later failures of this part are recorded without a warning)", RuntimeWarning, stacklevel=4)
        if part == "store" or self.store is None:
            return
        try:
            self.store.append(max(self.steps - 1, 0) if step is None else step, [(message, ERROR_METRIC, 1.0)])
        except Exception:  # the store itself fails: the warning above is all that can be said
            pass

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
        self.steps = index + 1
        curvature, stats = self.wants_curvature(index), self.wants_stats(index)
        if curvature and batch is None:
            raise InvalidArgumentError(f"step {index} measures curvature (every_curvature={self.every_curvature}): "
                                       "pass the batch, monitor.step((inputs, targets))")
        if curvature or stats:
            with self._own(index, "lr"):
                self._record_lr(index)
        if curvature:
            self.curvature(batch, loss_fn, step=index)
        session = None
        if stats:
            with self._own(index, "capture"):
                modules = list(self.model.named_modules())  # one walk of the tree for the step
                running = running_stats(self.model, modules)
                self._check_sites(index, modules)
                session = self._capture.__enter__()
        if session is None:
            yield
            return
        try:
            yield
        except BaseException:  # the user's own error: the hooks go, the error goes on to the loop
            with self._own(index, "capture"):
                session.__exit__(None, None, None)
            raise
        closed = False
        with self._own(index, "capture"):
            session.__exit__(None, None, None)
            closed = True
        with self._own(index, "gradients"):
            nonfinite = nonfinite_gradient_rows(self.model, modules)
            if nonfinite or self.gathering:  # record is a collective under torch.distributed
                self.record(index, nonfinite)
        if closed:
            with self._own(index, "rows"):
                self._after_capture(index, session, running)

    def _after_capture(self, index: int, cap, running: dict) -> None:
        """The rows of a captured step: now under ``torch.distributed``, else at the next flush."""
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

    def _check_sites(self, step: int, named: list[tuple[str, nn.Module]]) -> None:
        """Compare the model's normalization sites with those of the last recorded step: rows
        ``site_added``, ``site_removed`` and ``site_replaced`` (another module under the same name) and a
        warning. The module tree is compared first (one walk); when it changed, a new capture reads it."""
        modules = {name: id(m) for name, m in named}
        if modules == self._modules:
            return
        sites = {name: id(m) for name, m, how in module_sites(self.model)
                 if matches(name, how.kind.name, self.sites, self.kinds)}
        if self._modules:  # a new capture reads the new module tree (producers and consumers too)
            self._capture = capture(self.model, sites=self.sites, kinds=self.kinds, storage="reductions",
                                    functional=self.functional, preserve=False, links=False)
            rows = [(name, "site_added", 1.0) for name in sites.keys() - self._sites.keys()]
            rows += [(name, "site_removed", 1.0) for name in self._sites.keys() - sites.keys()]
            rows += [(name, "site_replaced", 1.0) for name in sites.keys() & self._sites.keys() if sites[name] != self._sites[name]]
            if rows:
                self.record(step, rows)
                changes = ", ".join(f"{site} {metric.removeprefix('site_')}" for site, metric, _ in rows)
                warnings.warn(f"normscope.Monitor: the model's normalization sites changed at step {step}: {changes}; "
                              "recorded as rows, the sites now there are watched from this step", RuntimeWarning, stacklevel=5)
        self._modules, self._sites = modules, sites

    def _compute_waiting(self) -> None:
        """The rows of the captured steps waiting since the last flush, in one computation
        (:func:`~normscope.monitor.metrics.steps_rows`: the same rows as step by step)."""
        if not self._waiting:
            return
        waiting, self._waiting, self._waiting_partitions = self._waiting, [], 0
        try:
            computed = steps_rows(waiting)
        except Exception:  # one step's sums spoil the lot: each step alone, the failing ones as error rows
            computed = {}
            for index, records, running in waiting:
                with self._own(index, "rows"):
                    computed.update(steps_rows([(index, records, running)]))
        with self._own(None, "store"):
            for index, rows in computed.items():
                self.record(index, rows)

    def curvature(self, batch: tuple, loss_fn: Callable | None = None, step: int | None = None) -> None:
        """Record the curvature rows of ``batch = (inputs, targets)`` at the model's parameters now
        (:func:`~normscope.monitor.curvature.curvature_step`), with the lr, as step ``step`` (default:
        the last step). :meth:`step` calls it on every ``every_curvature``-th step before the forward;
        an integration that sees the batch only in the forward (the Hugging Face Trainer) calls it
        before the optimizer's step. ``inputs`` may be a dict of keyword arguments, and ``targets``
        ``None`` for a ``loss_fn`` that reads the model's own loss (:func:`normscope.losses.model_loss`).
        A failure is an error row (see the class), not an exception."""
        index = self.steps - 1 if step is None else int(step)
        with self._own(index, "lr"):
            self._record_lr(index)
        full = self._curvatures % self.curvature_full_every == 0  # the first, then every k-th
        self._curvatures += 1
        with self._own(index, "curvature"):
            rows, self._ritz = curvature_step(self.model, batch[0], batch[1], loss_fn or self.loss_fn, self.optimizer,
                                              self.current_lr(), self.curvature_layers if full else 0,
                                              self.curvature_samples if full else 0, self.curvature_tol, seed=index,
                                              start=self._ritz)
            self.record(index, [*rows, (MODEL_SITE, "curvature_full", float(full))])

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


def nonfinite_gradient_rows(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> list[tuple[str, str, float]]:
    """``(layer, "nonfinite_gradient", 1.0)`` for every layer (module path) with a NaN or an infinity in a
    parameter's ``.grad``: one fused norm over all gradients, and the layers only when it is not finite.
    ``modules``: ``list(model.named_modules())`` when the caller has walked the tree already."""
    named = model.named_modules() if modules is None else modules
    grads = [p.grad for _, m in named for p in m._parameters.values() if p is not None and p.grad is not None]
    if not grads or torch.nn.utils.get_total_norm(grads, foreach=True).isfinite():
        return []
    layers = dict.fromkeys(name.rpartition(".")[0] for name, p in model.named_parameters()
                           if p.grad is not None and not torch.isfinite(p.grad).all())
    return [(layer or MODEL_SITE, "nonfinite_gradient", 1.0) for layer in layers]
