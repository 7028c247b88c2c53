"""Hessian-vector products of a model's loss on one batch, by the faster of two backends.

MATH.md §5 (Deshmukh, "Batch Norm" (notes, 2020)): the descent check needs ``d^T H d`` and the spectrum needs ``H v`` for the
Hessian ``H`` of the minibatch loss ``L(theta) = loss_fn(f(x; theta), y)`` with respect to all
parameters, or to one parameter group (then ``H`` is that group's diagonal block ``H_gg``).

* ``double_backward``: ``g = dL/dtheta`` with ``create_graph=True``, then ``H v = d(g . v)/dtheta``;
  the graph of ``g`` is kept, so later products cost one backward pass of the backward pass.
* ``func``: forward-over-reverse, ``H v = jvp(grad(L), (theta,), (v,))`` with
  ``torch.func.functional_call``.

``backend="auto"`` (:func:`select_backend`) is chosen at the operator's first product, which is
computed by double backward (building the graph that later products reuse) and timed: when it
is faster than :data:`FAST_PRODUCT` or slower than a quarter of the time the caller allows for
trying (``trial_seconds``, a small share of the time budget), double backward is kept and the
choice cost nothing beyond the product asked for; otherwise one more double-backward product
and two ``func`` products are timed and the faster kept (on CPU, ``func`` through
training-mode BatchNorm is often much slower). The choice is cached per user
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

``split`` (a :class:`~normscope.distributed.World` of several ranks, e.g.
:func:`normscope.distributed.current` under ``torchrun``) splits the products and the gradient
over the ranks where the loss decomposes (:func:`rank_pieces`): the batch is cut into ``W m``
balanced pieces (``m`` pieces per rank: 1, or as many as the memory chunks need), rank ``r``
computes the pieces ``i`` with ``i % W == r`` and the partial sums ``sum_i w_i H_i v`` and
``sum_i w_i g_i`` are all-reduced, so every rank ends with the vector of one process. Such an
operator is *collective*: every rank must construct it and call every product, gradient,
:meth:`HessianOperator.block` and :meth:`HessianOperator.local` in the same order (lockstep
code). Work shared out by item (the Hutchinson samples of a trace, the layers' Lanczos runs,
:func:`normscope.distributed.share_out`) calls products on the owning rank only and must use an
unsplit operator (``split=None``, the default, or :meth:`HessianOperator.local`), which runs no
collective. Where the loss couples the examples (training-mode BatchNorm) or is not float64 the
operator stays replicated: every rank computes the whole product.

Precision (``precision`` of :func:`curvature_dtype`): products run in the model's dtype
(``"model"``, float32 for most models; float16/bfloat16 models are raised to float32) or in
float64 (``"float64"``, the exact path); callers keep their Lanczos bases, tridiagonals,
reorthogonalization and trace sums in float64 whatever the products' dtype.

Symmetry (:func:`settle_symmetry`): ``nn.Embedding(padding_idx=p)`` masks row ``p`` of its
weight's gradient, so autograd's gradient is ``M grad L`` (``M`` zeroes the padding rows) and no
optimizer moves that row: double backward gives ``M H M``, but ``torch.func``'s
forward-over-reverse product is ``M H``, which is not symmetric (a Lanczos run on it is wrong).
The padding rows of untied embeddings are therefore excluded from every operator
(``v -> M H (M v)``: the Hessian over the coordinates autograd trains, the same for both
backends). When the backend is settled (chosen, given or cached), the operator's symmetry is
checked once per model, dtype, batch-statistics mode and backend from ``v^T H w`` against
``w^T H v``, ``v`` the vector of the operator's first product and ``w`` seeded Gaussian (one more product); where it fails the other backend is tried and kept
if it passes. The outcome is in :attr:`HessianOperator.symmetry`.

Unused parameters: a parameter the loss does not use on this batch (a masked-spectrum embedding
in eval mode, a head the loss skips) has no gradient in autograd; it is taken as zero gradient
and zero curvature (``allow_unused``) and named in :attr:`HessianOperator.unused`.

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
from normscope.budget import HVP_MEMORY, saved_bytes
from normscope.distributed import World, all_reduce, all_reduce_float
from normscope.errors import InvalidArgumentError, UnknownNameError

LossFn = Callable[[Tensor, Tensor], Tensor]
MODES = ("train", "eval")
BACKENDS = ("auto", "double_backward", "func")
FAST_PRODUCT = 0.25  # seconds of a first product (graph included) too small to repay trying func
DECOMPOSITION_TOL = 1e-12
GRAPH_FACTOR = 3.0
BACKEND_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
SYMMETRY_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
PRECISIONS = ("model", "float64")
SYMMETRY_SEED = 104729
SYMMETRY_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
"""Largest ``|v^T H w - w^T H v| / s`` of a symmetric operator, ``s = (||v|| ||Hw|| + ||w|| ||Hv||) / (2 sqrt(n))``
the typical size of either form for Gaussian ``v, w``. Rounding stays well below: 3e-16 to 4e-16 in float64 (a BERT
from a config), 2e-8 to 6e-7 in float32 (the five reference models in both modes, the BERT), measured with
three seeds each; a real asymmetry is larger (``torch.func`` through a padding row: 5e-5; the double backward of
torch's weight norm in a Hubert: 3e-5 to 4e-4)."""


def curvature_dtype(model: nn.Module, precision: str = "model") -> torch.dtype:
    """The dtype of curvature products for ``model``: float64 for ``precision="float64"``; for
    ``"model"`` the dtype of the model's first floating parameter, float32 for float16/bfloat16
    (products in half precision lose too many digits) or a model without one.

    Raises:
        UnknownNameError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise UnknownNameError("precision", precision, PRECISIONS)
    if precision == "float64":
        return torch.float64
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def gradients(value: Tensor, leaves: Sequence[Tensor], create_graph: bool = False) -> tuple[list[Tensor], list[int]]:
    """``d value / d leaves`` with a zero gradient for each leaf the value does not depend on, and
    the indices of those unused leaves."""
    if not value.requires_grad:  # none of the leaves is used
        return [torch.zeros_like(leaf) for leaf in leaves], list(range(len(leaves)))
    found = torch.autograd.grad(value, list(leaves), create_graph=create_graph, allow_unused=True)
    unused = [i for i, g in enumerate(found) if g is None]
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(found, leaves)], unused


def padding_rows(model: nn.Module, names: Sequence[str], sizes: Sequence[int]) -> dict[str, Tensor]:
    """``{"<weight name>[p]": flat indices}`` of the padding row ``p`` of every ``nn.Embedding`` or
    ``nn.EmbeddingBag`` with a ``padding_idx`` whose weight is among ``names`` (flat vectors in the
    order of ``names``, ``sizes`` their lengths) and is not tied to another module (a tied output
    layer gives the row a real gradient)."""
    offsets = dict(zip(names, np.cumsum([0, *sizes[:-1]]).tolist()))
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    rows = {}
    for path, module in model.named_modules():
        index = getattr(module, "padding_idx", None)
        name = f"{path}.weight" if path else "weight"
        if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and index is not None and name in offsets
                and uses[id(module.weight)] == 1):
            width = module.weight.shape[1]
            start = offsets[name] + int(index) * width
            rows[f"{name}[{int(index)}]"] = torch.arange(start, start + width)
    return rows


class BatchLoss:
    """The loss of a private copy of ``model`` on one batch, as a function of its parameters
    (the minibatch loss of Deshmukh's (2020) Taylor expansion, MATH.md §5).

    ``L(theta) = loss_fn(functional_call(copy, theta, x), y)``. In ``mode="train"`` the copy's
    BatchNorms normalize with batch statistics and update no running statistics (an op with
    ``freeze_statistics()``, PopulationNorm, keeps its statistics as they are); in
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
                elif callable(getattr(m, "freeze_statistics", None)):  # an op whose training output reads its own EMAs
                    m.freeze_statistics()
        self.model, self.inputs, self.targets, self.loss_fn, self.mode = net, inputs, targets, loss_fn, mode
        self.source = weakref.ref(model)
        self.params: dict[str, Tensor] = {n: p.detach() for n, p in net.named_parameters()}
        self.unused: set[str] = set()

    def __call__(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """``L`` at ``self.params`` with the entries of ``params`` substituted."""
        merged = self.params if not params else {**self.params, **params}
        with sdpa_kernel(SDPBackend.MATH):
            return self.loss_fn(forward(self.model, self.inputs, merged), self.targets)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the copy's first floating parameter (float32 without one)."""
        return next((p.dtype for p in self.params.values() if p.is_floating_point()), torch.float32)

    def in_float64(self) -> "BatchLoss":
        """This loss in float64: a float64 copy of the copy, at this loss's parameter values, on
        the batch with its floating tensors cast (same mode and loss function)."""
        twin = BatchLoss(self.model, self.inputs, cast_inputs(self.targets, torch.float64), self.loss_fn, self.mode, torch.float64)
        twin.params = {n: p.detach().to(torch.float64) if p.is_floating_point() else p for n, p in self.params.items()}
        return twin

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
        """``dL/dtheta`` for the parameters ``names`` (all by default); zero for a parameter the
        loss does not use, whose names this call leaves in :attr:`unused`."""
        names = list(self.params) if names is None else list(names)
        leaves = {n: self.params[n].detach().requires_grad_(True) for n in names}
        grads, unused = gradients(self(leaves), list(leaves.values()))
        self.unused = {names[i] for i in unused}
        return dict(zip(names, grads))

    @property
    def couples_examples(self) -> bool:
        """Whether the mode normalizes with batch statistics (train mode through a BatchNorm)."""
        return self.mode == "train" and any(isinstance(m, _BatchNorm) for m in self.model.modules())

    def on_examples(self, index: slice) -> "BatchLoss":
        """A shallow twin of this loss on the examples ``index`` of the batch (same copy and parameters)."""
        twin = copy.copy(self)
        twin.inputs, twin.targets = take((self.inputs, self.targets), index)
        return twin

    def example_chunks(self, chunk: int | None = None, count: int | None = None) -> list[tuple[float, "BatchLoss"]]:
        """``[(w_c, L_c)]`` over consecutive chunks of ``chunk`` examples (or, given ``count``
        instead, ``count`` balanced chunks ``[c n // count, (c + 1) n // count)``), ``w_c = n_c / n``, after
        checking in float64 that ``L = sum_c w_c L_c`` to :data:`DECOMPOSITION_TOL` (relative) at
        the parameters and at a seeded perturbation of them (1% of each tensor's RMS), so that
        ``g = sum_c w_c g_c`` and ``H v = sum_c w_c H_c v`` hold exactly. A loss in another dtype is
        checked on its float64 twin (:meth:`in_float64`): the decomposition is a property of the
        model and the loss, and float64 separates it from rounding.

        Raises:
            InvalidArgumentError: the loss is not the example-weighted mean
                of the chunks' losses (a model that couples the examples in this mode, such as
                BatchNorm with batch statistics, or a loss that is no mean over examples), or neither or both of ``chunk`` and ``count`` given, or
                more chunks than examples.
        """
        if (chunk is None) == (count is None):
            raise InvalidArgumentError("give example_chunks either chunk (examples per chunk) or count (chunks)")
        n = size(self.inputs)
        if count is not None and not 1 <= count <= n:
            raise InvalidArgumentError(f"{count} chunks of {n} examples: every chunk needs an example")
        bounds = ([(start, start + chunk) for start in range(0, n, chunk)] if chunk is not None
                  else [(c * n // count, (c + 1) * n // count) for c in range(count)])
        parts = [self.on_examples(slice(start, stop)) for start, stop in bounds]
        weights = [size(part.inputs) / n for part in parts]
        exact = self if self.dtype == torch.float64 else self.in_float64()
        checked = [exact.on_examples(slice(start, stop)) for start, stop in bounds]
        generator = torch.Generator(device="cpu").manual_seed(0)
        nudge = {name: p + 0.01 * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                 for name, p in exact.params.items()}
        with torch.no_grad():
            for at in (None, nudge):
                full = float(exact(at))
                split = sum(w * float(part(at)) for w, part in zip(weights, checked))
                if not abs(full - split) <= DECOMPOSITION_TOL * max(1.0, abs(full)):
                    raise InvalidArgumentError(
                        f"the {self.mode}-mode loss on the batch ({full:.17g}) is not the example-weighted mean of its "
                        f"{len(parts)} chunks' losses ({split:.17g}): the model couples the examples in this mode or the "
                        "loss is no mean over examples")
        return list(zip(weights, parts))


def graph_chunk(loss: BatchLoss, memory: int = HVP_MEMORY, factor: float = GRAPH_FACTOR) -> int | None:
    """Examples per chunk so that one chunk's double-backward graph stays within ``memory`` bytes;
    ``None`` when the whole batch fits, when it has fewer than 4 examples, or when the mode
    couples the examples (:attr:`BatchLoss.couples_examples`: no chunks possible). The graph of
    ``c`` examples is estimated as ``factor * c * (s_4 - s_2) / 2``, with ``s_k`` the bytes saved
    for backward by a forward of the first ``k`` examples (:func:`normscope.budget.saved_bytes`, per saved tensor; the
    difference leaves out what does not grow with the examples, such as the weights). Chunks
    are balanced: ``ceil(n / ceil(n / c))`` examples each."""
    n = size(loss.inputs)
    if n < 4 or loss.couples_examples:
        return None
    saved = []
    for k in (2, 4):
        part = loss.on_examples(slice(0, k))
        leaves = {name: p.detach().requires_grad_(True) for name, p in part.params.items()}
        saved.append(saved_bytes(lambda: part(leaves), unique=False))
    per_example = factor * max(saved[1] - saved[0], 1) / 2
    chunk = max(1, int(memory // per_example))
    if chunk >= n:
        return None
    return math.ceil(n / math.ceil(n / chunk))


def rank_pieces(loss: BatchLoss, world: World, chunks: list[tuple[float, BatchLoss]] | None = None
                ) -> list[tuple[float, BatchLoss]] | None:
    """The verified ``[(w_i, L_i)]`` to split ``loss``'s products over the ranks of ``world``:
    ``W m`` balanced consecutive pieces (:meth:`BatchLoss.example_chunks` with ``count``; sizes
    differ by one example at most), ``m = ceil(len(chunks) / W)`` so that no piece is larger than
    a memory chunk (``m = 1`` when ``chunks`` is ``None``: the whole batch's graph fits), at most
    ``n // W``. Rank ``r`` owns the pieces ``i`` with ``i % W == r`` (:meth:`World.owns`): ``m``
    each, so every rank has work and the same number of examples to one. ``None`` (stay
    replicated) for one rank, fewer examples than ranks, or a loss that does not decompose
    (not float64, or examples coupled, e.g. by training-mode BatchNorm).

    Collective when ``world`` is active (every rank calls it at the same point): the verdict and
    the piece count are all-reduced, so that every rank splits the same way or none does.
    """
    if not world.active:
        return None
    n = size(loss.inputs)
    per_rank = min(1 if chunks is None else math.ceil(len(chunks) / world.size), n // world.size)
    pieces = None
    if per_rank >= 1 and loss.dtype == torch.float64:
        try:
            pieces = loss.example_chunks(count=world.size * per_rank)
        except InvalidArgumentError:
            pieces = None
    count = 0 if pieces is None else len(pieces)
    spread = all_reduce(torch.tensor([float(pieces is None), count, -count], dtype=torch.float64), world, op="max")
    if spread[0] > 0 or spread[1] != -spread[2]:
        return None
    return pieces


class HessianOperator:
    """``v -> H v`` for the block of the Hessian ``H = d^2 L / dtheta^2`` of a :class:`BatchLoss`
    over ``names`` (MATH.md §5).

    Vectors are flat, in the order of ``names``; :meth:`linear_operator` wraps the product as a
    float64 ``scipy.sparse.linalg.LinearOperator`` and counts products in :attr:`products`.
    ``chunks``: the verified ``[(w_c, L_c)]`` of :meth:`BatchLoss.example_chunks` for exact
    chunked products and gradients; ``None``: the whole batch at once (:attr:`chunk` is the
    examples of the first chunk, or ``None``).
    ``trial_seconds``: what ``backend="auto"`` may spend trying ``func`` (:func:`select_backend`);
    :attr:`backend` is ``None`` until the first product (or :meth:`block`) chooses it, and the
    products the choice ran beyond that first one are in :attr:`selection_products`.
    ``split``: the ranks to split products and gradient over where the loss decomposes
    (:func:`rank_pieces`, module docstring); :attr:`world` is that world when the operator splits
    (then it is collective: every rank calls it in lockstep; :meth:`local` gives an unsplit twin
    for work done on one rank) and ``None`` when it does not (replicated, or one process);
    :attr:`pieces` the verified pieces of all ranks. With ``chunks=None`` and double backward each
    rank keeps the graphs of its own pieces, as the whole-batch operator keeps the batch's; with
    memory ``chunks`` every piece's graph is freed after use. Constructing with an active
    ``split`` is itself collective.
    """

    def __init__(self, loss: BatchLoss, names: Sequence[str] | None = None, backend: str = "auto",
                 chunks: list[tuple[float, BatchLoss]] | None = None, trial_seconds: float = math.inf,
                 split: World | None = None) -> None:
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
        self.pieces = None if split is None else rank_pieces(loss, split, chunks)
        self.world: World | None = split if self.pieces is not None else None
        self._piece_graphs: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.selection_products = 0
        self.trial_seconds = trial_seconds
        self.unused: set[str] | None = None
        self.symmetry: dict | None = None
        self.mask: Tensor | None = None
        self.backend: str | None = cached_backend(self) if backend == "auto" else backend

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
        """The flat gradient ``dL/dtheta`` over ``names``, computed once: split over ranks, the
        all-reduced ``sum_i w_i g_i`` of every rank's own pieces (collective; from the kept graphs
        of the pieces for a double-backward operator without memory chunks); else ``sum_c w_c g_c``
        with chunks; else, for a whole-batch double-backward operator, from the graph its products keep
        (built now if need be, so that the products after it cost no second gradient); else one
        backward pass."""
        if self._gradient is None:
            if self.world is not None:
                self._gradient = self._reduced(self._own_gradient)
            elif self.chunks is not None:
                self._gradient = sum(w * self.flatten(self._noted(part.gradient(self.names), part)) for w, part in self.chunks)
            elif self._graph is not None or (self.backend == "double_backward" and self._parent is None):
                _, grads = self._kept_graph()
                self._gradient = torch.cat([g.detach().reshape(-1) for g in grads])
            else:
                self._gradient = self.flatten(self._noted(self.loss.gradient(self.names), self.loss))
        return self._gradient

    def _noted(self, grads: dict[str, Tensor], loss: BatchLoss) -> dict[str, Tensor]:
        """``grads``, after noting the parameters ``loss`` left unused (:meth:`_note_unused`)."""
        self._note_unused(loss.unused)
        return grads

    def _note_unused(self, found: set[str]) -> None:
        """Keep in :attr:`unused` the parameters unused by every loss seen so far (each chunk's,
        each piece's): a parameter one chunk uses is used."""
        self.unused = set(found) if self.unused is None else self.unused & set(found)

    def unused_parameters(self) -> list[str]:
        """The parameters of this operator that the loss does not use (zero gradient and zero
        curvature), in the order of :attr:`names`; known once a gradient has been computed."""
        return [n for n in self.names if n in (self.unused or ())]

    def release(self) -> None:
        """Drop the kept double-backward graphs (the next product rebuilds them)."""
        self._graph = None
        self._piece_graphs.clear()

    def local(self) -> "HessianOperator":
        """This operator without the split over ranks (itself when it does not split): the same
        loss, parameters, backend and memory chunks, every product computed whole on the calling
        rank with no collective, for work that runs on one rank only (an item of
        :func:`normscope.distributed.share_out`, a Hutchinson sample owned by one rank). Its graph
        is its own (:meth:`release` it after use). An ``auto`` backend not chosen yet is chosen
        first, from a product (collective)."""
        if self.world is None:
            return self
        if self.backend is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
            self(torch.randn(self.numel, generator=generator, dtype=torch.float64).to(self.device))
        twin = HessianOperator(self.loss, self.names, self.backend, self.chunks)
        twin.timings = dict(self.timings)
        twin.adopt_symmetry(self)
        return twin

    def _own(self) -> list[tuple[int, float, BatchLoss]]:
        """``(i, w_i, L_i)`` of this rank's pieces."""
        return [(i, w, part) for i, (w, part) in enumerate(self.pieces or []) if self.world is not None and self.world.owns(i)]

    def _keeps_piece_graphs(self) -> bool:
        return self.chunks is None and self._parent is None and self.backend == "double_backward"

    def _piece_graph(self, i: int, part: BatchLoss) -> tuple[list[Tensor], list[Tensor]]:
        if i not in self._piece_graphs:
            self._piece_graphs[i] = self._gradient_graph(part)
        return self._piece_graphs[i]

    def _own_gradient(self) -> Tensor:
        """``sum_i w_i g_i`` over this rank's pieces (uncounted, not reduced)."""
        if self._keeps_piece_graphs():
            return sum(w * torch.cat([g.detach().reshape(-1) for g in self._piece_graph(i, part)[1]]) for i, w, part in self._own())
        return sum(w * self.flatten(self._noted(part.gradient(self.names), part)) for _, w, part in self._own())

    def _own_product(self, v: Tensor) -> Tensor:
        """``sum_i w_i H_i v`` over this rank's pieces (uncounted, not reduced)."""
        if self.backend == "func":
            return sum(w * self._hvp_func(v, part) for _, w, part in self._own())
        if self._keeps_piece_graphs():
            return sum(w * self._backward_of_gradient(self._piece_graph(i, part), v, keep=True) for i, w, part in self._own())
        return sum(w * self._hvp_once(v, part) for _, w, part in self._own())

    def _reduced(self, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` (this rank's partial sum) summed over :attr:`world`: exactly one all-reduce
        per call on every rank, also when ``compute`` raises on some ranks (a flag travels with the
        sum; every rank then raises, the failing ones their own error), so that no rank waits in a
        collective the others have left."""
        error: Exception | None = None
        try:
            partial = compute().reshape(-1).to(self.dtype)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            error, partial = exc, torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        flag = torch.ones(1, dtype=self.dtype, device=self.device) * float(error is not None)
        summed = all_reduce(torch.cat([partial, flag]), self.world)
        if error is not None:
            raise error
        if summed[-1] > 0:
            raise RuntimeError(f"a Hessian-vector product failed on {int(summed[-1])} other rank(s)")
        return summed[:-1]

    def agreed(self, seconds: float) -> float:
        """A timing every rank agrees on: the largest over :attr:`world`'s ranks when the operator
        splits (collective), so that decisions taken from it (:func:`select_backend`) are the
        same everywhere; ``seconds`` itself otherwise."""
        return seconds if self.world is None else all_reduce_float(seconds, self.world, op="max")

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` (flat, in the parameters' dtype and device); ``sum_c w_c H_c v`` with chunks.
        Counted in :attr:`products`; its wall seconds in :attr:`seconds`."""
        self.products += 1
        start = time.perf_counter()
        v = v.to(self.dtype)
        hv = select_backend(self, v, self.trial_seconds) if self.backend is None else None
        chosen = self.backend
        if self.symmetry is None:
            self.mask = padding_mask(self)
            if hv is None or self.mask is not None:  # the choice's product is the operator's without the mask
                hv = self._product(v)
            settle_symmetry(self, (v, hv))
        if hv is None or self.backend != chosen:
            hv = self._product(v)
        self.seconds = time.perf_counter() - start
        return hv

    def _product(self, v: Tensor) -> Tensor:
        """``H v`` with :attr:`backend`, ``M H (M v)`` when padding rows are excluded (:attr:`mask`;
        uncounted; collective when the operator splits)."""
        if self.mask is None:
            return self._backend_product(v)
        return self._backend_product(v * self.mask) * self.mask

    def _backend_product(self, v: Tensor) -> Tensor:
        if self._parent is not None:
            return self._hvp_double_backward(v)
        if self.world is not None:
            return self._reduced(lambda: self._own_product(v))
        if self.chunks is not None:
            product = self._hvp_func if self.backend == "func" else self._hvp_once
            return sum(w * product(v, part) for w, part in self.chunks)
        if self.backend == "func":
            return self._hvp_func(v, self.loss)
        return self._hvp_double_backward(v)

    def block(self, names: Sequence[str]) -> "HessianOperator":
        """The operator of the diagonal block ``H_gg`` over ``names`` (same backend, chunks and
        split over ranks: a block of a splitting operator is collective too);
        with double backward without memory chunks it shares this operator's gradient graph (the
        whole batch's, or this rank's pieces'): ``H_gg v_g = (H [v_g; 0])_g``. An ``auto`` backend
        not chosen yet is chosen first, from a product with a seeded random vector."""
        if self.backend is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
            self(torch.randn(self.numel, generator=generator, dtype=torch.float64).to(self.device))
        if self.symmetry is None:
            settle_symmetry(self)
        child = HessianOperator(self.loss, names, self.backend, self.chunks)
        child.world, child.pieces = self.world, self.pieces
        if self.backend == "double_backward" and self.chunks is None:
            child._parent = self
        child.adopt_symmetry(self)
        return child

    def adopt_symmetry(self, other: "HessianOperator") -> None:
        """Take ``other``'s symmetry verdict (an operator of the same loss): its padding rows
        excluded, restricted to this operator's parameters (none for a block that computes its
        products through ``other``'s, which excludes them already)."""
        self.symmetry = None if other.symmetry is None else {**other.symmetry, "products": 0}
        self.mask = padding_mask(self) if self._parent is None else None

    def _hvp_double_backward(self, v: Tensor) -> Tensor:
        if self._parent is not None:
            padded = {n: torch.zeros_like(p) for n, p in self._parent.loss.params.items() if n in self._parent.names}
            padded.update(self.split(v))
            return self.flatten(self._parent.split(self._parent._product(self._parent.flatten(padded))))
        return self._backward_of_gradient(self._kept_graph(), v, keep=True)

    def _gradient_graph(self, loss: BatchLoss) -> tuple[list[Tensor], list[Tensor]]:
        """``(leaves, dL/dleaves)`` of ``loss`` over :attr:`names`, with ``create_graph=True`` (a
        zero gradient, without a graph, for a parameter the loss does not use)."""
        leaves = [loss.params[n].detach().requires_grad_(True) for n in self.names]
        grads, unused = gradients(loss(dict(zip(self.names, leaves))), leaves, create_graph=True)
        self._note_unused({self.names[i] for i in unused})
        return leaves, grads

    def _kept_graph(self) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`_gradient_graph` of the whole batch, built once and kept for the products."""
        if self._graph is None:
            self._graph = self._gradient_graph(self.loss)
        return self._graph

    def _backward_of_gradient(self, graph: tuple[list[Tensor], list[Tensor]], v: Tensor, keep: bool) -> Tensor:
        """``H v = d(g . v)/dtheta`` from a gradient graph (``keep``: for more products)."""
        leaves, grads = graph
        pieces = list(self.split(v).values())
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient has zero curvature
        if not live:
            return torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        hv = torch.autograd.grad([grads[i] for i in live], leaves, grad_outputs=[pieces[i] for i in live], retain_graph=keep,
                                 allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hv, leaves)])

    def _hvp_once(self, v: Tensor, loss: BatchLoss) -> Tensor:
        """``H v`` of ``loss`` by double backward, its graph freed on return."""
        return self._backward_of_gradient(self._gradient_graph(loss), v, keep=False)

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


def _cache_key(op: HessianOperator) -> tuple:
    return op.dtype, op.names == list(op.loss.params), op.loss.couples_examples


def cached_backend(op: HessianOperator) -> str | None:
    """The backend chosen before for (user model, dtype, full or block operator, batch statistics
    or not), its timings copied into ``op.timings``; ``None`` when not chosen yet. The modes share
    a choice unless train mode normalizes with BatchNorm's batch statistics (module docstring)."""
    source = op.loss.source()
    chosen = BACKEND_CACHE.get(source, {}).get(_cache_key(op)) if source is not None else None
    if chosen is None:
        return None
    op.timings.update(chosen[1])
    return chosen[0]


def padding_mask(op: HessianOperator) -> Tensor | None:
    """The 0/1 vector over ``op``'s flat parameters that zeroes the padding rows
    (:func:`padding_rows`); ``None`` when it holds none."""
    rows = padding_rows(op.loss.model, op.names, op.sizes)
    if not rows:
        return None
    mask = torch.ones(op.numel, dtype=op.dtype, device=op.device)
    mask[torch.cat(list(rows.values())).to(op.device)] = 0
    return mask


def symmetry_error(op: HessianOperator, seed: int = SYMMETRY_SEED, known: tuple[Tensor, Tensor] | None = None) -> float:
    """``|v^T H w - w^T H v| / s`` for a seeded Gaussian ``w`` and ``v`` another seeded Gaussian
    vector or, given ``known = (v, H v)``, a product already computed (the operator's first: a
    Lanczos start vector, a step), with ``s = (||v|| ||Hw|| + ||w|| ||Hv||) / (2 sqrt(n))`` the
    typical size of either form for random vectors (0 for ``H v = H w = 0``); one or two products
    of ``op``'s settled backend (and mask), in float64 sums."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(op.numel, generator=generator, dtype=torch.float64).to(op.device)
    if known is None:
        v = torch.randn(op.numel, generator=generator, dtype=torch.float64).to(op.device)
        hv = op._product(v.to(op.dtype)).double()
    else:
        v, hv = known[0].double(), known[1].double()
    hw = op._product(w.to(op.dtype)).double()
    scale = float(v.norm() * hw.norm() + w.norm() * hv.norm()) / (2 * math.sqrt(op.numel))
    return abs(float(v @ hw) - float(w @ hv)) / scale if scale > 0 else 0.0


def settle_symmetry(op: HessianOperator, first: tuple[Tensor, Tensor] | None = None) -> None:
    """Exclude ``op``'s padding rows (:func:`padding_mask`) and check its symmetry
    (:func:`symmetry_error`, with ``first = (v, H v)`` the operator's first product when given)
    once its backend is settled; where the check fails, try the other backend (two random
    vectors) and keep it if it passes (module docstring).

    ``op.symmetry`` becomes ``{"error", "action", "excluded", "products", "backend"}``: ``error`` of
    the operator kept, ``action`` ``symmetric``, ``<backend> asymmetric: <other> used`` or
    ``asymmetric`` (neither backend passes: the operator is used as it is), ``excluded`` names the
    padding rows left out, ``products`` counts the check's products beyond ``first`` (1 with it,
    2 without, 2 more with the other backend; 0 when a verdict of the whole operator is cached for
    this model, dtype, batch-statistics mode and backend). A block operator takes a cached
    whole-operator verdict."""
    source = op.loss.source()
    key = (op.dtype, op.loss.couples_examples, op.backend)
    op.mask = padding_mask(op)
    known = SYMMETRY_CACHE.get(source, {}).get(key) if source is not None else None
    if known is not None:
        op.symmetry = {**known, "products": 0}
        op.backend = known["backend"]
        return
    tol = SYMMETRY_TOL.get(op.dtype, SYMMETRY_TOL[torch.float32])
    rows = padding_rows(op.loss.model, op.names, op.sizes)
    verdict = {"error": symmetry_error(op, known=first), "action": "symmetric", "excluded": ", ".join(rows),
               "products": 1 if first is not None else 2, "backend": op.backend}
    if not verdict["error"] <= tol:
        first, other = op.backend, "func" if op.backend == "double_backward" else "double_backward"
        op.release()
        op.backend = other
        try:
            error = symmetry_error(op)
        except (RuntimeError, NotImplementedError, ValueError):
            error = math.inf
        verdict["products"] += 2
        if error <= tol:
            verdict.update(error=error, action=f"{first} asymmetric: {other} used", backend=other)
        else:
            op.release()
            op.backend = first
            verdict["action"] = "asymmetric"
    op.symmetry = verdict
    if source is not None and op.names == list(op.loss.params):
        SYMMETRY_CACHE.setdefault(source, {})[key] = verdict


def select_backend(op: HessianOperator, v: Tensor, trial_seconds: float = math.inf, good_enough: float = FAST_PRODUCT) -> Tensor:
    """``H v`` by double backward, timed (``t``; the first product builds the graph that later
    products reuse, so it is the slowest), and ``op``'s backend chosen from it:

    * double backward, with no other product, when ``t < good_enough`` (``func``'s first use in a
      process imports torch's compiler stack, seconds and about 150 MB of memory that so small a
      product cannot repay) or
      when ``4 t > trial_seconds`` (trying ``func`` does not fit in the time allowed);
    * otherwise the faster of one more double-backward product (the cost with the graph kept)
      and a timed ``func`` product after a warm-up one: 3 products beyond ``H v``.

    On an operator that splits over ranks every timing is the largest over the ranks
    (:meth:`HessianOperator.agreed`) and a failure on one rank fails the product on all
    (:meth:`HessianOperator._reduced`), so every rank runs the same products and keeps the same
    backend. A backend that raises on this model (e.g. ``func`` through a layer that mutates buffers) is
    not chosen. One backend's memory at a time: the double-backward graph is dropped before
    ``func`` runs (the next product rebuilds it if double backward wins). The seconds are left in
    ``op.timings`` (a single double-backward figure is the first product, an upper bound on later
    ones), the extra products in ``op.selection_products``; the choice is cached for
    :func:`cached_backend`.
    """
    op.backend = "double_backward"
    hv, first = _timed(op, v)
    first = op.agreed(first)
    op.timings["double_backward"] = first
    products = int(hv is not None)
    if not (first < good_enough or (math.isfinite(first) and 4 * first > trial_seconds)):
        if hv is not None:
            op.timings["double_backward"] = op.agreed(_timed(op, v)[1])
            products += 1
        op.release()
        op.backend = "func"
        warm, _ = _timed(op, v)
        op.timings["func"] = op.agreed(_timed(op, v)[1]) if warm is not None else math.inf
        products += 2 * (warm is not None)
        hv = warm if hv is None else hv
    op.backend = min(op.timings, key=op.timings.get)
    if op.timings[op.backend] == math.inf:
        raise InvalidArgumentError(f"no Hessian-vector product backend runs on this model (tried {BACKENDS[1:]})")
    if op.backend != "double_backward":
        op.release()
    op.selection_products = products - 1
    source = op.loss.source()
    if source is not None:
        BACKEND_CACHE.setdefault(source, {})[_cache_key(op)] = (op.backend, dict(op.timings))
    return hv


def _timed(op: HessianOperator, v: Tensor) -> tuple[Tensor | None, float]:
    """``(H v, seconds)`` with ``op``'s current backend; ``(None, inf)`` if the backend raises."""
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    start = time.perf_counter()
    try:
        hv = op._product(v)
    except (RuntimeError, NotImplementedError, ValueError):
        return None, math.inf
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    return hv, time.perf_counter() - start
