"""Per-site figures of one training step, from the reductions of a ``storage="reductions"`` capture.

The same statistics as the snapshot tables, per site, from the per-partition sums alone
(:func:`normscope.capture.record.finish_reductions`):

* norm statistics (``stats_sites``, MATH.md §1): ``mean_drift_mean`` (mean over channels of
  ``|batch_mean - running_mean| / sqrt(running_var + eps)``), ``var_ratio_median`` (median of
  ``batch_var / running_var``), ``eps_fraction_max`` and ``eps_dominated_fraction`` (the share
  of partitions with ``eps / (var + eps) > 0.5``; ``mean x^2`` for uncentered kinds), ``gamma_mean``;
  running statistics are those before the step's forward;
* gradient least squares (``gls_sites``, MATH.md §2, "Normalization Gradients are Least-Squares
  Residuals", 2019): ``r2_mean``, ``r2_median``, ``r2_pooled``, ``beta_mean``, ``beta_abs_mean``,
  ``slope_ratio_mean`` and ``naive_gap`` over the partitions of all the site's records
  (:func:`normscope.analyzers.gls.fit_from_sums`).

Per-channel sites average the statistics of several records per channel, as ``stats_tables`` does.
All sites are computed at once: the per-partition sums of every record are concatenated into float64
tensors and the per-site means, maxima, medians and sums are segment reductions over them (sums in
item order, so they agree with the snapshot's pairwise numpy sums to float64 rounding).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from normscope.analyzers.gls import fit_from_sums
from normscope.analyzers.stats import F64, _cat, _segment_mean, _segment_median, _segment_sums, stats_values
from normscope.capture.record import SiteRecord

STATS_METRICS = ("eps_fraction_max", "eps_dominated_fraction", "gamma_mean")
DRIFT_METRICS = ("mean_drift_mean", "var_ratio_median")
GLS_METRICS = ("r2_mean", "r2_median", "r2_pooled", "beta_mean", "beta_abs_mean", "slope_ratio_mean", "naive_gap")
FIT_SUMS = ("n", "sum_z", "sum_z2", "sum_g", "sum_g2", "sum_gz", "scale")

Row = tuple[str, str, float]


def running_stats(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (running_mean, running_var)}`` of every module that tracks them, copied in one
    concatenation (the values are views of that copy, on the first buffer's device, in the promoted dtype)."""
    found = [(name, m.running_mean, m.running_var) for name, m in model.named_modules()
             if isinstance(getattr(m, "running_mean", None), Tensor) and isinstance(getattr(m, "running_var", None), Tensor)]
    if not found:
        return {}
    device = found[0][1].device
    tensors = [t.detach().reshape(-1).to(device) for _, mean, var in found for t in (mean, var)]
    parts = torch.cat(tensors).split([t.numel() for t in tensors])
    return {name: (parts[2 * i].view_as(mean), parts[2 * i + 1].view_as(var)) for i, (name, mean, var) in enumerate(found)}


def _figures(fits: list[SiteRecord]) -> dict[str, Tensor]:
    """:func:`~normscope.analyzers.gls.fit_from_sums` over the partitions of all ``fits`` at once
    (one call per kind of regression), with ``scale``, as float64 tensors in record order."""
    groups: dict[tuple[bool, bool, bool], list[int]] = {}
    for i, r in enumerate(fits):
        groups.setdefault((r.layout.kind.centered, r.layout.rule == "weight", r.layout.batch_stats), []).append(i)
    sizes = [r.reductions["n"].numel() for r in fits]
    starts = [0, *itertools.accumulate(sizes)]
    out: dict[str, Tensor] = {}
    for (centered, unit, batch_stats), members in groups.items():
        sums = {k: _cat([fits[i].reductions[k] for i in members]) for k in FIT_SUMS}
        fig = fit_from_sums(sums, centered, unit, batch_stats)
        fig["scale"] = sums["scale"]
        if len(groups) == 1:
            return fig
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members])
        for key, value in fig.items():
            out.setdefault(key, torch.empty(starts[-1], dtype=F64))[index] = value
    return out


def gls_values(fits: list[list[SiteRecord]]) -> dict[str, Tensor]:
    """Gradient-least-squares figures of every site, its records' partitions pooled (as ``gls_sites``):
    nan-means of ``r2``, ``beta``, ``|beta|`` and ``slope_ratio``, the nan-median of ``r2`` (NaN when no
    partition's ``r2`` is finite), ``r2_pooled = 1 - sum residual_sq / sum g_sq`` and
    ``naive_gap = sqrt(sum explained_sq / s^2 / sum residual_sq / s^2)`` (NaN when the latter is 0)."""
    flat = [r for group in fits for r in group]
    fig = _figures(flat)
    sizes = torch.tensor([sum(r.reductions["n"].numel() for r in group) for group in fits])
    starts = (sizes.cumsum(0) - sizes).numpy()
    r2, beta, scale_sq = fig["r2"], fig["beta"], fig["scale"] ** 2
    sums = _segment_sums(torch.stack([fig["residual_sq"], fig["g_sq"], fig["explained_sq"] / scale_sq,
                                      fig["residual_sq"] / scale_sq, r2.isfinite().to(F64)]), starts)
    finite = sums[4] > 0
    residual = sums[3]
    return {"r2_mean": _segment_mean(r2, starts).where(finite, math.nan),
            "r2_median": _segment_median(r2, starts, skip_nan=True).where(finite, math.nan),
            "r2_pooled": 1 - sums[0] / sums[1],
            "beta_mean": _segment_mean(beta, starts), "beta_abs_mean": _segment_mean(beta.abs(), starts),
            "slope_ratio_mean": _segment_mean(fig["slope_ratio"], starts),
            "naive_gap": (sums[2] / residual).sqrt().where(residual > 0, math.nan)}


def step_rows(records: list[SiteRecord], running: dict[str, tuple[Tensor, Tensor]]) -> list[Row]:
    """``(site, metric, value)`` for every site of one captured step: the norm statistics of every
    site in forward order, then the gradient-least-squares figures of every site with a gradient."""
    return steps_rows([(0, records, running)]).get(0, [])


def steps_rows(steps: list[tuple[int, list[SiteRecord], dict[str, tuple[Tensor, Tensor]]]]) -> dict[int, list[Row]]:
    """:func:`step_rows` of several captured steps ``(step, records, running statistics)`` in one
    computation, by step: each (step, site) is a segment of the concatenated sums, so every row equals
    the one of its step computed alone, bit for bit."""
    by_site: dict[tuple[int, str], list[SiteRecord]] = {}
    running_by_site: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for step, records, running in steps:
        for record in records:
            by_site.setdefault((step, record.site.name), []).append(record)
        running_by_site.update({(step, name): value for name, value in running.items()})
    if not by_site:
        return {}
    keys, groups = list(by_site), list(by_site.values())
    stats, drifting = stats_values(keys, groups, running_by_site)
    values = {name: value.tolist() for name, value in stats.items()}
    rows: dict[int, list[Row]] = {}
    for s, (step, site) in enumerate(keys):
        names = (*STATS_METRICS[:2], *STATS_METRICS[2:] * (groups[s][0].layout.weight is not None), *DRIFT_METRICS * (s in drifting))
        rows.setdefault(step, []).extend((site, name, values[name][s]) for name in names)
    fits = {key: [r for r in group if r.has_grad] for key, group in by_site.items()}
    fits = {key: group for key, group in fits.items() if group}
    if fits:
        gls = {name: value.tolist() for name, value in gls_values(list(fits.values())).items()}
        for s, (step, site) in enumerate(fits):
            rows[step].extend((site, name, gls[name][s]) for name in GLS_METRICS)
    return rows
