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
  ``slope_ratio_mean`` and ``naive_gap`` over the partitions of all the site's records, by the
  functions ``analyze`` uses (:func:`normscope.analyzers.gls.reduction_figures`,
  :func:`normscope.analyzers.gls.site_values`).

Both come from one implementation each, shared with ``analyze``: :func:`normscope.analyzers.stats.stats_values`
and :func:`normscope.analyzers.gls.site_values`.

Per-channel sites average the statistics of several records per channel, as ``stats_tables`` does.
All sites are computed at once: the per-partition sums of every record are concatenated into float64
tensors and the per-site means, maxima, medians and sums are segment reductions over them (sums in
item order, so they agree with the snapshot's pairwise numpy sums to float64 rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normscope.analyzers.gls import reduction_figures, site_values
from normscope.analyzers.stats import stats_values
from normscope.capture.record import SiteRecord

STATS_METRICS = ("eps_fraction_max", "eps_dominated_fraction", "gamma_mean")
DRIFT_METRICS = ("mean_drift_mean", "var_ratio_median")
GLS_METRICS = ("r2_mean", "r2_median", "r2_pooled", "beta_mean", "beta_abs_mean", "slope_ratio_mean", "naive_gap")

Row = tuple[str, str, float]


def running_stats(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (running_mean, running_var)}`` of every module that tracks them, copied in one
    concatenation (the values are views of that copy, on the first buffer's device, in the promoted dtype).
    ``modules``: ``list(model.named_modules())`` when the caller has walked the tree already."""
    found = [(name, m.running_mean, m.running_var) for name, m in (model.named_modules() if modules is None else modules)
             if isinstance(getattr(m, "running_mean", None), Tensor) and isinstance(getattr(m, "running_var", None), Tensor)]
    if not found:
        return {}
    device = found[0][1].device
    tensors = [t.detach().reshape(-1).to(device) for _, mean, var in found for t in (mean, var)]
    parts = torch.cat(tensors).split([t.numel() for t in tensors])
    return {name: (parts[2 * i].view_as(mean), parts[2 * i + 1].view_as(var)) for i, (name, mean, var) in enumerate(found)}


def gls_values(fits: list[list[SiteRecord]]) -> dict[str, Tensor]:
    """The gradient-least-squares figures (:data:`GLS_METRICS`) of every group of records (a site at a
    step), its records' partitions pooled: analyze's own computation of ``gls_sites``, per partition
    :func:`~normscope.analyzers.gls.reduction_figures` and per site
    :func:`~normscope.analyzers.gls.site_values` (without the quantiles beyond the median), over all
    groups at once. ``naive_gap`` is ``gls_sites``' ``naive_gap_identity``: the monitor keeps no
    ``dL/dx``, and the two are equal by MATH.md §2."""
    values = site_values(reduction_figures([r for group in fits for r in group]),
                         [sum(r.reductions["n"].numel() for r in group) for group in fits], quantiles=False)
    values["naive_gap"] = values.pop("naive_gap_identity")
    return {name: values[name] for name in GLS_METRICS}


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
