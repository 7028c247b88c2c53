"""The one training loop: the built-in default training, ``normscope train`` and ``compare``.

:func:`train_loop` runs SGD steps over given minibatches (backprop or two-stage backprop,
"Extreme Normalization" (under review) §3.2), with the EMA-only steps a model's ops ask for
(:mod:`normscope.ops.ema`), a constant or cosine learning rate, an optional context around each
step (the monitor's), a stop at the first non-finite loss, and progress (:func:`progress`: Rich
bars on a terminal, one line per epoch elsewhere). :func:`train_reference` (the built-in default),
:func:`normscope.monitor.demo.train_monitored` (``normscope train``) and
:func:`normscope.compare.train_run` (``compare`` and the reproduction harness) are thin callers.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope.analyzers import no_progress
from normscope.data import digits_loader
from normscope.errors import InvalidArgumentError
from normscope.models import DEFAULT_MODEL, build_model
from normscope.ops.ema import EmaSchedule, ema_only_step, ema_schedule
from normscope.ops.two_stage import two_stage_step

TRAINERS = ("backprop", "two_stage")
LR_SCHEDULES = ("constant", "cosine")
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


@dataclass
class StepInfo:
    """One weight update as :func:`train_loop` reports it to ``on_step``: its number (from 1),
    the epoch it ends (fractional), its loss, the model's outputs (None for two-stage), the batch."""

    step: int
    epoch: float
    loss: Tensor
    outputs: Tensor | None
    targets: Tensor


@dataclass
class LoopResult:
    """What a run did: updates made, seconds per update (the first, with one-time warm-up, apart),
    EMA-only steps and their seconds, and whether it stopped at a non-finite loss."""

    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)
    ema_steps: int = 0
    ema_seconds: float = 0.0
    diverged: bool = False


def train_loop(
    model: nn.Module,
    batches: Iterable[Batch],
    steps: int,
    lr: float,
    *,
    per_epoch: int | None = None,
    momentum: float = 0.9,
    lr_schedule: str = "constant",
    loss_fn: LossFn = F.cross_entropy,
    trainer: str = "backprop",
    chunk_size: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    ema: EmaSchedule | None = None,
    ema_inputs: Iterator[Tensor] | None = None,
    step_context: Callable[[Batch], ContextManager] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    track: Callable[..., Iterator] = no_progress,
    description: str = "",
    on_epoch: Callable[[int, int, float, float], None] | None = None,
) -> LoopResult:
    """Train ``model`` in place for at most ``steps`` updates on ``batches`` and return what it did.

    Each update: ``zero_grad``; the gradient of ``loss_fn(model(x), y)`` by backprop (inside
    ``step_context((x, y))`` when given) or by two-stage backprop
    (:func:`~normscope.ops.two_stage.two_stage_step`, chunks of ``chunk_size``); ``optimizer.step()``
    (default SGD with ``momentum``); then, with a finite loss, the EMA-only steps ``ema`` asks for
    after this update, on ``ema_inputs``. ``ema.warmup`` EMA-only steps come before the first update
    (default schedule: :func:`~normscope.ops.ema.ema_schedule` of the model). ``lr_schedule``
    ``"cosine"`` decays the learning rate from ``lr`` to 0 over ``steps`` updates
    (``CosineAnnealingLR``). The loop stops after the first update with a non-finite loss.
    ``per_epoch`` updates make an epoch (for ``StepInfo.epoch`` and ``on_epoch(epoch, epochs,
    mean loss, seconds)``, called after each full epoch and after the last update).
    """
    if trainer not in TRAINERS:
        raise InvalidArgumentError(f"trainer must be one of {', '.join(TRAINERS)} (got {trainer!r})")
    if lr_schedule not in LR_SCHEDULES:
        raise InvalidArgumentError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {lr_schedule!r})")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum) if optimizer is None else optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0) if lr_schedule == "cosine" else None
    ema = ema_schedule(model) if ema is None else ema
    result = LoopResult()
    per_epoch = per_epoch or steps
    epochs = math.ceil(steps / per_epoch)

    def ema_steps(number: int) -> None:
        if number == 0:
            return
        if ema_inputs is None:
            raise InvalidArgumentError("the model's ops ask for EMA-only steps; pass ema_inputs")
        start = time.perf_counter()
        for _ in range(number):
            inputs = next(ema_inputs)
            ema_only_step(model, lambda m: m(inputs))
        result.ema_seconds += time.perf_counter() - start
        result.ema_steps += number

    model.train()
    ema_steps(ema.warmup)
    epoch_losses: list[Tensor] = []
    epoch_start = time.perf_counter()
    for step, (inputs, targets) in enumerate(track(batches, description, steps), start=1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        outputs = None
        if trainer == "two_stage":
            loss = torch.tensor(two_stage_step(model, inputs, targets, loss_fn, chunk_size))
        else:
            with step_context((inputs, targets)) if step_context is not None else contextlib.nullcontext():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
                loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        result.step_seconds.append(time.perf_counter() - start)
        result.steps = step
        finite = bool(torch.isfinite(loss))
        if finite:
            ema_steps(ema.after(step))
        epoch_losses.append(loss.detach())
        if on_step is not None:
            on_step(StepInfo(step, step / per_epoch, loss.detach(), None if outputs is None else outputs.detach(), targets))
        last = not finite or step == steps
        if on_epoch is not None and (step % per_epoch == 0 or last):
            on_epoch(math.ceil(step / per_epoch), epochs, float(torch.stack(epoch_losses).mean()), time.perf_counter() - epoch_start)
            epoch_losses, epoch_start = [], time.perf_counter()
        if last:
            result.diverged = not finite
            break
    return result


def epoch_line(description: str) -> Callable[[int, int, float, float], None]:
    """An ``on_epoch`` that prints ``normscope: <description> epoch e/E: loss L (s s)`` to stderr."""

    def report(epoch: int, epochs: int, loss: float, seconds: float) -> None:
        print(f"normscope: {description} epoch {epoch}/{epochs}: loss {loss:.4f} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    return report


@contextlib.contextmanager
def progress(description: str, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """``train_loop`` keyword arguments for progress: a Rich bar over the updates on a terminal,
    one line per epoch on stderr elsewhere (a log, CI), nothing when not ``enabled``."""
    if not enabled:
        yield {}
        return
    if sys.stderr.isatty():
        from normscope.api import progress_bars

        with progress_bars(True) as track:
            yield {"track": track, "description": description}
        return
    yield {"on_epoch": epoch_line(description)}


def train_reference(
    name: str = DEFAULT_MODEL,
    epochs: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 0.05,
    show_progress: bool = False,
) -> nn.Module:
    """Train the reference model ``name`` on the digits' training split and return it in eval mode.

    Minimizes the cross-entropy with SGD (momentum 0.9, learning rate ``lr``) for ``epochs`` passes
    over the first 1400 digits in seeded minibatches of ``batch_size`` (:func:`train_loop`). Weights,
    batch order and the result depend only on ``seed``; the global random state is left as it was.

    Args:
        name: a name from :data:`normscope.models.MODELS`. Default: ``"mlp_bn"``.
        epochs: passes over the training split. Default: 8.
        batch_size: minibatch size. Default: 64.
        seed: seed of the initial weights and of the batch order. Default: 0.
        lr: SGD learning rate. Default: 0.05.
        show_progress: progress on stderr (:func:`progress`). Default: False.
    """
    model = build_model(name, seed=seed)
    loader = digits_loader(batch_size=batch_size, seed=seed, split="train", drop_last=True)
    with torch.random.fork_rng(), progress(f"training {name}", show_progress) as shown:
        torch.manual_seed(seed)
        train_loop(model, epoch_batches(loader, epochs), epochs * len(loader), lr, per_epoch=len(loader), **shown)
    model.zero_grad(set_to_none=True)
    return model.eval()


def epoch_batches(loader: Iterable[Batch], epochs: int) -> Iterator[Batch]:
    """The loader's batches, ``epochs`` passes in a row (a seeded loader reshuffles each pass)."""
    for _ in range(epochs):
        yield from loader
