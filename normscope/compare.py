"""Normalization ops side by side: the same model, data, seed and batch order, one short run per op
and batch size (the small-batch comparisons of "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) App. C, Table 2, and "Extreme Normalization" (under review) §4, at small scale).

Each op is swapped into a copy of the model in place of its BatchNorms
(:func:`normscope.ops.swap.swap_norms`) and trained with SGD (momentum 0.9) on the same seeded
minibatches; the learning rate follows the linear scaling rule ``lr * B / reference_batch_size``
(Goyal et al. 2017). The tables are ``compare_curves`` and ``compare_summary`` of ``docs/tables.md``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from normscope.analyzers import AnalyzerOutput, no_progress
from normscope.api import floating_dtype, model_device
from normscope.data import load_digits
from normscope.errors import DataShapeError, InvalidArgumentError
from normscope.models import build_model
from normscope.ops.factory import NormSpec, get_norm
from normscope.ops.swap import swap_norms

DEFAULT_OPS = ("bn", "median", "renorm", "population")
Data = tuple[Tensor, Tensor, Tensor, Tensor]


def op_label(op: NormSpec) -> str:
    """The name an op has in the tables: its factory name, or its class name."""
    if isinstance(op, str):
        return op.strip().lower().replace("-", "_")
    func = getattr(op, "func", op)
    return getattr(func, "__name__", repr(op))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` in eval mode on ``(inputs, targets)``; the flag is put back."""
    training = model.training
    model.eval()
    try:
        outputs = model(inputs)
    finally:
        model.train(training)
    return float(loss_fn(outputs, targets)), float((outputs.argmax(dim=1) == targets).double().mean())


def train_run(
    model: nn.Module,
    data: Data,
    batch_size: int,
    steps: int,
    lr: float,
    seed: int,
    points: int = 10,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    track: Callable[..., Iterator] = no_progress,
    description: str = "",
) -> list[dict[str, Any]]:
    """Train ``model`` in place for ``steps`` SGD steps (momentum 0.9, learning rate ``lr``) on
    minibatches of ``batch_size`` drawn in a ``seed``-determined order (the last partial batch of an
    epoch is dropped) and return curve rows.

    At ``points`` evenly spaced steps (and the last) two rows: ``train`` with the mean loss and
    accuracy of the training minibatches since the previous row (training mode, before each update),
    and ``test`` from :func:`evaluate` on the test split. A run whose loss becomes NaN or Inf stops
    there; its last rows carry the non-finite loss.
    """
    train_x, train_y, test_x, test_y = data
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
    per_epoch = len(loader)
    marks = {max(1, round(steps * k / points)) for k in range(1, points + 1)} | {steps}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    rows: list[dict[str, Any]] = []
    losses: list[Tensor] = []
    hits: list[Tensor] = []
    batches = (batch for _ in range(math.ceil(steps / per_epoch)) for batch in loader)
    model.train()
    for step, (inputs, targets) in enumerate(track(batches, description, steps), start=1):
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        hits.append((outputs.detach().argmax(dim=1) == targets).double().mean())
        finite = bool(torch.isfinite(loss))
        if step in marks or not finite:
            epoch = step / per_epoch
            rows.append(dict(step=step, epoch=epoch, split="train", loss=float(torch.stack(losses).mean()), accuracy=float(torch.stack(hits).mean())))
            test_loss, test_accuracy = evaluate(model, test_x, test_y, loss_fn)
            rows.append(dict(step=step, epoch=epoch, split="test", loss=test_loss, accuracy=test_accuracy))
            losses, hits = [], []
        if not finite or step == steps:
            break
    return rows


def default_data(device: torch.device, dtype: torch.dtype) -> Data:
    """The digits: the first 1400 images for training, the other 397 for testing."""
    train_x, train_y = load_digits(dtype=dtype, split="train")
    test_x, test_y = load_digits(dtype=dtype, split="test")
    return train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device)


def compare(
    model: nn.Module | str = "mlp_bn",
    ops: Sequence[NormSpec] = DEFAULT_OPS,
    batch_sizes: Sequence[int] = (2, 32),
    epochs: float = 1.0,
    steps: int | None = 300,
    lr: float = 0.05,
    reference_batch_size: int = 32,
    seed: int = 0,
    data: Data | None = None,
    points: int = 10,
    op_options: dict[str, dict[str, Any]] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: torch.device | str | None = None,
    track: Callable[..., Iterator] = no_progress,
) -> AnalyzerOutput:
    """Train each op swapped into ``model`` at each batch size and return the comparison tables.

    For each batch size B and op: a copy of ``model`` with its BatchNorms replaced by the op
    (``op="bn"`` keeps torch's BatchNorm: the baseline), trained for
    ``min(steps, epochs * (n_train // B))`` SGD steps (momentum 0.9) with learning rate
    ``lr * B / reference_batch_size`` on minibatches in the same ``seed``-determined order, from
    the same initial weights. ``model`` itself is never changed.

    Args:
        model: a built-in model name (built with ``torch.manual_seed(seed)``) or an ``nn.Module``
            whose weights are the common starting point. Default: ``"mlp_bn"``.
        ops: op names (:data:`normscope.ops.factory.NORMS`), classes or partials. Default: bn, median, renorm, population.
        batch_sizes: minibatch sizes, each at least 2. Default: (2, 32).
        epochs: passes over the training data per run. Default: 1.0.
        steps: cap on the steps per run (None: no cap). Default: 300.
        lr: SGD learning rate at ``reference_batch_size``. Default: 0.05.
        reference_batch_size: batch size at which ``lr`` applies unscaled. Default: 32.
        seed: seed of the initial weights of a built-in model and of the batch order. Default: 0.
        data: ``(train_inputs, train_targets, test_inputs, test_targets)``; the digits by default.
        points: curve points per run. Default: 10.
        op_options: constructor options per op label, e.g. ``{"median": {"backward": "smoothed"}}``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``. Default: cross-entropy.
        device: where to train; the model's device by default.
        track: progress wrapper ``track(iterable, description, total)``, as ``AnalysisContext.track``.

    Returns:
        :class:`~normscope.analyzers.AnalyzerOutput` with tables ``compare_curves`` (op,
        batch_size, step, epoch, split, loss, accuracy) and ``compare_summary`` (op, batch_size,
        final_train_loss, final_test_loss, final_test_accuracy, seconds, steps, lr, diverged),
        findings and headline figures.
    """
    for b in batch_sizes:
        if not (isinstance(b, int) and b >= 2):
            raise InvalidArgumentError(f"batch sizes must be integers >= 2 for batch statistics (got {b!r})")
    if not epochs > 0 or (steps is not None and steps < 1) or points < 1:
        raise InvalidArgumentError(f"need epochs > 0, steps >= 1 or None, points >= 1 (got epochs={epochs}, steps={steps}, points={points})")
    for op in ops:
        get_norm(op)
    base = build_model(model, seed=seed) if isinstance(model, str) else model
    device = model_device(base) if device is None else torch.device(device)
    dtype = floating_dtype(base)
    data = default_data(device, dtype) if data is None else tuple(t.to(device) for t in data)
    n_train = len(data[0])
    options = op_options or {}
    curves, summary = [], []
    for batch_size in batch_sizes:
        if batch_size > n_train:
            raise DataShapeError(f"batch size {batch_size} is larger than the {n_train} training examples")
        run_steps = max(1, int(epochs * (n_train // batch_size)))
        run_steps = run_steps if steps is None else min(steps, run_steps)
        run_lr = lr * batch_size / reference_batch_size
        for op in ops:
            label = op_label(op)
            net = swap_norms(base, op, **options.get(label, {})).to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                start = time.perf_counter()
                rows = train_run(net, data, batch_size, run_steps, run_lr, seed, points, loss_fn, track, f"{label} B={batch_size}")
                seconds = time.perf_counter() - start
            curves += [{"op": label, "batch_size": batch_size, **row} for row in rows]
            train_last = next(r for r in reversed(rows) if r["split"] == "train")
            test_last = rows[-1]
            summary.append(dict(
                op=label, batch_size=batch_size, final_train_loss=train_last["loss"], final_test_loss=test_last["loss"],
                final_test_accuracy=test_last["accuracy"], seconds=seconds, steps=test_last["step"], lr=run_lr,
                diverged=not math.isfinite(train_last["loss"]),
            ))
    summary_table = pd.DataFrame(summary)
    return AnalyzerOutput(
        tables={"compare_curves": pd.DataFrame(curves), "compare_summary": summary_table},
        findings=findings(summary_table),
        headline=headline(summary_table),
    )


def findings(summary: pd.DataFrame) -> list[str]:
    """One sentence per batch size: the best op by final test accuracy, against the ``bn`` baseline."""
    sentences = []
    for batch_size, group in summary.groupby("batch_size", sort=True):
        best = group.loc[group["final_test_accuracy"].idxmax()]
        sentence = f"At batch size {batch_size}, {best['op']} reached the best test accuracy ({best['final_test_accuracy']:.3f})"
        baseline = group[group["op"] == "bn"]
        if len(baseline) and best["op"] != "bn":
            sentence += f", against {baseline['final_test_accuracy'].iloc[0]:.3f} for BatchNorm"
        sentences.append(sentence + ".")
    diverged = summary[summary["diverged"]]
    sentences += [f"{row.op} diverged at batch size {row.batch_size} (non-finite loss)." for row in diverged.itertuples()]
    return sentences


def headline(summary: pd.DataFrame) -> dict[str, float | int | str]:
    """Final test accuracy per op and batch size, keyed ``accuracy_OP_bB``."""
    return {f"accuracy_{row.op}_b{row.batch_size}": float(row.final_test_accuracy) for row in summary.itertuples()}
