"""Normalization ops side by side: the same model, data, seeds, batch order and budget, one short
run per variant, batch size and seed (the small-batch comparisons of "Normalization Gradients are
Least-Squares Residuals", App. C, Table 2, and of "Extreme Normalization", §5, at small scale).

Each variant is an op with its options, swapped into a copy of the model
(:func:`normscope.ops.swap.swap_norms`: BatchNorm sites, and LayerNorm/RMSNorm sites for the ops
that apply to them), trained with SGD (momentum 0.9) by backprop or by two-stage backprop
(:func:`normscope.ops.two_stage.two_stage_step`) on the same seeded minibatches, with the
EMA-only steps its ops ask for (:mod:`normscope.ops.ema`). The learning rate follows the linear
scaling rule ``lr * B / reference_batch_size`` (Goyal et al. 2017). Every variant gets the same
budget, in weight updates (``steps``) or in examples seen (``examples``, the default). The tables
are ``compare_curves``, ``compare_summary`` and ``compare_stats`` of ``docs/tables.md``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, RandomSampler

from normscope.analyzers import AnalyzerOutput, no_progress
from normscope.api import floating_dtype, model_device
from normscope.data import load_digits
from normscope.errors import DataShapeError, InvalidArgumentError
from normscope.models import build_model
from normscope.ops.ema import EmaSchedule
from normscope.ops.factory import NormSpec, get_norm
from normscope.ops.swap import LAYER_SITE_OPS, swap_norms
from normscope.seed_stats import compare_means, format_mean_std, mean_std
from normscope.train import TRAINERS, StepInfo, epoch_batches, train_loop

DEFAULT_OPS = ("bn", "median", "renorm", "population")
Data = tuple[Tensor, Tensor, Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
ALIASES = {"ema": "momentum"}
UNSWAPPED = "model"


@dataclass(frozen=True)
class Variant:
    """One contender: ``op`` with constructor ``options``, trained by ``trainer``.

    ``op`` ``"model"`` keeps the model as it is. ``trainer`` ``"two_stage"`` trains with two-stage
    backprop ("Extreme Normalization", §3.2) in chunks of ``chunk_size`` examples (None: the whole batch).
    """

    label: str
    op: NormSpec
    options: dict[str, Any] = field(default_factory=dict)
    trainer: str = "backprop"
    chunk_size: int | None = None

    def build(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with this variant's op swapped in."""
        if isinstance(self.op, str) and self.op == UNSWAPPED:
            return copy.deepcopy(model)
        return swap_norms(model, self.op, **self.options)


def parse_value(text: str) -> Any:
    """``"4"`` -> 4, ``"0.8"`` -> 0.8, ``"true"``/``"false"``/``"none"`` -> True/False/None, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_variants(text: str) -> list[Variant]:
    """Variants from ``"bn,population:microbatch=1,rotation=hadamard,r_m=0,ema=0.2,warmup=200"``.

    Items are separated by commas (or semicolons). An item ``name`` or ``name:key=value`` starts a
    variant; a following ``key=value`` item adds an option to it. ``ema`` is the op's EMA rate
    (its ``momentum``). ``label=...`` names the variant (by default ``name:key=value,...`` as
    written). ``two_stage`` is PopulationNorm sites (fixed-mean arrangement) trained by two-stage
    backprop (option ``chunk``: examples per chunk); ``model`` keeps the model's own layers.
    """
    variants: list[dict[str, Any]] = []
    for raw in text.replace(";", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, option = item.partition(":") if ":" in item else (("", "", item) if "=" in item else (item, "", ""))
        if name:
            variants.append({"name": name.strip(), "options": {}, "text": item})
        elif not variants:
            raise InvalidArgumentError(f"option {item!r} comes before any op in {text!r}")
        else:
            variants[-1]["text"] += f",{item}"
        if option:
            key, eq, value = option.partition("=")
            if not eq or not key.strip():
                raise InvalidArgumentError(f"op options are key=value (got {option!r} in {text!r})")
            variants[-1]["options"][key.strip()] = parse_value(value)
    if not variants:
        raise InvalidArgumentError(f"--ops needs at least one op (got {text!r})")
    return distinct_labels([make_variant(v["name"], v["options"], v["text"]) for v in variants])


def make_variant(name: str, options: dict[str, Any], text: str | None = None) -> Variant:
    """A :class:`Variant` from an op name and its options (``label``, ``ema``, ``chunk`` understood)."""
    options = {ALIASES.get(k, k): v for k, v in options.items()}
    label = str(options.pop("label", text or name)).strip()
    key = name.strip().lower().replace("-", "_")
    if key == "two_stage":  # the fixed-mean arrangement: two-stage backprop is exact for it (MATH.md §4)
        chunk = options.pop("chunk", None)
        return Variant(label, "population", {"arrangement": "fixed_mean", **options}, "two_stage", chunk)
    if key != UNSWAPPED and key not in LAYER_SITE_OPS:
        get_norm(key)
    return Variant(label, key, options)


def op_label(op: NormSpec) -> str:
    """The name an op has in the tables: its factory name, or its class name with a partial's options."""
    if isinstance(op, str):
        return op.strip().lower().replace("-", "_")
    func = getattr(op, "func", op)
    name = getattr(func, "__name__", repr(op))
    keywords = getattr(op, "keywords", None)
    return f"{name}:{','.join(f'{k}={v}' for k, v in keywords.items())}" if keywords else name


def distinct_labels(variants: list[Variant]) -> list[Variant]:
    """The variants with repeated labels numbered (``op``, ``op #2``), so no two share a row."""
    seen: dict[str, int] = {}
    out = []
    for v in variants:
        seen[v.label] = seen.get(v.label, 0) + 1
        out.append(v if seen[v.label] == 1 else Variant(f"{v.label} #{seen[v.label]}", v.op, v.options, v.trainer, v.chunk_size))
    return out


def as_variants(ops: str | Sequence[NormSpec | Variant], op_options: dict[str, dict[str, Any]] | None) -> list[Variant]:
    """Variants from a spec string or a list of names (with options), classes, partials and Variants;
    ``op_options`` adds options by label."""
    if isinstance(ops, str):
        variants = parse_variants(ops)
    else:
        variants = []
        for op in ops:
            if isinstance(op, Variant):
                variants.append(op)
            elif isinstance(op, str):
                variants += parse_variants(op)
            else:
                get_norm(op)
                variants.append(Variant(op_label(op), op))
        variants = distinct_labels(variants)
    extra = op_options or {}
    return [Variant(v.label, v.op, {**v.options, **extra.get(v.label, {})}, v.trainer, v.chunk_size) for v in variants]


EVAL_CHUNK = 1024  # examples per eval forward: on CPU a 10,000-image forward is ~2.7x slower than chunks of 500-2000


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` in eval mode on ``(inputs, targets)``; the flags are put back.

    The forward runs in chunks of :data:`EVAL_CHUNK` examples: in eval mode every normalization of
    normscope (running or population statistics) treats each example on its own, so the outputs
    are those of one forward over all of them, up to rounding."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        outputs = torch.cat([model(chunk) for chunk in inputs.split(EVAL_CHUNK)])
    finally:
        for m, flag in flags.items():
            m.train(flag)
    return float(loss_fn(outputs, targets)), accuracy(outputs, targets)


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy for class targets, NaN for other targets."""
    if targets.dtype.is_floating_point or outputs.dim() != 2 or targets.dim() != 1:
        return math.nan
    return float((outputs.argmax(dim=1) == targets).double().mean())


class ShuffledBatches:
    """The batches of ``DataLoader(TensorDataset(*tensors), batch_size, shuffle=True,
    generator=torch.Generator().manual_seed(seed), drop_last=True)``, the same indices in the same
    order (its ``RandomSampler`` and ``BatchSampler``, reshuffling each pass), each batch taken by
    one indexing of each tensor instead of a per-example fetch and collate. Like the DataLoader's
    iterator, each pass first draws its worker base seed from the generator, then the permutation."""

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, seed: int) -> None:
        self.tensors = tensors
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = BatchSampler(RandomSampler(range(len(tensors[0])), generator=self.generator), batch_size, drop_last=True)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the DataLoader iterator's base seed
        for indices in self.batches:
            index = torch.as_tensor(indices)
            yield tuple(t[index] for t in self.tensors)


@dataclass
class RunTiming:
    """Seconds of one run: weight updates after the first (one-time warm-up excluded), and EMA-only steps."""

    seconds: float
    seconds_per_step: float
    ema_steps: int
    ema_seconds: float


def train_run(
    model: nn.Module,
    data: Data,
    batch_size: int,
    steps: int,
    lr: float,
    seed: int,
    points: int = 10,
    loss_fn: LossFn = F.cross_entropy,
    track: Callable[..., Iterator] = no_progress,
    description: str = "",
    trainer: str = "backprop",
    chunk_size: int | None = None,
    schedule: EmaSchedule | None = None,
    lr_schedule: str = "constant",
) -> tuple[list[dict[str, Any]], RunTiming]:
    """Train ``model`` in place for ``steps`` SGD steps (momentum 0.9, learning rate ``lr``,
    constant or cosine-decayed to 0, ``lr_schedule``) on minibatches of ``batch_size`` drawn in a
    ``seed``-determined order (the last partial batch of an epoch is dropped) with
    :func:`normscope.train.train_loop`, and return curve rows and timings.

    ``trainer`` ``"two_stage"`` computes each step's gradient by two-stage backprop. ``schedule``
    (default: :func:`~normscope.ops.ema.ema_schedule` of the model) adds EMA-only steps before the
    first update and after the early ones, on batches from a second seeded stream, so the update
    batches are the same for every variant. At ``points`` evenly spaced steps (and the last) two
    rows: ``train`` with the mean loss and accuracy of the training minibatches since the previous
    row (training mode, before each update; accuracy NaN for two-stage, whose step returns no
    outputs), and ``test`` from :func:`evaluate` on the test split. A run whose loss becomes NaN
    or Inf stops there; its last rows carry the non-finite loss.
    """
    if trainer not in TRAINERS:
        raise InvalidArgumentError(f"trainer must be one of {', '.join(TRAINERS)} (got {trainer!r})")
    train_x, train_y, test_x, test_y = data
    loader = ShuffledBatches((train_x, train_y), batch_size, seed)
    per_epoch = len(loader)
    marks = {max(1, round(steps * k / points)) for k in range(1, points + 1)} | {steps}
    ema_loader = ShuffledBatches((train_x,), batch_size, seed + 1_000_003)
    rows: list[dict[str, Any]] = []
    losses: list[Tensor] = []
    hits: list[float] = []

    def record(info: StepInfo) -> None:
        losses.append(info.loss)
        hits.append(math.nan if info.outputs is None else accuracy(info.outputs, info.targets))
        if info.step in marks or not bool(torch.isfinite(info.loss)):
            rows.append(dict(step=info.step, epoch=info.epoch, split="train", loss=float(torch.stack(losses).mean()), accuracy=float(sum(hits) / len(hits))))
            test_loss, test_accuracy = evaluate(model, test_x, test_y, loss_fn)
            rows.append(dict(step=info.step, epoch=info.epoch, split="test", loss=test_loss, accuracy=test_accuracy))
            losses.clear()
            hits.clear()

    result = train_loop(
        model, epoch_batches(loader, math.ceil(steps / per_epoch)), steps, lr, per_epoch=per_epoch,
        lr_schedule=lr_schedule, loss_fn=loss_fn, trainer=trainer, chunk_size=chunk_size, ema=schedule,
        ema_inputs=(batch for _ in count() for (batch,) in ema_loader), on_step=record, track=track,
        description=description,
    )
    step_seconds = result.step_seconds
    timed = step_seconds[1:] or step_seconds
    timing = RunTiming(sum(step_seconds[1:]), sum(timed) / len(timed), result.ema_steps, result.ema_seconds)
    return rows, timing


def default_data(device: torch.device, dtype: torch.dtype, flat: bool = False) -> Data:
    """The digits: the first 1400 images for training, the other 397 for testing; ``flat``: (N, 64)."""
    train_x, train_y = load_digits(dtype=dtype, split="train")
    test_x, test_y = load_digits(dtype=dtype, split="test")
    if flat:
        train_x, test_x = train_x.flatten(1), test_x.flatten(1)
    return train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device)


def chance_level(loss_fn: LossFn, data: Data) -> float | None:
    """``ln(classes)``, the cross-entropy of a uniform guess, when the loss is cross-entropy on class
    targets (1-D integers); None otherwise (no chance level known)."""
    train_y, test_y = data[1], data[3]
    if loss_fn is not F.cross_entropy or train_y.dtype.is_floating_point or train_y.dim() != 1:
        return None
    return math.log(int(max(train_y.max(), test_y.max())) + 1)


def run_status(train_loss: float, test_loss: float, chance: float | None) -> str:
    """``"diverged"``: a non-finite loss, or a final test loss above 3 x chance (confidently wrong,
    the weights blew up); ``"did not learn"``: a final test loss at or above chance, ln(classes);
    else ``"ok"``. Without a chance level only non-finite losses count."""
    if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
        return "diverged"
    if chance is None:
        return "ok"
    if test_loss > 3 * chance:
        return "diverged"
    return "did not learn" if test_loss >= chance else "ok"


def compare(
    model: nn.Module | str = "mlp_bn",
    ops: str | Sequence[NormSpec | Variant] = DEFAULT_OPS,
    batch_sizes: Sequence[int] = (2, 32),
    epochs: float = 1.0,
    steps: int | None = None,
    lr: float = 0.05,
    reference_batch_size: int = 32,
    seed: int = 0,
    data: Data | None = None,
    points: int = 10,
    op_options: dict[str, dict[str, Any]] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    device: torch.device | str | None = None,
    track: Callable[..., Iterator] = no_progress,
    *,
    examples: int | None = None,
    seeds: int | Sequence[int] = 1,
    lr_schedule: str = "constant",
    analyzers: str | Sequence[str] | None = None,
    analysis_budget: float = 30.0,
) -> AnalyzerOutput:
    """Train each variant swapped into ``model`` at each batch size and seed and return the tables.

    For each batch size B, seed s and variant: a copy of ``model`` with the variant's op swapped in
    (``op="bn"`` keeps torch's BatchNorm: the baseline), trained with learning rate
    ``lr * B / reference_batch_size`` on minibatches in the same ``s``-determined order, from the
    same initial weights. ``model`` itself is never changed.

    The budget is the same for every variant: ``steps`` weight updates when given, else
    ``examples`` examples seen (default ``epochs`` passes over the training data), i.e.
    ``examples // B`` updates. EMA-only steps (PopulationNorm's warm-up and refresh, "Extreme Normalization", §5)
    come on top and are counted in ``ema_steps``.

    Args:
        model: a built-in model name (built with ``torch.manual_seed(s)`` for each seed s) or an
            ``nn.Module`` whose weights are the common starting point of every seed. Default: ``"mlp_bn"``.
        ops: variants: a spec string (:func:`parse_variants`) or a list of names (with ``:options``),
            classes, partials and :class:`Variant`. Default: bn, median, renorm, population.
        batch_sizes: minibatch sizes, each at least 2. Default: (2, 32).
        epochs: the examples budget in passes over the training data, when neither ``steps`` nor
            ``examples`` is given. Default: 1.0.
        steps: equal budget in weight updates per run. Default: None.
        examples: equal budget in examples seen per run. Default: None (``epochs`` passes).
        lr: SGD learning rate at ``reference_batch_size``. Default: 0.05.
        reference_batch_size: batch size at which ``lr`` applies unscaled. Default: 32.
        seed: the first seed. Default: 0.
        seeds: how many seeds (``seed, seed + 1, ...``) or the seeds themselves. Default: 1.
        data: ``(train_inputs, train_targets, test_inputs, test_targets)``; the digits by default.
        points: curve points per run. Default: 10.
        op_options: extra constructor options by variant label, e.g. ``{"median": {"backward": "smoothed"}}``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, averaged over the examples. Default: cross-entropy.
        device: where to train; the model's device by default.
        track: progress wrapper ``track(iterable, description, total)``, as ``AnalysisContext.track``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over each run). Default: ``"constant"``.
        analyzers: analyzers (``stats``, ``gls``, ``descent``, ...) run by :func:`normscope.analyze` on
            each variant's trained model, on the training split, ``analysis_budget`` seconds each:
            the ``compare_analysis`` table, one row per run (the in-situ comparison). Default: None.

    Returns:
        :class:`~normscope.analyzers.AnalyzerOutput` with tables ``compare_curves``,
        ``compare_summary`` (one row per variant, batch size and seed) and ``compare_stats``
        (mean ± std over seeds and the verdict against the baseline), findings and headline figures.
    """
    for b in batch_sizes:
        if not (isinstance(b, int) and b >= 2):
            raise InvalidArgumentError(f"batch sizes must be integers >= 2 for batch statistics (got {b!r})")
    if steps is not None and examples is not None:
        raise InvalidArgumentError("give the budget as steps or as examples, not both")
    if not epochs > 0 or (steps is not None and steps < 1) or (examples is not None and examples < 1) or points < 1:
        raise InvalidArgumentError(
            f"need epochs > 0, steps >= 1, examples >= 1, points >= 1 (got epochs={epochs}, steps={steps}, examples={examples}, points={points})"
        )
    variants = as_variants(ops, op_options)
    seed_list = list(range(seed, seed + seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise InvalidArgumentError("need at least one seed")
    first = build_model(model, seed=seed_list[0]) if isinstance(model, str) else model
    device = model_device(first) if device is None else torch.device(device)
    dtype = floating_dtype(first)
    data = default_data(device, dtype) if data is None else tuple(t.to(device) for t in data)
    n_train = len(data[0])
    chance = chance_level(loss_fn, data)
    budget = "steps" if steps is not None else "examples"
    examples = examples if examples is not None else max(1, int(epochs * n_train))
    curves, summary, analysis = [], [], []
    for batch_size in batch_sizes:
        if batch_size > n_train:
            raise DataShapeError(f"batch size {batch_size} is larger than the {n_train} training examples")
        run_steps = steps if steps is not None else max(1, examples // batch_size)
        run_lr = lr * batch_size / reference_batch_size
        for s in seed_list:
            base = first if s == seed_list[0] or not isinstance(model, str) else build_model(model, seed=s)
            for variant in variants:
                net = variant.build(base).to(device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(s)
                    rows, timing = train_run(
                        net, data, batch_size, run_steps, run_lr, s, points, loss_fn, track,
                        f"{variant.label} B={batch_size} seed={s}", variant.trainer, variant.chunk_size,
                        lr_schedule=lr_schedule,
                    )
                curves += [{"op": variant.label, "batch_size": batch_size, **row, "seed": s} for row in rows]
                if analyzers:
                    analysis.append({"op": variant.label, "batch_size": batch_size, "seed": s,
                                     **analysis_row(net, data, analyzers, analysis_budget, s, run_lr, loss_fn)})
                train_last = next(r for r in reversed(rows) if r["split"] == "train")
                test_last = rows[-1]
                status = run_status(train_last["loss"], test_last["loss"], chance)
                summary.append(dict(
                    op=variant.label, batch_size=batch_size, final_train_loss=train_last["loss"],
                    final_test_loss=test_last["loss"], final_test_accuracy=test_last["accuracy"],
                    seconds=timing.seconds, steps=test_last["step"], lr=run_lr, diverged=status == "diverged",
                    seed=s, status=status, budget=budget, examples=test_last["step"] * batch_size,
                    ema_steps=timing.ema_steps, seconds_per_step=timing.seconds_per_step,
                    ema_seconds=timing.ema_seconds, trainer=variant.trainer,
                    chance_loss=math.nan if chance is None else chance,
                ))
    summary_table = pd.DataFrame(summary)
    stats = seed_stats(summary_table)
    tables = {"compare_curves": pd.DataFrame(curves), "compare_summary": summary_table, "compare_stats": stats}
    if analyzers:
        tables["compare_analysis"] = pd.DataFrame(analysis, columns=["op", "batch_size", "seed", *ANALYSIS_COLUMNS])
        means = tables["compare_analysis"].groupby(["op", "batch_size"], sort=False)[list(ANALYSIS_COLUMNS)].mean()
        tables["compare_stats"] = stats.join(means.add_suffix("_mean"), on=["op", "batch_size"])
    return AnalyzerOutput(
        tables=tables,
        findings=findings(summary_table),
        headline=headline(stats),
    )


ANALYSIS_COLUMNS = {  # compare_analysis column: (analyzer, headline figure)
    "lambda_max_train": ("descent", "lambda_max_train"),
    "a_crit_train": ("descent", "a_crit_train"),
    "lambda_max_eval": ("descent", "lambda_max_eval"),
    "a_crit_eval": ("descent", "a_crit_eval"),
    "mean_drift_max": ("stats", "mean_drift_max"),
    "gls_r2_mean": ("gls", "gls_r2_mean"),
    "gls_identity_rel_max": ("gls", "gls_identity_rel_max"),
}


def analysis_row(model: nn.Module, data: Data, analyzers: str | Sequence[str], budget: float, seed: int, lr: float,
                 loss_fn: LossFn) -> dict[str, float]:
    """The headline figures of :func:`normscope.analyze` on a trained variant (training split, one
    batch of up to 128): lambda_max and a_crit (descent, train and eval mode), the largest mean
    drift of the running statistics (stats), the mean gls R^2 and the largest distance of a
    backward from the least-squares residual (gls); NaN where an analyzer did not run or the
    budget cut it."""
    from normscope.api import analyze

    result = analyze(model, data=(data[0], data[1]), analyzers=analyzers, batch_size=min(128, len(data[0])), batches=1,
                     budget=budget, seed=seed, lr=lr, loss_fn=loss_fn)
    return {column: float(result.headline.get(name, {}).get(key, math.nan)) for column, (name, key) in ANALYSIS_COLUMNS.items()}


def baseline_label(labels: Sequence[str]) -> str:
    """The baseline of a comparison: ``bn`` when present, else the first variant."""
    return "bn" if "bn" in labels else labels[0]


def seed_stats(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per variant and batch size over its seeds: mean and std of the final test accuracy
    and loss, the statuses, and the verdict against the baseline (``bn`` or the first variant):
    ``better``/``worse`` only when the difference of mean accuracies exceeds the sum of the two
    standard deviations, else ``within spread`` (``one seed``: no spread to judge by)."""
    rows = []
    for batch_size, group in summary.groupby("batch_size", sort=True):
        labels = list(dict.fromkeys(group["op"]))
        base = baseline_label(labels)
        base_acc = group.loc[group["op"] == base, "final_test_accuracy"].to_numpy()
        for label in labels:
            runs = group[group["op"] == label]
            acc = runs["final_test_accuracy"].to_numpy()
            acc_mean, acc_std = mean_std(acc)
            loss_mean, loss_std = mean_std(runs["final_test_loss"].to_numpy())
            counts = runs["status"].value_counts()
            verdict = "baseline" if label == base else {"higher": "better", "lower": "worse"}.get(compare_means(acc, base_acc), compare_means(acc, base_acc))
            rows.append(dict(
                op=label, batch_size=batch_size, seeds=len(runs), steps=int(runs["steps"].max()),
                examples=int(runs["examples"].max()), test_accuracy_mean=acc_mean, test_accuracy_std=acc_std,
                test_loss_mean=loss_mean, test_loss_std=loss_std, train_loss_mean=float(runs["final_train_loss"].mean()),
                seconds_per_step=float(runs["seconds_per_step"].mean()), ema_steps=int(runs["ema_steps"].max()),
                status=", ".join(f"{n} {s}" for s, n in counts.items()), baseline=base,
                accuracy_vs_baseline=acc_mean - mean_std(base_acc)[0], verdict=verdict,
            ))
    return pd.DataFrame(rows)


def findings(summary: pd.DataFrame) -> list[str]:
    """Sentences from ``compare_summary``: the budget; per batch size the best variant by mean
    test accuracy, named the winner only when it beats the runner-up beyond the seeds' spread; and
    every run that diverged or did not learn."""
    sentences = []
    budget = summary["budget"].iloc[0] if "budget" in summary else "steps"
    if "examples" in summary:
        per_size = summary.groupby("batch_size")[["steps", "examples"]].max()
        sizes = ", ".join(f"B={b}: {int(r.steps)} steps, {int(r.examples)} examples" for b, r in per_size.iterrows())
        sentences.append(f"Equal budget in {budget} for every variant ({sizes}).")
    seed_column = "seed" if "seed" in summary else None
    for batch_size, group in summary.groupby("batch_size", sort=True):
        by_op = {op: runs["final_test_accuracy"].to_numpy() for op, runs in group.groupby("op", sort=False)}
        ranked = sorted(by_op, key=lambda op: -mean_std(by_op[op])[0])
        best = ranked[0]
        text = f"{best} ({format_mean_std(by_op[best])})"
        if len(ranked) == 1:
            sentences.append(f"At batch size {batch_size}, {text} test accuracy.")
            continue
        second = ranked[1]
        verdict = compare_means(by_op[best], by_op[second])
        other = f"{second} ({format_mean_std(by_op[second])})"
        if verdict == "higher":
            sentences.append(f"At batch size {batch_size}, {text} has the best test accuracy, beyond the seeds' spread over the next, {other}.")
        elif verdict == "one seed":
            sentences.append(f"At batch size {batch_size}, {text} has the best test accuracy of one seed, {other} next; one seed has no spread, so no winner is declared.")
        else:
            sentences.append(f"At batch size {batch_size}, no winner: {text} and {other} are within the seeds' spread.")
    status = summary["status"] if "status" in summary else summary["diverged"].map({True: "diverged", False: "ok"})
    for row, state in zip(summary.itertuples(), status):
        if state != "ok":
            seed_text = f", seed {getattr(row, seed_column)}" if seed_column else ""
            why = "non-finite loss or test loss above 3 x chance" if state == "diverged" else "final test loss at or above chance, ln(classes)"
            sentences.append(f"{row.op} {state} at batch size {row.batch_size}{seed_text} ({why}; test loss {row.final_test_loss:.3f}).")
    return sentences


def headline(stats: pd.DataFrame) -> dict[str, float | int | str]:
    """Mean final test accuracy per variant and batch size, keyed ``accuracy_LABEL_bB``."""
    return {f"accuracy_{row.op}_b{row.batch_size}": float(row.test_accuracy_mean) for row in stats.itertuples()}
