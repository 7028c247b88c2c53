"""Dead units after each normalization: the share of a site's output units that are never positive.

A unit is a channel (dim 1: BatchNorm, GroupNorm, InstanceNorm) or a feature (the normalized last
dims: LayerNorm, RMSNorm). Over every example and position of the captured training-mode batches,

    dead_fraction = (1 / U) * sum_u 1[ max y_u <= 0 ]

A ReLU after the site passes nothing of a dead unit, and its gradient there is zero: the unit's
``gamma`` and ``beta`` and the weights feeding it stop learning ("dying ReLU"; Lu et al., "Dying
ReLU and Initialization: Theory and Numerical Examples", 2019). Normalization keeps half the
values of each channel positive when ``beta = 0``; a negative ``beta`` of several ``gamma`` kills it.

A pure function of the driver's records (:func:`passes`: the forwards stats reads), so it costs no
pass of its own. Table ``dead_sites``: site, kind, units, dead_units, dead_fraction, consumer.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from normscope.analyzers import AnalysisContext, AnalyzerOutput
from normscope.capture.record import SiteRecord
from normscope.plan import Pass


def unit_rows(y: torch.Tensor, record: SiteRecord) -> torch.Tensor:
    """The site's output ``y`` as ``(units, items)``: features of the normalized last dims
    (``sample_last`` layouts), else channels (dim 1)."""
    layout = record.layout
    if layout.rule == "sample_last":
        return y.reshape(-1, math.prod(y.shape[y.dim() - layout.normalized_ndim:])).T
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def dead_table(records: list[SiteRecord]) -> pd.DataFrame:
    """``dead_sites``: per site (in call order) the units whose output is never positive in any record."""
    alive: dict[str, torch.Tensor] = {}
    first: dict[str, SiteRecord] = {}
    for record in records:
        if record.y is None or record.layout.rule == "weight":
            continue
        after = record.layout.activation  # the site's output is after(y): a fused activation, or a map such as a rotation
        positive = (unit_rows(record.y if after is None else after(record.y), record) > 0).any(dim=1)
        name = record.site.name
        first.setdefault(name, record)
        alive[name] = alive[name] | positive if name in alive else positive
    rows = [{"site": name, "kind": first[name].site.kind, "units": int(up.numel()), "dead_units": int((~up).sum()),
             "dead_fraction": float((~up).double().mean()),
             "consumer": first[name].consumer_type if getattr(first[name].layout.activation, "gates", True) else None}
            for name, up in alive.items()]
    return pd.DataFrame(rows, columns=["site", "kind", "units", "dead_units", "dead_fraction", "consumer"])


def passes(ctx: AnalysisContext) -> list[Pass]:
    """The training-mode forwards over every batch (the ones stats reads; run once for both)."""
    return [Pass("train", i) for i in range(len(ctx.batches))]


def analyze(ctx: AnalysisContext) -> AnalyzerOutput:
    """``dead_sites`` over ``ctx.batches`` in training mode, a finding per site with dead units."""
    table = dead_table(ctx.records("train", range(len(ctx.batches))))
    findings = [f"{row.site}: {row.dead_units} of {row.units} units ({100 * row.dead_fraction:.0f}%) are never positive "
                f"after normalization" + (f"; the {row.consumer} after it passes nothing of them." if row.consumer else ".")
                for row in table.itertuples() if row.dead_units]
    headline = {"dead_fraction_max": float(table["dead_fraction"].max()) if len(table) else math.nan}
    return AnalyzerOutput({"dead_sites": table}, findings, headline)
