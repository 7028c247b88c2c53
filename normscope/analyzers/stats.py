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

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.batch import concat
from normscope.batch import size as batch_size
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
    channel_tables, site_rows = [], []
    for depth, site in enumerate(order):
        site_records = [r for r in records if r.site.name == site and r.x is not None]
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
            "eps_fraction_max": table["eps_fraction"].max(),
            "eps_dominated_fraction": float((table["eps_fraction"] > EPS_DOMINANCE).mean()),
            "mean_drift_mean": table["mean_drift"].mean(),
            "var_ratio_median": table["var_ratio"].median(),
            "gamma_mean": _mean_or_nan(first.layout.weight),
            "gamma_min": _min_or_nan(first.layout.weight),
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


def findings(sites: pd.DataFrame, recalibration: pd.DataFrame | None = None) -> list[Finding]:
    """Findings, most severe first: :func:`normscope.rules.stats_findings`."""
    return stats_findings(sites, recalibration)


def _recalibration_seconds(ctx: AnalysisContext, layers: int) -> float:
    """The recalibration's price: at most one pass per layer plus two evaluations over the data,
    each forward priced at the first pass (a forward and backward of the first batch) per batch."""
    examples = batch_size(ctx.dataset[0]) if ctx.dataset is not None else sum(batch_size(b[0]) for b in ctx.batches)
    first = ctx.passes().results
    seconds = next(iter(first.values())).seconds if first else 0.0
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
