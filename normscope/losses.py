"""Loss presets and user loss functions, all called as ``loss(outputs, targets) -> scalar``.

Presets (``--loss`` on the CLI, ``loss_fn=`` in the API):

=================  ==========================================================================
``cross_entropy``  ``F.cross_entropy(logits, targets)`` for class targets (the default when a
                   batch has one class per example, or targets outside a dict); ``(B, T, V)`` logits against ``(B, T)`` targets are
                   read per token; label ``-100`` is ignored
``mse``            ``F.mse_loss(logits, targets)``
``lm``             next-token cross-entropy of ``logits[:, :-1]`` against ``tokens[:, 1:]``,
                   ``tokens`` the batch's ``labels`` or else its ``input_ids``; positions whose
                   ``attention_mask`` is 0 or whose label is ``-100`` are ignored (the default
                   for a batch of ``input_ids`` without targets)
``model``          the ``.loss`` the model computes itself from the batch's ``labels``, as
                   ``transformers`` models do (``labels`` stay in the forward's arguments; the
                   default for a dict batch whose ``labels`` hold more than one value per example
                   when the forward takes ``labels``),
                   or from a batch with ``return_loss=True`` and no labels (CLIP)
=================  ==========================================================================

Outputs are read as the preset needs: a tensor is the logits; a ``ModelOutput`` or dict gives
``.logits``/``["logits"]`` (``.loss`` for ``model``); a tuple gives its first element.

A user function (a callable, or ``"package.module:function"``) is called as
``fn(outputs, targets)`` with the model's raw outputs and the batch's targets (a dict batch's
``labels``; its inputs when it has no targets).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from normscope.batch import Batch, Part, describe, split
from normscope.errors import DataShapeError, ModelImportError, UnknownNameError

LossFn = Callable[[Any, Any], Tensor]
IGNORE = -100


def logits_of(outputs: Any) -> Tensor:
    """The logits of any output form: the tensor itself, ``.logits``/``["logits"]``, or the first element."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
        if logits is None:
            logits = next((v for v in outputs.values() if isinstance(v, Tensor) and v.dim() > 0), None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        return logits_of(outputs[0])
    if not isinstance(logits, Tensor):
        raise DataShapeError(f"the model outputs {describe_outputs(outputs)}, which hold no logits")
    return logits


def describe_outputs(outputs: Any) -> str:
    """``Tensor (8, 10)``, ``SequenceClassifierOutput(logits (8, 2))``, for messages."""
    if isinstance(outputs, Tensor):
        return f"Tensor {tuple(outputs.shape)}"
    if isinstance(outputs, Mapping):
        fields = ", ".join(f"{k} {describe(v)}" for k, v in outputs.items() if isinstance(v, Tensor))
        return f"{type(outputs).__name__}({fields})"
    if isinstance(outputs, (tuple, list)):
        return f"{type(outputs).__name__}({', '.join(describe_outputs(o) for o in outputs[:3])})"
    return type(outputs).__name__


def cross_entropy(outputs: Any, targets: Tensor) -> Tensor:
    """Cross-entropy of the logits against class targets (``-100`` ignored); ``(B, T, V)`` logits
    with ``(B, T)`` targets are read per token."""
    logits = logits_of(outputs)
    if not isinstance(targets, Tensor):
        raise DataShapeError("cross_entropy needs class targets; this batch has none")
    if logits.dim() > 2 and tuple(targets.shape) == tuple(logits.shape[:-1]):
        logits = logits.movedim(-1, 1)
    return F.cross_entropy(logits, targets)


def mse(outputs: Any, targets: Tensor) -> Tensor:
    """Mean squared error of the logits (predictions) against targets of the same shape."""
    predictions = logits_of(outputs)
    if not isinstance(targets, Tensor) or targets.numel() != predictions.numel():
        raise DataShapeError(f"mse needs targets of the predictions' shape {tuple(predictions.shape)} "
                             f"(got {describe(targets)})")
    return F.mse_loss(predictions, targets.reshape(predictions.shape).to(predictions.dtype))


def lm(outputs: Any, tokens: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy: ``logits[:, :-1]`` against ``tokens[:, 1:]``, ignoring padding
    (``attention_mask`` 0) and label ``-100``; averaged over the counted tokens."""
    logits = logits_of(outputs)
    ids = tokens.get("labels", tokens.get("input_ids"))
    if logits.dim() != 3 or ids is None or tuple(ids.shape) != tuple(logits.shape[:2]):
        raise DataShapeError(f"lm needs (batch, length, vocabulary) logits and (batch, length) tokens "
                             f"(got logits {tuple(logits.shape)}, tokens {describe(ids)})")
    target = ids[:, 1:]
    mask = tokens.get("attention_mask")
    if mask is not None:
        target = target.masked_fill(mask[:, 1:] == 0, IGNORE)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def model_loss(outputs: Any, targets: Any = None) -> Tensor:
    """The ``.loss`` (or ``["loss"]``) the model computed itself."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if not isinstance(loss, Tensor):
        raise DataShapeError(f"the model loss needs outputs with a .loss; the model outputs {describe_outputs(outputs)}")
    return loss


@dataclass(frozen=True)
class Loss:
    """A loss and how it reads a batch: ``loss(outputs, targets)``; :meth:`batch` splits a
    loader's batch into the forward's ``inputs`` and the ``targets`` this loss receives."""

    name: str
    fn: LossFn
    keep_labels: bool = False

    @property
    def __name__(self) -> str:
        return self.name

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        return self.fn(outputs, targets)

    def batch(self, raw: Any) -> Batch:
        """``(inputs, targets)`` of one raw batch for this loss (see :mod:`normscope.batch`).

        Raises:
            DataShapeError: ``model`` on a batch without labels.
        """
        inputs, targets = split(raw, keep_labels=self.keep_labels)
        if self.name == "lm":
            return inputs, _tokens(inputs, targets)
        if self.name == "model":
            if targets is None and isinstance(inputs, dict) and inputs.get("return_loss") is True:
                return inputs, None  # CLIP-style: the model computes its loss without labels
            if targets is None:
                keys = ", ".join(inputs) if isinstance(inputs, dict) else describe(inputs)
                raise DataShapeError(f"the model loss needs a batch with labels or return_loss=True (the batch has {keys}); "
                                     "add a labels key or pass --loss cross_entropy/lm")
            if not isinstance(inputs, dict):
                raise DataShapeError("the model loss needs a dict batch (keyword arguments with labels)")
            return {**inputs, "labels": targets}, targets
        if targets is None and self.name not in PRESETS:
            return inputs, inputs
        return inputs, targets


def _tokens(inputs: Part, targets: Part) -> dict[str, Tensor]:
    if isinstance(inputs, dict):
        tokens = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
    elif isinstance(inputs, Tensor) and not inputs.is_floating_point():
        tokens = {"input_ids": inputs}
    else:
        raise DataShapeError(f"lm needs token ids: a dict batch with input_ids or a tensor of ids (got {describe(inputs)})")
    if isinstance(targets, Tensor):
        tokens["labels"] = targets
    return tokens


PRESETS: dict[str, Loss] = {
    "cross_entropy": Loss("cross_entropy", cross_entropy),
    "mse": Loss("mse", mse),
    "lm": Loss("lm", lm),
    "model": Loss("model", model_loss, keep_labels=True),
}


def resolve(spec: str | Callable | Loss | None) -> Loss | None:
    """A :class:`Loss` from a preset name, ``"package.module:function"``, a callable or ``None``
    (``None``: choose with :func:`default_for` once a batch is seen).

    Raises:
        UnknownNameError: a name that is no preset and no ``module:function``.
        ModelImportError: the function cannot be imported.
    """
    if spec is None or isinstance(spec, Loss):
        return spec
    if callable(spec):
        return Loss(getattr(spec, "__name__", type(spec).__name__), spec)
    name = str(spec).strip()
    if name in PRESETS:
        return PRESETS[name]
    if ":" not in name:
        raise UnknownNameError("loss", name, [*PRESETS, "package.module:function"])
    module_name, _, function_name = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ModelImportError(f"cannot import loss {name!r} ({type(error).__name__}: {error})") from error
    if not callable(function):
        raise ModelImportError(f"loss {name!r} is not callable")
    return Loss(name, function)


def default_for(raw: Any, takes_labels: bool = False) -> Loss:
    """``model`` for a dict batch with labels of more than one value per example (segmentation
    maps, token labels) when the forward takes ``labels`` (``takes_labels``): the model knows how
    its outputs align with them (SegFormer upsamples its logits, a causal LM shifts its tokens);
    else ``cross_entropy`` for a batch with targets, ``lm`` for token ids without targets.

    Raises:
        DataShapeError: a batch without targets that is not token ids.
    """
    inputs, targets = split(raw)
    if takes_labels and isinstance(inputs, dict) and isinstance(targets, Tensor) and targets.dim() > 1:
        return PRESETS["model"]
    if targets is not None:
        return PRESETS["cross_entropy"]
    if (isinstance(inputs, dict) and "input_ids" in inputs) or (isinstance(inputs, Tensor) and not inputs.is_floating_point()):
        return PRESETS["lm"]
    raise DataShapeError(f"the batch {describe(inputs)} has no targets; pass a loss (lm, model or package.module:function)")


def fitting_presets(outputs: Any, raw: Any, forward_takes_labels: bool) -> list[str]:
    """The presets that accept ``outputs`` for this raw batch (for error messages)."""
    fits = []
    for name, preset in PRESETS.items():
        if name == "model":
            inputs, targets = split(raw)
            if targets is not None and isinstance(inputs, dict) and forward_takes_labels:
                fits.append(name)
            continue
        try:
            loss = preset(outputs, preset.batch(raw)[1])
        except Exception:  # any failure means: does not fit
            continue
        if isinstance(loss, Tensor) and loss.numel() == 1 and torch.isfinite(loss):
            fits.append(name)
    return fits
