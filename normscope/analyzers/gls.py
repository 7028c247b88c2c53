"""Gradient least squares ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission)): what each normalization's backward pass removes.

For every partition P of a site, with ``z`` the normalized activations, ``s = s_P`` the
partition's scale and ``g = dL/dz = gamma * dL/dy`` (MATH.md §2, "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Theorem 1, §2)::

    s * dL/dx = g - alpha - beta * z,      alpha = mean_P(g),  beta = mean_P(g z)

so the backward pass keeps the residual of a least-squares fit of ``g`` on ``z`` and divides it
by ``s``. RMSNorm fits without intercept (``alpha = 0``); weight normalization ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §3.2,
Lemma 2) has ``z = v / ||v||``, ``alpha = 0`` and ``beta = sum_P(g z)``. BatchNorm in eval mode
(running statistics) has no regression: ``s * dL/dx = g``, so ``alpha = beta = 0`` there.

Tables (``docs/tables.md``): ``gls_partitions``, ``gls_sites``, ``gls_kinds``, ``gls_scatter``,
``gls_two_step``, ``gls_whatif`` from one captured step (:func:`gls_tables`, :func:`gls_step`);
``gls_batch_sweep`` and ``gls_regularization`` from :func:`batch_size_sweep`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from normscope import batch as batches
from normscope.findings import Finding
from normscope.rules import gls_findings
from normscope.analyzers import AnalysisContext, AnalyzerOutput, no_progress
from normscope.analyzers.stats import _cat, _segment_mean, _segment_quantiles, _segment_sums
from normscope.budget import agreed
from normscope.capture import Capture, capture
from normscope.capture.record import SiteRecord
from normscope.errors import AnalyzerError, DataShapeError, UnknownNameError
from normscope.guard import preserved
from normscope.plan import Pass
from normscope.ops.ls_bn import regularized_moments
from normscope.registry import from_rows, partition_moments, to_rows

COLUMNS = {
    "gls_partitions": ["site", "kind", "depth", "record", "partition", "alpha", "beta", "ols_slope", "slope_ratio",
                       "r2", "residual_norm", "identity_error", "identity_rel", "batch_stats", "residual_backward"],
    "gls_sites": ["site", "kind", "depth", "n_records", "n_partitions", "r2_mean", "r2_median", "r2_q10", "r2_q25",
                  "r2_q75", "r2_q90", "r2_pooled", "beta_mean", "beta_abs_mean", "slope_ratio_mean", "naive_gap",
                  "naive_gap_identity", "identity_error_max", "identity_rel_max", "dtype", "batch_stats", "residual_backward"],
    "gls_kinds": ["kind", "n_sites", "r2_mean", "r2_median", "naive_gap_mean"],
    "gls_scatter": ["site", "record", "partition", "z", "g", "fit"],
    "gls_two_step": ["first_site", "second_site", "order", "r2_first", "r2_second_on_residual",
                     "r2_second_unscaled", "r2_combined"],
    "gls_whatif": ["site", "kind", "record", "extra_partitioning", "r2_extra"],
    "gls_batch_sweep": ["site", "kind", "depth", "batch_size", "r2_mean", "r2_median", "beta_mean", "beta_abs_mean",
                        "naive_gap"],
    "gls_regularization": ["site", "batch_size", "dist_plain", "dist_regularized", "dist_plain_residual",
                           "dist_regularized_residual", "momentum", "weight"],
}
EXTRA_PARTITIONINGS = ("per_sample", "per_channel")
SCATTER_POINTS = 2000


@functools.cache
def _empty_prototype(name: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c in ("site", "kind", "order", "dtype") else float)
                         for c in COLUMNS[name]})


def _empty(name: str) -> pd.DataFrame:
    return _empty_prototype(name).copy()


# -- the regression of one partition ---------------------------------------------------------
def backward_fit(z: Tensor, g: Tensor, centered: bool = True, unit_norm: bool = False) -> tuple[Tensor, Tensor]:
    """``(alpha, beta)``, each ``(P, 1)``, of the fit the backward pass removes ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Thm. 1).

    ``alpha = mean_P(g)`` (0 when not ``centered``), ``beta = mean_P(g z)`` or, for weight norm
    (``unit_norm``, "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Lemma 2), ``beta = sum_P(g z)``. ``z`` and ``g`` are ``(P, n)`` rows.
    """
    alpha = g.mean(1, keepdim=True) if centered else torch.zeros_like(g[:, :1])
    gz = (g * z).sum(1, keepdim=True)
    return alpha, gz if unit_norm else gz / z.shape[1]


def regularized_fit(
    z: Tensor, g: Tensor, alpha_star: Tensor, beta_star: Tensor, weight: float, batch_size: int
) -> tuple[Tensor, Tensor]:
    """``(alpha_w, beta_w)`` of the BatchNorm regression with two virtual items ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) App. C).

    Two virtual *batch items*, broadcast over the spatial dims like a real one, at ``z = +1`` and
    ``z = -1``, each of weight ``w`` batch items, receive the virtual gradients ``alpha* + beta*``
    and ``alpha* - beta*``. A row of ``n = B * H * W`` positions then has ``2 w H W`` virtual
    positions, and the weighted means are (MATH.md §2, the convention of
    :class:`~normscope.ops.ls_bn.LSBatchNorm`, by :func:`~normscope.ops.ls_bn.regularized_moments`)::

        alpha_w = (B alpha + 2 w alpha*) / (B + 2 w),   beta_w = (B beta + 2 w beta*) / (B + 2 w)

    with ``alpha = mean_P(g)``, ``beta = mean_P(g z)``; the regularized backward pass is
    ``s * dL/dx = g - alpha_w - beta_w z`` for the real items. ``batch_size`` is B (the number of
    batch items the ``n`` positions of a row come from). ``alpha_star``, ``beta_star`` are ``(P,)`` or ``(P, 1)``.
    """
    alpha, beta = g.mean(1), (g * z).mean(1)
    alpha_w, beta_w = regularized_moments(alpha, beta, alpha_star.reshape(-1), beta_star.reshape(-1), batch_size, weight)
    return alpha_w[:, None], beta_w[:, None]


def fit_from_sums(sums: dict[str, Tensor], centered: bool, unit_norm: bool, batch_stats: bool = True) -> dict[str, Tensor]:
    """Per-partition regression figures from the sums ``n, sum_z, sum_z2, sum_g, sum_g2, sum_gz``.

    ``alpha``, ``beta`` as in :func:`backward_fit` (0 when ``batch_stats`` is False: running
    statistics, no regression); ``ols_slope = Cov(z, g) / Var(z)`` (``sum(g z) / sum(z^2)``
    without intercept) and ``slope_ratio = beta / ols_slope`` (``Var(z) = var / (var + eps)`` for
    centered kinds, MATH.md §2); ``explained_sq = ||alpha + beta z||^2``;
    ``residual_sq = ||g - alpha - beta z||^2``; ``r2 = 1 - residual_sq / ||g||^2``.
    """
    n, sz, sz2 = sums["n"], sums["sum_z"], sums["sum_z2"]
    sg, sg2, sgz = sums["sum_g"], sums["sum_g2"], sums["sum_gz"]
    zero = torch.zeros_like(sg)
    if batch_stats:
        alpha = sg / n if centered else zero
        beta = sgz if unit_norm else sgz / n
    else:
        alpha, beta = zero, zero
    if centered:
        mz, mg = sz / n, sg / n
        ols = (sgz / n - mz * mg) / (sz2 / n - mz * mz)
    else:
        ols = sgz / sz2
    explained_sq = n * alpha**2 + 2 * alpha * beta * sz + beta**2 * sz2
    residual_sq = (sg2 - 2 * alpha * sg - 2 * beta * sgz + explained_sq).clamp_min(0)
    return {"alpha": alpha, "beta": beta, "ols_slope": ols, "slope_ratio": beta / ols,
            "explained_sq": explained_sq, "residual_sq": residual_sq, "g_sq": sg2, "r2": 1 - residual_sq / sg2}


FIT_SUMS = ("n", "sum_z", "sum_z2", "sum_g", "sum_g2", "sum_gz")


def reduction_figures(records: Sequence[SiteRecord]) -> dict[str, Tensor]:
    """:func:`fit_from_sums` over the partitions of all ``records`` (``storage="reductions"``, each
    with a gradient) at once, one call per kind of regression (centered or not, unit norm or not,
    batch statistics or not), with ``scale`` (the normalizer s of the capture's reductions):
    float64 tensors over the records' partitions in record order. Each partition's figures are
    those of its record computed alone (elementwise float64)."""
    groups: dict[tuple[bool, bool, bool], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.layout.kind.centered, r.layout.rule == "weight", r.layout.batch_stats), []).append(i)
    sizes = [r.reductions["n"].numel() for r in records]
    starts = np.cumsum([0, *sizes])
    out: dict[str, Tensor] = {}
    for (centered, unit, batch_stats), members in groups.items():
        sums = {k: _cat([records[i].reductions[k] for i in members]) for k in (*FIT_SUMS, "scale")}
        fig = fit_from_sums(sums, centered, unit, batch_stats)
        fig["scale"] = sums["scale"]
        if len(groups) == 1:
            return fig
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members])
        for key, value in fig.items():
            out.setdefault(key, torch.empty(int(starts[-1]), dtype=torch.float64))[index] = value
    return out


SITE_FIGURES = ("r2", "beta", "slope_ratio", "residual_sq", "g_sq", "explained_sq", "scale")
R2_QUANTILES = {"r2_q10": 0.1, "r2_q25": 0.25, "r2_median": 0.5, "r2_q75": 0.75, "r2_q90": 0.9}


def site_values(figures: dict[str, Tensor], sizes: Sequence[int], quantiles: bool = True) -> dict[str, Tensor]:
    """The per-site figures of ``gls_sites`` from the per-partition figures of every site
    (:data:`SITE_FIGURES`, float64, concatenated site after site, ``sizes[i]`` partitions for site
    ``i``), one (S,) float64 tensor each; the one implementation behind :func:`sites_table` and the
    training monitor's rows (:mod:`normscope.monitor.metrics`), vectorized over all sites:

    * ``r2_mean``, ``beta_mean``, ``beta_abs_mean``, ``slope_ratio_mean``: nan-means over the partitions;
    * ``r2_median`` and, with ``quantiles``, ``r2_q10``, ``r2_q25``, ``r2_q75``, ``r2_q90``: nan-quantiles
      (linear, as ``np.nanquantile``; NaN when no partition's R^2 is finite);
    * ``r2_pooled = 1 - sum ||residual||^2 / sum ||g||^2``;
    * ``naive_gap_identity = sqrt(sum ||alpha + beta z||^2 / s^2 / sum ||g - alpha - beta z||^2 / s^2)``
      (MATH.md §2: ``||gamma/s dL/dy - dL/dx|| / ||dL/dx||`` by the identity; NaN when the denominator is 0).
    """
    starts = np.cumsum([0, *sizes[:-1]])
    r2, beta, scale_sq = figures["r2"], figures["beta"], figures["scale"] ** 2
    sums = _segment_sums(torch.stack([figures["residual_sq"], figures["g_sq"], figures["explained_sq"] / scale_sq,
                                      figures["residual_sq"] / scale_sq, r2.isfinite().to(torch.float64)]), starts)
    names = R2_QUANTILES if quantiles else {"r2_median": 0.5}
    qs = _segment_quantiles(r2, starts, list(names.values()))
    finite = (sums[4] > 0).numpy()
    residual = sums[3]
    out = {name: torch.from_numpy(np.where(finite, q, np.nan)) for name, q in zip(names, qs.numpy())}
    out.update(r2_mean=_segment_mean(r2, starts), r2_pooled=1 - sums[0] / sums[1],
               beta_mean=_segment_mean(beta, starts), beta_abs_mean=_segment_mean(beta.abs(), starts),
               slope_ratio_mean=_segment_mean(figures["slope_ratio"], starts),
               naive_gap_identity=(sums[2] / residual).sqrt().where(residual > 0, math.nan))
    return out


# -- one record -------------------------------------------------------------------------------
@dataclass
class RecordFit:
    """The regression of one recorded call of a site, per partition (all tensors float64).

    ``figures`` holds the ``(P,)`` tensors of :func:`fit_from_sums` plus ``scale`` (s),
    ``identity_error = max_P |s dL/dx - (g - alpha - beta z)|`` and ``identity_rel`` (that over
    ``max_P |g|``), NaN where dL/dx was not captured. ``naive_sq`` and ``true_sq`` are
    ``||gamma/s dL/dy - dL/dx||^2`` and ``||dL/dx||^2`` summed over the site (measured on dL/dx
    when captured, else from the identity). ``z``, ``g``, ``residual`` are ``(P, n)`` rows, kept
    only for tensor storage.
    """

    record: SiteRecord
    depth: int
    figures: dict[str, Tensor]
    naive_sq: float
    true_sq: float
    z: Tensor | None = None
    g: Tensor | None = None
    residual: Tensor | None = None

    @property
    def centered(self) -> bool:
        return self.record.layout.kind.centered


def compute_dtype(record: SiteRecord, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or with ``None`` the captured dtype promoted to at least float32."""
    if dtype is not None:
        return dtype
    return torch.promote_types(record.dtype, torch.float32)


def fit_record(record: SiteRecord, depth: int = 0, keep: bool = True, dtype: torch.dtype | None = torch.float64) -> RecordFit:
    """Regress ``g`` on ``z`` per partition of one record ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Theorem 1, Lemma 2; MATH.md §2).

    Works on full tensors (identity error measured against the captured dL/dx) and on
    ``storage="reductions"`` records (the identity error is then NaN). ``keep`` keeps the rows.
    ``dtype``: arithmetic on the rows (float64 by default; ``None``: the captured dtype, at
    least float32); per-partition sums and figures are accumulated in float64 either way.

    Each captured tensor is cast and laid out as rows once (z is normalized in place, g scaled
    in place by gamma); the identity error and the naive gap come from
    ``d = (g - alpha - beta z) - s dL/dx`` as ``max |d|`` and
    ``||g - s dL/dx||^2 = ||alpha + beta z||^2 + 2 (alpha sum d + beta z.d) + ||d||^2``.
    """
    if not record.has_grad:
        raise AnalyzerError(f"site {record.site.name} (record {record.index}) has no gradient: "
                            "run loss.backward() inside the capture, not under torch.no_grad")
    layout = record.layout
    centered, unit = layout.kind.centered, layout.rule == "weight"
    f64 = torch.float64
    if record.x is None:
        fig = reduction_figures([record])
        scale = fig["scale"]
        fig.update(identity_error=torch.full_like(scale, math.nan), identity_rel=torch.full_like(scale, math.nan))
        naive = float((fig["explained_sq"] / scale**2).sum())
        true = float((fig["residual_sq"] / scale**2).sum())
        return RecordFit(record, depth, fig, naive, true)
    work = compute_dtype(record, dtype)
    rows = _rows(record, record.x, work)
    shift, scale = partition_moments(rows, layout)
    z = rows.sub_(shift).div_(scale)
    g = _g_rows(record, work)
    scratch = torch.empty_like(z)
    scale64 = scale[:, 0].to(f64)
    sums = {"n": torch.full_like(scale64, z.shape[1]), "sum_z": z.sum(1, dtype=f64), "sum_z2": _dot(z, z, scratch),
            "sum_g": g.sum(1, dtype=f64), "sum_g2": _dot(g, g, scratch), "sum_gz": _dot(g, z, scratch)}
    fig = fit_from_sums(sums, centered, unit, layout.batch_stats)
    alpha, beta = fig["alpha"].to(work)[:, None], fig["beta"].to(work)[:, None]
    residual = torch.addcmul(g, beta, z, value=-1).sub_(alpha)
    fig["residual_sq"] = _dot(residual, residual, scratch)
    fig["r2"] = 1 - fig["residual_sq"] / fig["g_sq"]
    fig["scale"] = scale64
    dx = None if record.dx is None else _rows(record, record.dx, work)
    if dx is None:
        fig["identity_error"] = fig["identity_rel"] = torch.full_like(scale64, math.nan)
        naive = float((fig["explained_sq"] / scale64**2).sum())
        true = float((fig["residual_sq"] / scale64**2).sum())
    else:
        true = float(_dot(dx, dx, scratch).sum())
        # d = (g - alpha - beta z) - s dL/dx; the naive gap is g - s dL/dx = alpha + beta z + d
        d = torch.addcmul(residual, scale, dx, value=-1, out=dx)
        err = torch.maximum(d.amax(1), -d.amin(1)).to(f64)
        g_max = torch.maximum(g.amax(1), -g.amin(1)).to(f64)
        fig["identity_error"] = err
        fig["identity_rel"] = err / g_max.clamp_min(torch.finfo(f64).tiny)
        cross = fig["alpha"] * d.sum(1, dtype=f64) + fig["beta"] * _dot(z, d, scratch)
        naive = float(((fig["explained_sq"] + 2 * cross + _dot(d, d, scratch)) / scale64**2).sum())
    if keep:
        return RecordFit(record, depth, fig, naive, true, z, g, residual)
    return RecordFit(record, depth, fig, naive, true)


def _rows(record: SiteRecord, t: Tensor, dtype: torch.dtype) -> Tensor:
    """``record.rows(t, dtype)`` as a tensor of its own (never a view of the captured ``t``);
    per-channel rows ``(C, N * rest)`` in one cast-and-transpose copy."""
    if record.layout.rule == "channel":
        out = torch.empty((t.shape[1], t.shape[0], t[0, 0].numel()), dtype=dtype, device=t.device)
        return out.copy_(t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1)).view(t.shape[1], -1)
    rows = record.rows(t, dtype)
    return rows.clone() if rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else rows


def _g_rows(record: SiteRecord, dtype: torch.dtype) -> Tensor:
    """``g = (gamma + offset) dL/dy`` as rows; for per-channel partitions one cast-and-transpose
    copy scaled in place by the partition's gamma (the same products as ``record.g_rows``)."""
    layout = record.layout
    if layout.rule != "channel" or layout.weight is None:
        return record.g_rows(dtype)
    gamma = layout.weight.detach().to(dtype) + layout.weight_offset
    return _rows(record, record.dy, dtype).mul_(gamma[:, None])


def _dot(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``sum(a * b)`` over the last dim, accumulated in float64; ``out``: a scratch tensor of
    ``a``'s shape and dtype for the products (no fresh allocation per call)."""
    return torch.mul(a, b, out=out).sum(-1, dtype=torch.float64)


def _records(source: Capture | Sequence[SiteRecord]) -> list[SiteRecord]:
    return list(source.records if isinstance(source, Capture) else source)


def fit_records(source: Capture | Sequence[SiteRecord], keep: bool = True,
                dtype: torch.dtype | None = torch.float64) -> list[RecordFit]:
    """:func:`fit_record` for every record with a gradient; ``depth`` is the site's forward order."""
    depths: dict[str, int] = {}
    fits = []
    for record in _records(source):
        depth = depths.setdefault(record.site.name, len(depths))
        if record.has_grad:
            fits.append(fit_record(record, depth, keep, dtype))
    return fits


# -- tables -----------------------------------------------------------------------------------
def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def partitions_table(fits: Sequence[RecordFit]) -> pd.DataFrame:
    """``gls_partitions``: one row per partition of every record (see :func:`fit_from_sums`)."""
    if not fits:
        return _empty("gls_partitions")
    sizes = [f.figures["alpha"].shape[0] for f in fits]

    def per_fit(values: Callable[[RecordFit], object]) -> np.ndarray:
        return np.repeat(np.array([values(f) for f in fits]), sizes)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([_np(f.figures[key]) for f in fits])

    return pd.DataFrame({
        "site": per_fit(lambda f: f.record.site.name), "kind": per_fit(lambda f: f.record.site.kind),
        "depth": per_fit(lambda f: f.depth), "record": per_fit(lambda f: f.record.index),
        "partition": np.concatenate([np.arange(n) for n in sizes]),
        **{k: cat(k) for k in ("alpha", "beta", "ols_slope", "slope_ratio", "r2")},
        "residual_norm": np.sqrt(cat("residual_sq")),
        "identity_error": cat("identity_error"), "identity_rel": cat("identity_rel"),
        "batch_stats": per_fit(lambda f: f.record.layout.batch_stats),
        "residual_backward": per_fit(lambda f: f.record.layout.residual_backward),
    })


def _nanmax(values: np.ndarray) -> float:
    return float(np.nanmax(values)) if np.isfinite(values).any() else math.nan


def sites_table(fits: Sequence[RecordFit]) -> pd.DataFrame:
    """``gls_sites``: per site, R^2 over its partitions (mean, median, quantiles; ``r2_pooled =
    1 - sum ||residual||^2 / sum ||g||^2``), the naive gradient gap
    ``||gamma/s dL/dy - dL/dx|| / ||dL/dx||`` (Deshmukh's (2020) expression against the true gradient,
    over the whole site), and ``naive_gap_identity = ||(alpha + beta z)/s|| / ||(g - alpha - beta z)/s||``
    (the same by MATH.md §2), and the largest identity error. The figures over partitions are
    :func:`site_values` (the training monitor's too)."""
    by_site: dict[str, list[RecordFit]] = {}
    for fit in fits:
        by_site.setdefault(fit.record.site.name, []).append(fit)
    if not by_site:
        return _empty("gls_sites")
    groups = list(by_site.values())
    ordered = [f for group in groups for f in group]
    sizes = [sum(f.figures["r2"].numel() for f in group) for group in groups]
    values = {k: v.tolist() for k, v in site_values({k: _cat([f.figures[k] for f in ordered]) for k in SITE_FIGURES}, sizes).items()}
    rows = []
    for s, (name, group) in enumerate(by_site.items()):
        naive_sq, true_sq = sum(f.naive_sq for f in group), sum(f.true_sq for f in group)
        first = group[0]
        rows.append({
            "site": name, "kind": first.record.site.kind, "depth": first.depth, "n_records": len(group),
            "n_partitions": sizes[s], **{k: values[k][s] for k in COLUMNS["gls_sites"] if k in values},
            "naive_gap": math.sqrt(naive_sq / true_sq) if true_sq > 0 else math.nan,
            "identity_error_max": _nanmax(np.concatenate([_np(f.figures["identity_error"]) for f in group])),
            "identity_rel_max": _nanmax(np.concatenate([_np(f.figures["identity_rel"]) for f in group])),
            "dtype": str(first.record.dtype).replace("torch.", ""),
            "batch_stats": first.record.layout.batch_stats,
            "residual_backward": first.record.layout.residual_backward,
        })
    return pd.DataFrame(rows, columns=COLUMNS["gls_sites"])


def kinds_table(sites: pd.DataFrame) -> pd.DataFrame:
    """``gls_kinds``: per kind, the number of sites and the mean/median over sites of ``r2_mean``
    and the mean naive gap."""
    if sites.empty:
        return _empty("gls_kinds")
    rows = []
    for kind in sorted(set(sites["kind"])):
        chosen = sites["kind"] == kind
        r2, gap = sites["r2_mean"].to_numpy()[chosen], sites["naive_gap"].to_numpy()[chosen]
        rows.append({"kind": kind, "n_sites": int(chosen.sum()), "r2_mean": float(np.mean(r2)),
                     "r2_median": float(np.median(r2)), "naive_gap_mean": float(np.mean(gap))})
    return pd.DataFrame(rows, columns=COLUMNS["gls_kinds"])


def scatter_table(fit: RecordFit, partition: int | None = None, max_points: int = SCATTER_POINTS, seed: int = 0) -> pd.DataFrame:
    """``gls_scatter``: the ``(z, g)`` pairs of one partition and the fit ``alpha + beta z`` the
    backward pass removes ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Figure 1). Default partition: the one with the median R^2.
    At most ``max_points`` items, drawn at random with ``seed``."""
    return pd.DataFrame(_scatter_columns(fit, partition, max_points, seed), columns=COLUMNS["gls_scatter"])


def _scatter_columns(fit: RecordFit, partition: int | None, max_points: int, seed: int) -> dict[str, np.ndarray]:
    if fit.z is None:
        raise AnalyzerError(f"site {fit.record.site.name}: the scatter needs captured tensors, not storage='reductions'")
    n_part = fit.z.shape[0]
    if partition is None:
        r2 = fit.figures["r2"].nan_to_num(nan=-math.inf)
        partition = int(r2.argsort()[n_part // 2])
    if not 0 <= partition < n_part:
        raise DataShapeError(f"partition {partition} out of range for site {fit.record.site.name} (0..{n_part - 1})")
    z, g = fit.z[partition], fit.g[partition]
    if z.numel() > max_points:
        pick = _sample(z.numel(), max_points, seed).to(z.device)
        z, g = z[pick], g[pick]
    fitted = fit.figures["alpha"][partition] + fit.figures["beta"][partition] * z
    size = z.numel()
    return {"site": np.full(size, fit.record.site.name, dtype=object), "record": np.full(size, fit.record.index),
            "partition": np.full(size, partition), "z": _np(z), "g": _np(g), "fit": _np(fitted)}


@functools.lru_cache(maxsize=16)
def _sample(total: int, size: int, seed: int) -> Tensor:
    """``size`` of ``range(total)`` drawn without replacement with ``seed`` (the same draw each call)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size]


def _scatter(fits: Sequence[RecordFit], partition: int | None, seed: int) -> pd.DataFrame:
    """``gls_scatter`` of the first record of every site with tensors, built as one frame."""
    parts = [_scatter_columns(f, partition, SCATTER_POINTS, seed) for f in fits if f.z is not None and f.record.index == 0]
    if not parts:
        return _empty("gls_scatter")
    return pd.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in COLUMNS["gls_scatter"]})


# -- other partitionings: two-step regression and what-if --------------------------------------
def _channel_dim(fit: RecordFit) -> int:
    """The channel axis of the site's input: dim 1 (N, C, *), except for layer/RMS norms over the
    trailing dims (``sample_last``), where it is the first normalized dim: the last for (N, T, C)
    over C, dim 1 for (N, C, H, W) over (C, H, W) (PyTorch's channels-first layout)."""
    if fit.record.layout.rule == "sample_last":
        return len(fit.record.shape) - fit.record.layout.normalized_ndim
    return 1


def extra_regression_r2(residual: Tensor, z: Tensor, dims: Sequence[int] = (1,)) -> float:
    """R^2 of one more centered normalization regression (eps = 0) of ``residual`` on ``z``
    renormalized within each partition (reduced over ``dims``; "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1)::

        z' = (z - mean z) / std z,   1 - sum ||r - mean r - mean(r z') z'||^2 / sum ||r||^2

    As 1 and z' are orthogonal with ``||1||^2 = ||z'||^2 = n``, the left-over norm is
    ``||r||^2 - n (mean r)^2 - n mean(r z')^2``, with ``mean(r z') = Cov(r, z) / std z``; partitions
    where ``z`` is constant contribute only their mean (:func:`_extra_r2_from_sums`).
    """
    dims, f64 = list(dims), torch.float64
    n = math.prod(z.shape[d] for d in dims)
    sums = [t.sum(dim=dims, dtype=f64) for t in (residual, z, z * z, residual * z)]
    return _extra_r2_from_sums(n, *sums, residual.pow(2).sum(dtype=f64))


def _extra_r2_from_sums(n: int, sum_r: Tensor, sum_z: Tensor, sum_z2: Tensor, sum_rz: Tensor, total: Tensor) -> float:
    """:func:`extra_regression_r2` from the per-partition sums of ``r, z, z^2, r z`` (``n`` items
    each) and ``total = ||r||^2``: ``sum_P n ((mean r)^2 + Cov(r, z)^2 / Var z) / total``."""
    mean_z, mean_r = sum_z / n, sum_r / n
    var = (sum_z2 / n - mean_z**2).clamp_min(0)
    cov = sum_rz / n - mean_r * mean_z
    slope_sq = torch.where(var > 0, cov**2 / var.clamp_min(torch.finfo(var.dtype).tiny), torch.zeros_like(var))
    return float(n * (mean_r**2 + slope_sq).sum() / total)


def _extra_dims(t: Tensor, partitioning: str, channel_dim: int) -> list[int]:
    """Dims reduced by an extra ``per_sample`` (all but 0) or ``per_channel`` (all but ``channel_dim``) partitioning."""
    if partitioning == "per_sample":
        return list(range(1, t.dim()))
    if partitioning == "per_channel":
        keep = channel_dim % t.dim()
        return [d for d in range(t.dim()) if d != keep]
    raise UnknownNameError("extra partitioning", partitioning, EXTRA_PARTITIONINGS)


def _input_shaped(rows: Tensor, fit: RecordFit) -> Tensor:
    return from_rows(rows, fit.record.shape, fit.record.layout)


def whatif_table(fits: Sequence[RecordFit]) -> pd.DataFrame:
    """``gls_whatif``: for each activation site, how much of its residual ``g - alpha - beta z`` one
    more regression on another partitioning would explain (:func:`extra_regression_r2` with the
    site's own ``z`` renormalized per sample or per channel: an extra LN or BN right after it,
    "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1), from the captured data; the model is not changed. For per-channel sites the
    sums of ``r, z, z^2, r z`` are taken once per (channel, sample) cell and added up both ways."""
    rows = []
    for fit in fits:
        if fit.z is None or fit.record.layout.rule == "weight" or fit.record.x is None or fit.record.x.dim() < 2:
            continue
        r2 = _channel_whatif(fit) if fit.record.layout.rule == "channel" else _generic_whatif(fit)
        for part in EXTRA_PARTITIONINGS:
            rows.append({"site": fit.record.site.name, "kind": fit.record.site.kind, "record": fit.record.index,
                         "extra_partitioning": part, "r2_extra": r2[part]})
    return pd.DataFrame(rows, columns=COLUMNS["gls_whatif"]) if rows else _empty("gls_whatif")


def _generic_whatif(fit: RecordFit) -> dict[str, float]:
    residual, z = _input_shaped(fit.residual, fit), _input_shaped(fit.z, fit)
    return {part: extra_regression_r2(residual, z, _extra_dims(z, part, _channel_dim(fit))) for part in EXTRA_PARTITIONINGS}


def _channel_whatif(fit: RecordFit) -> dict[str, float]:
    """Per-channel rows ``(C, N * rest)`` viewed as ``(C, N, rest)``: cell sums, then per sample
    (over C) and per channel (over N)."""
    channels, samples = fit.z.shape[0], fit.record.shape[0]
    z, r = fit.z.view(channels, samples, -1), fit.residual.view(channels, samples, -1)
    f64 = torch.float64
    scratch = torch.empty_like(z)
    cells = (r.sum(2, dtype=f64), z.sum(2, dtype=f64), _dot(z, z, scratch), _dot(r, z, scratch))
    total = fit.figures["residual_sq"].sum()
    per_item = z.shape[2]
    return {"per_sample": _extra_r2_from_sums(channels * per_item, *(c.sum(0) for c in cells), total),
            "per_channel": _extra_r2_from_sums(samples * per_item, *(c.sum(1) for c in cells), total)}


def _in_series(first: RecordFit, second: RecordFit) -> bool:
    a, b = first.record, second.record
    if a.layout.rule == "weight" or b.layout.rule == "weight" or a.shape != b.shape:
        return False
    if a.y is None or b.x is None:
        return b.producer is not None and b.producer == a.site.name
    head = slice(0, 64)
    return a.y.device == b.x.device and torch.equal(a.y.reshape(-1)[head], b.x.reshape(-1)[head]) and torch.equal(a.y, b.x)


def _pooled_r2(fit: RecordFit) -> float:
    return 1 - float(fit.figures["residual_sq"].sum() / fit.figures["g_sq"].sum())


def two_step_table(fits: Sequence[RecordFit]) -> pd.DataFrame:
    """``gls_two_step``: pairs of sites in series on the same tensor (the second's input is the
    first's output: equal captured tensors, or the capture's producer link under
    ``storage="reductions"``), e.g. BN then LN ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §4.1). The backward pass regresses twice: first at
    the later site (``r2_first``, its pooled R^2 on the incoming gradient), then at the earlier
    site on what the first stage left (``r2_second_on_residual``: its pooled R^2 on its actual
    incoming gradient ``gamma * residual / s``). ``r2_second_unscaled`` fits the first stage's
    residual itself on the earlier site's partitions, and ``r2_combined = 1 - (1 - r2_first)(1 -
    r2_second_unscaled)`` is the share of the incoming gradient the two regressions explain."""
    rows = []
    for i, second in enumerate(fits):
        for first in fits[:i]:
            if not _in_series(first, second):
                continue
            unscaled = math.nan
            if second.residual is not None and first.z is not None:
                residual = to_rows(_input_shaped(second.residual, second), first.record.layout)
                alpha, beta = backward_fit(first.z, residual, first.centered, first.record.layout.rule == "weight")
                left = residual - alpha - beta * first.z
                unscaled = 1 - float(left.pow(2).sum() / residual.pow(2).sum())
            r2_first = _pooled_r2(second)
            rows.append({"first_site": first.record.site.name, "second_site": second.record.site.name,
                         "order": f"{first.record.site.kind}->{second.record.site.kind}", "r2_first": r2_first,
                         "r2_second_on_residual": _pooled_r2(first), "r2_second_unscaled": unscaled,
                         "r2_combined": 1 - (1 - r2_first) * (1 - unscaled)})
    return pd.DataFrame(rows, columns=COLUMNS["gls_two_step"]) if rows else _empty("gls_two_step")


def gls_tables(
    source: Capture | Sequence[SiteRecord],
    scatter_partition: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
) -> dict[str, pd.DataFrame]:
    """All one-step tables of the gradient-least-squares analysis of a capture ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) §2-4).

    ``gls_partitions`` (:func:`fit_from_sums`), ``gls_sites`` (:func:`sites_table`),
    ``gls_kinds``, ``gls_scatter`` (each site's median-R^2 partition, or ``scatter_partition``),
    ``gls_two_step`` and ``gls_whatif``. Records without a gradient are left out; with
    ``storage="reductions"`` the tables that need tensors are empty. ``dtype``: see :func:`fit_record`.
    """
    fits = fit_records(source, dtype=dtype)
    sites = sites_table(fits)
    return {
        "gls_partitions": partitions_table(fits), "gls_sites": sites, "gls_kinds": kinds_table(sites),
        "gls_scatter": _scatter(fits, scatter_partition, seed),
        "gls_two_step": two_step_table(fits), "gls_whatif": whatif_table(fits),
    }


def _step(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable, sites, kinds) -> Capture:
    with capture(model, sites=sites, kinds=kinds, storage="device", preserve=False) as cap:
        loss_fn(batches.forward(model, inputs), targets).backward()
    return cap


def gls_step(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = torch.nn.functional.cross_entropy,
    sites: str | Iterable[str] | None = None,
    kinds: str | Iterable[str] | None = None,
    train: bool = True,
) -> dict[str, pd.DataFrame]:
    """Capture one forward/backward of ``model`` on ``batch`` and return :func:`gls_tables`.

    ``train=True`` runs in training mode (batch statistics: the regime of "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission)); the model's
    parameters, buffers, flags and ``.grad`` are restored afterwards (bit-identical).
    """
    with preserved(model):
        model.train(train)
        cap = _step(model, batch[0], batch[1], loss_fn, sites, kinds)
    return gls_tables(cap)


# -- batch size: sweep and small-batch regularization ------------------------------------------
def _chunk_dx(fit: RecordFit, alpha: Tensor, beta: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``B (g - alpha - beta z) / s`` and ``B (g - alpha - beta z)`` in the input's shape."""
    residual = size * (fit.g - alpha - beta * fit.z)
    return _input_shaped(residual / fit.figures["scale"][:, None], fit), _input_shaped(residual, fit)


def _relative_distance(estimate: list[tuple[Tensor, Tensor]], reference: tuple[Tensor, Tensor], which: int) -> float:
    ref = reference[which]
    return float((torch.cat([e[which] for e in estimate]) - ref).norm() / ref.norm())


def batch_size_sweep(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = torch.nn.functional.cross_entropy,
    batch_sizes: Sequence[int] | None = None,
    sites: str | Iterable[str] | None = None,
    kinds: str | Iterable[str] | None = None,
    momentum: float = 0.5,
    weight: float = 2.0,
    track: Callable = no_progress,
    first_step: tuple[int, Sequence[SiteRecord]] | None = None,
    budget=None,
) -> dict[str, pd.DataFrame]:
    """The site table as a function of batch size, and "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission) Appendix C's regularization.

    The ``L`` items of ``inputs`` are split, in order, into batches of each size ``B`` (which must
    divide ``L``; default: the powers of 2 that do); every batch runs forward/backward in training
    mode under capture. One batch of all ``L`` items always runs as the reference, whether or not
    ``L`` is among the sizes (its rows appear only if it is).

    ``gls_batch_sweep``: :func:`sites_table` pooled over the batches of size B (R^2, beta, naive gap).

    ``gls_regularization`` (BatchNorm-style sites: per-channel partitions, batch statistics): the
    plain gradient ``(g - alpha - beta z)/s`` and the regularized one ``(g - alpha_w - beta_w z)/s``
    (:func:`regularized_fit`) with running ``alpha* <- m alpha* + (1 - m) alpha_b`` (and beta*)
    over the previous batches (initialized with the first batch), against the same site's gradient
    for the same items in one batch of all L items: ``dist = ||B dL/dx_B - L dL/dx_L|| / ||L dL/dx_L||``
    (per-item gradients of a mean-reduced loss, rescaled to a common scale); ``dist_*_residual``
    the same for ``B (g - alpha - beta z)``, the regression residual before the division by s.
    The model is restored afterwards (bit-identical).

    ``first_step``: ``(size, records)`` of a training step already captured on the first ``size``
    items (the driver's step on batch 0, :mod:`normscope.plan`), used instead of running it again.
    ``budget`` (:class:`~normscope.budget.Budget`): before each batch size (largest first, the
    reference always runs) the sweep prices that size's steps at the step seconds measured on the
    size before it and stops, recording the cut, when they do not fit in what is left.
    """
    total = batches.check_sliceable((inputs, targets))
    sizes = sorted(set(batch_sizes or _powers_of_two(total)))
    if not sizes:
        raise DataShapeError(f"no batch size of at least 2 divides the {total} items; pass batch_sizes")
    bad = [b for b in sizes if b < 2 or total % b]
    if bad:
        raise DataShapeError(f"batch sizes {bad} do not divide the {total} items into batches of at least 2")
    if not 0 <= momentum < 1 or weight < 0:
        raise DataShapeError(f"momentum must be in [0, 1) and weight >= 0 (got momentum={momentum}, weight={weight})")
    runs = sorted({*sizes, total})  # the one batch of all L items is the reference, asked for or not
    sweep_rows, dx_plain, dx_reg = [], {}, {}
    clock = time.perf_counter if budget is None else budget.measure_clock
    step_seconds = 0.0
    with preserved(model):
        model.train()
        for size in track(runs[::-1], "gls batch-size sweep", len(runs)):
            if budget is not None and size != total and budget.limited:
                step_seconds = agreed(step_seconds)  # the slowest rank's: every rank cuts alike
                needed = step_seconds * (total // size)
                if needed > budget.remaining():
                    left = [b for b in runs if b <= size]
                    budget.cut(f"the batch-size sweep at batch sizes {', '.join(map(str, left))}",
                               f"{total // size} steps of up to {step_seconds:.2g} s each at batch size {size} "
                               f"did not fit in the {budget.remaining():.3g} s left")
                    sizes = [b for b in sizes if b > size]
                    break
            fits_b: list[RecordFit] = []
            running: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
            deadline = budget.deadline() if budget is not None and size != total else None
            for start in range(0, total, size):
                if start and deadline is not None and deadline():  # a slowdown mid-size: this size and the smaller ones go
                    budget.cut(f"the batch-size sweep at batch sizes {', '.join(str(b) for b in runs if b <= size)}",
                               f"the budget ran out after {start // size} of the {total // size} steps at batch size {size}")
                    break
                began = clock()
                if start == 0 and first_step is not None and first_step[0] == size:
                    records = first_step[1]
                else:
                    records = _step(model, *batches.take((inputs, targets), slice(start, start + size)), loss_fn, sites, kinds).records
                step_seconds = clock() - began
                for fit in fit_records(records):
                    key = (fit.record.site.name, fit.record.index)
                    if fit.record.layout.rule == "channel" and fit.record.layout.batch_stats:
                        alpha, beta = fit.figures["alpha"][:, None], fit.figures["beta"][:, None]
                        a_star, b_star = running.get(key, (alpha[:, 0], beta[:, 0]))
                        reg = regularized_fit(fit.z, fit.g, a_star, b_star, weight, size)
                        dx_plain.setdefault((key, size), []).append(_chunk_dx(fit, alpha, beta, size))
                        dx_reg.setdefault((key, size), []).append(_chunk_dx(fit, *reg, size))
                        running[key] = (momentum * a_star + (1 - momentum) * alpha[:, 0],
                                        momentum * b_star + (1 - momentum) * beta[:, 0])
                    fit.z = fit.g = fit.residual = None
                    fits_b.append(fit)
            if getattr(deadline, "stopped", False):
                sizes = [b for b in sizes if b > size]
                break
            if size in sizes:
                table = sites_table(fits_b)
                table["batch_size"] = size
                sweep_rows.append(table)
    if not sweep_rows:
        return {"gls_batch_sweep": _empty("gls_batch_sweep"), "gls_regularization": _empty("gls_regularization")}
    sweep = pd.concat(sweep_rows, ignore_index=True)
    sweep = sweep.sort_values(["depth", "batch_size"], ignore_index=True)[COLUMNS["gls_batch_sweep"]]
    reg_rows = []
    for (key, size), plain in dx_plain.items():
        if size not in sizes:
            continue
        reference = dx_plain[(key, total)][0]
        reg_rows.append({"site": key[0] if key[1] == 0 else f"{key[0]}#{key[1]}", "batch_size": size,
                         "dist_plain": _relative_distance(plain, reference, 0),
                         "dist_regularized": _relative_distance(dx_reg[(key, size)], reference, 0),
                         "dist_plain_residual": _relative_distance(plain, reference, 1),
                         "dist_regularized_residual": _relative_distance(dx_reg[(key, size)], reference, 1),
                         "momentum": momentum, "weight": weight})
    regularization = (pd.DataFrame(reg_rows, columns=COLUMNS["gls_regularization"])
                      .sort_values(["site", "batch_size"], ignore_index=True) if reg_rows else _empty("gls_regularization"))
    return {"gls_batch_sweep": sweep, "gls_regularization": regularization}


def sweep_runs(total: int) -> list[int]:
    """The batch sizes :func:`batch_size_sweep` runs by default on ``total`` items: the powers of 2
    that divide it and ``total`` itself (the reference); ``sum(total // b)`` steps in all (63 for 64)."""
    return sorted({*_powers_of_two(total), total})


def _powers_of_two(total: int) -> list[int]:
    return [2**k for k in range(1, int(math.log2(total)) + 1) if total % 2**k == 0]


# -- the analyzer ------------------------------------------------------------------------------
def _sweep_data(ctx: AnalysisContext, limit: int) -> tuple | None:
    data = batches.concat(ctx.batches)
    if batches.size(data[0]) < limit and ctx.dataset is not None:
        data = ctx.dataset
    n = batches.size(data[0])
    size = 2 ** int(math.log2(min(limit, n))) if n >= 4 else 0
    return None if size < 4 else batches.take(data, slice(0, size))


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def findings(tables: dict[str, pd.DataFrame]) -> list[Finding]:
    """Findings from the gls tables, most important first: :func:`normscope.rules.gls_findings`."""
    return gls_findings(tables)


def headline(tables: dict[str, pd.DataFrame]) -> dict[str, float | int | str]:
    """Scalar figures for ``summary.json``."""
    sites = tables["gls_sites"]
    figures: dict[str, float | int | str] = {"gls_n_sites": int(len(sites))}
    if not sites.empty:
        figures.update(gls_r2_mean=float(sites["r2_mean"].mean()), gls_naive_gap_max=float(sites["naive_gap"].max()),
                       gls_identity_rel_max=float(sites["identity_rel_max"].max()))
    reg = tables.get("gls_regularization", pd.DataFrame())
    if not reg.empty:
        small = reg[reg["batch_size"] == reg["batch_size"].min()]
        figures.update(gls_small_batch=int(small["batch_size"].iloc[0]),
                       gls_dist_plain_small=float(small["dist_plain"].mean()),
                       gls_dist_regularized_small=float(small["dist_regularized"].mean()))
    return figures


def passes(ctx: AnalysisContext) -> list[Pass]:
    """One training-mode forward and backward on the first batch (:mod:`normscope.plan`)."""
    return [Pass("train", 0, backward=True)]


def analyze(ctx: AnalysisContext) -> AnalyzerOutput:
    """The gradient-least-squares analyzer ("Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission)): the tables of one captured training step on the first
    batch (:func:`passes`, as :func:`gls_step`), then :func:`batch_size_sweep` over up to 64 items (``quick``) or
    512 items of the data. Options (``ctx.options``): ``gls_momentum`` (0.5), ``gls_weight`` (2.0),
    ``gls_sweep`` (True)."""
    tables = gls_tables(ctx.records("train", [0], backward=True))
    step_seconds = agreed(ctx.passes().seconds("train", 0))
    data = _sweep_data(ctx, 64 if ctx.quick else 512)
    if data is not None and ctx.options.get("gls_sweep", True):
        total, first = batches.size(data[0]), batches.size(ctx.batches[0][0])
        runs = sweep_runs(total)
        steps = sum(total // b for b in runs)
        needed = len(runs) * step_seconds * total / first  # each size's steps hold the total items once
        if needed > ctx.budget.remaining():
            ctx.budget.cut("the batch-size sweep", f"{steps} captured steps over {len(runs)} batch sizes, about {needed:.2g} s "
                           f"at the first batch's step time, did not fit in the {ctx.budget.remaining():.3g} s left")
            data = None
    if ctx.options.get("gls_sweep", True) and data is not None:
        first_step = (batches.size(ctx.batches[0][0]), ctx.records("train", [0], backward=True))
        tables.update(batch_size_sweep(ctx.model, *data, loss_fn=ctx.loss_fn, track=ctx.track,
                                       momentum=ctx.options.get("gls_momentum", 0.5),
                                       weight=ctx.options.get("gls_weight", 2.0),
                                       first_step=first_step, budget=ctx.budget))
    else:
        tables.update(gls_batch_sweep=_empty("gls_batch_sweep"), gls_regularization=_empty("gls_regularization"))
    return AnalyzerOutput(tables, findings(tables), headline(tables))
