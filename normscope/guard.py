"""Never mutate the user's model: snapshot its state, restore it, and check it.

:func:`preserved` wraps any analysis. On exit, normal or by an exception, it puts back every
parameter's value, every buffer (BatchNorm running statistics and ``num_batches_tracked``
included), every module's train/eval flag, every ``requires_grad`` and every ``.grad`` exactly
as they were. :func:`model_fingerprint` and :func:`assert_unchanged` let tests check that
bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass
class ModelState:
    """A bit-exact copy of everything an analysis could change on a module."""

    params: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]
    training: dict[str, bool]


def snapshot(model: nn.Module) -> ModelState:
    """Clone parameters, gradients and buffers, and record the flags."""
    named = dict(model.named_parameters(remove_duplicate=False))
    return ModelState(
        params={k: p.detach().clone() for k, p in named.items()},
        requires_grad={k: p.requires_grad for k, p in named.items()},
        grads={k: None if p.grad is None else p.grad.detach().clone() for k, p in named.items()},
        buffers={k: b.detach().clone() for k, b in model.named_buffers(remove_duplicate=False) if b is not None},
        training={k: m.training for k, m in model.named_modules(remove_duplicate=False)},
    )


@torch.no_grad()
def restore(model: nn.Module, state: ModelState) -> None:
    """Put ``state`` back into ``model`` in place (the tensors keep their identity)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in state.params:
            continue
        p.copy_(state.params[name])
        p.requires_grad_(state.requires_grad[name])
        saved = state.grads[name]
        p.grad = None if saved is None else saved.clone()
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None and name in state.buffers:
            b.copy_(state.buffers[name])
    for name, m in model.named_modules(remove_duplicate=False):
        if name in state.training:
            m.training = state.training[name]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body on ``model`` and restore its complete state afterwards, also on error."""
    state = snapshot(model)
    try:
        yield model
    finally:
        restore(model, state)


def differences(model: nn.Module, state: ModelState) -> list[str]:
    """Names of everything in ``model`` that is not bit-identical to ``state``."""
    now = snapshot(model)
    diffs: list[str] = []
    for field in ("params", "buffers"):
        old, new = getattr(state, field), getattr(now, field)
        diffs += [f"{field[:-1]} {k}" for k in old if k not in new or not torch.equal(old[k], new[k])]
    for k, g in state.grads.items():
        h = now.grads.get(k)
        if (g is None) != (h is None) or (g is not None and not torch.equal(g, h)):
            diffs.append(f"grad {k}")
    diffs += [f"requires_grad {k}" for k, v in state.requires_grad.items() if now.requires_grad.get(k) != v]
    diffs += [f"training {k or '<root>'}" for k, v in state.training.items() if now.training.get(k) != v]
    return diffs


def assert_unchanged(model: nn.Module, state: ModelState) -> None:
    """Raise ``AssertionError`` naming what changed since ``state`` was taken."""
    diffs = differences(model, state)
    if diffs:
        raise AssertionError("model was mutated: " + "; ".join(diffs[:10]))
