"""Analyzers: pure functions of a model, data and captured activations that return tables.

Every analyzer is registered here by name (the names ``normscope analyze --analyzers`` takes)
as ``"module:function"``. The function takes an :class:`AnalysisContext` and returns an
:class:`AnalyzerOutput`. Modules are imported on first use, so one analyzer's heavy imports do
not slow the others down.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from normscope.batch import device as batch_device
from normscope.budget import Budget
from normscope.errors import UnknownNameError

if TYPE_CHECKING:
    from normscope.capture.record import SiteRecord
    from normscope.plan import Driver

T = TypeVar("T")

ANALYZERS: dict[str, str] = {
    "stats": "normscope.analyzers.stats:analyze",
    "gls": "normscope.analyzers.gls:analyze",
    "bias": "normscope.analyzers.bias:analyze",
    "descent": "normscope.analyzers.descent:analyze",
    "dead": "normscope.analyzers.dead:analyze",
}


def no_progress(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
    """The default ``track``: iterate without showing progress."""
    yield from iterable


@dataclass
class AnalysisContext:
    """Everything an analyzer may use. Analyzers must leave ``model`` bit-identical
    (wrap work in :func:`normscope.guard.preserved` or work on a copy).

    Attributes:
        model: the user's model, on ``device``.
        batches: a few ``(inputs, targets)`` minibatches on ``device`` for per-step analyses, in
            the forms of :mod:`normscope.batch` (move, slice and join them with its functions).
        dataset: the whole data set as ``(inputs, targets)`` on ``device`` when it fits, for
            analyzers that need full-data quantities (estimator bias); ``None`` otherwise.
        loader: the DataLoader the batches came from, for streamed computations.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a :class:`normscope.losses.Loss` from
            ``analyze``); cross-entropy by default.
        lr: the learning rate to check against (descent), if known.
        seed: seed for every random choice an analyzer makes.
        track: progress wrapper, ``track(iterable, description, total)``; a no-op by default.
        quick: ask analyzers for their small default sweep (CLI default run); False is ``--full``.
        budget: the time this analyzer may spend (:class:`normscope.budget.Budget`, unlimited by
            default); analyzers plan from its unit costs and record what they cut.
        sites: fnmatch pattern(s) on site and module names restricting the work; None is all.
        driver: the :class:`normscope.plan.Driver` that runs each captured pass once and serves
            its records (:meth:`records`); made on first use when not given.
    """

    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    dataset: tuple[torch.Tensor, torch.Tensor] | None = None
    loader: torch.utils.data.DataLoader | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    lr: float | None = None
    seed: int = 0
    track: Callable[..., Iterator] = no_progress
    quick: bool = True
    options: dict = field(default_factory=dict)
    budget: Budget = field(default_factory=lambda: Budget(None))
    sites: str | list[str] | None = None
    driver: Any = None

    def passes(self) -> "Driver":
        """The driver of this context's captured passes (:mod:`normscope.plan`)."""
        if self.driver is None:
            from normscope.plan import Driver

            self.driver = Driver(self.model, self.batches, self.loss_fn, self.sites, self.budget.measure_clock)
        return self.driver

    def records(self, mode: str, batches: Sequence[int], backward: bool = False) -> "list[SiteRecord]":
        """The records of the captured passes in ``mode`` over ``batches`` (run once, shared by
        every analyzer: :meth:`normscope.plan.Driver.records`; passes beyond batch 0 only as this
        context's budget allows)."""
        return self.passes().records(mode, batches, backward, self.budget)

    @property
    def device(self) -> torch.device:
        return batch_device(self.batches[0][0])


@dataclass
class AnalyzerOutput:
    """What one analyzer returns.

    Attributes:
        tables: long-format DataFrames by table name (snake_case, prefixed with the analyzer
            name, e.g. ``gls_sites``); key columns ``site``, ``kind``, ``partition``/``channel``.
        findings: plain-language sentences for the report and terminal, most important first.
        headline: a few scalar figures for ``summary.json``.
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    headline: dict[str, float | int | str] = field(default_factory=dict)


def get_analyzer(name: str) -> Callable[[AnalysisContext], AnalyzerOutput]:
    """Import and return the analyzer registered as ``name``."""
    if name not in ANALYZERS:
        raise UnknownNameError("analyzer", name, list(ANALYZERS))
    module_name, function_name = ANALYZERS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)
