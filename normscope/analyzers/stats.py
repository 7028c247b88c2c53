"""Norm-layer statistics: batch moments against running statistics, eps dominance, affine
parameters, ReLU dead fractions and the scale of the weights feeding each normalization.

Per partition P of a site (MATH.md §1), from the captured input x and output y:

* ``batch_mean = mean_P x``, ``batch_var = var_P x`` (biased, as the normalization uses it);
* ``mean_drift = |batch_mean - running_mean| / sqrt(running_var + eps)`` and
  ``var_ratio = batch_var / running_var`` (BatchNorm: how far eval mode is from training mode);
* ``eps_fraction = eps / (batch_var + eps)`` (``mean_P x^2`` in place of the variance for
  uncentered kinds): the share of the normalizer that is eps; it is
  also ``1 - Var(z)``, the factor by which the backward slope of "Normalization Gradients are
  Least-Squares Residuals" (ICLR 2019 submission) differs from the OLS slope (MATH.md §2);
* ``relu_zero_fraction = mean_P [y <= 0]`` when the next op is a ReLU;
* ``feeding_weight_norm = ||W||`` of the Linear/Conv whose output the site normalizes: the loss is
  invariant to the scale of W (MATH.md §5), so the effective step shrinks like 1/||W||^2.
"""

from __future__ import annotations

import itertools
import math
from typing import Hashable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.batch import concat
from normscope.batch import size as batch_size
from normscope.budget import agreed
from normscope.capture.record import SiteRecord
from normscope.distributed import current, shard
from normscope.findings import Finding
from normscope.plan import Pass
from normscope.recalibration import recalibration_table, running_stat_layers
from normscope.rules import stats_findings

EPS_DOMINANCE = 0.5
RELU_TYPES = ("ReLU", "relu", "ReLU6", "relu6")


def _numpy(t: torch.Tensor | None, size: int) -> np.ndarray:
    if t is None:
        return np.full(size, np.nan)
    return t.detach().to("cpu", torch.float64).reshape(-1).numpy()


def _running_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
        for name, m in model.named_modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor) and isinstance(getattr(m, "running_var", None), torch.Tensor)
    }


def partition_table(record: SiteRecord, running: tuple[torch.Tensor, torch.Tensor] | None) -> pd.DataFrame:
    """One row per partition of one record: batch moments, drift, eps fraction, affine, ReLU zeros."""
    rows = record.rows(record.x)
    var, mean = torch.var_mean(rows, dim=1, correction=0)
    n = rows.shape[0]
    per_channel = record.layout.rule == "channel"
    eps = record.layout.eps
    table = pd.DataFrame({
        "site": record.site.name,
        "kind": record.site.kind,
        "channel": np.arange(n),
        "batch_mean": _numpy(mean, n),
        "batch_var": _numpy(var, n),
    })
    if per_channel and running is not None and running[0].numel() == n:
        rm, rv = _numpy(running[0], n), _numpy(running[1], n)
        table["running_mean"], table["running_var"] = rm, rv
        table["mean_drift"] = np.abs(table["batch_mean"] - rm) / np.sqrt(rv + eps)
        table["var_ratio"] = table["batch_var"] / rv
    else:
        table["running_mean"] = table["running_var"] = table["mean_drift"] = table["var_ratio"] = np.nan
    normalizer = table["batch_var"] if record.layout.kind.centered else _numpy(rows.pow(2).mean(dim=1), n)
    table["eps_fraction"] = eps / (normalizer + eps)
    affine = per_channel and record.layout.weight is not None and record.layout.weight.numel() == n
    table["gamma"] = _numpy(record.layout.weight, n) if affine else np.nan
    table["beta"] = _numpy(record.layout.bias, n) if affine and record.layout.bias is not None else np.nan
    if record.consumer_type in RELU_TYPES and record.y is not None:
        table["relu_zero_fraction"] = _numpy((record.rows(record.y) <= 0).double().mean(dim=1), n)
    else:
        table["relu_zero_fraction"] = np.nan
    return table


def _mean_or_nan(t: torch.Tensor | None) -> float:
    return math.nan if t is None else float(t.double().mean())


def _min_or_nan(t: torch.Tensor | None) -> float:
    return math.nan if t is None else float(t.double().min())


def _nonfinite(record: SiteRecord) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in (record.x, record.y, record.dy) if t is not None)


def _feeding_weight_norm(model: nn.Module, producer: str | None) -> float:
    if not producer:
        return math.nan
    module = model.get_submodule(producer)
    weight = getattr(module, "weight", None)
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or weight is None:
        return math.nan
    return float(weight.detach().double().norm())


def _site_values(groups: dict[str, list[SiteRecord]], running: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """The per-site figures the monitor also writes, by :func:`stats_values` (one implementation)
    on the per-partition reductions of the records (:func:`normscope.capture.record.partial_sums`
    on copies, so the records keep their tensors); ``gamma_min`` beside them."""
    from dataclasses import replace

    from normscope.capture.record import finish_reductions, partial_sums

    if not groups:
        return {}
    shadows = {site: [replace(r, reductions={}) for r in group] for site, group in groups.items()}
    finish_reductions([(r, partial_sums(r)) for group in shadows.values() for r in group])
    sites = list(shadows)
    values, drifting = stats_values(sites, list(shadows.values()), running)
    out = {}
    for s, site in enumerate(sites):
        weight = groups[site][0].layout.weight
        out[site] = {"eps_fraction_max": float(values["eps_fraction_max"][s]),
                     "eps_dominated_fraction": float(values["eps_dominated_fraction"][s]),
                     "mean_drift_mean": float(values["mean_drift_mean"][s]) if s in drifting else math.nan,
                     "var_ratio_median": float(values["var_ratio_median"][s]) if s in drifting else math.nan,
                     "gamma_mean": float(values["gamma_mean"][s]), "gamma_min": _min_or_nan(weight)}
    return out


def stats_tables(
    records: list[SiteRecord],
    model: nn.Module | None = None,
    running: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, pd.DataFrame]:
    """``stats_channels`` and ``stats_sites`` (docs/tables.md) from captured records.

    Per-channel sites (BatchNorm) average the partition statistics over all records of the site;
    other kinds, whose partitions are samples, use the site's first record. ``running`` maps a
    module path to its running statistics as they were before the captured forwards; by default
    they are read from ``model`` now.
    """
    if running is None:
        running = _running_stats(model) if model is not None else {}
    order = list(dict.fromkeys(r.site.name for r in records))
    groups = {site: [r for r in records if r.site.name == site and r.x is not None] for site in order}
    groups = {site: group for site, group in groups.items() if group}
    values = _site_values(groups, running)
    channel_tables, site_rows = [], []
    for depth, site in enumerate(order):
        site_records = groups.get(site)
        if not site_records:
            continue
        first = site_records[0]
        used = site_records if first.layout.rule == "channel" else site_records[:1]
        table = pd.concat([partition_table(r, running.get(site)) for r in used])
        table = table.groupby(["site", "kind", "channel"], as_index=False, sort=False).mean()
        table.insert(2, "depth", depth)
        channel_tables.append(table)
        site_rows.append({
            "site": site,
            "kind": first.site.kind,
            "depth": depth,
            "n_partitions": len(table),
            "eps": first.layout.eps,
            **values[site],
            "relu_zero_fraction": table["relu_zero_fraction"].mean(),
            "producer": first.producer,
            "consumer": first.consumer_type,
            "feeding_weight_norm": _feeding_weight_norm(model, first.producer) if model is not None else math.nan,
            "nonfinite": sum(_nonfinite(r) for r in site_records),
            "records": len(site_records),
        })
    return {
        "stats_channels": pd.concat(channel_tables, ignore_index=True) if channel_tables else pd.DataFrame(),
        "stats_sites": pd.DataFrame(site_rows),
    }


# -- the per-site statistics from per-partition reductions: one implementation, used by stats_tables
# -- and by the monitor (normscope.monitor.metrics), vectorized over every site and step at once;
# -- the segment reductions also serve gls_sites (normscope.analyzers.gls.site_values)
F64 = torch.float64


def _host(t: Tensor) -> Tensor:
    return t.detach().to("cpu", F64)


def _cat(tensors: list[Tensor]) -> Tensor:
    """1-D ``tensors`` concatenated, as float64 on the host."""
    return _host(torch.cat(tensors)) if tensors else torch.empty(0, dtype=F64)


def _repeat(values: list, sizes: Tensor, dtype: torch.dtype = F64) -> Tensor:
    """One value per segment, repeated over its ``sizes`` items."""
    return torch.tensor(values, dtype=dtype).repeat_interleave(sizes)


def _segment_sums(values: Tensor, starts: np.ndarray) -> Tensor:
    """Sums of the rows of ``values`` (K, items) over the contiguous, non-empty segments that begin at
    ``starts``, item by item in order: (K, segments)."""
    return torch.from_numpy(np.add.reduceat(values.numpy(), starts, axis=1))


def _segment_mean(values: Tensor, starts: np.ndarray) -> Tensor:
    """``nanmean`` of each segment: the sum over its non-NaN items / their number (NaN if none)."""
    v = values.numpy()
    valid = ~np.isnan(v)
    sums = np.add.reduceat(np.stack([np.where(valid, v, 0.0), valid]), starts, axis=1)
    with np.errstate(invalid="ignore"):
        return torch.from_numpy(sums[0] / sums[1])


def _segment_median(values: Tensor, starts: np.ndarray, skip_nan: bool) -> Tensor:
    """Median of each contiguous, non-empty segment: the middle item of the sorted segment, or
    ``(a + b) / 2`` of the two middle items, as numpy; ``skip_nan``: over the non-NaN items
    (``nanmedian``, NaN when all are NaN), else NaN when the segment holds a NaN."""
    v = values.numpy()
    size = np.diff(starts, append=len(v))
    ordered = v[np.lexsort((v, np.repeat(np.arange(len(starts)), size)))]  # NaN last in each segment
    nan = np.add.reduceat(np.isnan(v).astype(np.int64), starts)
    m = size - nan if skip_nan else size
    lo, hi = starts + np.maximum(m - 1, 0) // 2, np.minimum(starts + m // 2, len(v) - 1)
    a, b = ordered[lo], ordered[hi]
    median = np.where(lo == hi, a, (a + b) / 2)
    return torch.from_numpy(np.where((m > 0) & ((nan == 0) | skip_nan), median, np.nan))


def _segment_quantiles(values: Tensor, starts: np.ndarray, quantiles: Sequence[float]) -> Tensor:
    """``np.nanquantile`` (linear interpolation) of each contiguous, non-empty segment at each of
    ``quantiles``, (Q, segments): over the non-NaN items sorted, position ``q (m - 1)`` between the
    items ``a`` and ``b`` around it, ``a + (b - a) t`` (``b - (b - a)(1 - t)`` for ``t >= 0.5``, as
    numpy's lerp); NaN where a segment holds no non-NaN item."""
    v = values.numpy()
    size = np.diff(starts, append=len(v))
    ordered = v[np.lexsort((v, np.repeat(np.arange(len(starts)), size)))]  # NaN last in each segment
    m = size - np.add.reduceat(np.isnan(v).astype(np.int64), starts)
    out = np.full((len(quantiles), len(starts)), np.nan)
    for i, q in enumerate(quantiles):
        position = q * np.maximum(m - 1, 0)
        below = np.floor(position).astype(np.int64)
        t = position - below
        a, b = ordered[starts + below], ordered[starts + np.minimum(below + 1, np.maximum(m - 1, 0))]
        with np.errstate(invalid="ignore"):
            diff = b - a
            value = np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
        out[i] = np.where(m > 0, np.where(t == 0, a, value), np.nan)
    return torch.from_numpy(out)


def stats_values(sites: list[Hashable], records: list[list[SiteRecord]],
                 running: dict[Hashable, tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], set[int]]:
    """The norm statistics of every site (``sites``: its key in ``running``, with ``records`` its
    records), one (S,) float64 tensor per metric (see the module docstring), and the indices of the
    sites with drift figures.

    Per partition of a record: ``eps_fraction = eps / (v + eps)`` with ``v = var`` (centered kinds) or
    ``var + mean^2``; for per-channel sites with running statistics of as many channels
    ``drift = |mean - running_mean| / sqrt(running_var + eps)`` and ``var_ratio = var / running_var``.
    Each site's table is the mean of its records' per-channel figures (per-channel sites) or its first
    record's (others); ``gamma_mean`` is the mean of the first record's weight; absent figures are NaN.
    """
    used = [(s, r) for s, group in enumerate(records) for r in (group if group[0].layout.rule == "channel" else group[:1])]
    sizes = torch.tensor([r.reductions["n"].numel() for _, r in used])
    site_size = [records[s][0].reductions["n"].numel() for s in range(len(sites))]
    site_start = [0, *itertools.accumulate(site_size)][:-1]
    record_start = (sizes.cumsum(0) - sizes).tolist()
    slot = torch.arange(int(sizes.sum())) - _repeat([a - site_start[s] for (s, _), a in zip(used, record_start)], sizes, torch.long)
    slots = sum(site_size)
    mean, var = _cat([r.reductions["mean"] for _, r in used]), _cat([r.reductions["var"] for _, r in used])
    eps = _repeat([r.layout.eps for _, r in used], sizes)
    centered = _repeat([r.layout.kind.centered for _, r in used], sizes, torch.bool)
    eps_fraction = eps / (var.where(centered, var + mean * mean) + eps)
    drifting = {s for s, group in enumerate(records)
                if group[0].layout.rule == "channel" and sites[s] in running and running[sites[s]][0].numel() == site_size[s]}
    on = torch.tensor([s in drifting for s, _ in used]).repeat_interleave(sizes)
    rm = _cat([running[sites[s]][0] for s, _ in used if s in drifting])
    rv = _cat([running[sites[s]][1] for s, _ in used if s in drifting])
    drift = (mean[on] - rm).abs() / (rv + eps[on]).sqrt()
    figures = torch.full((3, len(slot)), math.nan, dtype=F64)
    figures[0], figures[1, on], figures[2, on] = eps_fraction, drift, var[on] / rv
    table = torch.zeros(3, slots, dtype=F64).index_add_(1, slot, figures)
    table /= torch.bincount(slot, minlength=slots)
    starts = np.array(site_start)
    sums = _segment_sums(torch.stack([table[1], (table[0] > EPS_DOMINANCE).to(F64)]), starts)
    count = torch.tensor(site_size, dtype=F64)
    weighted = [s for s, group in enumerate(records) if group[0].layout.weight is not None]
    weights = [records[s][0].layout.weight for s in weighted]
    weight_sizes = torch.tensor([w.numel() for w in weights], dtype=torch.long)
    gamma = torch.full((len(sites),), math.nan, dtype=F64)
    if weights:
        gamma[weighted] = _segment_sums(_cat([w.reshape(-1) for w in weights])[None], (weight_sizes.cumsum(0) - weight_sizes).numpy())[0] / weight_sizes
    return {"eps_fraction_max": torch.from_numpy(np.maximum.reduceat(table[0].numpy(), starts)),
            "eps_dominated_fraction": sums[1] / count, "gamma_mean": gamma,
            "mean_drift_mean": sums[0] / count,
            "var_ratio_median": _segment_median(table[2], starts, skip_nan=False)}, drifting


def findings(sites: pd.DataFrame, recalibration: pd.DataFrame | None = None) -> list[Finding]:
    """Findings, most severe first: :func:`normscope.rules.stats_findings`."""
    return stats_findings(sites, recalibration)


def _recalibration_seconds(ctx: AnalysisContext, layers: int) -> float:
    """The recalibration's price: at most one pass per layer plus two evaluations over the data,
    each forward priced at the fastest of the driver's passes (a forward, or a forward and backward) per batch."""
    examples = batch_size(ctx.dataset[0]) if ctx.dataset is not None else sum(batch_size(b[0]) for b in ctx.batches)
    results = ctx.passes().results
    seconds = agreed(min((r.seconds for r in results.values()), default=0.0))  # the fastest pass, the slowest rank
    return (layers + 2) * seconds * examples / max(1, batch_size(ctx.batches[0][0]))


def passes(ctx: AnalysisContext) -> list[Pass]:
    """A training-mode forward over every batch (:mod:`normscope.plan`)."""
    return [Pass("train", i) for i in range(len(ctx.batches))]


def analyze(ctx: AnalysisContext) -> AnalyzerOutput:
    """Norm-layer statistics of ``ctx.model`` over ``ctx.batches`` (the records of :func:`passes`:
    training mode, so that normalizations use batch statistics); the model is left bit-identical.

    Under :func:`normscope.distributed.session` the batch statistics are replicated (every rank
    captures the same batches) and the recalibration's full-data passes run on this rank's shard
    of ``ctx.dataset`` (of the joined batches without one), their sums all-reduced."""
    model = ctx.model
    running = _running_stats(model)
    tables = stats_tables(ctx.records("train", range(len(ctx.batches))), model, running)
    layers = running_stat_layers(model)
    if layers and ctx.budget.fits("the recalibration of the running statistics", _recalibration_seconds(ctx, len(layers))):
        data = ctx.dataset if ctx.dataset is not None else ctx.batches
        if current().active:
            data = shard(data if ctx.dataset is not None else concat(data))
        tables["stats_recalibration"] = recalibration_table(model, data, ctx.loss_fn, ctx.passes().graph)
    sites = tables["stats_sites"]
    headline = {
        "sites": int(len(sites)),
        "eps_fraction_max": float(sites["eps_fraction_max"].max()) if len(sites) else math.nan,
        "mean_drift_max": float(sites["mean_drift_mean"].max()) if len(sites) else math.nan,
        "nonfinite": int(sites["nonfinite"].sum()) if len(sites) else 0,
    }
    return AnalyzerOutput(tables=tables, findings=findings(sites, tables.get("stats_recalibration")), headline=headline)
