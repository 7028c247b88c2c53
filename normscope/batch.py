"""One batch abstraction: what a batch holds, how the model and the loss receive it.

A batch is a pair ``(inputs, targets)`` of *parts*. A part is a tensor, a tuple of tensors, a dict
of tensors, or ``None`` (no targets). ``inputs`` is exactly what ``forward`` receives; values
that are not tensors (``return_loss=True``, a string, a flag) pass through to ``forward``
untouched, and only tensors are moved, cast, sliced and concatenated:

======================  =======================================  ==================================
the loader yields       ``forward`` is called as                 targets
======================  =======================================  ==================================
``x``                   ``model(x)``                             None
``(x, y)``              ``model(x)``                             ``y``
``{"input_ids": ...}``  ``model(**batch)``, ``labels`` left out  ``batch["labels"]`` (or None)
``(dict, y)``           ``model(**dict)``                        ``y``
``(x1, ..., xk, y)``    ``model(x1, ..., xk)``                   ``y`` (the last element)
======================  =======================================  ==================================

The loss decides how the targets are built from the batch (:meth:`normscope.losses.Loss.targets`):
the ``model`` preset keeps ``labels`` in the forward's keyword arguments, ``lm`` reads the tokens.

Every analyzer moves, casts, slices and concatenates batches with the functions here, so a dict
batch works wherever a tensor pair does. Slicing takes the first dimension of every tensor as the
example dimension; a batch whose tensors disagree on it (a custom collate that flattens targets)
runs whole but cannot be sliced (:class:`~normscope.errors.DataShapeError` names the shapes).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from normscope.errors import DataShapeError

Part = Tensor | tuple | dict | None
Batch = tuple[Part, Part]
LABEL_KEY = "labels"


def split(raw: Any, keep_labels: bool = False) -> Batch:
    """``(inputs, targets)`` of one batch as a loader yields it (the table of the module docstring).

    ``keep_labels``: a dict batch's ``labels`` stay in the forward's keyword arguments too
    (the ``model`` loss preset, for models that compute their own loss).

    Raises:
        DataShapeError: the batch is none of the accepted forms.
    """
    if isinstance(raw, Tensor):
        return raw, None
    if isinstance(raw, Mapping):
        inputs = dict(raw)
        _check_tensors(inputs, "dict batch", any_leaf=True)
        targets = inputs.get(LABEL_KEY)
        if not keep_labels:
            inputs.pop(LABEL_KEY, None)
        return inputs, targets
    if isinstance(raw, (tuple, list)) and raw and all(isinstance(part, Mapping) for part in raw) and (
            isinstance(raw, list) or len(raw) > 2):
        raise DataShapeError(
            f"a batch is one dict of tensors with the examples stacked (or (dict, targets)); got a {type(raw).__name__} "
            f"of {len(raw)} dicts: collate them into one, e.g. with torch.utils.data.default_collate"
        )
    if isinstance(raw, (tuple, list)) and raw:
        if len(raw) == 1:
            return split(raw[0], keep_labels)
        *inputs, targets = raw
        inputs = inputs[0] if len(inputs) == 1 else tuple(inputs)
        if isinstance(inputs, Mapping):
            inputs = dict(inputs)
        _check_tensors(inputs, "batch inputs", any_leaf=isinstance(inputs, dict))
        _check_tensors(targets, "batch targets")
        return inputs, targets
    got = f"an empty {type(raw).__name__}" if isinstance(raw, (tuple, list)) else type(raw).__name__
    raise DataShapeError(
        f"a batch must be a tensor, a dict of tensors, (inputs, targets), (dict, targets) or "
        f"(x1, ..., xk, targets) (got {got})"
    )


def _check_tensors(part: Any, what: str, any_leaf: bool = False) -> None:
    """``part`` holds tensors only; with ``any_leaf`` (a dict of keyword arguments), at least one
    tensor, and other values pass through to ``forward``."""
    leaves, _ = tree_flatten(part)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    bad = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, Tensor)})
    if not tensors or (bad and not any_leaf):
        raise DataShapeError(f"{what} must hold tensors (found {', '.join(bad) or 'nothing'}); convert them with torch.as_tensor")


def forward(model: nn.Module | Callable, inputs: Part, params: dict | tuple[dict, ...] | None = None) -> Any:
    """Call ``model`` on ``inputs`` (positional, unpacked tuple or keyword arguments); with
    ``params``, through :func:`torch.func.functional_call` at those parameter values."""
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    else:
        args, kwargs = ((inputs,) if isinstance(inputs, Tensor) else tuple(inputs)), {}
    if params is not None:
        return functional_call(model, params, args, kwargs)
    return model(*args, **kwargs)


def size(inputs: Part) -> int:
    """The number of examples: the first dimension of the first tensor of ``inputs``."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        raise DataShapeError("batch inputs hold no tensor with an example dimension")
    return int(leaves[0].shape[0])


def device(inputs: Part) -> torch.device:
    """The device of the first tensor of ``inputs``."""
    return next(t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)).device


def describe(part: Part) -> str:
    """Shapes of a part, for messages: ``(8, 1, 8, 8)`` or ``{input_ids: (8, 16), ...}``."""
    if isinstance(part, Tensor):
        return str(tuple(part.shape))
    if isinstance(part, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in part.items()) + "}"
    if isinstance(part, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in part) + ")"
    return type(part).__name__


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """The batch on ``device``; floating *inputs* cast to ``dtype`` (targets and integer tensors
    such as token ids and attention masks keep their dtype)."""

    def move(t, cast: bool):
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if cast and dtype is not None and t.is_floating_point() else t.dtype)

    inputs, targets = batch
    return tree_map(lambda t: move(t, True), inputs), tree_map(lambda t: move(t, False), targets)


def floating_dtype(inputs: Part, model: nn.Module) -> torch.dtype:
    """The dtype of the first floating tensor of ``inputs``; else of the model's first floating
    parameter (token-id inputs); float32 without either."""
    for t in tree_flatten(inputs)[0]:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def cast_inputs(inputs: Part, dtype: torch.dtype) -> Part:
    """``inputs`` with floating tensors cast to ``dtype`` (token ids and masks unchanged)."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, inputs)


def check_sliceable(batch: Batch) -> int:
    """The batch size, after checking that every tensor has it as its first dimension.

    Raises:
        DataShapeError: a tensor's first dimension differs (e.g. a collate that flattens targets).
    """
    n = size(batch[0])
    for what, part in (("inputs", batch[0]), ("targets", batch[1])):
        for t in tree_flatten(part)[0]:
            if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != n):
                raise DataShapeError(
                    f"batch {what} {describe(part)} do not all have the {n} examples of the inputs as first "
                    "dimension, so the batch cannot be sliced per example (sweeps, per-example gradients); "
                    "make the collate function keep one row per example"
                )
    return n


def take(batch: Batch, index: slice | Tensor | Sequence[int]) -> Batch:
    """The examples ``index`` (a slice or indices) of every tensor of the batch.

    Raises:
        DataShapeError: the batch's tensors do not share the example dimension.
    """
    check_sliceable(batch)
    if not isinstance(index, (slice, Tensor)):
        index = torch.as_tensor(index, dtype=torch.long)
    if isinstance(index, Tensor):
        index = index.to(device(batch[0]))
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, batch)


def concat(batches: Sequence[Batch]) -> Batch:
    """One batch of the examples of ``batches``, in order (they must have the same structure).

    Raises:
        DataShapeError: the batches differ in structure or cannot be joined per example.
    """
    if len(batches) == 1:
        return batches[0]
    for b in batches:
        check_sliceable(b)
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise DataShapeError("batches differ in structure (keys or number of tensors) and cannot be joined")
    try:
        joined = [torch.cat(list(parts)) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*(f for f, _ in flat))]
    except RuntimeError as error:
        raise DataShapeError(
            f"batches cannot be joined per example ({str(error).splitlines()[0]}); pad them to a common length "
            "in the collate function"
        ) from error
    return tree_unflatten(joined, spec)


def unsqueeze(part: Part) -> Part:
    """``part`` with a leading example dimension of 1 on every tensor (one example of a vmap)."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, part)


def example_dims(part: Part) -> Any:
    """``in_dims`` for :func:`torch.func.vmap` over the examples of ``part`` (``None`` for no targets)."""
    return None if part is None else tree_map(lambda t: 0 if isinstance(t, Tensor) else None, part)


def check_keys(model: nn.Module, inputs: Part) -> None:
    """For a dict batch: the forward's required arguments are present and no key is unknown.

    Raises:
        DataShapeError: keys are missing (named) or the forward takes no such keyword.
    """
    if not isinstance(inputs, dict):
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    name = type(model).__name__
    kinds = {p.kind for p in params.values()}
    named = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in named if p.default is p.empty and p.name not in inputs]
    if missing:
        raise DataShapeError(
            f"the dict batch lacks key(s) {', '.join(missing)} that {name}.forward needs (it has {', '.join(inputs) or 'none'})"
        )
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        unknown = [k for k in inputs if k not in params]
        if unknown:
            raise DataShapeError(
                f"{name}.forward takes no argument(s) {', '.join(unknown)} of the dict batch "
                f"(it takes {', '.join(p.name for p in named)})"
            )


def first_argument(model: nn.Module) -> str | None:
    """The name of the forward's first argument (``input_ids``, ``pixel_values``, ...), if named."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind in (params[0].POSITIONAL_OR_KEYWORD, params[0].KEYWORD_ONLY) else None
