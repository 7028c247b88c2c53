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
  (:func:`normscope.analyzers.gls.fit_record` on the sums).

Per-channel sites average the statistics of several records per channel, as ``stats_tables`` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from normscope.analyzers.gls import fit_record
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
    table = {k: np.mean([p[k] for p in parts], axis=0) for k in parts[0]}
    eps = table["eps_fraction"]
    rows = [(site, "eps_fraction_max", float(eps.max())),
            (site, "eps_dominated_fraction", float((eps > EPS_DOMINANCE).mean()))]
    if first.layout.weight is not None:
        rows.append((site, "gamma_mean", float(first.layout.weight.detach().double().mean())))
    if "mean_drift" in table:
        rows += [(site, "mean_drift_mean", float(table["mean_drift"].mean())),
                 (site, "var_ratio_median", float(np.median(table["var_ratio"])))]
    return rows


def gls_rows(site: str, records: list[SiteRecord]) -> list[Row]:
    """Gradient-least-squares rows of one site: its records' partitions pooled, as ``gls_sites``."""
    fits = [fit_record(r, keep=False) for r in records if r.has_grad]
    if not fits:
        return []
    cat = {k: np.concatenate([_np(f.figures[k]) for f in fits]) for k in ("r2", "beta", "slope_ratio", "residual_sq", "g_sq")}
    naive_sq, true_sq = sum(f.naive_sq for f in fits), sum(f.true_sq for f in fits)
    r2 = cat["r2"]
    finite = np.isfinite(r2).any()
    values = {
        "r2_mean": float(np.nanmean(r2)) if finite else math.nan,
        "r2_median": float(np.nanmedian(r2)) if finite else math.nan,
        "r2_pooled": 1 - float(cat["residual_sq"].sum() / cat["g_sq"].sum()),
        "beta_mean": float(np.nanmean(cat["beta"])), "beta_abs_mean": float(np.nanmean(np.abs(cat["beta"]))),
        "slope_ratio_mean": float(np.nanmean(cat["slope_ratio"])),
        "naive_gap": math.sqrt(naive_sq / true_sq) if true_sq > 0 else math.nan,
    }
    return [(site, name, values[name]) for name in GLS_METRICS]


def step_rows(records: list[SiteRecord], running: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Row]:
    """``(site, metric, value)`` for every site of one captured step, sites in forward order."""
    by_site: dict[str, list[SiteRecord]] = {}
    for record in records:
        by_site.setdefault(record.site.name, []).append(record)
    rows: list[Row] = []
    for site, group in by_site.items():
        rows += stats_rows(site, group, running)
        rows += gls_rows(site, group)
    return rows
