"""The plan of an analysis: the passes each analyzer needs, each distinct pass run once.

An analyzer declares the captured passes it reads (``passes(ctx) -> list[Pass]`` beside its
``analyze``; :func:`needs`): the mode (``train``: batch statistics, ``eval``: running statistics),
the batch (an index into ``ctx.batches``) and whether it needs the backward (gradients). The
:class:`Driver` merges the needs (a forward-and-backward pass also serves a forward-only need of
the same mode and batch), runs the passes of one mode in batch order inside one
:func:`normscope.guard.preserved` block (so a layer whose training-mode forward reads its own
running statistics sees them as a run over the batches would), and hands each analyzer the
records of its passes. The first pass (batch 0) also checks that the data fits the model and
gives the site graph (:mod:`normscope.capture.graph`). Every pass re-enters one
:class:`~normscope.capture.Capture`, so a site's reading is verified once per reading and input
shape, on its first pass, not on every batch (on a tiny MobileViT at batch 128 the verifications
were 57 of the 69 s of stats' four passes).

Before this module, a default ``analyze`` captured batch 0 three times (the fit check, stats'
forward, gls's step); now once (``tests/test_plan.py`` counts the model's forwards).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from normscope.batch import Batch, forward
from normscope.capture.graph import SiteGraph, from_records
from normscope.capture.record import SiteRecord
from normscope.capture.session import Capture
from normscope.guard import preserved

if TYPE_CHECKING:
    from normscope.analyzers import AnalysisContext
    from normscope.budget import Budget

MODES = ("train", "eval")


@dataclass(frozen=True)
class Pass:
    """One captured pass over one batch: ``mode`` (``train`` or ``eval``), ``batch`` (index into
    the analysis's batches), ``backward`` (forward and backward, else forward only)."""

    mode: str
    batch: int
    backward: bool = False


@dataclass
class PassResult:
    """What one pass left: the capture's records, its seconds, the error of its loss or backward
    (the forward's records stay usable), the capture's unverified sites and whether the loss was
    a scalar (the first pass computes it even without a backward), and the norm-like modules it
    did not record (:attr:`normscope.capture.Capture.unrecognized`)."""

    records: list[SiteRecord]
    seconds: float
    error: BaseException | None = None
    unverified: list = field(default_factory=list)
    scalar_loss: bool = True
    unrecognized: list = field(default_factory=list)


def merge(passes: Sequence[Pass]) -> list[Pass]:
    """The distinct passes of ``passes``: one per (mode, batch), with a backward when any asked
    for it; in mode order, then batch order."""
    wanted: dict[tuple[str, int], bool] = {}
    for p in passes:
        wanted[(p.mode, p.batch)] = wanted.get((p.mode, p.batch), False) or p.backward
    return [Pass(mode, batch, backward) for (mode, batch), backward in
            sorted(wanted.items(), key=lambda item: (MODES.index(item[0][0]), item[0][1]))]


def needs(names: Sequence[str], ctx: "AnalysisContext") -> dict[str, list[Pass]]:
    """The passes each analyzer of ``names`` declares (its module's ``passes(ctx)``; none when it
    declares none)."""
    from normscope.analyzers import ANALYZERS

    out: dict[str, list[Pass]] = {}
    for name in names:
        module_name = ANALYZERS[name].split(":")[0]
        try:
            declared = getattr(importlib.import_module(module_name), "passes", None)
        except ImportError:
            declared = None
        out[name] = list(declared(ctx)) if declared is not None else []
    return out


class Driver:
    """Runs each distinct pass once and serves its records.

    Args:
        model: the model (left bit-identical: every mode's passes run inside ``preserved``).
        batches: the analysis's ``(inputs, targets)`` batches.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for the backward passes.
        sites: fnmatch pattern(s) restricting the capture (``None``: all).
        clock: the seconds clock the passes are timed with (the budget's).

    Attributes:
        plan: the merged passes still to run or run (:func:`merge`).
        results: the :class:`PassResult` of every pass that ran.
        forwards, backwards: how many forward and backward passes of the model the driver ran.
        graph: the site graph of the first pass (:mod:`normscope.capture.graph`).
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], loss_fn: Callable, sites=None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.model, self.batches, self.loss_fn, self.sites = model, list(batches), loss_fn, sites
        self.clock = clock or time.perf_counter
        self.plan: list[Pass] = []
        self.results: dict[Pass, PassResult] = {}
        self.forwards = self.backwards = 0
        self.graph: SiteGraph | None = None
        self._capture: Capture | None = None

    def need(self, passes: Sequence[Pass]) -> None:
        """Add ``passes`` to the plan (merged with what is there; a pass that ran is not run again
        unless it now needs a backward it did not have)."""
        self.plan = merge([*self.plan, *passes])

    def first(self, mode: str, backward: bool) -> PassResult:
        """Run the pass on batch 0 in ``mode`` now (the fit check: errors of the forward propagate)."""
        self.need([Pass(mode, 0, backward)])
        return self._run(mode, upto=0, check=True)[Pass(mode, 0, backward)]

    def records(self, mode: str, batches: Sequence[int], backward: bool = False, budget: "Budget | None" = None) -> list[SiteRecord]:
        """The records of the passes in ``mode`` over ``batches`` (in batch order), running those
        not run yet; raises the error of a needed backward that failed. With a limited ``budget``
        the passes not run yet beyond batch 0 are refinements: as many as fit at the measured
        ``forward`` (``gradient`` with a backward) cost run, the rest are cut (recorded in the
        budget's cuts) and their batches left out of the records."""
        batches = list(batches)
        if budget is not None and budget.limited:
            extra = [b for b in batches if b > 0 and not any(p.mode == mode and p.batch == b for p in self.results)]
            fit = budget.affordable("gradient" if backward else "forward", len(extra))
            if fit < len(extra):
                budget.cut(f"the {mode}-mode passes over {len(extra) - fit} of the {len(batches)} batches",
                           "no time left; the tables hold the batches that ran")
                batches = [b for b in batches if b not in extra[fit:]]
        self.need([Pass(mode, b, backward) for b in batches])
        self._run(mode, upto=max(batches))
        out: list[SiteRecord] = []
        for b in batches:
            result = self._result(mode, b)
            if backward and result.error is not None:
                raise result.error
            out += result.records
        return out

    def seconds(self, mode: str, batch: int) -> float:
        """Seconds the pass over ``batch`` in ``mode`` took."""
        return self._result(mode, batch).seconds

    def release(self) -> None:
        """Drop every record (the analyzers that read them are done)."""
        for result in self.results.values():
            result.records = []

    def _result(self, mode: str, batch: int) -> PassResult:
        return next(r for p, r in self.results.items() if p.mode == mode and p.batch == batch)

    def _run(self, mode: str, upto: int, check: bool = False) -> dict[Pass, PassResult]:
        """Run the planned passes of ``mode`` up to batch ``upto`` that have not run, in batch
        order, in one preserved block (earlier passes of the mode rerun only when a later one
        must follow them and they now need a backward)."""
        todo = [p for p in self.plan if p.mode == mode and p.batch <= upto and p not in self.results]
        if not todo:
            return self.results
        for stale in [p for p in self.results if p.mode == mode and any(t.batch == p.batch for t in todo)]:
            del self.results[stale]
        with preserved(self.model):
            self.model.train(mode == "train")
            for p in todo:
                self.results[p] = self._one(p, check)
        return self.results

    def _one(self, p: Pass, check: bool) -> PassResult:
        inputs, targets = self.batches[p.batch]
        graph = self.graph is None
        started = self.clock()
        error = None
        loss = None
        if self._capture is None:
            self._capture = Capture(self.model, sites=self.sites, storage="device", preserve=False)
        cap = self._capture
        cap.graph = graph
        with torch.set_grad_enabled(p.backward or graph), cap:
            self.forwards += 1
            try:
                outputs = forward(self.model, inputs)
            except Exception as failure:
                raise PassFailure("forward", failure) if check else failure
            if p.backward or check:
                try:
                    loss = self.loss_fn(outputs, targets)
                except Exception as failure:  # noqa: BLE001 - served to the analyzers that need the loss
                    if check:
                        raise PassFailure("loss", failure, outputs) from failure
                    error = failure
            if p.backward and error is None:
                try:
                    loss.backward()
                    self.backwards += 1
                except Exception as failure:  # noqa: BLE001 - served to the analyzers that need the backward
                    error = failure
            del outputs
        if graph:
            self.graph = from_records(cap.records)
        scalar = isinstance(loss, torch.Tensor) and loss.numel() == 1
        return PassResult(list(cap.records), self.clock() - started, error, list(cap.unverified), scalar, list(cap.unrecognized))


class PassFailure(Exception):
    """The first pass failed in its ``stage`` (``forward`` or ``loss``) with ``error``; ``outputs``
    are the model's outputs when the loss failed (for the message that names what fits)."""

    def __init__(self, stage: str, error: BaseException, outputs=None) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage, self.error, self.outputs = stage, error, outputs
