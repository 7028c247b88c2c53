"""Hessian-vector products of a model's loss on one batch, by the faster of two backends.

MATH.md §5 (Deshmukh, "Batch Norm" (notes, 2020)): the descent check needs ``d^T H d`` and the spectrum needs ``H v`` for the
Hessian ``H`` of the minibatch loss ``L(theta) = loss_fn(f(x; theta), y)`` with respect to all
parameters, or to one parameter group (then ``H`` is that group's diagonal block ``H_gg``).

* ``double_backward``: ``g = dL/dtheta`` with ``create_graph=True``, then ``H v = d(g . v)/dtheta``;
  the graph of ``g`` is kept, so later products cost one backward pass of the backward pass.
* ``func``: forward-over-reverse, ``H v = jvp(grad(L), (theta,), (v,))`` with
  ``torch.func.functional_call``.

``backend="auto"`` (:func:`select_backend`) costs about one product: the first double-backward
product (which also builds the graph that later products reuse) is timed; when it is faster than
:data:`FAST_PRODUCT` or slower than the time the caller allows for trying (``trial_seconds``, a
small share of the time budget), double backward is kept after that one product; otherwise one
more double-backward product and two ``func`` products are timed and the faster kept (on CPU,
``func`` through training-mode BatchNorm is often much slower). The choice is cached per user
model, dtype, full or block operator and whether the mode normalizes with batch statistics
(:data:`BACKEND_CACHE`): train and eval mode differ in the cost of a product only through
BatchNorm's batch statistics (and dropout, which changes no shapes), so a model without BatchNorm
shares one choice across the modes, and later operators on the same model skip it.

``chunks`` (from :meth:`BatchLoss.example_chunks`) computes products and gradients exactly from example chunks when
the loss decomposes as ``L = sum_c w_c L_c`` with ``w_c = n_c / n`` (a mean over examples of a
model that does not couple the examples in this mode): ``H v = sum_c w_c H_c v`` and
``g = sum_c w_c g_c``. :meth:`BatchLoss.example_chunks` verifies the decomposition on the batch
before it is used; the graph of one chunk at a time is alive, none is kept between products, so a
product costs a forward, a backward and a double backward of every chunk.

Everything runs on a deep copy of the
user's model, so its parameters, buffers and flags are never touched; in ``train`` mode the copy's
BatchNorms stop tracking running statistics, so they normalize with batch statistics and update
nothing, and in ``eval`` mode they use the running statistics. Attention runs with the math kernel
of scaled dot-product attention, the one with a second derivative.
"""

from __future__ import annotations

import copy
import math
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

from normscope.batch import cast_inputs, forward, size, take
from normscope.budget import HVP_MEMORY
from normscope.errors import InvalidArgumentError, UnknownNameError

LossFn = Callable[[Tensor, Tensor], Tensor]
MODES = ("train", "eval")
BACKENDS = ("auto", "double_backward", "func")
FAST_PRODUCT = 0.05
DECOMPOSITION_TOL = 1e-12
GRAPH_FACTOR = 3.0
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

    @property
    def couples_examples(self) -> bool:
        """Whether the mode normalizes with batch statistics (train mode through a BatchNorm)."""
        return self.mode == "train" and any(isinstance(m, _BatchNorm) for m in self.model.modules())

    def on_examples(self, index: slice) -> "BatchLoss":
        """A shallow twin of this loss on the examples ``index`` of the batch (same copy and parameters)."""
        twin = copy.copy(self)
        twin.inputs, twin.targets = take((self.inputs, self.targets), index)
        return twin

    def example_chunks(self, chunk: int) -> list[tuple[float, "BatchLoss"]]:
        """``[(w_c, L_c)]`` over consecutive chunks of ``chunk`` examples, ``w_c = n_c / n``, after
        checking in float64 that ``L = sum_c w_c L_c`` to :data:`DECOMPOSITION_TOL` (relative) at
        the parameters and at a seeded perturbation of them (1% of each tensor's RMS), so that
        ``g = sum_c w_c g_c`` and ``H v = sum_c w_c H_c v`` hold exactly.

        Raises:
            InvalidArgumentError: the loss is not float64, or it is not the example-weighted mean
                of the chunks' losses (a model that couples the examples in this mode, such as
                BatchNorm with batch statistics, or a loss that is no mean over examples).
        """
        if self.params and next(iter(self.params.values())).dtype != torch.float64:
            raise InvalidArgumentError("example chunks are verified only in float64; use dtype=torch.float64")
        n = size(self.inputs)
        parts = [self.on_examples(slice(start, start + chunk)) for start in range(0, n, chunk)]
        weights = [size(part.inputs) / n for part in parts]
        generator = torch.Generator(device="cpu").manual_seed(0)
        nudge = {name: p + 0.01 * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                 for name, p in self.params.items()}
        with torch.no_grad():
            for at in (None, nudge):
                full = float(self(at))
                split = sum(w * float(part(at)) for w, part in zip(weights, parts))
                if not abs(full - split) <= DECOMPOSITION_TOL * max(1.0, abs(full)):
                    raise InvalidArgumentError(
                        f"the {self.mode}-mode loss on the batch ({full:.17g}) is not the example-weighted mean of its "
                        f"{len(parts)} chunks' losses ({split:.17g}): the model couples the examples in this mode or the "
                        "loss is no mean over examples")
        return list(zip(weights, parts))


def graph_chunk(loss: BatchLoss, memory: int = HVP_MEMORY, factor: float = GRAPH_FACTOR) -> int | None:
    """Examples per chunk so that one chunk's double-backward graph stays within ``memory`` bytes;
    ``None`` when the whole batch fits. The graph of ``c`` examples is estimated as ``factor``
    times the bytes its forward saves for backward, ``c * (s_2 - s_1)`` with ``s_k`` the bytes
    saved by a forward of the first ``k`` examples (counted by saved-tensor hooks). Chunks are
    balanced: ``ceil(n / ceil(n / c))`` examples each."""
    n = size(loss.inputs)
    saved = []
    for k in (1, 2):
        count = [0]

        def pack(t: Tensor) -> Tensor:
            count[0] += t.numel() * t.element_size()
            return t

        part = loss.on_examples(slice(0, k))
        leaves = {name: p.detach().requires_grad_(True) for name, p in part.params.items()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            part(leaves)
        saved.append(count[0])
    per_example = factor * max(saved[1] - saved[0], 1)
    chunk = max(1, int(memory // per_example))
    if n < 2 or chunk >= n:
        return None
    return math.ceil(n / math.ceil(n / chunk))


class HessianOperator:
    """``v -> H v`` for the block of the Hessian ``H = d^2 L / dtheta^2`` of a :class:`BatchLoss`
    over ``names`` (MATH.md §5).

    Vectors are flat, in the order of ``names``; :meth:`linear_operator` wraps the product as a
    float64 ``scipy.sparse.linalg.LinearOperator`` and counts products in :attr:`products`.
    ``chunks``: the verified ``[(w_c, L_c)]`` of :meth:`BatchLoss.example_chunks` for exact
    chunked products and gradients; ``None``: the whole batch at once (:attr:`chunk` is the
    examples of the first chunk, or ``None``).
    ``trial_seconds``: what ``backend="auto"`` may spend trying ``func`` (:func:`select_backend`);
    the products it ran are in :attr:`selection_products`.
    """

    def __init__(self, loss: BatchLoss, names: Sequence[str] | None = None, backend: str = "auto",
                 chunks: list[tuple[float, BatchLoss]] | None = None, trial_seconds: float = math.inf) -> None:
        if backend not in BACKENDS:
            raise UnknownNameError("HVP backend", backend, BACKENDS)
        self.loss = loss
        self.chunks = chunks
        self.chunk = None if chunks is None else size(chunks[0][1].inputs)
        self.names = list(loss.params) if names is None else list(names)
        unknown = [n for n in self.names if n not in loss.params]
        if unknown:
            raise UnknownNameError("parameter", unknown[0], list(loss.params))
        self.shapes = [loss.params[n].shape for n in self.names]
        self.sizes = [int(loss.params[n].numel()) for n in self.names]
        self.numel = sum(self.sizes)
        self.products = 0
        self.seconds = math.nan
        self.timings: dict[str, float] = {}
        self._gradient: Tensor | None = None
        self._graph: tuple[list[Tensor], list[Tensor]] | None = None
        self._parent: HessianOperator | None = None
        self.selection_products = 0
        self.backend = cached_backend(self, trial_seconds) if backend == "auto" else backend

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
        """The flat gradient ``dL/dtheta`` over ``names``, computed once: ``sum_c w_c g_c`` with
        chunks, the kept double-backward graph's when there is one (no new pass), else one
        backward pass."""
        if self._gradient is None:
            if self.chunks is not None:
                self._gradient = sum(w * self.flatten(part.gradient(self.names)) for w, part in self.chunks)
            elif self._graph is not None:
                self._gradient = torch.cat([g.detach().reshape(-1) for g in self._graph[1]])
            else:
                self._gradient = self.flatten(self.loss.gradient(self.names))
        return self._gradient

    def release(self) -> None:
        """Drop the kept double-backward graph (the next product rebuilds it)."""
        self._graph = None

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` (flat, in the parameters' dtype and device); ``sum_c w_c H_c v`` with chunks.
        Counted in :attr:`products`; its wall seconds in :attr:`seconds`."""
        self.products += 1
        start = time.perf_counter()
        v = v.to(self.dtype)
        if self.chunks is not None:
            product = self._hvp_func if self.backend == "func" else self._hvp_once
            hv = sum(w * product(v, part) for w, part in self.chunks)
        elif self.backend == "func":
            hv = self._hvp_func(v, self.loss)
        else:
            hv = self._hvp_double_backward(v)
        self.seconds = time.perf_counter() - start
        return hv

    def block(self, names: Sequence[str]) -> "HessianOperator":
        """The operator of the diagonal block ``H_gg`` over ``names`` (same backend and chunks);
        with double backward on the whole batch it shares this operator's gradient graph:
        ``H_gg v_g = (H [v_g; 0])_g``."""
        child = HessianOperator(self.loss, names, self.backend, self.chunks)
        if self.backend == "double_backward" and self.chunks is None:
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

    def _hvp_once(self, v: Tensor, loss: BatchLoss) -> Tensor:
        """``H v`` of ``loss`` by double backward, its graph freed on return."""
        leaves = [loss.params[n].detach().requires_grad_(True) for n in self.names]
        grads = torch.autograd.grad(loss(dict(zip(self.names, leaves))), leaves, create_graph=True)
        hv = torch.autograd.grad(grads, leaves, grad_outputs=list(self.split(v).values()), allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hv, leaves)])

    def _hvp_func(self, v: Tensor, loss: BatchLoss) -> Tensor:
        primals = {n: loss.params[n] for n in self.names}
        _, hv = jvp(grad(loss), (primals,), (self.split(v),))
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


def cached_backend(op: HessianOperator, trial_seconds: float = math.inf) -> str:
    """:func:`select_backend` once per (user model, dtype, full or block operator, batch
    statistics or not): the modes share a choice unless train mode normalizes with BatchNorm's
    batch statistics (see the module docstring). Later calls reuse the choice, copy its timings
    into ``op.timings`` and run no product."""
    source = op.loss.source()
    key = (op.dtype, op.names == list(op.loss.params), op.loss.couples_examples)
    cache = BACKEND_CACHE.setdefault(source, {}) if source is not None else {}
    if key not in cache:
        cache[key] = (select_backend(op, trial_seconds), dict(op.timings))
    backend, timings = cache[key]
    op.timings.update(timings)
    return backend


def select_backend(op: HessianOperator, trial_seconds: float = math.inf, good_enough: float = FAST_PRODUCT) -> str:
    """The backend for ``op`` from at most 4 products, usually 1.

    1. One double-backward product, timed (``t``; it builds the graph that later products of
       ``op`` reuse, so it is the slowest one). Kept after that product when ``t < good_enough``
       (``func``'s first use in a process imports torch's compiler stack, seconds that so small a
       product cannot repay) or when ``4 t > trial_seconds`` (trying ``func`` is not affordable).
    2. Otherwise one more double-backward product (the cost with the graph kept) and two ``func``
       products (a warm-up and a timed one); the faster backend is kept. A backend that raises
       on this model (e.g. ``func`` through a layer that mutates buffers) is not chosen.

    Only one backend's memory is held at a time (the double-backward graph is dropped before
    ``func`` runs and rebuilt by the next product if double backward wins). The seconds are left
    in ``op.timings`` (a single double-backward figure is the first product, an upper bound on
    later ones), the number of products in ``op.selection_products``.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(op.numel, generator=generator, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    op.backend = "double_backward"
    first = op.timings["double_backward"] = _timed(op, v)
    if first < good_enough or (math.isfinite(first) and 4 * first > trial_seconds):
        return _chosen(op)
    if math.isfinite(first):
        op.timings["double_backward"] = _timed(op, v)
    op.release()  # one backend's memory at a time
    op.backend = "func"
    op.timings["func"] = _timed(op, v) if _timed(op, v) < math.inf else math.inf
    return _chosen(op)


def _timed(op: HessianOperator, v: Tensor) -> float:
    """Seconds of one product of ``op`` with its current backend; ``inf`` if the backend raises."""
    try:
        return _seconds(op, v)
    except (RuntimeError, NotImplementedError, ValueError):
        return math.inf


def _chosen(op: HessianOperator) -> str:
    best = min(op.timings, key=op.timings.get)
    if op.timings[best] == math.inf:
        raise InvalidArgumentError(f"no Hessian-vector product backend runs on this model (tried {BACKENDS[1:]})")
    op.selection_products, op.products = op.products, 0
    if best != "double_backward":
        op.release()
    return best
