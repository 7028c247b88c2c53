"""Estimator bias: how far minibatch and per-example gradients are from the population gradient.

"Extreme Normalization" (under review) (§2, §2.2) casts BatchNorm as an approximation of normalizing with moments over the
whole data set; minibatch estimates of that population gradient g* are biased because a product
of per-example Jacobian estimates is not the product of the Jacobians. This analyzer computes g*
(:mod:`normscope.analyzers.population_gradient`), draws R random minibatches of each size B
(the same minibatches for every estimator) and measures each estimator against g*
(MATH.md §4):

* ``batchnorm``: forward and backward through the minibatch moments;
* ``per_example``: :class:`~normscope.ops.population.PopulationNorm` with microbatch 1 and its
  EMAs at the population moments ("Extreme Normalization" (under review) §3.1), per-example gradients averaged;
* ``microbatch``: the same with microbatches of k (the seed's improved batch renormalization);
* ``two_stage``: :func:`~normscope.ops.two_stage.two_stage_gradient` ("Extreme Normalization" (under review) §3.2);
* ``batch_renorm``: :class:`~normscope.ops.renorm.BatchRenorm` (Ioffe 2017) with running
  statistics at the population moments;
* ``control``: per-example gradients of the eval-mode model (no interaction between examples),
  measured against its own full-data gradient, for which they are unbiased.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn
from torch.func import grad, vmap

from normscope import batch as batches
from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.analyzers.population_gradient import (
    PopulationGradient,
    population_gradient,
    streamed_population_gradient,
)
from normscope.budget import Budget, agreed, chunk_for_memory, memory_budget, step_memory
from normscope.capture.graph import covering
from normscope.distributed import current, shard
from normscope.errors import InvalidArgumentError, UnknownNameError
from normscope.findings import Finding, plural
from normscope.guard import preserved
from normscope.ops.norm_sites import norm_sites, parameters
from normscope.ops.population import PopulationNorm
from normscope.ops.renorm import BatchRenorm
from normscope.ops.swap import BatchNormBase, swap_norms
from normscope.rules import bias_findings, log_log_fit, measurable, single_value_sites
from normscope.ops.two_stage import two_stage_gradient

LossFn = Callable[[Tensor, Tensor], Tensor]

ESTIMATORS = ("batchnorm", "per_example", "microbatch", "two_stage", "batch_renorm", "control")
LABELS = {
    "batchnorm": "BatchNorm",
    "per_example": "Per-example normalization",
    "microbatch": "Microbatch renormalization",
    "two_stage": "Two-stage backprop",
    "batch_renorm": "Batch renormalization",
    "control": "The control (per-example gradients of eval-mode BN)",
}
MIN_REPEATS = 3
JACOBIAN_PASSES = 4.0
"""The Jacobian check (two-stage backprop over all N examples) priced in passes of g*: its two stages
are a forward and backward over the data and a per-example tower pass (3.2 g* passes measured on a tiny
MobileViT in float64, 2026-12-06); the check is cut when that much time is not left."""
"""The fewest draws a cell's statistics take (:func:`bias_statistics`: the leave-one-out spread)."""
QUICK = {"batch_sizes": (4, 16, 64), "repeats": 16, "examples": 256}
FULL = {"batch_sizes": (2, 4, 8, 16, 32, 64, 128), "repeats": 32, "examples": None}
FULL_BATCH_MAX = 4096


# ---------------------------------------------------------------- per-example gradients


def per_example_grads(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn = F.cross_entropy, chunk_size: int = 64
) -> dict[str, Tensor]:
    """Per-example gradients ``dL_n/dW`` (shape ``(N, *W.shape)``) with ``torch.func``:
    ``vmap(grad(L))`` over examples of ``functional_call(model, ...)`` on ``x[None]``, ``chunk_size``
    examples at a time into preallocated outputs (memory: the N gradients plus one chunk's work).
    The model must have no cross-example interaction in this mode (eval-mode
    BatchNorm, or PopulationNorm with microbatch 1 and momentum 0).
    """
    params = {name: p.detach() for name, p in parameters(model).items()}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, Tensor], x, y) -> Tensor:
        return loss_fn(batches.forward(model, batches.unsqueeze(x), (p, buffers)), batches.unsqueeze(y))

    per_example = vmap(grad(loss_one), in_dims=(None, batches.example_dims(inputs), batches.example_dims(targets)))
    n = batches.check_sliceable((inputs, targets))
    if n <= chunk_size:
        return per_example(params, inputs, targets)
    out = {name: p.new_empty((n, *p.shape)) for name, p in params.items()}
    for start in range(0, n, chunk_size):
        chunk = per_example(params, *batches.take((inputs, targets), slice(start, start + chunk_size)))
        for name, g in chunk.items():
            out[name][start : start + len(g)] = g
    return out


# ---------------------------------------------------------------- statistics


@dataclass
class BiasStatistics:
    """Bias figures of R estimates ``g_r`` of a target ``g*`` (MATH.md §4), all relative to ||g*||.

    ``rel_bias = sqrt(max(U, 0)) / ||g*||`` with the unbiased estimate of ``||E g - g*||^2``

    .. math:: U = \\|\\bar g - g^*\\|^2 - \\mathrm{tr}\\,\\widehat{\\mathrm{Cov}}(g)/R
              = \\frac{1}{R(R-1)}\\sum_{r \\ne s} \\langle g_r - g^*, g_s - g^* \\rangle

    and a confidence interval from the jackknife standard error of U (t quantile, R-1 dof),
    mapped through the same square root (its lower end is 0 when the interval for U covers 0).
    ``rel_bias_uncorrected = ||mean g - g*|| / ||g*||`` (with its own jackknife interval);
    ``variance = tr Cov(g) / ||g*||^2`` of one estimate; ``cosine`` of mean g to g*;
    ``mse = rel_bias^2 + variance``. ``abs_bias = sqrt(max(U, 0))`` (with its interval) is the
    same figure before dividing by ||g*||. When ``zero_gradient`` (||g*|| negligible, see
    :func:`negligible`), every relative figure is NaN: a ratio to a rounding-level ||g*|| is meaningless.
    """

    rel_bias: float
    rel_bias_lo: float
    rel_bias_hi: float
    rel_bias_uncorrected: float
    rel_bias_uncorrected_lo: float
    rel_bias_uncorrected_hi: float
    variance: float
    cosine: float
    mse: float
    repeats: int
    target_norm: float
    abs_bias: float
    abs_bias_lo: float
    abs_bias_hi: float
    zero_gradient: bool


def negligible(norm: float, total_norm: float, dtype: torch.dtype = torch.float64) -> bool:
    """Whether a group's ``||g*_g||`` is zero up to rounding: ``||g*_g|| <= sqrt(eps) ||g*||``
    (``eps`` of ``dtype``: 1.5e-8 in float64), e.g. the bias of a layer that feeds a BatchNorm,
    which the normalization removes exactly (MATH.md §4)."""
    return norm <= math.sqrt(torch.finfo(dtype).eps) * total_norm


def bias_statistics(samples: Tensor, target: Tensor, level: float = 0.95, total_norm: float | None = None) -> BiasStatistics:
    """:class:`BiasStatistics` of ``samples`` (R, P) against ``target`` (P,); R >= 3. ``total_norm``
    (||g*|| over all parameters, default ``||target||``) decides :func:`negligible`."""
    repeats = samples.shape[0]
    if repeats < MIN_REPEATS:
        raise InvalidArgumentError(f"bias statistics need at least 3 repeats (got {repeats})")
    diff = (samples - target).double()
    gram = diff @ diff.T
    total, trace = gram.sum(), gram.trace()
    rows, diag = gram.sum(dim=1), gram.diagonal()
    u = (total - trace) / (repeats * (repeats - 1))
    v = total / repeats**2
    loo_total = total - 2 * rows + diag
    loo_u = (loo_total - (trace - diag)) / ((repeats - 1) * (repeats - 2))
    loo_v = loo_total / (repeats - 1) ** 2
    t = stats.t.ppf(0.5 + level / 2, repeats - 1)

    def jackknife(values: Tensor) -> float:
        return math.sqrt((repeats - 1) / repeats * float((values - values.mean()).pow(2).sum()))

    norm = float(target.double().norm())
    zero = negligible(norm, norm if total_norm is None else total_norm, target.dtype)
    scale = math.nan if zero or norm == 0 else 1.0 / norm
    absolute = lambda value: math.sqrt(max(value, 0.0))  # noqa: E731
    root = lambda value: absolute(value) * scale  # noqa: E731
    se_u, se_v = jackknife(loo_u), jackknife(loo_v)
    tr_cov = float(trace - repeats * v) / (repeats - 1)
    mean = samples.double().mean(dim=0)
    denominator = float(mean.norm()) * norm
    rel_bias = root(float(u))
    variance = tr_cov * scale**2
    return BiasStatistics(
        rel_bias=rel_bias,
        rel_bias_lo=root(float(u) - t * se_u),
        rel_bias_hi=root(float(u) + t * se_u),
        rel_bias_uncorrected=root(float(v)),
        rel_bias_uncorrected_lo=root(float(v) - t * se_v),
        rel_bias_uncorrected_hi=root(float(v) + t * se_v),
        variance=variance,
        cosine=float(mean @ target.double()) / denominator if denominator > 0 and not zero else math.nan,
        mse=rel_bias**2 + variance,
        repeats=repeats,
        target_norm=norm,
        abs_bias=absolute(float(u)),
        abs_bias_lo=absolute(float(u) - t * se_u),
        abs_bias_hi=absolute(float(u) + t * se_u),
        zero_gradient=zero,
    )


# ---------------------------------------------------------------- estimators


def _flat(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[name].reshape(-1) for name in names])


def _batch_grad(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> dict[str, Tensor]:
    params = parameters(model)
    loss = loss_fn(batches.forward(model, inputs), targets)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=False)))


def _chunked_grad(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn, chunk_size: int) -> dict[str, Tensor]:
    """The gradient of the mean loss over all N examples of a model that does not couple them
    (eval mode) from chunks of ``chunk_size``: ``g = sum_c (n_c / N) g_c`` (one chunk's graph alive)."""
    n = batches.size(inputs)
    total: dict[str, Tensor] = {}
    for start in range(0, n, chunk_size):
        x, y = batches.take((inputs, targets), slice(start, start + chunk_size))
        weight = batches.size(x) / n
        for name, g in _batch_grad(model, x, y, loss_fn).items():
            total[name] = weight * g if name not in total else total[name] + weight * g
    return total


def _set_moments(model: nn.Module, moments: PopulationGradient) -> None:
    with torch.no_grad():
        for name, module in norm_sites(model).items():
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(moments.mean[name])
                module.running_var.copy_(moments.var[name])


def _swap(model: nn.Module, op: str, **kwargs: object) -> nn.Module:
    """``swap_norms`` with frozen running statistics (momentum 0), the swapped layers in training mode."""
    swapped = swap_norms(model, op, momentum=0.0, **kwargs)
    for module in swapped.modules():
        if isinstance(module, (PopulationNorm, BatchRenorm)):
            module.train()
    return swapped


class _Estimators:
    """The estimators of this module on float64 copies of one model, EMAs at the population moments."""

    def __init__(self, model: nn.Module, moments: PopulationGradient, loss_fn: LossFn, options: dict) -> None:
        self.loss_fn = loss_fn
        self.base = model
        _set_moments(self.base, moments)
        self.names = list(parameters(self.base))
        self.train_bn = copy.deepcopy(self.base)
        for module in norm_sites(self.train_bn).values():
            module.train()
        population = {k: options[k] for k in ("r_m", "r_v", "f_max", "u_max") if k in options}
        self.per_example = _swap(self.base, "population", microbatch=1, **population)
        self.microbatch_size = int(options.get("microbatch", 2))
        self.microbatch = {}
        self.population_options = population
        self.renorm = _swap(self.base, "renorm", bn_steps=0, rmax_steps=0, dmax_steps=0)  # constant rmax 3, dmax 5
        self.chunk_size = int(options.get("chunk_size", 64))
        norm = next(m for m in self.per_example.modules() if isinstance(m, PopulationNorm))
        renorm = next(m for m in self.renorm.modules() if isinstance(m, BatchRenorm))
        shared = f"r_m={norm.r_m}, r_v={norm.r_v}, f_max={norm.f_max}, u_max={norm.u_max}"
        self.settings = {
            "batchnorm": "minibatch moments",
            "per_example": f"microbatch 1, {shared}",
            "microbatch": f"microbatch {self.microbatch_size}, {shared}",
            "two_stage": f"r_m=1, r_v=1, no caps, chunks of {self.chunk_size}",
            "batch_renorm": f"rmax={renorm.rmax}, dmax={renorm.dmax}",
            "control": "eval-mode BN, per-example gradients",
        }

    def _per_example_means(self, model: nn.Module, inputs: Tensor, targets: Tensor, draws: list[Tensor]) -> Tensor:
        """``(R, P)``: the mean per-example gradient of each of the R ``draws``, from one pass over
        the examples the draws hold, ``chunk_size`` at a time: ``means += W[:, c] @ G_c`` with
        ``G_c`` the chunk's per-example gradients and ``W[r, n] = 1/B_r`` for ``n`` in draw ``r``.
        Memory: the R means and one chunk's gradients, never the gradients of all N examples."""
        used = torch.unique(torch.cat(draws))
        dtype = next(iter(parameters(model).values())).dtype
        weights = torch.zeros(len(draws), len(used), dtype=dtype)
        for r, idx in enumerate(draws):
            weights[r, torch.searchsorted(used, idx)] = 1.0 / len(idx)
        weights = weights.to(batches.device(inputs))
        means = None
        for start in range(0, len(used), self.chunk_size):
            rows = used[start : start + self.chunk_size]
            grads = per_example_grads(model, *batches.take((inputs, targets), rows), self.loss_fn, self.chunk_size)
            part = weights[:, start : start + len(rows)] @ torch.cat([grads[n].reshape(len(rows), -1) for n in self.names], dim=1)
            means = part if means is None else means + part
        return means

    def samples(self, name: str, inputs: Tensor, targets: Tensor, draws: list[Tensor],
                stop: Callable[[], bool] | None = None) -> Tensor:
        """``(R, P)``: estimator ``name``'s gradient on each of the R ``draws`` (index tensors);
        a minibatch estimator's draws end early when ``stop()`` (called after each draw but the
        last: a time budget's :class:`~normscope.budget.Deadline`) says so (fewer rows)."""
        if name == "per_example":
            return self._per_example_means(self.per_example, inputs, targets, draws)
        if name == "control":
            return self._per_example_means(self.base, inputs, targets, draws)
        out = []
        for i, idx in enumerate(draws):
            out.append(self._estimate(name, inputs, targets, idx))
            if stop is not None and i + 1 < len(draws) and stop():
                break
        return torch.stack(out)

    def _estimate(self, name: str, inputs: Tensor, targets: Tensor, idx: Tensor) -> Tensor:
        """A minibatch estimator's gradient on the examples ``idx``."""
        x, y = batches.take((inputs, targets), idx)
        if name == "batchnorm":
            return _flat(_batch_grad(self.train_bn, x, y, self.loss_fn), self.names)
        if name == "microbatch":
            k = min(self.microbatch_size, len(idx))
            if k not in self.microbatch:
                self.microbatch[k] = _swap(self.base, "population", microbatch=k, **self.population_options)
            return _flat(_batch_grad(self.microbatch[k], x, y, self.loss_fn), self.names)
        if name == "two_stage":
            return _flat(two_stage_gradient(self.base, x, y, self.loss_fn, self.chunk_size).grads, self.names)
        if name == "batch_renorm":
            return _flat(_batch_grad(self.renorm, x, y, self.loss_fn), self.names)
        raise UnknownNameError("estimator", name, ESTIMATORS)


# ---------------------------------------------------------------- the analysis


def _groups(model: nn.Module) -> dict[str, slice]:
    groups, start = {}, 0
    for name, p in parameters(model).items():
        groups[name] = slice(start, start + p.numel())
        start += p.numel()
    return {"total": slice(0, start), **groups}


def estimator_bias(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    batch_sizes: tuple[int, ...] = QUICK["batch_sizes"],
    repeats: int = QUICK["repeats"],
    estimators: tuple[str, ...] = ESTIMATORS,
    seed: int = 0,
    options: dict | None = None,
    track: Callable = lambda iterable, description="", total=None: iterable,
    target: PopulationGradient | None = None,
    budget: Budget | None = None,
    reserve: float | None = None,
) -> tuple[pd.DataFrame, PopulationGradient]:
    """The ``bias_estimators`` table: :class:`BiasStatistics` per estimator, batch size B and
    parameter group (``total`` and each parameter), over ``repeats`` minibatches of B examples
    drawn without replacement (seeded; the same minibatches for every estimator); groups whose
    ||g*_g|| is :func:`negligible` against the total get NaN relative figures. Runs on a
    copy of ``model`` in the dtype of ``inputs``; ``model`` is left bit-identical. Cells run by
    batch size, every estimator at each; with ``budget``, the cells left once the longest cell
    so far no longer fits are cut (recorded in ``budget.cuts``), and a cell whose draws outrun the
    time left (a :class:`~normscope.budget.Deadline` between draws, leaving ``reserve`` seconds:
    the Jacobian check's, about one pass for g*) keeps the draws it made (at least
    :data:`MIN_REPEATS`; its interval is wider) and ends the cells.
    """
    for name in estimators:
        if name not in ESTIMATORS:
            raise UnknownNameError("estimator", name, ESTIMATORS)
    n = batches.check_sliceable((inputs, targets))
    sizes = [b for b in batch_sizes if 2 <= b <= n]
    if not sizes:
        raise InvalidArgumentError(f"batch sizes {list(batch_sizes)} leave none in [2, {n}] (N = {n} examples)")
    with preserved(model):
        work = copy.deepcopy(model).to(batches.floating_dtype(inputs, model)).eval()
    clock = time.perf_counter if budget is None else budget.measure_clock
    started = clock()
    g_star = target or population_gradient(work, inputs, targets, loss_fn)
    reserve = agreed(clock() - started) if reserve is None else reserve
    est = _Estimators(work, g_star, loss_fn, options or {})
    names = est.names
    star = _flat(g_star.grads, names)
    control_target = None  # the eval-mode full-data gradient, made when the first control cell runs
    groups = _groups(work)
    generator = torch.Generator().manual_seed(seed)
    draws = {b: [torch.randperm(n, generator=generator)[:b] for _ in range(repeats)] for b in sizes}
    rows = []
    jobs = [(e, b) for b in sizes for e in estimators]
    longest = 0.0
    for done, (estimator, b) in enumerate(track(jobs, description="estimator bias", total=len(jobs))):
        if budget is not None and longest > budget.remaining():
            budget.cut(f"{len(jobs) - done} of {len(jobs)} (estimator, batch size) cells from batch size {b} on",
                       f"each took up to {longest:.3g} s, {budget.remaining():.3g} s were left")
            break
        started = clock()
        deadline = None if budget is None else budget.deadline(floor=MIN_REPEATS, reserve=reserve)
        samples = est.samples(estimator, inputs, targets, draws[b], deadline)
        if estimator == "control" and control_target is None:
            control_target = _flat(_chunked_grad(est.base, inputs, targets, loss_fn, 8 * est.chunk_size), names)
        reference = control_target if estimator == "control" else star
        total_norm = float(reference.double().norm())
        for group, part in groups.items():
            figures = bias_statistics(samples[:, part], reference[part], total_norm=total_norm)
            rows.append(
                {"estimator": estimator, "batch_size": b, "group": group, **figures.__dict__, "settings": est.settings[estimator]}
            )
        longest = max(longest, agreed(clock() - started))
        if getattr(deadline, "stopped", False):
            budget.cut(f"{repeats - len(samples)} of {repeats} draws of the ({estimator}, batch size {b}) cell and the "
                       f"{len(jobs) - done - 1} cells after it", f"the time budget ran out during the cell; it holds "
                       f"{len(samples)} draws, its interval is wider")
            break
    return pd.DataFrame(rows), g_star


def jacobian_product_bias(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    chunk_size: int | None = 64,
    target: PopulationGradient | None = None,
) -> pd.DataFrame:
    """The ``bias_jacobian`` table ("Extreme Normalization" (under review) §2.2, MATH.md §4): the two-stage estimate at B = N
    with the EMAs at the population moments and r = 1 against g*,
    ``jacobian_product_gap = ||g_two-stage - g*||``, ``relative_gap = gap / ||g*||``. The gap is
    the mean of per-example Jacobian products minus the product of mean Jacobians: zero (to
    float64 rounding) with one normalization level, nonzero with two or more in series.
    ``target``: the full-batch g* of this model on this data when already computed.
    """
    with preserved(model):
        work = copy.deepcopy(model).to(batches.floating_dtype(inputs, model)).eval()
    g_star = target or population_gradient(work, inputs, targets, loss_fn)
    _set_moments(work, g_star)
    names = list(g_star.grads)
    estimate = _flat(two_stage_gradient(work, inputs, targets, loss_fn, chunk_size).grads, names)
    star = _flat(g_star.grads, names)
    gap = float((estimate - star).norm())
    return pd.DataFrame(
        [{"n_norm_layers": g_star.levels, "n_sites": len(g_star.mean), "jacobian_product_gap": gap, "relative_gap": gap / float(star.norm())}]
    )


def slopes(table: pd.DataFrame) -> pd.DataFrame:
    """The ``bias_slopes`` table: per estimator and group the log-log slope of the bias against B
    with its 95% interval, fitted on the measurable points only (:func:`normscope.rules.log_log_fit`,
    three or more needed; NaN otherwise)."""
    keep = table["measurable"] if "measurable" in table.columns else measurable(table)
    rows = []
    for (estimator, group), part in table.groupby(["estimator", "group"], sort=False):
        fit = log_log_fit(part["batch_size"].to_numpy(float), part["rel_bias"].to_numpy(float), keep[part.index].to_numpy())
        rows.append({"estimator": estimator, "group": group, **fit})
    return pd.DataFrame(rows, columns=["estimator", "group", "slope", "intercept", "slope_lo", "slope_hi", "n_points"])


def _data(ctx: AnalysisContext, limit: int | None) -> tuple:
    if ctx.dataset is not None:
        data = ctx.dataset
    elif ctx.loader is not None:
        split = getattr(ctx.loss_fn, "batch", batches.split)
        data = batches.concat([batches.to_device(split(raw), ctx.device) for raw in ctx.loader])
    else:
        data = batches.concat(ctx.batches)
    n = batches.size(data[0])
    if limit is not None and n > limit:
        data = batches.take(data, torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))[:limit])
    return data


def _findings(table: pd.DataFrame, slope_table: pd.DataFrame, jacobian: pd.DataFrame, g_star: PopulationGradient, n: int,
              single_value: list[str], quick: bool = True) -> list[Finding]:
    total = table[table["group"] == "total"]
    out = bias_findings(table, slope_table, LABELS, jacobian, n, single_value, quick)
    smallest = total["batch_size"].min()
    best = total[(total["batch_size"] == smallest) & (total["estimator"] != "control")].sort_values("mse")
    if len(best):
        row = best.iloc[0]
        out.append(Finding(f"At batch size {int(smallest)} the estimator with the smallest error (bias² + variance) is "
                           f"{LABELS[row['estimator']].lower()}.", "bias", "note", site=row["estimator"], metric="mse",
                           value=row["mse"], table="bias_estimators", where={"batch_size": int(smallest), "group": "total"}, statistic="min"))
    zero = sorted(set(table.loc[table["zero_gradient"] & (table["estimator"] != "control"), "group"]))
    if zero:
        largest = table.loc[table["group"].isin(zero), "abs_bias"].max()
        out.append(Finding(
            f"{plural(len(zero), 'parameter group')} {'has' if len(zero) == 1 else 'have'} a zero population gradient: "
            f"{', '.join(zero[:6])}{', ...' if len(zero) > 6 else ''}. A normalization after them removes their effect "
            "(e.g. the bias of a layer feeding a BatchNorm), so they have no relative bias (shown as –); the largest absolute "
            f"bias among them is {largest:.2g}.", "bias", "note", metric="abs_bias", value=largest, table="bias_estimators",
            where={"zero_gradient": True}, statistic="max"))
    ranks = current().size
    out.append(Finding(
        f"The population gradient was computed {g_star.method} over {plural(n, 'example')} in {plural(g_star.passes, 'pass', 'passes')}"
        + (f" (2L + 1 with L = {g_star.levels} normalization levels in series)" if g_star.method == "streamed" else "")
        + (f", each rank of {ranks} streaming its shard, the sums all-reduced." if ranks > 1 else "."),
        "bias", "note", metric="target_norm", value=float(total["target_norm"].iloc[0]), table="bias_estimators",
        where={"estimator": total["estimator"].iloc[0], "batch_size": int(smallest), "group": "total"}))
    return out


def analyze(ctx: AnalysisContext) -> AnalyzerOutput:
    """Estimator bias against the population gradient ("Extreme Normalization" (under review) §2–3, MATH.md §4).

    Options (``ctx.options``, prefix ``bias_``): ``batch_sizes``, ``repeats``, ``examples``,
    ``estimators``, ``dtype`` (float64), ``microbatch`` (2), ``r_m``, ``r_v``, ``f_max``,
    ``u_max``, ``memory`` (bytes of working memory; default
    :func:`normscope.budget.memory_budget` of :func:`~normscope.budget.step_memory` on the first
    batch: ``max(16 MiB, 2 x the training step)``), ``chunk_size`` (examples per chunk of
    per-example gradients and of two-stage backprop; default
    :func:`~normscope.budget.chunk_for_memory` of ``memory``: at most 64, fewer when 3 copies of
    their gradients would pass it). The per-example estimators hold the R means of a batch size's
    draws and one chunk's gradients, never the gradients of all N examples.
    ``ctx.quick``: B in {4, 16, 64}, 16 repeats, 256 examples.
    Data sets over 4096 examples get g* streamed (2L + 1 passes, L normalization levels).
    Under a time budget g* (the headline's reference) is timed, and the Jacobian check is priced at
    :data:`JACOBIAN_PASSES` times it: the estimator cells leave that much, and the check is cut
    (``meta["budget"]["cuts"]``, no ``bias_jacobian`` row) when it no longer fits. The control
    estimator's full-data eval-mode gradient is made only when its first cell runs.

    Under :func:`normscope.distributed.session` g* is streamed over this rank's shard of the
    examples and all-reduced (:func:`~normscope.analyzers.population_gradient.streamed_population_gradient`);
    the estimators' minibatch draws and per-example gradients are replicated on every rank (the
    same seeded draws from the same examples).
    """
    if not norm_sites(ctx.model):
        return AnalyzerOutput(
            findings=["Estimator bias needs BatchNorm-style layers (BatchNorm1d/2d/3d, PopulationNorm); this model has none, so there is no minibatch bias to measure."]
        )
    if not any(isinstance(m, BatchNormBase) for m in ctx.model.modules()):
        return AnalyzerOutput(
            findings=["Estimator bias does not apply: its estimators (minibatch BatchNorm, per-example and microbatch PopulationNorm, "
                      "batch renorm, two-stage backprop) replace torch BatchNorm layers, and this model's BatchNorm-style sites are "
                      "all PopulationNorm already."]
        )
    defaults = QUICK if ctx.quick else FULL
    opts = {k[len("bias_"):]: v for k, v in ctx.options.items() if k.startswith("bias_")}
    dtype = getattr(torch, str(opts.get("dtype", "float64")).replace("torch.", ""))
    inputs, targets = _data(ctx, opts.get("examples", defaults["examples"]))
    inputs, targets = batches.to_device((inputs, targets), ctx.device, dtype)
    n = batches.size(inputs)
    target = None
    with preserved(ctx.model):
        work = copy.deepcopy(ctx.model).to(dtype).eval()
    if "chunk_size" not in opts:
        memory = int(opts["memory"]) if "memory" in opts else memory_budget(step_memory(ctx.model, ctx.batches[0], ctx.loss_fn))
        opts["chunk_size"] = chunk_for_memory(sum(p.numel() for p in work.parameters()), next(work.parameters()).element_size(), memory)
    graph = ctx.driver.graph if ctx.driver is not None else None
    world = current()
    if n > FULL_BATCH_MAX or world.active:
        step = int(opts.get("chunk_size", 64)) * 8
        mine = shard((inputs, targets))
        chunks = [batches.take(mine, slice(start, start + step)) for start in range(0, batches.size(mine[0]), step)]
        target = streamed_population_gradient(work, chunks, ctx.loss_fn, covering(graph, work, inputs, norm_sites(work)))
    clock = ctx.budget.measure_clock
    started = clock()
    if target is None:
        target = population_gradient(work, inputs, targets, ctx.loss_fn)
    jacobian_cost = JACOBIAN_PASSES * agreed(clock() - started)
    table, g_star = estimator_bias(
        work,
        inputs,
        targets,
        ctx.loss_fn,
        batch_sizes=tuple(opts.get("batch_sizes", defaults["batch_sizes"])),
        repeats=int(opts.get("repeats", defaults["repeats"])),
        estimators=tuple(opts.get("estimators", ESTIMATORS)),
        seed=ctx.seed,
        options=opts,
        track=ctx.track,
        target=target,
        budget=ctx.budget,
        reserve=jacobian_cost,
    )
    table["measurable"] = measurable(table)
    slope_table = slopes(table)
    full_batch = g_star if g_star.method == "full-batch" or world.active else None
    if ctx.budget.limited and jacobian_cost > ctx.budget.remaining():
        ctx.budget.cut("the Jacobian check (two-stage backprop on all examples, bias_jacobian)",
                       f"it costs about {jacobian_cost:.3g} s ({JACOBIAN_PASSES:g} passes of g*), "
                       f"{max(ctx.budget.remaining(), 0.0):.3g} s were left")
        jacobian = pd.DataFrame(columns=["n_norm_layers", "n_sites", "jacobian_product_gap", "relative_gap"])
    else:
        jacobian = jacobian_product_bias(work, inputs, targets, ctx.loss_fn, int(opts.get("chunk_size", 64)), full_batch)
    total = table[table["group"] == "total"]
    headline: dict[str, float | int | str] = {
        "bias_examples": n,
        "bias_population_gradient": f"{g_star.method}, {g_star.passes} pass(es)",
    }
    if len(jacobian):
        headline["bias_jacobian_relative_gap"] = float(jacobian["relative_gap"].iloc[0])
    bn = total[total["estimator"] == "batchnorm"].sort_values("batch_size")
    if len(bn):
        headline[f"bias_batchnorm_b{int(bn.iloc[0]['batch_size'])}"] = float(bn.iloc[0]["rel_bias"])
        slope = slope_table[(slope_table["estimator"] == "batchnorm") & (slope_table["group"] == "total")]["slope"]
        headline["bias_batchnorm_slope"] = float(slope.iloc[0])
    return AnalyzerOutput(
        tables={"bias_estimators": table, "bias_slopes": slope_table, "bias_jacobian": jacobian},
        findings=_findings(table, slope_table, jacobian, g_star, n, single_value_sites(work, inputs, graph), ctx.quick),
        headline=headline,
    )
