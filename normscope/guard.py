"""Never mutate the user's model or session: snapshot the state, restore it, and check it.

:func:`preserved` wraps any analysis. On exit, normal or by an exception, the model is as it was:

* every parameter and buffer (BatchNorm running statistics and ``num_batches_tracked`` included)
  is the same tensor object with the same bits; a tensor is written back, in place, only when
  it changed, and its version counter is set back too, so a graph the user built before the
  analysis still runs ``backward()``;
* every ``.grad`` is the same tensor object with the same value: inside the block the
  gradients are set aside (``None``), so a ``backward()`` there starts fresh gradients instead
  of accumulating into the user's;
* every ``requires_grad``, train/eval flag and hook (module hooks, global module hooks and
  tensor hooks on parameters) is as it was;
* with ``rng=True`` the random generators (torch CPU, every initialized CUDA device, NumPy's and
  Python's global ones) and the grad mode are restored.

:func:`model_fingerprint` is the same snapshot under the name tests use; :func:`differences`
and :func:`assert_unchanged` name everything that is not as it was.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as module_globals

MODULE_HOOKS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    "_global_buffer_registration_hooks", "_global_module_registration_hooks", "_global_parameter_registration_hooks",
)
TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


@dataclass
class RngState:
    """The states of every random generator an analysis may draw from."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def take(cls) -> "RngState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def put_back(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)

    def differences(self, other: "RngState") -> list[str]:
        diffs = [] if torch.equal(self.cpu, other.cpu) else ["rng torch cpu"]
        if (self.cuda is None) != (other.cuda is None) or (
            self.cuda is not None and any(not torch.equal(a, b) for a, b in zip(self.cuda, other.cuda))
        ):
            diffs.append("rng torch cuda")
        old, new = self.numpy, other.numpy
        if old[0] != new[0] or not np.array_equal(old[1], new[1]) or old[2:] != new[2:]:
            diffs.append("rng numpy")
        if self.python != other.python:
            diffs.append("rng python")
        return diffs


@dataclass
class ModelState:
    """Everything an analysis could change on a module: copies of the values, and the objects,
    version counters, flags and hooks they must come back with."""

    objects: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    versions: dict[str, int]
    requires_grad: dict[str, bool]
    grad_objects: dict[str, torch.Tensor | None]
    grads: dict[str, torch.Tensor | None]
    grad_versions: dict[str, int]
    training: dict[str, bool]
    hooks: dict[str, dict]
    attributes: dict[str, frozenset]
    rng: RngState
    grad_enabled: bool
    inference_mode: bool


def snapshot(model: nn.Module) -> ModelState:
    """Clone parameters, gradients and buffers; record objects, versions, flags, hooks, RNGs."""
    named = dict(model.named_parameters(remove_duplicate=False))
    buffers = {k: b for k, b in model.named_buffers(remove_duplicate=False) if b is not None}
    tensors = {**named, **buffers}
    return ModelState(
        objects=tensors,
        params={k: p.detach().clone() for k, p in named.items()},
        buffers={k: b.detach().clone() for k, b in buffers.items()},
        versions={k: t._version for k, t in tensors.items()},
        requires_grad={k: p.requires_grad for k, p in named.items()},
        grad_objects={k: p.grad for k, p in named.items()},
        grads={k: None if p.grad is None else p.grad.detach().clone() for k, p in named.items()},
        grad_versions={k: p.grad._version for k, p in named.items() if p.grad is not None},
        training={k: m.training for k, m in model.named_modules(remove_duplicate=False)},
        hooks=hook_tables(model),
        attributes={k: frozenset(vars(m)) for k, m in model.named_modules(remove_duplicate=False)},
        rng=RngState.take(),
        grad_enabled=torch.is_grad_enabled(),
        inference_mode=torch.is_inference_mode_enabled(),
    )


model_fingerprint = snapshot


def hook_tables(model: nn.Module) -> dict[str, dict]:
    """Shallow copies of every hook table: per module, per parameter, and the global ones."""
    tables: dict[str, dict] = {"<global>": {name: dict(getattr(module_globals, name)) for name in GLOBAL_HOOKS}}
    for path, module in model.named_modules(remove_duplicate=False):
        tables[f"module {path or '<root>'}"] = {name: dict(getattr(module, name, None) or {}) for name in MODULE_HOOKS}
    for path, p in model.named_parameters(remove_duplicate=False):
        tables[f"parameter {path}"] = {name: dict(getattr(p, name, None) or {}) for name in TENSOR_HOOKS}
    return tables


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits (NaN and -0.0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
        if width is None:
            return torch.equal(torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b)
        return torch.equal(a.detach().contiguous().view(width), b.detach().contiguous().view(width))
    return torch.equal(a, b)


def set_version(tensor: torch.Tensor, version: int) -> None:
    """Set ``tensor``'s autograd version counter back (after restoring its bits in place)."""
    torch._C._autograd._unsafe_set_version_counter((tensor,), (version,))


@torch.no_grad()
def put_back(tensor: torch.Tensor, saved: torch.Tensor, version: int) -> None:
    """Write ``saved`` into ``tensor`` in place only if it changed, then reset its version."""
    if tensor._version == version and same_bits(tensor, saved):
        return
    tensor.copy_(saved)
    set_version(tensor, version)


def restore(model: nn.Module, state: ModelState) -> None:
    """Put ``state`` back into ``model``: the original objects, their bits, grads, flags, hooks."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, original in state.objects.items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None:
            continue
        table = module._parameters if name in state.params else module._buffers
        if table.get(leaf) is not original:
            table[leaf] = original
    done: set[int] = set()
    for name, original in state.objects.items():
        if id(original) in done:
            continue
        done.add(id(original))
        put_back(original, state.params[name] if name in state.params else state.buffers[name], state.versions[name])
    for name in state.params:
        p = state.objects[name]
        if p.requires_grad != state.requires_grad[name]:
            p.requires_grad_(state.requires_grad[name])
        grad = state.grad_objects[name]
        if p.grad is not grad:
            p.grad = grad
        if grad is not None:
            put_back(grad, state.grads[name], state.grad_versions[name])
    for name, m in modules.items():
        if name in state.training:
            m.training = state.training[name]
        # attributes set during the block go with the hooks: transformers marks a model whose
        # output-capturing hooks it installed, and would not install them again
        for added in set(vars(m)) - state.attributes.get(name, set(vars(m))):
            delattr(m, added)
    restore_hooks(model, state.hooks)


def restore_hooks(model: nn.Module, saved: dict[str, dict]) -> None:
    """Put every hook table back to its saved content, in place (hooks added since are dropped)."""
    now = hook_tables(model)
    owners: dict[str, Any] = {"<global>": module_globals}
    owners.update({f"module {path or '<root>'}": m for path, m in model.named_modules(remove_duplicate=False)})
    owners.update({f"parameter {path}": p for path, p in model.named_parameters(remove_duplicate=False)})
    for key, tables in saved.items():
        if key not in owners or now.get(key) == tables:
            continue
        for name, content in tables.items():
            table = getattr(owners[key], name, None)
            if table is None:
                continue
            table.clear()
            table.update(content)


@contextlib.contextmanager
def preserved(model: nn.Module, rng: bool = True) -> Iterator[nn.Module]:
    """Run the body on ``model`` and restore its complete state afterwards, also on error.

    Inside, every ``.grad`` is ``None`` (the user's gradients are set aside, not accumulated
    into). With ``rng`` the random generators and the grad mode are restored too.
    """
    state = snapshot(model)
    for p in state.objects.values():
        if isinstance(p, nn.Parameter) or p.grad is not None:
            p.grad = None
    try:
        yield model
    finally:
        restore(model, state)
        if rng:
            state.rng.put_back()
            torch.set_grad_enabled(state.grad_enabled)


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Enable autograd for the body (also inside ``torch.no_grad()`` or ``torch.inference_mode()``);
    the caller's mode comes back on exit."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def differences(model: nn.Module, state: ModelState, session: bool = False) -> list[str]:
    """Names of everything in ``model`` that is not as in ``state``; with ``session`` also the
    random generators and the grad mode."""
    now = snapshot(model)
    diffs: list[str] = []
    for kind, old, new in (("param", state.params, now.params), ("buffer", state.buffers, now.buffers)):
        diffs += [f"{kind} {k}" for k in old if k not in new or not same_bits(old[k], new[k])]
    diffs += [f"object {k}" for k, t in state.objects.items() if now.objects.get(k) is not t]
    diffs += [f"version {k}" for k, v in state.versions.items() if now.versions.get(k) != v]
    for k, g in state.grads.items():
        h = now.grads.get(k)
        if (g is None) != (h is None) or (g is not None and not same_bits(g, h)):
            diffs.append(f"grad {k}")
        if now.grad_objects.get(k) is not state.grad_objects[k]:
            diffs.append(f"grad object {k}")
        elif k in state.grad_versions and now.grad_versions.get(k) != state.grad_versions[k]:
            diffs.append(f"grad version {k}")
    diffs += [f"requires_grad {k}" for k, v in state.requires_grad.items() if now.requires_grad.get(k) != v]
    diffs += [f"training {k or '<root>'}" for k, v in state.training.items() if now.training.get(k) != v]
    diffs += [f"hooks {k}" for k, v in state.hooks.items() if now.hooks.get(k) != v]
    if not session:
        return diffs
    diffs += state.rng.differences(now.rng)
    if now.grad_enabled != state.grad_enabled or now.inference_mode != state.inference_mode:
        diffs.append("grad mode")
    return diffs


def assert_unchanged(model: nn.Module, state: ModelState, session: bool = False) -> None:
    """Raise ``AssertionError`` naming what changed since ``state`` was taken (see :func:`differences`)."""
    diffs = differences(model, state, session)
    if diffs:
        raise AssertionError("model was mutated: " + "; ".join(diffs[:10]))
