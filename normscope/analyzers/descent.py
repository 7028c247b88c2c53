"""Second-order descent check (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5) and BN as reparameterization (Deb, "Batch Normalization" (notes), §6).

Along a direction ``d`` the quadratic model of the minibatch loss is::

    L(theta + a d) ~ L + a g^T d + a^2/2 d^T H d

With ``g^T d < 0`` it decreases iff ``0 < a < a_crit = 2 (-g^T d) / d^T H d`` (every ``a > 0``
when ``d^T H d <= 0``); with ``g^T d >= 0`` ``d`` is no descent direction. For ``d = -g`` this is
``2 ||d||^2 / d^T H d``. Every ``d`` here is the update *per unit learning rate* (``-g``, or an
optimizer's update divided by its lr), so the actual step is ``lr * d`` and it is compared as
``lr < a_crit``. This module measures that per layer (the block ``H_gg`` of
the layer's own parameters) and in total, in training mode (batch statistics) and eval mode
(running statistics); compares the quadratic model with the real loss along ``d``; checks the
scale invariance of weights that feed a BatchNorm; and, with :mod:`~normscope.analyzers.spectrum`
and :mod:`~normscope.analyzers.reparam`, reports the curvature spectrum and Deb's
reparameterization. Tables: ``descent_*`` in ``docs/tables.md``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.analyzers.hvp import MODES, BatchLoss, HessianOperator, curvature_dtype, graph_chunk
from normscope.analyzers.reparam import reparam_check
from normscope.analyzers.spectrum import MIN_TRACE_SAMPLES, krylov_trace, lanczos, trace_interval
from normscope.budget import Budget, agreed
from normscope.capture.graph import SiteGraph, covering
from normscope.distributed import current, share_out
from normscope.findings import Finding
from normscope.rules import descent_findings, descent_verdicts
from normscope.errors import InvalidArgumentError

COLUMNS = {
    "descent_directions": ["mode", "direction", "group", "sq_norm", "slope", "curvature", "a_crit", "lr", "lr_below_a_crit",
                           "descent_direction", "a_crit_reason"],
    "descent_quadratic": ["mode", "step", "loss", "quadratic", "rel_error"],
    "descent_spectrum": ["mode", "group", "rank", "eigenvalue", "stability_limit", "residual", "error_bound", "bound",
                         "products", "converged"],
    "descent_trace": ["mode", "group", "trace", "trace_stderr", "trace_low", "trace_high", "n_samples", "products", "method"],
    "descent_scale_invariance": ["layer", "c", "loss_ratio", "a_crit_ratio", "max_abs_inner", "effective_lr"],
    "descent_reparam": ["layer", "max_abs_error", "cond_s", "cond_reparam"],
    "descent_operator": ["mode", "dtype", "backend", "chunk", "float64_rel_error", "float64_check", "symmetry_error", "symmetry",
                         "excluded_rows", "n_unused", "unused_parameters"],
}
DEFAULT_LR = 0.1
PARTING_THRESHOLD = 0.1
REFINE_STEPS = 8
SCALES = (1.0, 0.5, 2.0)
QUICK = {"k": 1, "layer_k": 1, "layer_spectra": 3, "trace_products": 30, "steps": 12, "tol": 1e-3, "lanczos_products": 40}
FULL = {"k": 5, "layer_k": 5, "layer_spectra": None, "trace_products": 99, "steps": 25, "tol": 1e-4, "lanczos_products": 100}
FIRST_PRODUCT_GRADIENTS = 4.0
"""A Hessian-vector product not measured yet, priced in gradients: the first double-backward product
builds the gradient's graph (about one gradient) and then backpropagates through it (2-2.5 gradients
on the reference ResNet: 46-62 ms against 25 ms, 1 thread)."""
TRIAL_SHARE = 0.02
HEADLINE_PRODUCTS = 3
"""Products λ_max's Lanczos gets whenever the whole analysis has time for them and for the later
modes' :data:`MODE_FLOOR`, even past the mode's share (the Krylov floor for λ_max alone is 3-7 on
the reference models): a headline, with the error bound it reached."""
MODE_FLOOR = {"gradient": 2.0, "hvp": HEADLINE_PRODUCTS + 3.0}
"""The least a mode's headlines take: the gradient (twice with the first graph), the direction's
product, the symmetry check's two products and λ_max's floor."""
FLOAT64_PRODUCT = 6.0
"""A float64 product with its graph, priced in model-dtype products for the float64 check (float64 convolutions cost
about 5x float32 ones on CPU; the graph adds about one gradient)."""


def critical_step(slope: float, curvature: float) -> float:
    """``a_crit = 2 (-g^T d) / d^T H d`` from the slope ``g^T d`` and the curvature ``d^T H d``:
    ``inf`` when ``d^T H d <= 0`` (the model decreases for every step), NaN when ``g^T d >= 0``
    (no descent direction). ``2 ||d||^2 / d^T H d`` for ``d = -g`` (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5)."""
    if not slope < 0:
        return math.nan
    return -2.0 * slope / curvature if curvature > 0 else math.inf


def critical_step_reason(slope: float, curvature: float) -> str:
    """Why :func:`critical_step` is what it is: ``quadratic`` (finite), ``no_descent``
    (``g^T d >= 0``: NaN) or ``nonpositive_curvature`` (``d^T H d <= 0``: inf)."""
    if not slope < 0:
        return "no_descent"
    return "quadratic" if curvature > 0 else "nonpositive_curvature"


def negative_gradient(loss: BatchLoss, grads: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``d = -dL/dtheta`` for every parameter of the loss's model copy (``grads`` when already
    computed, by parameter name; Deshmukh, "Batch Norm" (notes, 2020), §2)."""
    return {n: -g for n, g in (loss.gradient() if grads is None else grads).items()}


def optimizer_direction(model: nn.Module, optimizer: torch.optim.Optimizer, loss: BatchLoss,
                        grads: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float]:
    """The update the optimizer would make from this batch's gradient, per unit of learning rate.

    A fresh optimizer of the same class, hyper-parameters and (deep-copied) state steps on
    copies of the parameters whose ``.grad`` is ``dL/dtheta`` of ``loss`` (``grads`` when already
    computed, by parameter name); returns
    ``d = (theta_after - theta_before) / lr`` (zero for parameters the optimizer does not hold)
    and ``lr`` (the first group's). ``model`` and ``optimizer`` are not touched. A wrapper that
    holds the optimizer as ``.optimizer`` (``accelerate``'s, as the Hugging Face Trainer uses) is
    read through to the optimizer it wraps.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    lr = float(optimizer.param_groups[0]["lr"])
    if lr <= 0:
        raise InvalidArgumentError(f"the optimizer's learning rate must be positive (got {lr})")
    grads = loss.gradient() if grads is None else grads
    leaves: dict[str, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        held = [names[id(p)] for p in group["params"] if id(p) in names]
        for n in held:
            leaves[n] = loss.params[n].detach().clone().requires_grad_(True)
            leaves[n].grad = grads[n].detach().clone()
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [leaves[n] for n in held]})
    twin = type(optimizer)(groups)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    with torch.no_grad():
        twin.step()
    return {n: (leaves[n].detach() - p) / lr if n in leaves else torch.zeros_like(p) for n, p in loss.params.items()}, lr


def descent_rows(
    total: HessianOperator, d: dict[str, Tensor], lr: float, direction: str, groups: dict[str, list[str]] | None = None
) -> list[dict]:
    """One ``descent_directions`` row for the total (``total``, the operator over all parameters)
    and for each layer (moving that layer's block only): ``||d_g||^2``, the slope ``g_g^T d_g``,
    ``d_g^T H_gg d_g`` (one Hessian-vector product each), ``a_crit = 2 (-g_g^T d_g) / d_g^T H_gg d_g``
    (:func:`critical_step`, with its reason) and ``lr < a_crit``; ``d`` is per unit learning rate,
    so the step ``lr * d`` decreases the quadratic model iff ``lr < a_crit`` (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5).
    ``groups``: ``{name: parameter names, or None for the total}``; default the total and every layer."""
    loss = total.loss
    groups = {"total": None, **loss.layers()} if groups is None else groups
    gradient = total.split(total.gradient())
    rows = []
    for group, names in groups.items():
        op = total if names is None else total.block(names)
        flat = op.flatten(d)
        sq_norm = float(flat.double().pow(2).sum())
        slope = float(torch.dot(op.flatten(gradient).double(), flat.double()))
        curvature = op.quadratic_form(flat)
        a_crit = critical_step(slope, curvature)
        rows.append({"mode": loss.mode, "direction": direction, "group": group, "sq_norm": sq_norm, "slope": slope,
                     "curvature": curvature, "a_crit": a_crit, "lr": lr, "lr_below_a_crit": bool(lr < a_crit),
                     "descent_direction": slope < 0, "a_crit_reason": critical_step_reason(slope, curvature)})
    return rows


def quadratic_model(op: HessianOperator, d: dict[str, Tensor], steps: Sequence[float], slope: float | None = None,
                    curvature: float | None = None) -> pd.DataFrame:
    """``descent_quadratic``: the real ``L(theta + a d)`` against ``Q(a) = L + a g^T d + a^2/2 d^T H d``
    for each step ``a``, with ``rel_error = |L - Q| / max(|L(a) - L(0)|, |Q(a) - L(0)|)`` (the error
    relative to the actual or the predicted change; Deshmukh's (2020) expansion, MATH.md §5).
    ``op`` is the operator over all parameters; ``slope = g^T d`` and ``curvature = d^T H d`` are
    computed from it (a gradient and one product) unless given (e.g. from :func:`descent_rows`)."""
    loss = op.loss
    flat = op.flatten(d)
    if slope is None:
        slope = float(torch.dot(op.gradient().double(), flat.double()))
    if curvature is None:
        curvature = op.quadratic_form(flat)
    with torch.no_grad():
        base = float(loss())
        rows = []
        for a in steps:
            value = float(loss({n: loss.params[n] + a * d[n] for n in loss.params}))
            predicted = base + a * slope + 0.5 * a * a * curvature
            scale = max(abs(value - base), abs(predicted - base))
            rows.append({"mode": loss.mode, "step": float(a), "loss": value, "quadratic": predicted,
                         "rel_error": abs(value - predicted) / scale if scale > 0 else 0.0})
    return pd.DataFrame(rows, columns=COLUMNS["descent_quadratic"])


def parting_step(table: pd.DataFrame, threshold: float = PARTING_THRESHOLD) -> float:
    """The smallest step of ``descent_quadratic`` whose ``rel_error`` exceeds ``threshold`` (NaN if none)."""
    parted = table.loc[table["rel_error"] > threshold, "step"]
    return float(parted.min()) if len(parted) else math.nan


def refine_near_parting(op: HessianOperator, d: dict[str, Tensor], table: pd.DataFrame, slope: float, curvature: float,
                        n: int = REFINE_STEPS) -> pd.DataFrame:
    """``table`` (one mode's ``descent_quadratic``) with ``n`` more steps, geometrically spaced
    between the last grid step below the parting step and the parting step, so that the step
    where the quadratic model stops describing the loss is located finely; unchanged when the
    model never parts or parts at the first step. ``slope`` and ``curvature`` as in :func:`quadratic_model`."""
    parted = parting_step(table)
    below = table.loc[table["step"] < parted, "step"]
    if math.isnan(parted) or below.empty:
        return table
    extra = quadratic_model(op, d, np.geomspace(float(below.max()), parted, n + 2)[1:-1], slope, curvature)
    return pd.concat([table, extra], ignore_index=True).sort_values("step", ignore_index=True)


def step_grid(lr: float, a_crit: float, n: int) -> np.ndarray:
    """``n`` geometric steps from ``min(lr, a_crit) / 100`` to ``4 max(lr, a_crit)``."""
    low, high = (lr, lr) if not math.isfinite(a_crit) else (min(lr, a_crit), max(lr, a_crit))
    return np.geomspace(low / 100, 4 * high, n)


def feeding_layers(model: nn.Module, inputs: Tensor, graph: SiteGraph | None = None) -> dict[str, str]:
    """``{linear_or_conv_name: batchnorm_name}`` for every Linear/Conv whose output tensor is the
    very input of a BatchNorm (the scale-invariant weights of MATH.md §5), from the site graph
    (:mod:`normscope.capture.graph`: ``graph``, or one captured forward of ``inputs``), so it
    follows the real data flow, not definition order."""
    norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    return covering(graph, model, inputs, norms).feeding_layers(model)


def scale_invariance(loss: BatchLoss, layer: str, lr: float, scales: Iterable[float] = SCALES, backend: str = "auto") -> list[dict]:
    """``descent_scale_invariance`` rows for the weight ``W`` of ``layer`` (which feeds a BatchNorm):
    ``L(cW) / L(W)`` (1 when eps = 0), ``a_crit(cW) / a_crit(W)`` of the block ``H_WW`` along
    ``-dL/dW`` (``c^2`` when eps = 0), ``max_j |<cW_j, dL/d(cW)_j>|`` over output channels (0 when
    eps = 0) and the effective learning rate ``lr / ||cW||^2`` (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5)."""
    name = f"{layer}.weight"
    weight = loss.params[name]

    def measure(c: float) -> tuple[float, float, float]:
        scaled = loss.with_params({name: c * weight})
        op = HessianOperator(scaled, [name], backend)
        g = op.gradient()
        a_crit = critical_step(-float(g.double().pow(2).sum()), op.quadratic_form(-g))
        inner = (c * weight * op.split(g)[name]).double().flatten(1).sum(dim=1)
        with torch.no_grad():
            value = float(scaled())
        return value, a_crit, float(inner.abs().max())

    scales = [float(c) for c in scales]
    if any(c <= 0 for c in scales):
        raise InvalidArgumentError(f"scales must be positive (got {scales})")
    measured = {c: measure(c) for c in dict.fromkeys([1.0, *scales])}
    base_loss, base_a_crit, _ = measured[1.0]
    rows = []
    for c in scales:
        value, a_crit, inner = measured[c]
        rows.append({"layer": layer, "c": float(c), "loss_ratio": value / base_loss, "a_crit_ratio": a_crit / base_a_crit,
                     "max_abs_inner": inner, "effective_lr": lr / float((c * weight).double().pow(2).sum())})
    return rows


def spectrum_rows(op: HessianOperator, mode: str, group: str, k: int, tol: float, seed: int,
                  max_products: int | None = None, stop=None) -> list[dict]:
    """``descent_spectrum`` rows from :func:`lanczos`: the top ``k`` eigenvalues, ``2 / eigenvalue``
    (NaN if <= 0), each value's residual ``||H y - theta y||``, error bound and which bound it is
    (``residual``, ``gap`` or ``exact``: :func:`~normscope.analyzers.spectrum.ritz_errors`), the
    products spent and whether the tolerance was reached (not when ``max_products`` or ``stop``, a
    time budget's :class:`~normscope.budget.Deadline`, stopped it first)."""
    found = lanczos(op, k, tol, seed, max_products, stop=stop)
    return [{"mode": mode, "group": group, "rank": i + 1, "eigenvalue": float(v),
             "stability_limit": 2.0 / float(v) if v > 0 else math.nan, "residual": float(r), "error_bound": float(e),
             "bound": b, "products": found.products, "converged": found.converged}
            for i, (v, r, e, b) in enumerate(zip(found.values, found.residuals, found.errors, found.bounds))]


def spectrum_layers(traces: dict[str, tuple[float, float]], layers: dict[str, list[str]], limit: int | None) -> list[str]:
    """The layers whose spectra to compute: all (``limit=None``), or the ``limit`` layers with the
    largest absolute block trace ``|tr H_gg|`` (layers without a trace last), in model order."""
    if limit is None or len(layers) <= limit:
        return list(layers)
    chosen = set(sorted(layers, key=lambda g: -abs(traces[g][0]) if g in traces else math.inf)[:limit])
    return [g for g in layers if g in chosen]


def selected_layers(layers: dict[str, list[str]], sites: str | Sequence[str] | None) -> dict[str, list[str]]:
    """The layers (module paths) matching the fnmatch pattern(s) ``sites``; all when ``None``."""
    if sites is None:
        return layers
    patterns = [sites] if isinstance(sites, str) else list(sites)
    return {g: names for g, names in layers.items() if any(fnmatch.fnmatchcase(g, p) for p in patterns)}


def _frame(name: str, rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS[name])


def trace_rows(mode: str, traces: dict[str, tuple[float, float, int]], products: int) -> list[dict]:
    """``descent_trace`` rows: each block's trace with its standard error and 95% Student-t interval
    (:func:`~normscope.analyzers.spectrum.trace_interval`, ``n_samples - 1`` degrees of freedom);
    trace, error and interval NaN (not measured) below
    :data:`~normscope.analyzers.spectrum.MIN_TRACE_SAMPLES` samples."""
    rows = []
    for group, (t, se, samples) in traces.items():
        measured = samples >= MIN_TRACE_SAMPLES
        low, high = trace_interval(t, se, samples)
        rows.append({"mode": mode, "group": group, "trace": t if measured else math.nan, "trace_stderr": se if measured else math.nan,
                     "trace_low": low, "trace_high": high, "n_samples": samples, "products": products, "method": "krylov-hutch++"})
    return rows


def float64_agreement(total: HessianOperator, v: Tensor) -> float:
    """``||H v - H_64 v|| / ||H_64 v||``: ``total``'s product (in its dtype) against the same
    product in float64 (the copy and the batch cast to float64 at the same parameter values, double
    backward, the same padding rows excluded, example chunks where its graph needs them); 0 when
    ``total`` computes in float64."""
    if total.dtype == torch.float64:
        return 0.0
    exact_loss = total.loss.in_float64()
    exact = HessianOperator(exact_loss, total.names, "double_backward", _chunks(exact_loss))
    exact.adopt_symmetry(total)
    v = v.double()
    reference = exact(v)
    exact.release()
    return float((total(v).double() - reference).norm() / reference.norm()) if reference.norm() > 0 else 0.0


def operator_row(mode: str, total: HessianOperator, agreement: float, check: str) -> dict:
    """The ``descent_operator`` row of a mode: how its products ran (dtype, backend, examples per
    chunk), their agreement with float64 (:func:`float64_agreement`) and how it was checked, the
    symmetry check (:func:`~normscope.analyzers.hvp.settle_symmetry`), the padding rows excluded and
    the parameters the loss does not use (zero gradient and zero curvature)."""
    symmetry = total.symmetry or {}
    return {"mode": mode, "dtype": str(total.dtype).removeprefix("torch."), "backend": total.backend, "chunk": total.chunk,
            "float64_rel_error": agreement, "float64_check": check, "symmetry_error": symmetry.get("error", math.nan),
            "symmetry": symmetry.get("action", "not checked"), "excluded_rows": symmetry.get("excluded", ""),
            "n_unused": len(total.unused_parameters()), "unused_parameters": ", ".join(total.unused_parameters())}


def descent_tables(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn=torch.nn.functional.cross_entropy,
    lr: float = DEFAULT_LR,
    optimizer: torch.optim.Optimizer | None = None,
    modes: Sequence[str] = MODES,
    quick: bool = True,
    seed: int = 0,
    precision: str = "model",
    backend: str = "auto",
    track=None,
    budget: Budget | None = None,
    sites: str | Sequence[str] | None = None,
    graph: SiteGraph | None = None,
    k: int | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Every ``descent_*`` table for ``model`` on one batch, and per mode the HVP backend and chunk.

    All work happens on private copies (:class:`BatchLoss`). ``precision``
    (:func:`~normscope.analyzers.hvp.curvature_dtype`): ``"model"`` computes the products in the
    model's dtype (float32 for most; the Lanczos bases, tridiagonals and trace sums stay float64)
    and checks one of them against float64 per mode where the budget allows (``descent_operator``);
    ``"float64"`` computes everything in float64. ``descent_operator`` also holds the symmetry
    check, the padding rows excluded and the parameters the loss does not use.
    Directions: ``gradient`` (``-dL/dtheta``, checked against ``lr``) and, given ``optimizer``,
    ``optimizer:<class>`` (:func:`optimizer_direction`, checked against the optimizer's lr). The
    quadratic table follows the optimizer's direction when given, the gradient otherwise.
    Settings (:data:`QUICK` or :data:`FULL`): the top ``k`` eigenvalues of ``H`` (``k`` given: that many;
    quick: ``lambda_max`` alone) to relative tolerance ``tol``, the top ``layer_k`` of each layer's block (quick: only the ``layer_spectra``
    layers with the largest block trace), a Krylov Hutch++ trace (:func:`krylov_trace`) from ``trace_products`` products shared
    by all blocks, ``steps`` grid steps. ``sites`` (fnmatch patterns on module paths) restricts the
    per-layer work. ``graph``: the model's site graph (:mod:`normscope.capture.graph`; the
    scale-invariance checks read the layers feeding each BatchNorm from it; one captured forward
    when not given).

    ``budget`` (:class:`~normscope.budget.Budget`, unlimited by default) is split evenly between
    the modes; within a mode the stages run in this order, each only if its products fit in what
    is left at the measured HVP cost (gradients and forwards are priced at the measured gradient
    and forward costs): the total's direction rows and the top eigenvalues of ``H`` (the headline: a_crit and λ_max), the
    quadratic model, the trace, the layers' direction rows (as many layers as fit), the layers' spectra,
    the scale-invariance and reparameterization checks. What does not fit is recorded in
    ``budget.cuts``; the tables hold what finished. Inside a stage the Lanczos runs, the trace and the
    layers' spectra stop between products at the budget's deadline (:class:`~normscope.budget.Deadline`;
    one process), with the bounds they reached, and re-measure the product's cost; λ_max's Lanczos
    gets at least :data:`HEADLINE_PRODUCTS` products while the analysis has time for them and for
    the later modes' :data:`MODE_FLOOR`. The HVP backend is chosen at the first product
    (the total's direction row; trying ``func`` only within :data:`TRIAL_SHARE` of the mode's
    share; cached per model), that product measures the HVP cost when it is not known (until then
    a product is priced at :data:`FIRST_PRODUCT_GRADIENTS` gradients), and the products the choice
    ran beyond it are charged to the mode's plan. Lanczos for the top eigenvalues runs up to ``lanczos_products`` products
    as the budget allows; stopping at that cap is no budget cut (the residuals state the accuracy).

    Memory: one mode's operator at a time (its graph is dropped when the mode ends), and when the
    whole batch's double-backward graph would exceed :data:`normscope.budget.HVP_MEMORY`
    (:func:`~normscope.analyzers.hvp.graph_chunk`) and the loss is verified to be the
    example-weighted mean of its chunks' losses in this mode (eval mode, or train mode without
    BatchNorm's batch statistics; :meth:`~normscope.analyzers.hvp.BatchLoss.example_chunks`),
    products and gradients are summed exactly over example chunks; otherwise the whole batch is
    used. ``meta`` (the second return value) gives each mode's backend and examples per chunk.

    Under :func:`normscope.distributed.session` every rank computes the same rows and makes the
    same budget decisions (:mod:`normscope.budget`). Where the mode's loss decomposes over examples (eval mode, or train mode without
    BatchNorm's batch statistics; float64) the total operator splits its products and gradient
    over the ranks (``split`` of :class:`~normscope.analyzers.hvp.HessianOperator`: each rank its
    share of the examples, the partial sums all-reduced), so the direction rows (total and
    layers), the quadratic model's slope and curvature and the top eigenvalues cost each rank
    ``1/W`` of the examples; every call on it is made in lockstep on all ranks. The trace's
    Hutchinson samples and the layers' spectra are shared out over the ranks and gathered; they
    run on one rank per item, so they use unsplit operators (:meth:`HessianOperator.local`; the
    trace's Lanczos basis, computed by every rank before its samples, is therefore replicated).
    In train mode through BatchNorm the batch statistics couple the examples and every product
    is replicated. ``meta[mode]["ranks"]`` is the number of ranks the mode's products were split
    over (1: replicated or one process). The same values as in one process, to rounding.
    """
    settings = QUICK if quick else FULL
    if k is not None:
        settings = {**settings, "k": int(k)}
    budget = budget or Budget(None)
    tables: dict[str, list[dict]] = {name: [] for name in COLUMNS}
    meta: dict[str, dict] = {}
    track = track or (lambda it, *a, **k: it)
    modes = list(modes)
    for index, mode in enumerate(track(modes, "descent", total=len(modes))):
        plan = budget.share(f"descent ({mode} mode)", [f"descent ({m} mode)" for m in modes[index:]])
        loss = BatchLoss(model, inputs, targets, loss_fn, mode, curvature_dtype(model, precision))
        total = HessianOperator(loss, backend=backend, chunks=_chunks(loss), trial_seconds=TRIAL_SHARE * plan.remaining(),
                                split=current())
        budget.cost("forward", lambda: budget.time(torch.no_grad()(loss.__call__)))
        budget.cost("gradient", lambda: budget.time(total.gradient))
        try:
            _mode_tables(tables, plan, loss, total, model, optimizer, lr, settings, seed, sites, graph, len(modes) - index - 1)
        finally:
            total.release()
        budget.release(f"descent ({mode} mode)")
        meta[mode] = {"backend": total.backend, "chunk": total.chunk, "ranks": 1 if total.world is None else total.world.size}
        if tables["descent_operator"] and tables["descent_operator"][-1]["mode"] == mode:
            row = tables["descent_operator"][-1]
            meta[mode].update({k: row[k] for k in ("dtype", "float64_rel_error", "symmetry", "excluded_rows", "unused_parameters")})
        del loss, total
    return {name: _frame(name, rows) for name, rows in tables.items()}, meta


def _chunks(loss: BatchLoss) -> list[tuple[float, BatchLoss]] | None:
    """The verified example chunks for ``loss``'s products (:func:`graph_chunk`), or ``None`` (the
    whole batch) when the batch's graph fits or the loss does not decompose over example chunks."""
    chunk = graph_chunk(loss)
    if chunk is None:
        return None
    try:
        return loss.example_chunks(chunk)
    except InvalidArgumentError:
        return None


def _mode_tables(tables: dict[str, list[dict]], plan: Budget, loss: BatchLoss, total: HessianOperator, model: nn.Module,
                 optimizer, lr: float, settings: dict, seed: int, sites, graph: SiteGraph | None = None, later: int = 0) -> None:
    """The stages of :func:`descent_tables` for one mode, within ``plan``, appended to ``tables``
    (``later``: the modes still to run after it)."""
    mode = loss.mode
    layers = selected_layers(loss.layers(), sites)
    directions = [("gradient", lambda: (negative_gradient(loss, total.split(total.gradient())), lr))]
    if optimizer is not None:
        directions.append((f"optimizer:{type(optimizer).__name__}", lambda: optimizer_direction(model, optimizer, loss, total.split(total.gradient()))))
    first = {"hvp": len(directions)} if "hvp" in plan.costs else {"gradient": FIRST_PRODUCT_GRADIENTS * len(directions)}
    # the mode's headline (its direction rows, then λ_max's floor) may run past the mode's share while
    # the analysis has time for it and for the later modes' floors
    headline = {**first, "gradient": len(directions) + first.get("gradient", 0)}
    floors = {unit: later * count for unit, count in MODE_FLOOR.items()}
    floors["hvp"] = floors.get("hvp", 0.0) + min(HEADLINE_PRODUCTS, settings["lanczos_products"])
    if not plan.allows_headline("every table of this mode", headline, floors):
        return
    started = plan.measure_clock()
    chosen = [(name, *make()) for name, make in directions]
    for name, d, step_lr in chosen:
        tables["descent_directions"] += descent_rows(total, d, step_lr, name, {"total": None})
    took = plan.measure_clock() - started
    products = len(chosen) + total.selection_products + (total.symmetry or {}).get("products", 0)
    # the product's cost on the budget's clock, from above: the stage (the backend choice and the symmetry
    # check included) less its gradients, per product; Lanczos re-measures it on its own products
    if "hvp" not in plan.injected and "hvp" not in plan.timed:  # once timed, Lanczos keeps it measured
        gradients = plan.cost("gradient") * len(chosen)
        plan.costs["hvp"] = agreed(max(took - gradients, took / (products + len(chosen))) / products)
    plan.spend("gradient", len(chosen))
    plan.spend("hvp", products)
    _, d, step_lr = chosen[-1]
    row = next(r for r in reversed(tables["descent_directions"]) if r["group"] == "total" and r["mode"] == mode)
    cap = settings["lanczos_products"]
    products = plan.affordable("hvp", cap)
    floor = min(HEADLINE_PRODUCTS, cap)
    if products < floor and plan.left_in_all() >= floor * plan.cost("hvp") + later * plan.price(MODE_FLOOR):
        products = floor  # the headline: past the mode's share while the analysis has time for it and the later modes' floors
    if products >= 2:
        deadline = plan.deadline("hvp", floor)
        tables["descent_spectrum"] += spectrum_rows(total, mode, "total", settings["k"], settings["tol"], seed, products, deadline)
        spent = tables["descent_spectrum"][-1]["products"]
        plan.spend("hvp", spent)
        if deadline is not None:
            deadline.finish()
        if not tables["descent_spectrum"][-1]["converged"] and spent < cap:
            plan.cut("Lanczos iterations for the top eigenvalues", f"the budget allowed {spent} of the {cap} products "
                     f"before tolerance {settings['tol']:g}; the residuals in descent_spectrum give the accuracy reached")
    else:
        plan.cut("the top eigenvalues", "no time left for 2 Hessian-vector products")
    if plan.allows("the quadratic model", {"forward": settings["steps"] + 1}):
        started = plan.measure_clock()
        coarse = quadratic_model(total, d, step_grid(step_lr, row["a_crit"], settings["steps"]), row["slope"], row["curvature"])
        plan.spend("forward", settings["steps"] + 1)
        plan.remeasure("forward", agreed(plan.measure_clock() - started) / (settings["steps"] + 1))
        if plan.allows("a fine grid near the parting step", {"forward": REFINE_STEPS + 1}):
            coarse = refine_near_parting(total, d, coarse, row["slope"], row["curvature"])
            plan.spend("forward", REFINE_STEPS + 1)
        tables["descent_quadratic"] += coarse.to_dict("records")
    agreement, check = 0.0, "products in float64"
    if total.dtype != torch.float64:
        agreement, check = math.nan, "not measured: no time left"
        if plan.allows("the float64 check of the products", {"hvp": FLOAT64_PRODUCT + 1}):
            agreement, check = float64_agreement(total, total.flatten(d)), "measured"
            plan.spend("hvp", FLOAT64_PRODUCT + 1)
    tables["descent_operator"].append(operator_row(mode, total, agreement, check))
    products = plan.affordable("hvp", settings["trace_products"])
    traces: dict[str, tuple[float, float, int]] = {}
    if products >= 2:
        deadline = plan.deadline("hvp")
        before = total.products
        traces = krylov_trace(total, products, seed, layers, deadline)
        if deadline is not None:  # one process: the products it ran (it stops early at the deadline)
            products = total.products - before
            deadline.finish()
        tables["descent_trace"] += trace_rows(mode, traces, products)
        plan.spend("hvp", products)
        if products < settings["trace_products"]:
            plan.cut(f"{settings['trace_products'] - products} of {settings['trace_products']} trace products",
                     "the budget ran out; the intervals in descent_trace give the accuracy reached (no trace below "
                     f"{MIN_TRACE_SAMPLES} samples)")
    else:
        plan.cut("the trace", "no time left for 2 Hessian-vector products")
    fitting = plan.affordable("hvp", len(layers) * len(chosen))
    done = list(layers)[: fitting // len(chosen)]
    for name, d, step_lr in chosen:
        tables["descent_directions"] += descent_rows(total, d, step_lr, name, {g: layers[g] for g in done})
    plan.spend("hvp", len(done) * len(chosen))
    if len(done) < len(layers):
        plan.cut(f"per-layer critical steps of {len(layers) - len(done)} of {len(layers)} layers",
                 "one Hessian-vector product each did not fit")
    spectra = spectrum_layers(traces, {g: layers[g] for g in done}, settings["layer_spectra"])
    world = current()
    if world.active:  # the layers' Lanczos runs are independent: shared out over the ranks, each on its owner
        # only, so with unsplit operators (a split one would all-reduce on one rank), a product of which costs
        # about as many of the measured (split) products as the ranks it was split over; planned per round of W layers
        per_layer = 2 * settings["layer_k"] + 10
        each = per_layer * (1 if total.world is None else total.world.size)
        rounds = plan.affordable("hvp", math.ceil(len(spectra) / world.size) * each) // each
        if rounds * world.size < len(spectra):
            plan.cut(f"the spectra of {len(spectra) - rounds * world.size} of {len(spectra)} layers", "no time left")
        spectra = spectra[: rounds * world.size]

        def layer_spectrum(item: tuple[int, str]) -> list[dict]:
            i, group = item
            op = HessianOperator(loss, layers[group], total.backend, total.chunks)
            return spectrum_rows(op, mode, group, settings["layer_k"], settings["tol"], seed + i, per_layer)

        tables["descent_spectrum"] += [row for rows in share_out(list(enumerate(spectra, start=1)), layer_spectrum) for row in rows]
        plan.spend("hvp", rounds * each)
        spectra = []
    for i, group in enumerate(spectra, start=1):
        products = plan.affordable("hvp", 2 * settings["layer_k"] + 10)
        if products < 2:
            plan.cut(f"the spectra of layer {group} and after", "no time left")
            break
        op = HessianOperator(loss, layers[group], total.backend, total.chunks)
        deadline = plan.deadline("hvp")
        tables["descent_spectrum"] += spectrum_rows(op, mode, group, settings["layer_k"], settings["tol"], seed + i, products,
                                                    deadline)
        plan.spend("hvp", op.products)
        if deadline is not None and deadline.stopped:
            plan.cut(f"Lanczos iterations for layer {group} and the spectra after it", "the budget ran out during its products; "
                     "its residuals give the accuracy reached")
            break
    if mode == "train":
        for layer, norm in feeding_layers(loss.model, loss.inputs, graph).items():
            if sites is not None and not (selected_layers({layer: [], norm: []}, sites)):
                continue
            if not plan.allows(f"scale invariance of {layer}", {"gradient": len(SCALES), "hvp": len(SCALES), "forward": len(SCALES)}):
                break
            tables["descent_scale_invariance"] += scale_invariance(loss, layer, lr, SCALES, total.backend)
            plan.spend("gradient", len(SCALES))
            plan.spend("hvp", len(SCALES))
            plan.spend("forward", len(SCALES))
            if isinstance(loss.model.get_submodule(layer), nn.Linear):
                tables["descent_reparam"].append({"layer": layer, **reparam_check(loss.model, loss.inputs, layer, norm)})


def findings(tables: dict[str, pd.DataFrame], lr_given: bool, lr: float, quick: bool = True) -> list[Finding]:
    """Findings, most important first (``quick``: the tables came from quick settings): one verdict
    per mode (``descent_verdicts``, made here when absent; :func:`normscope.rules.descent_findings`),
    then the supporting measurements."""
    if "descent_verdicts" not in tables:
        tables["descent_verdicts"] = verdicts(tables)
    out = descent_findings(tables["descent_verdicts"])
    directions = tables["descent_directions"]
    layers = directions[(directions["group"] != "total") & (directions["direction"] == "gradient")].dropna(subset=["a_crit"])
    if len(layers):
        worst = layers.loc[layers["a_crit"].idxmin()]
        out.append(Finding(f"The smallest per-layer critical step is {worst['a_crit']:.3g} for {worst['group']} ({worst['mode']} mode).",
                           "descent", "note", site=worst["group"], metric="a_crit", value=worst["a_crit"], table="descent_directions",
                           where={"mode": worst["mode"], "direction": "gradient", "group": worst["group"]}))
    spectrum = tables["descent_spectrum"]
    spectrum_groups = set(spectrum["group"]) - {"total"}
    layer_groups = set(directions["group"]) - {"total"}
    if quick and QUICK["layer_spectra"] <= len(spectrum_groups) < len(layer_groups):
        trace = tables["descent_trace"]
        products = int(trace["products"].iloc[0]) if len(trace) else 0
        out.append(Finding(f"Quick mode limited the per-layer work: spectra for only {len(spectrum_groups)} of the "
                           f"{len(layer_groups)} layers (those with the largest block trace), Lanczos to relative tolerance "
                           f"{QUICK['tol']:g}, Krylov Hutch++ traces from {products} products (shared by every layer); "
                           "run with --full (full=True in normscope.analyze) for all of them.", "descent", "note",
                           metric="products", value=products, table="descent_trace", statistic="max" if len(trace) else "value"))
    cap = (QUICK if quick else FULL)["lanczos_products"]
    capped = spectrum[(spectrum["group"] == "total") & (spectrum["rank"] == 1) & ~spectrum["converged"].astype(bool)
                      & (spectrum["products"] >= cap)]
    for row in capped.itertuples():
        out.append(Finding(f"Lanczos for the top eigenvalues ({row.mode} mode) stopped at its cap of {cap} products before "
                           f"the tolerance; λ_max = {row.eigenvalue:.4g} with residual {row.residual:.2g}.", "descent", "note",
                           metric="residual", value=row.residual, table="descent_spectrum",
                           where={"mode": row.mode, "group": "total", "rank": 1}))
    out += operator_findings(tables)
    scale = tables["descent_scale_invariance"]
    for layer, part in scale.groupby("layer", sort=False):
        two = part[part["c"] == 2.0]
        if len(two):
            r = two.iloc[0]
            one = part[part["c"] == 1.0].iloc[0]
            out.append(Finding(f"{layer} feeds a BatchNorm, so the loss ignores its scale: L(2W)/L(W) = {r['loss_ratio']:.6g} and the "
                               f"critical step grows {r['a_crit_ratio']:.4g}-fold (4 when eps = 0); its effective learning rate is "
                               f"lr/||W||² = {one['effective_lr']:.3g}.", "descent", "note", site=layer, metric="a_crit_ratio",
                               value=r["a_crit_ratio"], table="descent_scale_invariance", where={"layer": layer, "c": 2.0}))
    for row in tables["descent_reparam"].itertuples():
        out.append(Finding(f"{row.layer}: BN(x W^T) = x_c W_hat^T to {row.max_abs_error:.1e}; the condition number of the input "
                           f"covariance is {row.cond_s:.3g} against {row.cond_reparam:.3g} for the reparameterized problem.",
                           "descent", "note", site=row.layer, metric="cond_s", value=row.cond_s, table="descent_reparam",
                           where={"layer": row.layer}))
    if not lr_given:
        out.append(Finding(f"No learning rate was given; the checks use the default lr = {DEFAULT_LR}.", "descent", "note",
                           metric="lr", value=DEFAULT_LR, table="descent_verdicts", statistic="max"))
    return out


def operator_findings(tables: dict[str, pd.DataFrame]) -> list[Finding]:
    """What ``descent_operator`` and ``descent_trace`` say about the curvature's own reliability:
    an operator that fails the symmetry check, another backend used, padding rows left out,
    unused parameters, the float64 agreement, traces not measured for want of samples."""
    out = []
    for row in tables.get("descent_operator", pd.DataFrame(columns=COLUMNS["descent_operator"])).itertuples():
        where = {"mode": row.mode}
        if row.symmetry == "asymmetric":
            out.append(Finding(f"The Hessian-vector products ({row.mode} mode) are not symmetric with either backend: v^T H w and "
                               f"w^T H v differ by {row.symmetry_error:.2g} of their size; the eigenvalues and traces assume a "
                               "symmetric Hessian.", "descent", "warning", metric="symmetry_error", value=row.symmetry_error,
                               table="descent_operator", where=where))
        elif row.symmetry.endswith(" used"):
            out.append(Finding(f"The Hessian-vector products ({row.mode} mode): {row.symmetry} (its symmetry error "
                               f"{row.symmetry_error:.2g}).", "descent", "note", metric="symmetry_error", value=row.symmetry_error,
                               table="descent_operator", where=where))
        if row.excluded_rows:
            out.append(Finding(f"The embedding padding rows {row.excluded_rows} are left out of the curvature ({row.mode} mode): "
                               "autograd masks their gradient, so no optimizer moves them; the operator is symmetric without "
                               f"them (error {row.symmetry_error:.2g}).", "descent", "note", metric="symmetry_error",
                               value=row.symmetry_error, table="descent_operator", where=where))
        if row.n_unused:
            out.append(Finding(f"{row.n_unused} parameter tensor(s) are not used by the loss on this batch ({row.mode} mode): "
                               f"{row.unused_parameters}; they count as zero gradient and zero curvature.", "descent", "note",
                               metric="n_unused", value=row.n_unused, table="descent_operator", where=where))
        if row.float64_check == "measured":
            out.append(Finding(f"The Hessian-vector products ran in {row.dtype} ({row.mode} mode); on this batch one agrees with "
                               f"float64 to {row.float64_rel_error:.1e} (relative).", "descent", "note", metric="float64_rel_error",
                               value=row.float64_rel_error, table="descent_operator", where=where))
    trace = tables["descent_trace"]
    for row in trace[trace["group"] == "total"].itertuples():
        if row.n_samples < MIN_TRACE_SAMPLES:
            out.append(Finding(f"The trace is not measured ({row.mode} mode): the budget left {row.n_samples} Hutchinson samples, "
                               f"fewer than the {MIN_TRACE_SAMPLES} an interval needs.", "descent", "note", metric="n_samples",
                               value=row.n_samples, threshold=MIN_TRACE_SAMPLES, table="descent_trace",
                               where={"mode": row.mode, "group": "total"}))
    return out


def verdicts(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The ``descent_verdicts`` table (:func:`normscope.rules.descent_verdicts`) with each mode's parting step."""
    quadratic = tables["descent_quadratic"]
    parting = {mode: parting_step(part) for mode, part in quadratic.groupby("mode", sort=False)}
    return descent_verdicts(tables, parting)


def analyze(ctx: AnalysisContext) -> AnalyzerOutput:
    """The descent analyzer on ``ctx.batches[0]``: every ``descent_*`` table (:func:`descent_tables`),
    in train and eval mode, products in the model's dtype unless ``descent_precision`` says float64,
    quick settings when ``ctx.quick``, within ``ctx.budget``, per-layer work restricted to ``ctx.sites``. Options (``ctx.options``):
    ``descent_optimizer`` (a ``torch.optim`` optimizer of ``ctx.model`` whose update to check),
    ``descent_backend`` (``auto``), ``descent_precision`` (``model``: products in the model's dtype, checked against
    float64; ``float64``), ``descent_k`` (the top eigenvalues of the whole Hessian; default 1 in quick mode, 5 in
    full). ``ctx.lr`` defaults to 0.1 (said in the findings). Under
    ``torch.distributed`` the headline's ``hvp_ranks_<mode>`` says over how many ranks each mode's
    products were split (1: replicated, the examples coupled by batch statistics)."""
    inputs, targets = ctx.batches[0]
    lr = DEFAULT_LR if ctx.lr is None else float(ctx.lr)
    if not lr > 0:
        raise InvalidArgumentError(f"lr must be positive (got {ctx.lr})")
    tables, meta = descent_tables(
        ctx.model, inputs, targets, ctx.loss_fn, lr, ctx.options.get("descent_optimizer"), quick=ctx.quick,
        seed=ctx.seed, backend=ctx.options.get("descent_backend", "auto"), track=ctx.track, budget=ctx.budget,
        sites=ctx.sites, graph=None if ctx.driver is None else ctx.driver.graph,
        precision=ctx.options.get("descent_precision", "model"), k=ctx.options.get("descent_k"))
    directions, spectrum = tables["descent_directions"], tables["descent_spectrum"]
    train = meta.get("train", {"backend": "", "chunk": None})
    chunked = f" ({train['chunk']}-example chunks)" if train["chunk"] else ""
    headline: dict[str, float | int | str] = {"lr": lr, "hvp_backend": (train["backend"] or "") + chunked}
    for mode in MODES:
        total = directions[(directions["mode"] == mode) & (directions["group"] == "total") & (directions["direction"] == "gradient")]
        top = spectrum[(spectrum["mode"] == mode) & (spectrum["group"] == "total") & (spectrum["rank"] == 1)]
        if len(total):
            headline[f"a_crit_{mode}"] = float(total["a_crit"].iloc[0])
        if len(top):
            headline[f"lambda_max_{mode}"] = float(top["eigenvalue"].iloc[0])
        part = tables["descent_quadratic"][tables["descent_quadratic"]["mode"] == mode]
        if len(part):
            headline[f"parting_step_{mode}"] = parting_step(part)
    if current().active:  # how the products ran under torch.distributed: split over the ranks or replicated
        for mode, described in meta.items():
            headline[f"hvp_ranks_{mode}"] = described["ranks"]
    tables["descent_verdicts"] = verdicts(tables)
    return AnalyzerOutput(tables, findings(tables, ctx.lr is not None, lr, ctx.quick), headline)
