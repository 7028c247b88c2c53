"""``normscope.analyze`` under ``torch.distributed``: the process group, data shards and sums.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`session` initialises the process
group itself (gloo for a CPU device, NCCL for CUDA, with a timeout so that a failing rank cannot
hang the others for ever) unless the caller has one already, and destroys only a group it created.
Inside a session the analyzers' full-data passes read :func:`current`: each rank streams its
:func:`shard` of the examples and the per-rank sums are added with :func:`all_reduce`, so a rank
ends with the same sums as one process over all the data. The descent analyzer's Hessian-vector
products split the minibatch's examples the same way where the loss decomposes over them
(``HessianOperator(split=current())`` in :mod:`normscope.analyzers.hvp`); work shared out by item
(:func:`share_out`, :meth:`World.owns`) runs on one rank per item and must call no collective.
Every collective here must be called by all ranks in the same order (lockstep). Outside a session
(or with one rank) every helper is the identity: one process is a world of size 1.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from normscope import batch as B
from normscope.errors import DataShapeError, InvalidArgumentError

TIMEOUT = timedelta(minutes=10)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    """The ranks of an analysis: this process's ``rank`` among ``size``, the group's ``backend``."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    def owns(self, item: int) -> bool:
        """Whether work item ``item`` (0, 1, ...) is this rank's: ``item % size == rank``."""
        return item % self.size == self.rank

    def describe(self) -> dict[str, Any]:
        """``meta["distributed"]``: ``world_size`` and ``backend`` (None for one process)."""
        return {"world_size": self.size, "backend": self.backend}


_current = World()


def current() -> World:
    """The world of the analysis running now (one process outside :func:`session`)."""
    return _current


def launched() -> bool:
    """Whether this process was started as one of several ranks (``WORLD_SIZE`` > 1, as ``torchrun`` sets)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank: the initialized group's, else ``RANK`` from the launcher, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def rank_device(device: torch.device) -> torch.device:
    """``device`` for this rank: a CUDA device without an index becomes ``cuda:LOCAL_RANK``
    under a launcher (one GPU per rank), anything else is kept."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def session(device: torch.device, timeout: timedelta = TIMEOUT) -> Iterator[World]:
    """The :class:`World` of an analysis on ``device``, current while the block runs.

    A process group that is already initialized is used as it is; under a launcher without one,
    one is created (``nccl`` for a CUDA ``device``, ``gloo`` otherwise; ``env://`` rendezvous,
    ``timeout`` per collective) and destroyed on exit. Neither: a world of one process.

    Raises:
        InvalidArgumentError: the group's backend is NCCL and ``device`` is not CUDA.
    """
    global _current
    created = False
    if launched() and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout)
        created = True
    world = World()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = str(dist.get_backend())
        if backend == "nccl" and device.type != "cuda":
            if created:
                dist.destroy_process_group()
            raise InvalidArgumentError(f"the process group's backend is nccl, which needs CUDA; the analysis runs on {device} "
                                       "(pass a CUDA device, or initialise the group with gloo)")
        world = World(dist.get_rank(), dist.get_world_size(), backend)
    previous, _current = _current, world
    try:
        yield world
    finally:
        _current = previous
        if created:
            dist.destroy_process_group()


def shard_slice(n: int, world: World | None = None) -> slice:
    """This rank's contiguous share of ``n`` examples: ``[r n // W, (r + 1) n // W)``.

    Raises:
        DataShapeError: fewer examples than ranks (a rank would get none).
    """
    world = world or current()
    if n < world.size:
        raise DataShapeError(f"{n} examples cannot be shared out over {world.size} ranks; use fewer ranks or more data")
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def shard(data: B.Batch, world: World | None = None) -> B.Batch:
    """This rank's examples of a whole-data ``(inputs, targets)`` batch (:func:`shard_slice`)."""
    return B.take(data, shard_slice(B.size(data[0]), world))


def _wire(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Where ``world``'s backend reduces: the current CUDA device for NCCL, the CPU otherwise."""
    device = torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")
    return tensor.detach().to(device, copy=True)


def all_reduce(tensor: torch.Tensor, world: World | None = None, op: str = "sum") -> torch.Tensor:
    """``sum_r tensor_r`` (``op="max"``: the elementwise ``max_r tensor_r``) over the ranks, on
    ``tensor``'s device and dtype (``tensor`` itself in one process). Every rank must call it, in
    the same order, with the same shape."""
    world = world or current()
    if not world.active:
        return tensor
    wire = _wire(tensor, world)
    dist.all_reduce(wire, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return wire.to(tensor.device)


def all_reduce_float(value: float, world: World | None = None, op: str = "sum") -> float:
    """:func:`all_reduce` of one number, in float64 (``op="max"``: the largest over the ranks, the
    way to make a decision taken from a measurement, such as a time, the same on every rank)."""
    return float(all_reduce(torch.tensor([float(value)], dtype=torch.float64), world, op)[0])


def merge_owned(rows: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """Rows of work items shared out by :meth:`World.owns` (item ``i`` on rank ``i % W``; the
    other ranks' rows zero) completed on every rank: the sum over ranks, which adds zeros only, so
    each row holds exactly the value its owner computed."""
    return all_reduce(rows, world)


def share_out(items: list[T], work: Callable[[T], R], world: World | None = None) -> list[R]:
    """``[work(item) for item in items]`` with item ``i`` computed on rank ``i % W`` only and the
    results gathered to every rank (``all_gather_object``); ``work`` must not depend on the rank."""
    world = world or current()
    if not world.active:
        return [work(item) for item in items]
    mine = {i: work(item) for i, item in enumerate(items) if world.owns(i)}
    parts: list[dict[int, R]] = [{} for _ in range(world.size)]
    dist.all_gather_object(parts, mine)
    merged = {i: result for part in parts for i, result in part.items()}
    return [merged[i] for i in range(len(items))]
