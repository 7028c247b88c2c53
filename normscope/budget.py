"""A time budget for an analysis: a plan priced from unit costs, headlines first, re-measured as work proceeds.

The analysis gets ``seconds`` in all (:data:`DEFAULT_BUDGET`, about two minutes; ``None`` is no
limit). Before any analyzer runs, :func:`normscope.api.analyze` measures the unit costs on the
first batch (the driver's first pass, :mod:`normscope.plan`) and reserves every analyzer's
headline (:data:`HEADLINES`: stats per site, gls R² per site, bias at one batch size, descent's
λ_max and total critical step in both modes) at those costs (:meth:`Budget.reserve`). Each
analyzer then receives its reserved headline plus a weighted share (:data:`WEIGHTS`) of what is
left after the headlines still to come (:meth:`Budget.share`), so refinements (sweeps, traces,
per-layer spectra, more batch sizes and draws) never take the time of a later headline; time an
analyzer does not use passes to the next. Reservations are kept as units, so they are re-priced
whenever a unit cost changes. Unit costs are re-measured as work proceeds: every
:meth:`Budget.spend` compares the time the stage took on the budget's clock with its price and
rescales every unit cost by the square root of the ratio (:meth:`Budget.observe`), so a machine that slows down
mid-run makes the later refinements cost more and cuts them, not the headlines. Inside a stage,
every loop of steps (Lanczos products, the trace's basis and samples, the layers' spectra, bias's
draws, the gls sweep's steps) checks a :class:`Deadline` after each step and stops cleanly once the
time left is less than the step just taken, returning what it has with its accuracy; the steps'
own times re-measure their unit (:meth:`Budget.remeasure`: directly, the other units following by
the same factor), so a stage that is running when the machine slows down overruns by less than
one step. λ_max's Lanczos gets a floor of products (``descent.HEADLINE_PRODUCTS``) while the whole
analysis has time for it and the later modes' floors. On a virtual clock that makes the machine 4x
slower mid-run (``tests/test_budget_load_slowdown.py``) the runs stay within 0.90-1.00x the budget
with every headline. Before a stage, an
analyzer asks :meth:`Budget.allows` whether the stage's units (``forward``, ``gradient``,
``hvp``, ``example_chunk``: one chunk of per-example gradients) fit in what is left at their
measured cost; a stage that does not fit is recorded in :attr:`Budget.cuts` with the reason, and
the analyzer returns the tables it finished. Unit costs are measured on the first use
(:meth:`Budget.cost` with a ``measure`` function) or injected (``costs=``, for tests); a unit
not measured yet is priced at 0 (the first use measures it).

``clock="planned"`` makes the elapsed time the sum of the costs charged with :meth:`spend`
instead of wall time, so that plans and cuts are reproducible (tests).

Under :func:`normscope.distributed.session` every decision is the same on every rank: the time
left (:meth:`Budget.remaining`), measured unit costs and the timings an analyzer compares with the
time left (:func:`agreed`) are the largest over the ranks, so the ranks plan, cut and run the same
collectives. Those calls are collectives themselves: every rank makes them in the same order.

Memory: an analyzer's working memory follows the model's training step (:func:`step_memory`:
parameters, gradients and the bytes a forward saves for backward), :func:`memory_budget` is a
small multiple of it with a floor, and :func:`chunk_for_memory` sizes per-example chunks from it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from normscope.distributed import all_reduce_float, current
from normscope.errors import InvalidArgumentError
from normscope.findings import seconds as seconds_text

if TYPE_CHECKING:
    import torch

DEFAULT_BUDGET = 120.0
UNITS = ("forward", "gradient", "hvp", "example_chunk")
WEIGHTS = {"stats": 1.0, "gls": 2.0, "bias": 3.0, "descent": 4.0}
HEADLINES = {"stats": {"forward": 1.0}, "gls": {"forward": 1.0}, "bias": {"gradient": 16.0},
             "descent (train mode)": {"gradient": 2.0, "hvp": 20.0}, "descent (eval mode)": {"gradient": 2.0, "hvp": 20.0}}
"""Each headline's price in units (:meth:`Budget.seed` prices them from the first pass): stats'
tables (plus a forward per further batch) and gls's tables; bias's g* and per-example gradients
at its smallest batch size; per descent mode the gradient, the first products and Lanczos for
λ_max (about 20 products at the quick tolerance)."""
HOLD_SHARE = 0.5
"""The most of the budget the headline holds take together (:func:`normscope.api.hold_headlines`)."""
FIRST_PRODUCT = 4.0
"""A Hessian-vector product in gradients until one is measured (float64: 2-14, float32: 1.7-2.8)."""
RESCALE_BOUNDS = (0.5, 4.0)
"""The least and largest factor one re-measurement (:meth:`Budget.observe`) rescales the unit costs by."""
PACE_BOUNDS = (0.25, 20.0)
"""The least and largest pace (all re-measurements together) the unit costs may reach."""


@dataclass
class Cut:
    """One piece of planned work left out: by ``analyzer``, ``what`` and ``why``."""

    analyzer: str
    what: str
    why: str


class Budget:
    """``seconds`` of work (``None``: unlimited) with shared unit ``costs`` in seconds.

    Args:
        seconds: the time this budget may spend; ``None`` for no limit.
        costs: measured (or injected) seconds per unit, shared with every :meth:`share`.
        clock: ``time.monotonic`` (wall time) or ``"planned"`` (the sum of :meth:`spend` charges).
        name: the analyzer a share belongs to (``"analysis"`` for the whole run).

    Attributes:
        cuts: what was left out and why (:class:`Cut`), shared with the parent budget.
        charged: seconds charged with :meth:`spend` to this budget.
    """

    def __init__(
        self,
        seconds: float | None = DEFAULT_BUDGET,
        costs: dict[str, float] | None = None,
        clock: Callable[[], float] | str = time.monotonic,
        name: str = "analysis",
        _parent: "Budget | None" = None,
        _others: Iterable[str] = (),
    ) -> None:
        if seconds is not None and not (seconds > 0):
            raise InvalidArgumentError(f"budget must be a positive number of seconds or None (got {seconds})")
        self.costs = (costs if costs is not None else {}) if _parent is None else _parent.costs
        unknown = set(self.costs) - set(UNITS)
        if unknown:
            raise InvalidArgumentError(f"unknown unit cost {sorted(unknown)[0]!r}; units are {', '.join(UNITS)}")
        self.seconds, self.clock, self.name = seconds, clock, name
        self.injected = set(self.costs) if _parent is None else _parent.injected
        self.cuts: list[Cut] = [] if _parent is None else _parent.cuts
        self._ledger = [0.0] if _parent is None else _parent._ledger
        self.reserved: dict[str, float] = {} if _parent is None else _parent.reserved
        self._pace = [1.0] if _parent is None else _parent._pace
        self._timed: set[str] = set() if _parent is None else _parent._timed
        self._parent, self._others = _parent, list(_others)
        self.charged = 0.0
        self._start = self._now()
        self._mark, self._stage = self._start, 0.0

    def _now(self) -> float:
        return self._ledger[0] if self.clock == "planned" else self.clock()

    @property
    def measure_clock(self) -> Callable[[], float]:
        """The clock work is timed with: this budget's (wall ``time.perf_counter`` for a planned one)."""
        return time.perf_counter if self.clock == "planned" else self.clock

    @property
    def limited(self) -> bool:
        return self.seconds is not None and math.isfinite(self.seconds)

    def elapsed(self) -> float:
        """Seconds spent since this budget (or share) started, on this process's clock."""
        return self._now() - self._start

    def remaining(self) -> float:
        """Seconds left (``inf`` when unlimited, never below 0); under torch.distributed from the
        largest elapsed time over the ranks (a wall clock; a collective). A share's time left is
        also never more than its parent's left after the headlines held for the analyzers after it."""
        if not self.limited:
            return math.inf
        spent = self.elapsed() if self.clock == "planned" else agreed(self.elapsed())
        left = max(0.0, self.seconds - spent)
        if self._parent is not None:  # never past the parent's time, nor the time of a later headline, as re-priced now
            left = min(left, max(0.0, self._parent.remaining() - (self._parent.held(self._others) if self._others else 0.0)))
        return left

    def cost(self, unit: str, measure: Callable[[], float] | None = None) -> float:
        """The seconds one ``unit`` costs: injected, measured before, or measured now by ``measure``
        (and kept for every share); 0 when unknown and not measurable."""
        if unit not in UNITS:
            raise InvalidArgumentError(f"unknown unit {unit!r}; units are {', '.join(UNITS)}")
        if unit not in self.costs and measure is not None:
            self.costs[unit] = agreed(float(measure()))
        return self.costs.get(unit, 0.0)

    def price(self, units: dict[str, float]) -> float:
        """The seconds of ``{unit: count}`` at the known unit costs."""
        return sum(self.cost(unit) * count for unit, count in units.items())

    def spend(self, unit: str, count: float = 1) -> None:
        """Charge ``count`` units (advances a ``"planned"`` clock; recorded in ``charged``); on a
        timed clock the stage's charges re-measure the unit costs when the next stage begins."""
        seconds = self.cost(unit) * count
        self.charged += seconds
        self._ledger[0] += seconds
        self._stage += seconds

    def _next_stage(self) -> None:
        """A stage begins (:meth:`allows`, :meth:`affordable`): the one before it, charged since the
        last mark, re-measures the unit costs (:meth:`observe`) on a timed clock."""
        if self.clock != "planned" and self._stage > 0:
            self.observe(self._stage, self._now() - self._mark)
        self._stage, self._mark = 0.0, self._now()

    def observe(self, priced: float, took: float) -> None:
        """Re-measure: a stage priced ``priced`` seconds took ``took`` (the largest over the ranks);
        every unit cost is rescaled by ``sqrt(took / priced)`` within :data:`RESCALE_BOUNDS` (damped:
        a stage also holds work no unit prices, which must not compound into the plan), so the plan
        follows a machine that slows down or speeds up; the pace (the product of the factors) stays
        within :data:`PACE_BOUNDS`. Stages priced under a millisecond are too short to tell."""
        took = agreed(took)
        if priced < 1e-3 or took <= 0:
            return
        factor = min(max(math.sqrt(took / priced), RESCALE_BOUNDS[0]), RESCALE_BOUNDS[1])
        factor = min(max(self._pace[0] * factor, PACE_BOUNDS[0]), PACE_BOUNDS[1]) / self._pace[0]
        for unit in self.costs:
            self.costs[unit] *= factor
        self._pace[0] *= factor

    def measure(self, unit: str, count: float, fn: Callable[[], object]) -> object:
        """Run ``fn`` (``count`` units of ``unit``) timed on this budget's clock, and make the unit's
        cost what it took per unit (the largest over the ranks); returns ``fn()``."""
        started = self.measure_clock()
        out = fn()
        self.costs[unit] = agreed((self.measure_clock() - started) / max(count, 1e-12))
        self._stage, self._mark = 0.0, self._now()
        return out

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn()`` takes on this budget's clock (wall: :func:`seconds_of`, CUDA synchronized)."""
        if self.measure_clock in (time.perf_counter, time.monotonic):
            return seconds_of(fn)
        started = self.measure_clock()
        fn()
        return self.measure_clock() - started

    def affordable(self, unit: str, wanted: int, reserve: float = 0.0) -> int:
        """How many of ``wanted`` units fit in what is left after ``reserve`` seconds."""
        if not self.limited:
            return wanted
        self._next_stage()
        each = self.cost(unit)
        if each <= 0:
            return wanted
        return max(0, min(wanted, int((self.remaining() - reserve) // each)))

    def allows(self, what: str, units: dict[str, float]) -> bool:
        """Whether a stage of ``units`` fits in what is left; if not, record the cut and say no."""
        if self.limited:
            self._next_stage()
        needed = self.price(units)
        if needed <= self.remaining():
            return True
        self.cut(what, f"needs about {seconds_text(needed)}, {seconds_text(self.remaining())} left")
        return False

    def allows_headline(self, what: str, units: dict[str, float], after: dict[str, float] | None = None) -> bool:
        """:meth:`allows` for a headline: it also fits past this share while the whole analysis
        (:meth:`left_in_all`) has time for ``units`` and for ``after`` (the later headlines' floors)."""
        if self.limited:
            self._next_stage()
        needed = self.price(units)
        if needed <= self.remaining() or needed + self.price(after or {}) <= self.left_in_all():
            return True
        self.cut(what, f"needs about {seconds_text(needed)}, {seconds_text(self.remaining())} left")
        return False

    def seed(self, seconds: float, backward: bool) -> None:
        """Price the units from the first pass (``seconds``; a forward and ``backward`` of the first
        batch under capture, or a forward): ``gradient`` = the pass with a backward (3 forwards
        without), ``forward`` = a third of it, ``hvp`` = :data:`FIRST_PRODUCT` gradients; units
        injected or measured before keep their cost. The pace (:meth:`observe`) starts here."""
        gradient = agreed(seconds if backward else 3 * seconds)  # the largest over the ranks: every rank plans alike
        for unit, cost in (("gradient", gradient), ("forward", gradient / 3), ("hvp", FIRST_PRODUCT * gradient)):
            self.costs.setdefault(unit, cost)
        self._pace[0] = 1.0

    def reserve(self, key: str, units: dict[str, float]) -> None:
        """Hold the time of ``units`` for the headline ``key`` until :meth:`release`; :meth:`share`
        keeps it from the refinements of earlier analyzers. The hold is priced at the current unit
        costs, so it follows the machine (:meth:`observe`)."""
        self.reserved[key] = dict(units)

    def release(self, key: str) -> None:
        """The headline ``key`` (and ``key (...)``, its parts) ran or will not: the hold ends."""
        for held in [k for k in self.reserved if k == key or k.startswith(key + " (")]:
            del self.reserved[held]

    def held(self, keys: Iterable[str] | None = None) -> float:
        """Seconds held for the headlines ``keys`` (default all; a key also holds its parts
        ``key (...)``) at the current unit costs."""
        chosen = [k for k in self.reserved if keys is None or any(k == key or k.startswith(key + " (") for key in keys)]
        return sum(self.price(self.reserved[k]) for k in chosen)

    def fits(self, what: str, seconds: float) -> bool:
        """Whether work estimated at ``seconds`` (at the first batch's pace, :meth:`seed`; scaled by
        the pace since) fits in what is left (:meth:`remaining`); if not, record the cut."""
        if not self.limited:
            return True
        self._next_stage()
        needed = seconds * self._pace[0]
        if needed <= self.remaining():
            return True
        self.cut(what, f"needs about {needed:.3g} s, {self.remaining():.3g} s of the {self.seconds:.3g} s left")
        return False

    def deadline(self, unit: str | None = None, floor: int = 0, reserve: float = 0.0) -> "Deadline | None":
        """A deadline check for a loop of steps (Lanczos products, trace samples, sweep steps,
        draws), leaving ``reserve`` seconds: :class:`Deadline`; ``None`` when this budget is
        unlimited or under torch.distributed (the ranks would have to agree on every step; there
        the stages are planned only)."""
        if not self.limited or current().active:
            return None
        return Deadline(self, unit, floor, reserve)

    def remeasure(self, unit: str, seconds: float) -> None:
        """``unit`` measured again at ``seconds`` each (its steps just ran, e.g. :class:`Deadline`):
        the unit takes that cost; when it was timed so before, every other unit follows by the same
        factor (within :data:`RESCALE_BOUNDS`; the pace, :data:`PACE_BOUNDS`), so a slowdown seen on
        the products also re-prices the forwards and gradients still to come (a first timing
        corrects only its own unit: it measures the unit, not the machine). Injected costs stay, and
        a ``"planned"`` budget keeps its costs (its plan must not depend on timing)."""
        old = self.costs.get(unit, 0.0)
        if unit in self.injected or seconds <= 0 or self.clock == "planned":
            return
        self.costs[unit] = seconds
        self._stage, self._mark = 0.0, self._now()  # this stage is measured: no second re-measurement of it
        first = unit not in self._timed
        self._timed.add(unit)
        if old <= 0 or first:
            return
        factor = min(max(seconds / old, RESCALE_BOUNDS[0]), RESCALE_BOUNDS[1])
        factor = min(max(self._pace[0] * factor, PACE_BOUNDS[0]), PACE_BOUNDS[1]) / self._pace[0]
        for other in self.costs:
            if other != unit and other not in self.injected:
                self.costs[other] *= factor
        self._pace[0] *= factor

    @property
    def timed(self) -> set[str]:
        """The units whose cost was timed on their own steps (:meth:`remeasure`)."""
        return self._timed

    def left_in_all(self) -> float:
        """Seconds left of the whole analysis (the root budget), holds of later headlines included."""
        return self.remaining() if self._parent is None else self._parent.left_in_all()

    def cut(self, what: str, why: str) -> None:
        """Record that ``what`` was left out because of ``why``."""
        self.cuts.append(Cut(self.name, what, why))

    def share(self, name: str, pending: list[str]) -> "Budget":
        """The budget of analyzer ``name`` when ``pending`` (``name`` first) are still to run: its
        reserved headline (:meth:`reserve`) plus its :data:`WEIGHTS` share of the time left after
        the headlines of ``pending``. Costs, clock, cuts and reservations are shared with this budget."""
        seconds = None
        if self.limited:
            weights = [WEIGHTS.get(n, 1.0) for n in pending]
            free = max(0.0, self.remaining() - self.held(pending))
            seconds = max(self.held([name]) + free * WEIGHTS.get(name, 1.0) / sum(weights), 1e-9)
        return Budget(seconds, clock=self.clock, name=name, _parent=self, _others=[n for n in pending if n != name])

    def report(self) -> dict:
        """JSON-safe account: budget, elapsed, unit costs and every cut."""
        return {
            "seconds": self.seconds,
            "elapsed": self.elapsed(),
            "clock": "planned" if self.clock == "planned" else "wall",
            "unit_costs": dict(self.costs),
            "reserved": {key: self.price(units) for key, units in self.reserved.items()},
            "pace": self._pace[0],
            "cuts": [{"analyzer": c.analyzer, "what": c.what, "why": c.why} for c in self.cuts],
        }


class Deadline:
    """Called after each step of a loop: True (stop now) once at least ``floor`` steps ran and the
    time left (:meth:`Budget.remaining`, which keeps the holds of later headlines, less ``reserve``
    seconds) is less than the step just taken, timed on the budget's clock; so a loop overruns its
    share by less than one step however the machine slows down, and the loop returns what it has with its accuracy. The
    steps' times re-measure ``unit`` (:meth:`finish`, :meth:`Budget.remeasure`). On a ``"planned"``
    clock steps take no time and it never stops (the plan alone decides)."""

    def __init__(self, budget: Budget, unit: str | None = None, floor: int = 0, reserve: float = 0.0) -> None:
        self.budget, self.unit, self.floor, self.reserve = budget, unit, floor, reserve
        self.times: list[float] = []
        self.stopped = False
        self._mark = budget._now()

    def __call__(self) -> bool:
        now = self.budget._now()
        self.times.append(now - self._mark)
        self._mark = now
        self.stopped = len(self.times) >= self.floor and self.budget.remaining() - self.reserve < self.times[-1]
        return self.stopped

    def finish(self) -> None:
        """Re-measure ``unit`` from the steps (the mean of all but the first, which may hold a
        one-off set-up, when there are more than two)."""
        steps = self.times[1:] if len(self.times) > 2 else self.times
        if self.unit is not None and steps and self.budget.clock != "planned":
            self.budget.remeasure(self.unit, sum(steps) / len(steps))


HVP_MEMORY = 512 * 2**20
"""Bytes one example chunk's double-backward graph may take (``normscope.analyzers.hvp.graph_chunk``):
on the 3.5M-parameter BERT of ``benchmarks/scale.py`` (float64, batch 128) 512 MiB gives 16-example
chunks and a descent peak of 1.34 GB (2.1x a training step) at 18 s a product, 1 GiB 32-example
chunks, 1.94 GB and 12 s (load 2.2 on 2 cores)."""

MEMORY_FACTOR = 2.0
"""Working memory an analyzer may hold, in training steps (:func:`memory_budget`)."""
MEMORY_FLOOR = 16 * 2**20
"""The least working memory (bytes) of :func:`memory_budget`, for models whose step is tiny."""


def saved_bytes(run: Callable[[], object], unique: bool = True, skip: "Iterable[torch.Tensor]" = ()) -> int:
    """Bytes that ``run()`` saves for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``:
    each storage once (``unique``; the storages of ``skip``, e.g. the parameters, not at all), or
    each saved tensor's own bytes (``unique=False``)."""
    import torch

    seen = {t.untyped_storage().data_ptr() for t in skip}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not unique:
            total[0] += t.numel() * t.element_size()
        elif t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total[0]


def step_memory(model: torch.nn.Module, batch: tuple, loss_fn: Callable) -> int:
    """Bytes of one training step of ``model`` on ``batch`` (``(inputs, targets)`` in any form of
    :mod:`normscope.batch`), optimizer state left out:

    ``step = 2 * parameter bytes (weights and their gradients) + bytes saved for backward``

    by a forward and loss (:func:`saved_bytes`, each storage once, parameters not again). The
    forward runs in eval mode, so that it works on any batch (BatchNorm refuses one example in
    training mode) and draws no dropout masks (not counted); the activations saved are those of the
    training step. Runs on a deep copy inside :func:`normscope.guard.preserved`: ``model`` and the
    RNG are untouched."""
    import copy

    import torch

    from normscope import batch as batches
    from normscope.guard import preserved

    with preserved(model):
        work = copy.deepcopy(model).eval()
        params = list(work.parameters())
        inputs, targets = batch
        with torch.enable_grad():
            saved = saved_bytes(lambda: loss_fn(batches.forward(work, inputs), targets), skip=params)
    return 2 * sum(p.numel() * p.element_size() for p in params) + saved


def memory_budget(step: int, factor: float = MEMORY_FACTOR, floor: int = MEMORY_FLOOR) -> int:
    """Bytes of working memory an analyzer may hold beyond its inputs: ``max(floor, factor * step)``
    with ``step`` from :func:`step_memory`."""
    return max(int(floor), int(factor * step))


def chunk_for_memory(parameters: int, itemsize: int, memory: int, largest: int = 64) -> int:
    """Examples per chunk of per-example gradients so that one chunk's gradients and their work
    (about 3 parameter-sized copies per example) stay within ``memory`` bytes; 1 to ``largest``."""
    return max(1, min(largest, memory // max(1, 3 * parameters * itemsize)))


def agreed(seconds: float) -> float:
    """``seconds`` measured on this rank as every rank sees it: the largest over the ranks under
    :func:`normscope.distributed.session` (a collective), ``seconds`` itself in one process."""
    return all_reduce_float(seconds, op="max")


def as_budget(budget: "Budget | float | None") -> Budget:
    """A :class:`Budget` from seconds (``None`` or ``0``: unlimited) or a given budget."""
    if isinstance(budget, Budget):
        return budget
    if budget is None or budget == 0 or budget == math.inf:
        return Budget(None)
    return Budget(float(budget))


def seconds_of(fn: Callable[[], object], repeats: int = 1) -> float:
    """Wall seconds of ``fn()`` (the fastest of ``repeats`` calls, CUDA synchronized)."""
    import torch

    best = math.inf
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best
