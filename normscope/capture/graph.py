"""The site graph: what one capture knows about how the normalization sites are wired.

From the records of one ``capture(..., graph=True)`` forward (the driver's first pass,
:mod:`normscope.plan`) it holds, per site:

* ``order``: the sites in the order of their first call;
* ``feeding``: the leaf module whose output tensor *is* the site's input (a Linear or Conv
  feeding a BatchNorm is a scale-invariant weight, MATH.md §5);
* ``upstream``: the nearest sites whose outputs the site's input depends on (autograd);
* ``rank``: the number of dimensions of the site's input (2: one value per channel per example).

:meth:`SiteGraph.levels` gives the level in series among any subset of the sites: 1 + the
highest level of the sites of the subset the site's input depends on (through sites outside
the subset too). The moments of a level depend only on the moments of lower levels, so one pass
per level fixes them ("Extreme Normalization" (under review) §2.1's S-graph; population moments
in :mod:`normscope.recalibration`). These facts replace the probe forwards that each analyzer
used to run; :func:`site_graph` runs one capture for callers outside :func:`normscope.analyze`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from normscope.batch import Part, forward, take
from normscope.capture.record import SiteRecord
from normscope.guard import preserved


@dataclass
class SiteGraph:
    """Sites in call order with the layer feeding each, the sites upstream and the input rank."""

    order: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    feeding: dict[str, str | None] = field(default_factory=dict)
    upstream: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    rank: dict[str, int] = field(default_factory=dict)

    @property
    def wired(self) -> bool:
        """Whether every site's upstream sites are known (the capture ran with grad enabled)."""
        return all(u is not None for u in self.upstream.values())

    def levels(self, among: Iterable[str] | None = None) -> dict[str, int]:
        """``{site: level}`` for the sites of ``among`` (default all) that ran: 1 + the highest
        level of the sites of ``among`` upstream of its input, looking through sites outside
        ``among``. Raises ``ValueError`` when the capture had no autograd graph."""
        if not self.wired:
            raise ValueError("the site graph was captured without autograd; levels are unknown")
        chosen = set(self.order if among is None else among)
        reach: dict[str, int] = {}  # the highest level of a chosen site at or above each site
        level: dict[str, int] = {}
        for site in self.order:
            below = max((reach[u] for u in (self.upstream[site] or ()) if u in reach), default=0)
            if site in chosen:
                level[site] = below + 1
                reach[site] = level[site]
            else:
                reach[site] = below
        return level

    def in_levels(self, among: Iterable[str]) -> list[list[str]]:
        """The sites of ``among`` grouped by :meth:`levels`, each group in call order."""
        level = self.levels(among)
        depth = max(level.values(), default=0)
        return [[s for s in self.order if level.get(s) == k] for k in range(1, depth + 1)]

    def single_value(self, among: Iterable[str]) -> list[str]:
        """The sites of ``among`` whose input has two dimensions (one value per channel per example)."""
        chosen = set(among)
        return [s for s in self.order if s in chosen and self.rank[s] == 2]

    def feeding_layers(self, model: nn.Module) -> dict[str, str]:
        """``{linear_or_conv: batchnorm}`` for every Linear/Conv of ``model`` whose output tensor is
        the input of a torch BatchNorm (the scale-invariant weights of MATH.md §5)."""
        from torch.nn.modules.batchnorm import _BatchNorm

        pairs: dict[str, str] = {}
        for site in self.order:
            layer = self.feeding.get(site)
            if layer is None or ":" in site:
                continue
            if isinstance(model.get_submodule(site), _BatchNorm) and isinstance(
                    model.get_submodule(layer), (nn.Linear, nn.modules.conv._ConvNd)):
                pairs[layer] = site
        return pairs


def from_records(records: Sequence[SiteRecord]) -> SiteGraph:
    """The graph of the first forward of ``records`` (a capture's records, in call order): each
    site's first record."""
    graph = SiteGraph()
    for record in records:
        name = record.site.name
        if name in graph.kinds:
            continue
        graph.order.append(name)
        graph.kinds[name] = record.site.kind
        graph.feeding[name] = record.feeder
        graph.upstream[name] = record.upstream
        graph.rank[name] = len(record.shape)
    return graph


def site_graph(model: nn.Module, inputs: Part, examples: int = 2, train: bool = False) -> SiteGraph:
    """The site graph of ``model`` from one captured forward of the first ``examples`` examples of
    ``inputs`` (any form of :mod:`normscope.batch`) with grad enabled, in eval mode (``train``:
    training mode); the model is left bit-identical. :func:`normscope.analyze` takes the graph
    from its first pass instead (:class:`normscope.plan.Driver`)."""
    from normscope.capture.session import Capture

    with preserved(model), torch.enable_grad():
        model.train(train)
        with Capture(model, storage="device", preserve=False, graph=True) as cap:
            forward(model, take((inputs, None), slice(0, examples))[0])
    return from_records(cap.records)


def covering(graph: SiteGraph | None, model: nn.Module, inputs: Part, names: Iterable[str], examples: int = 2) -> SiteGraph:
    """``graph`` when it saw every site of ``names`` with its autograd wiring (the driver's graph
    under a ``sites`` pattern may not), else :func:`site_graph` of ``model`` on ``inputs``."""
    if graph is not None and graph.wired and set(names) <= set(graph.order):
        return graph
    return site_graph(model, inputs, examples)
