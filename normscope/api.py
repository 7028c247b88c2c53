"""The notebook API: ``normscope.analyze(model)`` runs the analyzers and returns the result.

The CLI's ``normscope analyze`` calls the same function, so both give the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import numbers
import platform
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, TensorDataset

import normscope
from normscope import distributed
from normscope.batch import Batch, check_keys, describe, first_argument, split, to_device
from normscope.batch import size as batch_size_of
from normscope.losses import Loss, default_for, describe_outputs, fitting_presets
from normscope.losses import resolve as resolve_loss
from normscope.analyzers import ANALYZERS, AnalysisContext, AnalyzerOutput, get_analyzer, no_progress
from normscope.analyzers.hvp import PRECISIONS
from normscope.budget import DEFAULT_BUDGET, HEADLINES, HOLD_SHARE, Budget, as_budget
from normscope.capture.verify import Verification
from normscope.checkpoint import first_line, nonfinite_weights
from normscope.data import DIGITS, digits_form, digits_loader, load_digits
from normscope.determinism import random_layers as deterministic
from normscope.capture.sites import matches
from normscope.errors import AnalyzerError, DataShapeError, InvalidArgumentError, NoNormSitesError, NormscopeError, UnknownNameError
from normscope.guard import grad_enabled, preserved
from normscope.threads import fitting_threads
from normscope.overview import attach as attach_overview
from normscope.plan import Driver, PassFailure, needs
from normscope.result import AnalysisResult

T = TypeVar("T")
Data = DataLoader | tuple | dict | torch.Tensor | None
SEED_RANGE = (0, 2**63 - 1)
DEVICE_TYPES = ("cpu", "cuda")
MAX_NAMED_SITES = 12


def analyze(
    model: nn.Module,
    data: Data = None,
    analyzers: str | Sequence[str] | None = None,
    batch_size: int = 128,
    batches: int = 4,
    device: str | torch.device | None = None,
    seed: int = 0,
    loss_fn: str | Callable | Loss | None = None,
    lr: float | None = None,
    progress: bool = False,
    budget: float | Budget | None = DEFAULT_BUDGET,
    quick: bool = True,
    sites: str | Sequence[str] | None = None,
    random_layers: str = "off",
    precision: str = "model",
) -> AnalysisResult:
    """Analyze the normalization sites of ``model`` on ``data`` and return tables and findings.

    The model is never changed: every analyzer runs inside :func:`normscope.guard.preserved`
    (and on a copy when ``device`` differs from the model's). One forward pass on the first
    batch checks that the data fits the model and lists the sites that ran. On CPU, torch's
    threads are lowered to the cores other work leaves free while the analysis runs and restored
    after (:func:`normscope.threads.fitting_threads`; ``meta["threads"]``).

    Args:
        model: any ``nn.Module`` with normalization layers (modules or functional calls).
        data: a DataLoader, or the whole data as one batch, in any form of
            :mod:`normscope.batch` (``(inputs, targets)``, a dict of tensors passed to ``forward``
            as keyword arguments, ``(dict, targets)``, ``(x1, ..., xk, targets)``), or ``None``
            for the digits' training split. Default: None.
        analyzers: names (list or comma-separated) among ``stats, gls, bias, descent``;
            ``None`` runs all, skipping those that do not apply. Default: None.
        batch_size: minibatch size for ``None`` or tuple data. Default: 128.
        batches: how many minibatches the per-step analyses use. Default: 4.
        device: where to run; ``None`` keeps the model's device. Default: None.
        seed: seed of the batch order and of every random choice. Default: 0.
        loss_fn: a preset (``cross_entropy``, ``mse``, ``lm``, ``model``; :mod:`normscope.losses`),
            ``"package.module:function"`` or a callable ``fn(outputs, targets) -> scalar``.
            Default: ``cross_entropy`` for batches with targets, ``lm`` for token ids without.
        lr: the learning rate to check step sizes against (descent analyzer). Default: None.
        progress: show Rich progress bars on a terminal, one log line per stage elsewhere
            (both on stderr). Default: False.
        budget: seconds the analyzers may spend in all (shared out by :mod:`normscope.budget`,
            work planned from unit costs measured on the first batch), or a ``Budget``; ``None``
            is no limit. What was cut and why is in ``meta["budget"]`` and the findings.
            Default: 120.
        quick: the analyzers' small default settings; ``False`` is their full settings (still
            within ``budget``). Default: True.
        sites: fnmatch pattern(s) on site and module names restricting the work. Default: all.
        random_layers: dropout during the analyses: ``off``, ``fixed`` (on, with fixed masks) or
            ``on`` (:mod:`normscope.determinism`); normalization layers keep each analysis's
            mode. Said in ``meta["random_layers"]``. Default: ``off``.
        precision: descent's Hessian-vector products in the model's dtype (``model``, checked
            against float64 on the first batch) or in ``float64``. Default: ``model``.

    Under ``torchrun`` (or any initialized process group of several ranks) every rank runs this
    call: the full-data passes shard the examples and all-reduce their sums, descent's
    Hessian-vector products are split over the ranks where the loss decomposes over examples, the
    rest is replicated or shared out by work item (:mod:`normscope.distributed`, README "Data beyond one
    process"); every rank returns the same result. A CUDA ``device`` without an index is
    ``cuda:LOCAL_RANK``. The budget holds there too: every rank plans and cuts from the largest
    elapsed time and unit costs over the ranks (:mod:`normscope.budget`), so all make the same cuts.
    ``meta["distributed"]`` holds the world size and backend.

    Raises:
        DataShapeError: the data is in no accepted form or does not fit the model or loss.
        NoNormSitesError: no normalization site ran in the forward pass.
        UnknownNameError: an analyzer name is not registered.
        AnalyzerError: none of the requested analyzers could run.
        InvalidArgumentError: ``seed`` is outside [0, 2**63 - 1], ``device`` is not a CPU or CUDA
            device, or the model's tensors are on the meta device (they hold no values).
    """
    names = analyzer_names(analyzers)
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)
    loss = resolve_loss(loss_fn)
    check_seed(seed)
    home = model_device(model)
    target = distributed.rank_device(home if device is None else checked_device(device))
    compiled = type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)
    model = model._orig_mod if compiled else model  # capture's hooks and torch.func need the eager module
    inner = model.module if isinstance(model, nn.DataParallel) else model  # torch.func refuses the wrapper
    work = inner if home == target else copy.deepcopy(inner).to(target)
    dtype = floating_dtype(work)
    started = time.perf_counter()
    with (distributed.session(target) as world, preserved(model), grad_enabled(),
          fitting_threads(target.type == "cpu" and not distributed.launched()) as threads,
          progress_bars(progress and world.rank == 0) as track):
        seed_generators(seed, target)
        data = usable_outside_inference(data)
        loader, dataset, data_source = make_loader(digits_form(work) if data is None else data, batch_size, seed)
        takes_labels = "labels" in _forward_arguments(work)
        chosen = take_batches(loader, batches, target, dtype, track, loss, takes_labels)
        loss = loss or default_for(_raw(chosen[0]), takes_labels)
        loaded = time.perf_counter()  # the data is loaded: the budget starts here
        plan_budget = as_budget(budget)
        with deterministic(random_layers, seed) as randomness:
            driver = Driver(work, chosen, loss, sites, plan_budget.measure_clock)
            ctx = AnalysisContext(
                model=work,
                batches=chosen,
                dataset=None if dataset is None else to_device(loss.batch(dataset), target, dtype),
                loader=loader,
                loss_fn=loss,
                lr=lr,
                seed=seed,
                track=track,
                quick=quick,
                budget=plan_budget,
                sites=sites,
                driver=driver,
                options={"descent_precision": precision},
            )
            declared = needs(names, ctx)
            driver.need([p for passes in declared.values() for p in passes])
            ran, unrecognized, unverified = check_fit(work, chosen[0], loss, driver)
            check_selection(ran, sites)
            hold_headlines(plan_budget, names, driver, len(chosen))
            outputs, errors, timings = run_analyzers(ctx, names, track, explicit=analyzers is not None, declared=declared)
    result = AnalysisResult()
    for name, output in outputs.items():
        result.tables.update(output.tables)
        result.findings[name] = list(output.findings)
        result.headline[name] = dict(output.headline)
    model_findings = nonfinite_weights(work) + [
        f"the torch.compile model was analyzed through its original module (_orig_mod, {type(model).__name__}), "
        "which shares its parameters; compiled kernels may round differently"
    ] * compiled + [
        f"{path} ({cls}) looks like a normalization layer but is not recognized; register it with normscope.register_norm"
        for path, cls in unrecognized
    ] + [
        f"{check.site} ({check.module_type}) is unverified and left out of every analysis: its reading does not "
        f"reproduce its output ({check.compared}); register it with normscope.register_norm"
        for check in unverified
    ]
    if model_findings:
        result.findings["model"] = model_findings
    if ctx.budget.cuts or "interrupted" in errors:
        result.findings["budget"] = budget_findings(ctx.budget, errors.get("interrupted"))
    result.meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"normscope": normscope.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "model": {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())},
        "sites": [site_row(site) for site in ran],
        "unrecognized": [{"name": path, "module_type": cls} for path, cls in unrecognized],
        "unverified": [check.as_dict() for check in unverified],
        "data": {
            "source": data_source,
            "batch_size": batch_size_of(chosen[0][0]),
            "batches": len(chosen),
            "input_shape": input_shape(chosen[0][0]),
            "examples": None if dataset is None else batch_size_of(split(dataset)[0]),
        },
        "device": str(target),
        "seed": seed,
        "lr": lr,
        "loss_fn": loss.name,
        "random_layers": randomness.describe(),
        "analyzers": list(outputs),
        "analyzer_errors": errors,
        "settings": "quick" if quick else "full",
        "sites_pattern": sites,
        "budget": ctx.budget.report(),
        "passes": {"forwards": driver.forwards, "backwards": driver.backwards},
        "distributed": world.describe(),
        "threads": threads,
        "seconds": {"loading": loaded - started, **timings, "total": time.perf_counter() - started},
    }
    attach_overview(result)
    return result


def check_seed(seed: int) -> None:
    """Raise :class:`InvalidArgumentError` unless ``seed`` is an integer (Python's or NumPy's) in :data:`SEED_RANGE`."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not low <= int(seed) <= high:
        raise InvalidArgumentError(f"seed {seed!r} is outside [{low}, 2**63 - 1]; pass a smaller non-negative integer")


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` parsed; only CPU and CUDA devices run analyses (a meta tensor holds no values,
    XLA and MPS are not supported)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidArgumentError(f"device {device!r} is not a device name; pass 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type not in DEVICE_TYPES:
        raise InvalidArgumentError(f"device {device!r} is not supported: normscope analyzes on 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def check_selection(ran: list, sites: str | Sequence[str] | None) -> None:
    """Raise :class:`NoNormSitesError` naming the sites that ran when the pattern(s) ``sites``
    match none of them (an analysis of nothing)."""
    if sites is None or any(matches(site.name, site.kind, sites, None) for site in ran):
        return
    names = [site.name for site in ran]
    shown = ", ".join(names[:MAX_NAMED_SITES]) + (f" and {len(names) - MAX_NAMED_SITES} more" if len(names) > MAX_NAMED_SITES else "")
    raise NoNormSitesError(f"the site pattern {sites!r} matches none of the {len(names)} normalization sites: {shown}")


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, for a CUDA ``device``, that device's generator only
    (``torch.manual_seed`` would also reseed every CUDA device, lazily, after restore)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()].manual_seed(seed)


def usable_outside_inference(data: Data) -> Data:
    """Whole-data batches (tuples, dicts) created under ``torch.inference_mode()`` cloned into normal tensors
    (autograd cannot save inference tensors); everything else unchanged."""
    if isinstance(data, (tuple, list, dict, torch.Tensor)):
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, data)
    return data


def analyzer_names(analyzers: str | Sequence[str] | None) -> list[str]:
    """The analyzer names to run, validated: ``None`` is all registered analyzers."""
    if analyzers is None:
        return list(ANALYZERS)
    names = [n.strip() for n in analyzers.split(",")] if isinstance(analyzers, str) else [str(n).strip() for n in analyzers]
    names = [n for n in names if n]
    if not names:
        raise UnknownNameError("analyzer", "", list(ANALYZERS))
    for name in names:
        if name not in ANALYZERS:
            raise UnknownNameError("analyzer", name, list(ANALYZERS))
    return list(dict.fromkeys(names))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any).

    Raises:
        InvalidArgumentError: a parameter or buffer is on the meta device (shapes, no values).
    """
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    meta = next((t for t in tensors if t.is_meta), None)
    if meta is not None:
        raise InvalidArgumentError(f"{type(model).__name__} has tensors on the meta device (shapes without values); "
                                   "load its weights first, e.g. model.to_empty(device='cpu') then load_state_dict")
    return torch.device("cpu") if not tensors else tensors[0].device


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def make_loader(data: Data, batch_size: int, seed: int) -> tuple[DataLoader, Any, str]:
    """``(loader, whole data set as one raw batch or None, description)`` for any accepted
    ``data``: a DataLoader, a whole data set as one batch (``(inputs, targets)`` tensors, a dict
    of tensors, or any form of :mod:`normscope.batch`), or ``None`` for the digits."""
    if data is None or data in DIGITS:
        flat = data == "digits-flat"
        loader = digits_loader(batch_size=batch_size, seed=seed, split="train", flat=flat)
        return loader, load_digits(split="train", flat=flat), data or "digits"
    if isinstance(data, DataLoader):
        tensors = getattr(data.dataset, "tensors", None)
        dataset = tuple(tensors) if isinstance(data.dataset, TensorDataset) and len(tensors) >= 2 else None
        return data, dataset, f"DataLoader({type(data.dataset).__name__})"
    if isinstance(data, (tuple, list, dict, torch.Tensor)):
        whole = split(data)
        counts = sorted({int(t.shape[0]) if t.dim() else 0 for t in tree_flatten(whole)[0] if isinstance(t, torch.Tensor)})
        if len(counts) > 1:
            raise DataShapeError(
                f"data {describe(data)} has tensors of {' and '.join(map(str, counts))} examples; "
                "pass inputs and targets of equal length"
            )
        n = counts[0] if counts else 0
        if n == 0:
            raise DataShapeError(f"data {describe(data)} holds no examples; pass inputs and targets with at least one row")
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(WholeBatch(data, n), batch_size=batch_size, shuffle=True, generator=generator,
                            collate_fn=WholeBatch.collate)
        return loader, data, f"tensors {describe(whole[0])}"
    raise DataShapeError(
        f"data must be a DataLoader, an (inputs, targets) tuple of tensors, a dict of tensors or None for the digits "
        f"(got {type(data).__name__})"
    )


class WholeBatch(torch.utils.data.Dataset):
    """The examples of one whole-data batch (any form of :mod:`normscope.batch`), served by index."""

    def __init__(self, data: Any, n: int) -> None:
        self.data, self.n = data, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> Any:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) else t, self.data)

    @staticmethod
    def collate(batch: Any) -> Any:
        return batch


def take_batches(
    loader: DataLoader, count: int, device: torch.device, dtype: torch.dtype, track: Callable, loss: Loss | None = None,
    takes_labels: bool = False,
) -> list[Batch]:
    """The first ``count`` batches of ``loader`` as ``(inputs, targets)`` for ``loss``
    (:meth:`normscope.losses.Loss.batch`; ``None``: :func:`normscope.losses.default_for` the
    first batch) on ``device``, floating inputs cast to ``dtype``."""
    if count < 1:
        raise DataShapeError(f"batches must be at least 1 (got {count})")
    chosen = []
    for raw in track(user_batches(loader), "loading batches", count):
        loss = loss or default_for(raw, takes_labels)
        chosen.append(to_device(loss.batch(raw), device, dtype))
        if len(chosen) == count:
            break
    if not chosen:
        raise DataShapeError("data is empty: the loader yielded no batch")
    return chosen


def user_batches(loader: Iterable[T]) -> Iterator[T]:
    """The batches of ``loader``; an exception while the user's loader produces one becomes
    :class:`DataShapeError` naming the loader and the batch (it is the data's error, not
    normscope's). Interrupts propagate."""
    batches = iter(loader)
    for index in itertools.count():
        try:
            raw = next(batches)
        except StopIteration:
            return
        except Exception as error:
            dataset = getattr(loader, "dataset", None)
            name = f"DataLoader({type(dataset).__name__})" if dataset is not None else type(loader).__name__
            raise DataShapeError(f"the data loader {name} raised on batch {index} ({type(error).__name__}: {first_line(error)}); "
                                 "fix the loader or its data") from error
        yield raw


def check_fit(model: nn.Module, batch: Batch, loss_fn: Callable,
              driver: Driver | None = None) -> tuple[list, list[tuple[str, str]], list[Verification]]:
    """Run the first captured pass on ``batch`` (the ``driver``'s planned pass on batch 0:
    training mode with a backward when an analyzer needs one, else one eval-mode forward; a
    private driver's eval forward without ``driver``) and check that the data and the loss fit;
    return the verified sites that ran, the unrecognized norm-like modules and the unverified
    sites (:mod:`normscope.capture.verify`). A training-mode pass that fails in its forward (a
    BatchNorm given one example) is retried in eval mode; the analyzers that need it then report
    the failure.

    Raises:
        DataShapeError: the model or the loss rejects the batch (the message names what fits).
        NoNormSitesError: no normalization site ran.
    """
    inputs, targets = batch
    check_keys(model, inputs)
    driver = driver or Driver(model, [batch], loss_fn)
    first = next((p for p in driver.plan if p.batch == 0), None)
    mode, backward = (first.mode, first.backward) if first is not None else ("eval", False)
    try:
        try:
            result = driver.first(mode, backward)
        except PassFailure as failure:
            if mode == "eval" or failure.stage != "forward":
                raise
            result = driver.first("eval", False)
    except PassFailure as failure:
        error = failure.error
        if failure.stage == "forward":
            first_arg = first_argument(model)
            lacks = f"; the dict batch lacks {first_arg}" if isinstance(inputs, dict) and first_arg and first_arg not in inputs else ""
            hint = " (the digits are (N, 1, 8, 8); --data digits-flat gives (N, 64))" if _digits_images(inputs) else ""
            raise DataShapeError(
                f"inputs of shape {describe(inputs)} do not fit {type(model).__name__} "
                f"({type(error).__name__}: {first_line(error)}){lacks}; pass data the model accepts{hint}"
            ) from error
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        fits = fitting_presets(failure.outputs, _raw(batch), "labels" in _forward_arguments(model))
        fit = f"presets that fit: {', '.join(fits)}" if fits else "no preset fits; pass a package.module:function loss"
        raise DataShapeError(
            f"loss {name} does not fit model outputs {describe_outputs(failure.outputs)} and targets {describe(targets)} "
            f"({type(error).__name__}: {first_line(error)}); {fit}"
        ) from error
    if not result.scalar_loss:
        raise DataShapeError("loss_fn must return a scalar tensor; reduce it with a mean")
    sites = list({r.site.name: r.site for r in result.records}.values())
    unrecognized = result.unrecognized
    if not sites and driver.sites is not None:  # a selection that matches nothing: name the sites there are
        every = Driver(model, [batch], loss_fn).first("eval", False)
        check_selection(list({r.site.name: r.site for r in every.records}.values()), driver.sites)
    if not sites:
        unknown = ", ".join(f"{path} ({cls})" for path, cls in unrecognized)
        hint = f"; norm-like modules not recognized: {unknown} (register them with normscope.register_norm)" if unknown else ""
        if result.unverified:
            hint += "; unverified (reading does not reproduce the output): " + ", ".join(c.site for c in result.unverified)
        raise NoNormSitesError(f"{type(model).__name__} has no normalization layer that normscope can analyze{hint}")
    return sites, list(unrecognized), list(result.unverified)


def _digits_images(inputs: Any) -> bool:
    return isinstance(inputs, torch.Tensor) and tuple(inputs.shape[1:]) == (1, 8, 8)


def _raw(batch: Batch) -> Any:
    """A raw batch equivalent to ``batch`` for any loss (labels back in a dict batch, the
    ``lm`` preset's tokens back to inputs)."""
    inputs, targets = batch
    if isinstance(targets, dict):
        targets = targets.get("labels")
    if isinstance(inputs, dict):
        return {**inputs, "labels": targets} if isinstance(targets, torch.Tensor) else dict(inputs)
    return inputs if targets is None or targets is inputs else (inputs, targets)


def _forward_arguments(model: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def input_shape(inputs: Any) -> list | dict:
    """Per-example shape of the inputs (a dict of shapes for a dict batch)."""
    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape[1:])
    if isinstance(inputs, dict):
        return {k: list(v.shape[1:]) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return [list(t.shape[1:]) for t in inputs if isinstance(t, torch.Tensor)]


def site_row(site) -> dict:
    """A site as a JSON-safe dict."""
    kind = getattr(site.kind, "name", site.kind)
    row = {"name": site.name, "kind": kind, "module_type": site.module_type, "functional": bool(site.functional)}
    return {**row, "reading": site.reading} if getattr(site, "reading", "") else row


def run_analyzers(
    ctx: AnalysisContext, names: list[str], track: Callable, explicit: bool, declared: dict | None = None
) -> tuple[dict[str, AnalyzerOutput], dict[str, str], dict[str, float]]:
    """Run each analyzer on ``ctx`` with the model preserved; a missing or failing analyzer is
    recorded in the errors (by name, with the exception's type and message) and the others
    still run. Any ``Exception`` of an analyzer counts as its failure; interrupts propagate.
    The driver's records are dropped once no later analyzer ``declared`` captured passes.

    Raises:
        AnalyzerError: no analyzer produced output.
    """
    outputs: dict[str, AnalyzerOutput] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    for index, name in enumerate(track(names, "analyzers", len(names))):
        started = time.perf_counter()
        try:
            function = get_analyzer(name)
        except ImportError as error:
            errors[name] = f"analyzer {name} is not available ({first_line(error)})"
            continue
        try:
            with preserved(ctx.model):
                outputs[name] = function(dataclasses.replace(ctx, budget=ctx.budget.share(name, names[index:])))
        except KeyboardInterrupt:
            done = ", ".join(outputs) or "none"
            errors["interrupted"] = f"interrupted during analyzer {name}; finished analyzers ({done}) are complete, {name} and later ones did not run"
            break
        except NormscopeError as error:
            verb = "failed" if explicit else "skipped"
            errors[name] = f"analyzer {name} {verb}: {first_line(error)}"
            continue
        except Exception as error:
            errors[name] = f"analyzer {name} failed ({type(error).__name__}: {first_line(error)})"
            continue
        finally:
            ctx.budget.release(name)
            if declared is not None and not any(declared.get(n) for n in names[index + 1:]):
                ctx.passes().release()
        timings[name] = time.perf_counter() - started
    if not outputs:
        if "interrupted" in errors:
            raise KeyboardInterrupt
        raise AnalyzerError("no analyzer could run: " + "; ".join(errors.values()))
    return outputs, errors, timings


def hold_headlines(budget: Budget, names: Sequence[str], driver: Driver, batches: int) -> None:
    """Price the units from the driver's first pass (:meth:`normscope.budget.Budget.seed`) and hold
    every analyzer's headline (:data:`normscope.budget.HEADLINES`; stats a forward more per further
    batch) before any analyzer runs (:meth:`normscope.budget.Budget.reserve`); the holds together
    take at most :data:`normscope.budget.HOLD_SHARE` of the budget (scaled down alike), so a first
    pass priced high (it also verifies every site) does not leave the analyzers before descent nothing."""
    first = next(iter(driver.results.items()), None)
    if first is None or not budget.limited:
        return
    budget.seed(first[1].seconds, first[0].backward)
    holds = {}
    for key, units in HEADLINES.items():
        analyzer = key.split(" (")[0]
        if analyzer in names:
            holds[key] = {**units, **({"forward": units.get("forward", 0) + batches - 1} if analyzer == "stats" else {})}
    total = sum(budget.price(units) for units in holds.values())
    scale = min(1.0, HOLD_SHARE * budget.remaining() / total) if total > 0 else 1.0
    for key, units in holds.items():
        budget.reserve(key, {unit: count * scale for unit, count in units.items()})


def budget_findings(budget: Budget, interrupted: str | None) -> list[str]:
    """Sentences on what the budget cut (and an interrupt), for the report and summary."""
    out = [f"Analysis {interrupted}."] if interrupted else []
    if budget.cuts:
        limit = f"{budget.seconds:.0f} s" if budget.limited else "no limit"
        out.append(f"The time budget ({limit}; pass --budget SECONDS or budget= for more) cut {len(budget.cuts)} piece(s) "
                   "of work; every table holds what finished, with its accuracy:")
        out += [f"{cut.analyzer}: {cut.what} ({cut.why})." for cut in budget.cuts]
    return out


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[..., Iterator]]:
    """A ``track(iterable, description, total)`` function: Rich bars on stderr, or a pass-through."""
    if not enabled:
        yield no_progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )

    started = time.perf_counter()

    def track(iterable: Iterable[T], description: str = "", total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if not console.is_terminal:
            yield from logged(iterable, description, total, started, console)
            return
        task = bars.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                bars.advance(task)
        finally:
            bars.remove_task(task)

    with bars:
        yield track


def logged(iterable: Iterable[T], description: str, total: int | None, started: float, console) -> Iterator[T]:
    """``iterable`` with log lines for a non-terminal: one per named stage (string items),
    ``normscope: <description> i/total <item> (at <elapsed> s)``, and one when it ends."""
    begun, count = time.perf_counter(), 0
    for count, item in enumerate(iterable, start=1):
        if isinstance(item, str):
            console.print(f"normscope: {description} {count}/{total if total is not None else '?'} {item} "
                          f"(at {time.perf_counter() - started:.1f} s)", markup=False, highlight=False)
        yield item
    console.print(f"normscope: {description} done, {count} step(s) in {time.perf_counter() - begun:.1f} s "
                  f"(at {time.perf_counter() - started:.1f} s)", markup=False, highlight=False)

