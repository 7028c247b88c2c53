"""Hessian-vector products of a model's loss on one batch, by the faster of two backends.

MATH.md §5 (Deshmukh, "Batch Norm" (notes, 2020)): the descent check needs ``d^T H d`` and the spectrum needs ``H v`` for the
Hessian ``H`` of the minibatch loss ``L(theta) = loss_fn(f(x; theta), y)`` with respect to all
parameters, or to one parameter group (then ``H`` is that group's diagonal block ``H_gg``).

* ``double_backward``: ``g = dL/dtheta`` with ``create_graph=True``, then ``H v = d(g . v)/dtheta``;
  the graph of ``g`` is kept, so later products cost one backward pass of the backward pass.
* ``func``: forward-over-reverse, ``H v = jvp(grad(L), (theta,), (v,))`` with
  ``torch.func.functional_call``.

``backend="auto"`` times both once on the model at hand and keeps the faster (on CPU, ``func``
through training-mode BatchNorm is often much slower); the choice and its timings are cached per
user model, mode and dtype (:data:`BACKEND_CACHE`), so later operators on the same model skip it. Everything runs on a deep copy of the
user's model, so its parameters, buffers and flags are never touched; in ``train`` mode the copy's
BatchNorms stop tracking running statistics, so they normalize with batch statistics and update
nothing, and in ``eval`` mode they use the running statistics. Attention runs with the math kernel
of scaled dot-product attention, the one with a second derivative.
"""

from __future__ import annotations

import copy
import time
import weakref
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from normscope.batch import cast_inputs, forward
from normscope.errors import InvalidArgumentError, UnknownNameError

LossFn = Callable[[Tensor, Tensor], Tensor]
MODES = ("train", "eval")
BACKENDS = ("auto", "double_backward", "func")
FAST_PRODUCT = 0.05
BACKEND_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class BatchLoss:
    """The loss of a private copy of ``model`` on one batch, as a function of its parameters
    (the minibatch loss of Deshmukh's (2020) Taylor expansion, MATH.md §5).

    ``L(theta) = loss_fn(functional_call(copy, theta, x), y)``. In ``mode="train"`` the copy's
    BatchNorms normalize with batch statistics and update no running statistics; in
    ``mode="eval"`` they use the running statistics. ``dtype`` (e.g. ``torch.float64``) casts the
    copy and the inputs; ``None`` keeps the model's dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn = F.cross_entropy,
        mode: str = "train",
        dtype: torch.dtype | None = None,
    ) -> None:
        if mode not in MODES:
            raise UnknownNameError("mode", mode, MODES)
        net = copy.deepcopy(model)
        if dtype is not None:
            net = net.to(dtype)
            inputs = cast_inputs(inputs, dtype)
        net.train(mode == "train")
        net.zero_grad(set_to_none=True)
        if mode == "train":
            for m in net.modules():
                if isinstance(m, _BatchNorm):
                    m.track_running_stats = False
        self.model, self.inputs, self.targets, self.loss_fn, self.mode = net, inputs, targets, loss_fn, mode
        self.source = weakref.ref(model)
        self.params: dict[str, Tensor] = {n: p.detach() for n, p in net.named_parameters()}

    def __call__(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """``L`` at ``self.params`` with the entries of ``params`` substituted."""
        merged = self.params if not params else {**self.params, **params}
        with sdpa_kernel(SDPBackend.MATH):
            return self.loss_fn(forward(self.model, self.inputs, merged), self.targets)

    def with_params(self, params: dict[str, Tensor]) -> "BatchLoss":
        """A shallow twin of this loss evaluated at other parameter values (same copy and batch)."""
        twin = copy.copy(self)
        twin.params = {**self.params, **{n: p.detach() for n, p in params.items()}}
        return twin

    def layers(self) -> dict[str, list[str]]:
        """Parameter groups = layers: the parameters each module owns directly, by module path."""
        groups: dict[str, list[str]] = {}
        for name in self.params:
            groups.setdefault(name.rpartition(".")[0] or "<root>", []).append(name)
        return groups

    def gradient(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``dL/dtheta`` for the parameters ``names`` (all by default)."""
        names = list(self.params) if names is None else list(names)
        leaves = {n: self.params[n].detach().requires_grad_(True) for n in names}
        return dict(zip(names, torch.autograd.grad(self(leaves), list(leaves.values()))))


class HessianOperator:
    """``v -> H v`` for the block of the Hessian ``H = d^2 L / dtheta^2`` of a :class:`BatchLoss`
    over ``names`` (MATH.md §5).

    Vectors are flat, in the order of ``names``; :meth:`linear_operator` wraps the product as a
    float64 ``scipy.sparse.linalg.LinearOperator`` and counts products in :attr:`products`.
    """

    def __init__(self, loss: BatchLoss, names: Sequence[str] | None = None, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise UnknownNameError("HVP backend", backend, BACKENDS)
        self.loss = loss
        self.names = list(loss.params) if names is None else list(names)
        unknown = [n for n in self.names if n not in loss.params]
        if unknown:
            raise UnknownNameError("parameter", unknown[0], list(loss.params))
        self.shapes = [loss.params[n].shape for n in self.names]
        self.sizes = [int(loss.params[n].numel()) for n in self.names]
        self.numel = sum(self.sizes)
        self.products = 0
        self.timings: dict[str, float] = {}
        self._graph: tuple[list[Tensor], list[Tensor]] | None = None
        self._parent: HessianOperator | None = None
        self.backend = cached_backend(self) if backend == "auto" else backend

    @property
    def dtype(self) -> torch.dtype:
        return self.loss.params[self.names[0]].dtype

    @property
    def device(self) -> torch.device:
        return self.loss.params[self.names[0]].device

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat vector as a dict of tensors shaped like the parameters."""
        return {n: t.reshape(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """A dict of parameter-shaped tensors as one flat vector in the order of ``names``."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def gradient(self) -> Tensor:
        """The flat gradient ``dL/dtheta`` over ``names``."""
        return self.flatten(self.loss.gradient(self.names))

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` (flat, in the parameters' dtype and device)."""
        self.products += 1
        v = v.to(self.dtype)
        if self.backend == "func":
            return self._hvp_func(v)
        return self._hvp_double_backward(v)

    def block(self, names: Sequence[str]) -> "HessianOperator":
        """The operator of the diagonal block ``H_gg`` over ``names``; with double backward it
        shares this operator's gradient graph: ``H_gg v_g = (H [v_g; 0])_g``."""
        child = HessianOperator(self.loss, names, self.backend)
        if self.backend == "double_backward":
            child._parent = self
        return child

    def _hvp_double_backward(self, v: Tensor) -> Tensor:
        if self._parent is not None:
            padded = {n: torch.zeros_like(p) for n, p in self._parent.loss.params.items() if n in self._parent.names}
            padded.update(self.split(v))
            return self.flatten(self._parent.split(self._parent._hvp_double_backward(self._parent.flatten(padded))))
        if self._graph is None:
            leaves = [self.loss.params[n].detach().requires_grad_(True) for n in self.names]
            grads = torch.autograd.grad(self.loss(dict(zip(self.names, leaves))), leaves, create_graph=True)
            self._graph = (leaves, list(grads))
        leaves, grads = self._graph
        parts = list(self.split(v).values())
        hv = torch.autograd.grad(grads, leaves, grad_outputs=parts, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hv, leaves)])

    def _hvp_func(self, v: Tensor) -> Tensor:
        primals = {n: self.loss.params[n] for n in self.names}
        _, hv = jvp(grad(self.loss), (primals,), (self.split(v),))
        return self.flatten(hv)

    def quadratic_form(self, d: Tensor) -> float:
        """``d^T H d`` in float64 from one product."""
        return float(torch.dot(d.double(), self(d).double()))

    def linear_operator(self) -> LinearOperator:
        """``H`` as a float64 ``LinearOperator`` (numpy in, numpy out) for ``scipy.sparse.linalg``."""

        def matvec(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), device=self.device)
            return self(v).detach().double().cpu().numpy()

        return LinearOperator((self.numel, self.numel), matvec=matvec, dtype=np.float64)


def _seconds(op: HessianOperator, v: Tensor) -> float:
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    start = time.perf_counter()
    op(v)
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    return time.perf_counter() - start


def cached_backend(op: HessianOperator) -> str:
    """:func:`select_backend` once per (user model, mode, dtype, full or block operator); later
    calls reuse the choice and copy its timings into ``op.timings``."""
    source = op.loss.source()
    key = (op.loss.mode, op.dtype, op.names == list(op.loss.params))
    cache = BACKEND_CACHE.setdefault(source, {}) if source is not None else {}
    if key not in cache:
        cache[key] = (select_backend(op), dict(op.timings))
    backend, timings = cache[key]
    op.timings.update(timings)
    return backend


def select_backend(op: HessianOperator, repeats: int = 1, good_enough: float = FAST_PRODUCT) -> str:
    """Time one product with each backend (the best of ``repeats`` after a warm-up call) and
    return the faster name.

    Double backward is timed first; a product faster than ``good_enough`` seconds is kept without
    trying ``func``, whose first use in a process imports torch's compiler stack (seconds) that so
    small a product cannot repay. A backend that raises on this model (e.g. ``func`` through a
    layer that mutates buffers in its forward) is not chosen. The measured seconds are left in
    ``op.timings``.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(op.numel, generator=generator, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    for backend in BACKENDS[1:]:
        op.backend = backend
        try:
            op(v)
            op.timings[backend] = min(_seconds(op, v) for _ in range(repeats))
        except (RuntimeError, NotImplementedError, ValueError):
            op.timings[backend] = float("inf")
        if op.timings[backend] < good_enough:
            break
    op.products = 0
    best = min(op.timings, key=op.timings.get)
    if op.timings[best] == float("inf"):
        raise InvalidArgumentError(f"no Hessian-vector product backend runs on this model (tried {BACKENDS[1:]})")
    return best
