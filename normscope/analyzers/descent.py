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
import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.analyzers.hvp import MODES, BatchLoss, HessianOperator
from normscope.analyzers.reparam import no_grad_forward, reparam_check
from normscope.analyzers.spectrum import hutchinson_trace, top_eigenvalues
from normscope.findings import Finding
from normscope.rules import descent_findings, descent_verdicts
from normscope.errors import InvalidArgumentError

COLUMNS = {
    "descent_directions": ["mode", "direction", "group", "sq_norm", "slope", "curvature", "a_crit", "lr", "lr_below_a_crit",
                           "descent_direction", "a_crit_reason"],
    "descent_quadratic": ["mode", "step", "loss", "quadratic", "rel_error"],
    "descent_spectrum": ["mode", "group", "rank", "eigenvalue", "stability_limit"],
    "descent_trace": ["mode", "group", "trace", "trace_stderr", "n_samples"],
    "descent_scale_invariance": ["layer", "c", "loss_ratio", "a_crit_ratio", "max_abs_inner", "effective_lr"],
    "descent_reparam": ["layer", "max_abs_error", "cond_s", "cond_reparam"],
}
DEFAULT_LR = 0.1
PARTING_THRESHOLD = 0.1
REFINE_STEPS = 8
SCALES = (1.0, 0.5, 2.0)
QUICK = {"k": 3, "layer_k": 1, "layer_spectra": 3, "trace_samples": 8, "steps": 12, "tol": 1e-3}
FULL = {"k": 5, "layer_k": 5, "layer_spectra": None, "trace_samples": 64, "steps": 25, "tol": 1e-6}


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


def negative_gradient(loss: BatchLoss) -> dict[str, Tensor]:
    """``d = -dL/dtheta`` for every parameter of the loss's model copy (Deshmukh, "Batch Norm" (notes, 2020), §2)."""
    return {n: -g for n, g in loss.gradient().items()}


def optimizer_direction(model: nn.Module, optimizer: torch.optim.Optimizer, loss: BatchLoss) -> tuple[dict[str, Tensor], float]:
    """The update the optimizer would make from this batch's gradient, per unit of learning rate.

    A fresh optimizer of the same class, hyper-parameters and (deep-copied) state steps on
    copies of the parameters whose ``.grad`` is ``dL/dtheta`` of ``loss``; returns
    ``d = (theta_after - theta_before) / lr`` (zero for parameters the optimizer does not hold)
    and ``lr`` (the first group's). ``model`` and ``optimizer`` are not touched.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    lr = float(optimizer.param_groups[0]["lr"])
    if lr <= 0:
        raise InvalidArgumentError(f"the optimizer's learning rate must be positive (got {lr})")
    grads = loss.gradient()
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
    so the step ``lr * d`` decreases the quadratic model iff ``lr < a_crit`` (Deshmukh, "Batch Norm" (notes, 2020), MATH.md §5)."""
    loss = total.loss
    groups = {"total": None, **(loss.layers() if groups is None else groups)}
    gradient = loss.gradient(total.names)
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


def quadratic_model(loss: BatchLoss, d: dict[str, Tensor], steps: Sequence[float], backend: str) -> pd.DataFrame:
    """``descent_quadratic``: the real ``L(theta + a d)`` against ``Q(a) = L + a g^T d + a^2/2 d^T H d``
    for each step ``a``, with ``rel_error = |L - Q| / max(|L(a) - L(0)|, |Q(a) - L(0)|)`` (the error
    relative to the actual or the predicted change; Deshmukh's (2020) expansion, MATH.md §5)."""
    op = HessianOperator(loss, backend=backend)
    flat = op.flatten(d)
    slope = float(torch.dot(op.gradient().double(), flat.double()))
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


def refine_near_parting(loss: BatchLoss, d: dict[str, Tensor], table: pd.DataFrame, backend: str, n: int = REFINE_STEPS) -> pd.DataFrame:
    """``table`` (one mode's ``descent_quadratic``) with ``n`` more steps, geometrically spaced
    between the last grid step below the parting step and the parting step, so that the step
    where the quadratic model stops describing the loss is located finely; unchanged when the
    model never parts or parts at the first step."""
    parted = parting_step(table)
    below = table.loc[table["step"] < parted, "step"]
    if math.isnan(parted) or below.empty:
        return table
    extra = quadratic_model(loss, d, np.geomspace(float(below.max()), parted, n + 2)[1:-1], backend)
    return pd.concat([table, extra], ignore_index=True).sort_values("step", ignore_index=True)


def step_grid(lr: float, a_crit: float, n: int) -> np.ndarray:
    """``n`` geometric steps from ``min(lr, a_crit) / 100`` to ``4 max(lr, a_crit)``."""
    low, high = (lr, lr) if not math.isfinite(a_crit) else (min(lr, a_crit), max(lr, a_crit))
    return np.geomspace(low / 100, 4 * high, n)


def feeding_layers(model: nn.Module, inputs: Tensor) -> dict[str, str]:
    """``{linear_or_conv_name: batchnorm_name}`` for every Linear/Conv whose output tensor is the
    very input of a BatchNorm (the scale-invariant weights of MATH.md §5), found by hooks in one
    forward of ``model`` (a private copy), so it follows the real data flow, not definition order."""
    produced: dict[int, tuple[str, Tensor]] = {}
    pairs: dict[str, str] = {}
    names = {m: n for n, m in model.named_modules()}

    def on_output(module: nn.Module, args: tuple, output: Tensor) -> None:
        produced[id(output)] = (names[module], output)

    def on_input(module: nn.Module, args: tuple) -> None:
        source = produced.get(id(args[0])) if args else None
        if source is not None and source[1] is args[0]:
            pairs[source[0]] = names[module]

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(m.register_forward_hook(on_output))
        elif isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(on_input))
    no_grad_forward(model, inputs, handles)
    return pairs


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


def spectrum_rows(op: HessianOperator, mode: str, group: str, k: int, tol: float, seed: int) -> list[dict]:
    """``descent_spectrum`` rows: the top ``k`` eigenvalues and ``2 / eigenvalue`` (NaN if <= 0)."""
    values = top_eigenvalues(op, k, tol, seed)
    return [{"mode": mode, "group": group, "rank": i + 1, "eigenvalue": float(v),
             "stability_limit": 2.0 / float(v) if v > 0 else math.nan} for i, v in enumerate(values)]


def spectrum_layers(traces: dict[str, tuple[float, float]], layers: dict[str, list[str]], limit: int | None) -> list[str]:
    """The layers whose spectra to compute: all (``limit=None``), or the ``limit`` layers with the
    largest absolute Hutchinson trace ``|tr H_gg|``, in model order."""
    if limit is None or len(layers) <= limit:
        return list(layers)
    chosen = set(sorted(layers, key=lambda g: -abs(traces[g][0]))[:limit])
    return [g for g in layers if g in chosen]


def _frame(name: str, rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS[name])


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
    dtype: torch.dtype | None = torch.float64,
    backend: str = "auto",
    track=None,
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Every ``descent_*`` table for ``model`` on one batch, and the HVP backend chosen per mode.

    All work happens on private copies (:class:`BatchLoss`), in ``dtype`` (float64 by default).
    Directions: ``gradient`` (``-dL/dtheta``, checked against ``lr``) and, given ``optimizer``,
    ``optimizer:<class>`` (:func:`optimizer_direction`, checked against the optimizer's lr). The
    quadratic table follows the optimizer's direction when given, the gradient otherwise.
    Settings (:data:`QUICK` or :data:`FULL`): the top ``k`` eigenvalues of ``H``, the top
    ``layer_k`` of each layer's block (quick: only the ``layer_spectra`` layers with the largest
    block trace), ``trace_samples`` Hutchinson products shared by all blocks, ``steps`` grid steps.
    """
    settings = QUICK if quick else FULL
    tables: dict[str, list[dict]] = {name: [] for name in COLUMNS}
    backends: dict[str, str] = {}
    track = track or (lambda it, *a, **k: it)
    for mode in track(list(modes), "descent", total=len(modes)):
        loss = BatchLoss(model, inputs, targets, loss_fn, mode, dtype)
        layers = loss.layers()
        total = HessianOperator(loss, backend=backend)
        backends[mode] = total.backend
        rows = descent_rows(total, negative_gradient(loss), lr, "gradient")
        d, step_lr = negative_gradient(loss), lr
        if optimizer is not None:
            d, step_lr = optimizer_direction(model, optimizer, loss)
            rows += descent_rows(total, d, step_lr, f"optimizer:{type(optimizer).__name__}")
        tables["descent_directions"] += rows
        a_crit = next(r["a_crit"] for r in reversed(rows) if r["group"] == "total")
        coarse = quadratic_model(loss, d, step_grid(step_lr, a_crit, settings["steps"]), total.backend)
        tables["descent_quadratic"] += refine_near_parting(loss, d, coarse, total.backend).to_dict("records")
        traces = hutchinson_trace(total, settings["trace_samples"], seed, layers)
        tables["descent_trace"] += [{"mode": mode, "group": group, "trace": t, "trace_stderr": se,
                                     "n_samples": settings["trace_samples"]} for group, (t, se) in traces.items()]
        tables["descent_spectrum"] += spectrum_rows(total, mode, "total", settings["k"], settings["tol"], seed)
        for i, group in enumerate(spectrum_layers(traces, layers, settings["layer_spectra"]), start=1):
            op = HessianOperator(loss, layers[group], total.backend)
            tables["descent_spectrum"] += spectrum_rows(op, mode, group, settings["layer_k"], settings["tol"], seed + i)
        if mode == "train":
            for layer, norm in feeding_layers(loss.model, loss.inputs).items():
                tables["descent_scale_invariance"] += scale_invariance(loss, layer, lr, SCALES, total.backend)
                if isinstance(loss.model.get_submodule(layer), nn.Linear):
                    tables["descent_reparam"].append({"layer": layer, **reparam_check(loss.model, loss.inputs, layer, norm)})
    return {name: _frame(name, rows) for name, rows in tables.items()}, backends


def findings(tables: dict[str, pd.DataFrame], lr_given: bool, lr: float) -> list[Finding]:
    """Findings, most important first: one verdict per mode (``descent_verdicts``, made here when
    absent; :func:`normscope.rules.descent_findings`), then the supporting measurements."""
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
    if len(spectrum_groups) < len(layer_groups):
        trace = tables["descent_trace"]
        samples = int(trace["n_samples"].iloc[0]) if len(trace) else 0
        out.append(Finding(f"Quick mode limited the per-layer work: spectra for only {len(spectrum_groups)} of the "
                           f"{len(layer_groups)} layers (those with the largest block trace), Lanczos to relative tolerance "
                           f"{QUICK['tol']:g}, Hutchinson traces from {samples} products (shared by every layer); "
                           "run without quick mode for all of them.", "descent", "note", metric="n_samples", value=samples,
                           table="descent_trace", statistic="max"))
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


def verdicts(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The ``descent_verdicts`` table (:func:`normscope.rules.descent_verdicts`) with each mode's parting step."""
    quadratic = tables["descent_quadratic"]
    parting = {mode: parting_step(part) for mode, part in quadratic.groupby("mode", sort=False)}
    return descent_verdicts(tables, parting)


def analyze(ctx: AnalysisContext) -> AnalyzerOutput:
    """The descent analyzer on ``ctx.batches[0]``: every ``descent_*`` table (:func:`descent_tables`),
    in train and eval mode, float64, quick settings when ``ctx.quick``. Options (``ctx.options``):
    ``descent_optimizer`` (a ``torch.optim`` optimizer of ``ctx.model`` whose update to check),
    ``descent_backend`` (``auto``). ``ctx.lr`` defaults to 0.1 (said in the findings)."""
    inputs, targets = ctx.batches[0]
    lr = DEFAULT_LR if ctx.lr is None else float(ctx.lr)
    if not lr > 0:
        raise InvalidArgumentError(f"lr must be positive (got {ctx.lr})")
    tables, backends = descent_tables(
        ctx.model, inputs, targets, ctx.loss_fn, lr, ctx.options.get("descent_optimizer"), quick=ctx.quick,
        seed=ctx.seed, backend=ctx.options.get("descent_backend", "auto"), track=ctx.track)
    directions, spectrum = tables["descent_directions"], tables["descent_spectrum"]
    headline: dict[str, float | int | str] = {"lr": lr, "hvp_backend": backends.get("train", "")}
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
    tables["descent_verdicts"] = verdicts(tables)
    return AnalyzerOutput(tables, findings(tables, ctx.lr is not None, lr), headline)
