"""Per-site figures of one training step, from the reductions of a ``storage="reductions"`` capture.

The same statistics as the snapshot tables, per site, from the per-partition sums alone
(:func:`normscope.capture.record.reduce_record`):

* norm statistics (``stats_sites``, MATH.md §1): ``mean_drift_mean`` (mean over channels of
  ``|batch_mean - running_mean| / sqrt(running_var + eps)``), ``var_ratio_median`` (median of
  ``batch_var / running_var``), ``eps_fraction_max`` and ``eps_dominated_fraction`` (the share
  of partitions with ``eps / (var + eps) > 0.5``; ``mean x^2`` for uncentered kinds), ``gamma_mean``;
  running statistics are those before the step's forward;
* gradient least squares (``gls_sites``, MATH.md §2, "Normalization Gradients are Least-Squares
  Residuals", 2019): ``r2_mean``, ``r2_median``, ``r2_pooled``, ``beta_mean``, ``beta_abs_mean``,
  ``slope_ratio_mean`` and ``naive_gap`` over the partitions of all the site's records
  (:func:`normscope.analyzers.gls.fit_from_sums` on the sums of all sites at once).

Per-channel sites average the statistics of several records per channel, as ``stats_tables`` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from normscope.analyzers.gls import fit_from_sums
from normscope.analyzers.stats import EPS_DOMINANCE
from normscope.capture.record import SiteRecord

STATS_METRICS = ("eps_fraction_max", "eps_dominated_fraction", "gamma_mean")
DRIFT_METRICS = ("mean_drift_mean", "var_ratio_median")
GLS_METRICS = ("r2_mean", "r2_median", "r2_pooled", "beta_mean", "beta_abs_mean", "slope_ratio_mean", "naive_gap")

Row = tuple[str, str, float]


def running_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (running_mean, running_var)}`` copies of every module that tracks them."""
    out = {}
    for name, m in model.named_modules():
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            out[name] = (mean.detach().clone(), var.detach().clone())
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float64 and t.device.type == "cpu":
        return t.detach().numpy()
    return t.detach().to("cpu", torch.float64).numpy()


def _partition_stats(record: SiteRecord, running: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, np.ndarray]:
    red, layout = record.reductions, record.layout
    mean, var = _np(red["mean"]), _np(red["var"])
    normalizer = var if layout.kind.centered else var + mean * mean
    out = {"eps_fraction": layout.eps / (normalizer + layout.eps)}
    if layout.rule == "channel" and running is not None and running[0].numel() == mean.size:
        rm, rv = _np(running[0]), _np(running[1])
        out["mean_drift"] = np.abs(mean - rm) / np.sqrt(rv + layout.eps)
        out["var_ratio"] = var / rv
    return out


def stats_rows(site: str, records: list[SiteRecord], running: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Row]:
    """Norm-statistics rows of one site (see the module docstring)."""
    first = records[0]
    used = records if first.layout.rule == "channel" else records[:1]
    parts = [_partition_stats(r, running.get(site)) for r in used]
    table = parts[0] if len(parts) == 1 else {k: np.mean([p[k] for p in parts], axis=0) for k in parts[0]}
    eps = table["eps_fraction"]
    rows = [(site, "eps_fraction_max", float(eps.max())),
            (site, "eps_dominated_fraction", float((eps > EPS_DOMINANCE).mean()))]
    if first.layout.weight is not None:
        rows.append((site, "gamma_mean", float(_np(first.layout.weight).mean())))
    if "mean_drift" in table:
        rows += [(site, "mean_drift_mean", float(table["mean_drift"].mean())),
                 (site, "var_ratio_median", float(np.median(table["var_ratio"])))]
    return rows


def _figures(fits: list[SiteRecord]) -> dict[str, np.ndarray]:
    """:func:`~normscope.analyzers.gls.fit_from_sums` over the partitions of all ``records`` at once
    (one call per kind of regression), with ``scale``, as float64 arrays in record order."""
    groups: dict[tuple[bool, bool, bool], list[int]] = {}
    for i, r in enumerate(fits):
        groups.setdefault((r.layout.kind.centered, r.layout.rule == "weight", r.layout.batch_stats), []).append(i)
    sizes = [r.reductions["n"].numel() for r in fits]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out: dict[str, np.ndarray] = {}
    for (centered, unit, batch_stats), members in groups.items():
        sums = {k: torch.cat([fits[i].reductions[k] for i in members]) for k in ("n", "sum_z", "sum_z2", "sum_g", "sum_g2", "sum_gz", "scale")}
        fig = fit_from_sums(sums, centered, unit, batch_stats)
        fig["scale"] = sums["scale"]
        index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
        for key, value in fig.items():
            out.setdefault(key, np.empty(starts[-1]))[index] = _np(value)
    return out


def _mean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if np.isnan(a).any() else float(a.mean())


def gls_rows(sites: dict[str, list[SiteRecord]]) -> list[Row]:
    """Gradient-least-squares rows of every site: its records' partitions pooled, as ``gls_sites``."""
    fits = [(site, r) for site, group in sites.items() for r in group if r.has_grad]
    if not fits:
        return []
    fig = _figures([r for _, r in fits])
    rows: list[Row] = []
    start = 0
    bounds: dict[str, list[int]] = {}
    for site, r in fits:
        size = r.reductions["n"].numel()
        bounds.setdefault(site, [start, start])[1] = start + size
        start += size
    for site, (a, b) in bounds.items():
        r2, beta, scale_sq = fig["r2"][a:b], fig["beta"][a:b], fig["scale"][a:b] ** 2
        explained, residual = float((fig["explained_sq"][a:b] / scale_sq).sum()), float((fig["residual_sq"][a:b] / scale_sq).sum())
        finite = np.isfinite(r2).any()
        values = {
            "r2_mean": _mean(r2) if finite else math.nan,
            "r2_median": float(np.nanmedian(r2) if np.isnan(r2).any() else np.median(r2)) if finite else math.nan,
            "r2_pooled": 1 - float(fig["residual_sq"][a:b].sum() / fig["g_sq"][a:b].sum()),
            "beta_mean": _mean(beta), "beta_abs_mean": _mean(np.abs(beta)),
            "slope_ratio_mean": _mean(fig["slope_ratio"][a:b]),
            "naive_gap": math.sqrt(explained / residual) if residual > 0 else math.nan,
        }
        rows += [(site, name, values[name]) for name in GLS_METRICS]
    return rows


def step_rows(records: list[SiteRecord], running: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Row]:
    """``(site, metric, value)`` for every site of one captured step, sites in forward order."""
    by_site: dict[str, list[SiteRecord]] = {}
    for record in records:
        by_site.setdefault(record.site.name, []).append(record)
    rows: list[Row] = []
    for site, group in by_site.items():
        rows += stats_rows(site, group, running)
    return rows + gls_rows(by_site)
