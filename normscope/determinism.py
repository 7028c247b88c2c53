"""Deterministic training-mode analyses: normalization layers in the requested mode, dropout off.

Analyses that compare losses or take second derivatives in training mode (descent, bias, the gls
sweeps) would otherwise draw a new dropout mask on every forward, so the "same" loss differs
between evaluations. :func:`random_layers` intercepts the random functions themselves
(``F.dropout`` and its variants, which ``nn.Dropout`` modules call, and the ``dropout_p`` of
scaled dot-product attention), so train/eval flags stay as the analysis set them:

* ``"off"`` (default): dropout is the identity (attention ``dropout_p`` 0);
* ``"fixed"``: dropout stays on, with a fixed mask per call position within each forward
  (the k-th random call of every forward draws from seed ``seed + k``, on the CPU generator and
  the generator of the tensor's CUDA device only, both restored after the call);
* ``"on"``: untouched (masks change between forwards).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from normscope.errors import UnknownNameError

MODES = ("off", "fixed", "on")
DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
            torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout}
ATTENTION = F.scaled_dot_product_attention


class _RandomCalls(TorchFunctionMode):
    """Turns dropout off, or fixes its masks, and counts the calls it changed by function name."""

    def __init__(self, mode: str, seed: int) -> None:
        super().__init__()
        self.mode, self.seed, self.position, self.calls = mode, seed, 0, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in DROPOUTS:
            self.calls[func.__name__] += 1
            if self.mode == "off":
                return args[0] if args else kwargs["input"]
            return self._seeded(func, args, kwargs)
        if func is ATTENTION and (kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0) or 0.0) > 0:
            self.calls["scaled_dot_product_attention"] += 1
            if self.mode == "off":
                if len(args) > 4:
                    args = (*args[:4], 0.0, *args[5:])
                else:
                    kwargs["dropout_p"] = 0.0
                return func(*args, **kwargs)
            return self._seeded(func, args, kwargs)
        return func(*args, **kwargs)

    def _seeded(self, func, args, kwargs):
        self.position += 1
        tensor = args[0] if args else next(iter(kwargs.values()))
        with seeded_on(tensor.device, self.seed + self.position):
            return func(*args, **kwargs)

    def describe(self) -> str:
        calls = ", ".join(f"{n} x{c}" for n, c in sorted(self.calls.items())) or "no random call ran"
        what = {"off": "turned off", "fixed": "kept with fixed masks", "on": "left on (masks vary)"}[self.mode]
        return f"dropout {what}; normalization layers in each analysis's mode ({calls})"


@contextlib.contextmanager
def seeded_on(device: torch.device, seed: int) -> Iterator[None]:
    """Within the block the CPU generator and, for a CUDA ``device``, that device's generator
    alone are seeded with ``seed``; both are restored on exit. (``torch.manual_seed`` would
    reseed every CUDA device, and ``fork_rng(devices=[])`` would restore none of them.)"""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def random_layers(mode: str = "off", seed: int = 0) -> Iterator[_RandomCalls]:
    """Within the block, dropout is off / has fixed masks / is untouched (see the module docstring).

    Raises:
        UnknownNameError: ``mode`` is not ``off``, ``fixed`` or ``on``.
    """
    if mode not in MODES:
        raise UnknownNameError("random-layers mode", mode, MODES)
    calls = _RandomCalls(mode, seed)
    if mode == "on":
        yield calls
        return
    depth = [0]

    def enter(module, args):
        if depth[0] == 0:
            calls.position = 0
        depth[0] += 1

    def leave(module, args, output):
        depth[0] = max(depth[0] - 1, 0)

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    try:
        with calls:
            yield calls
    finally:
        for handle in handles:
            handle.remove()
