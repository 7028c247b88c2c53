"""BatchNorm-style sites of a model and a way to recompute their outputs with chosen moments.

The two-stage estimator ("Extreme Normalization" (under review) §3.2) and the population gradient ("Extreme Normalization" (under review) §2, MATH.md §4)
need each normalization site to normalize with moments that are not its own batch moments:
leaf tensors, population moments, or the second tower's aggregated moments. :func:`override`
does that with forward hooks that replace the site's output by ``fn(site, x)``, without
changing the model's structure; the sites run in eval mode meanwhile so that their own forward
updates no running statistics (their flags are restored on exit).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normscope.batch import forward
from normscope.errors import NoNormSitesError
from normscope.ops.population import PopulationNorm, affine_rotate


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the last site needed has run."""


@dataclass(frozen=True)
class SiteOptions:
    """Gradient options of a site: PopulationNorm's own, or r = 1 and no caps for a BatchNorm."""

    eps: float
    r_m: float = 1.0
    r_v: float = 1.0
    f_max: float = math.inf
    u_max: float = math.inf


def is_norm_site(module: nn.Module) -> bool:
    """A BatchNorm-style module: torch's BatchNorm1d/2d/3d, SyncBatchNorm, or a PopulationNorm."""
    return isinstance(module, (_BatchNorm, PopulationNorm))


def norm_sites(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm-style modules of ``model`` by name, in definition order."""
    return {name: m for name, m in model.named_modules() if is_norm_site(m)}


def site_options(module: nn.Module) -> SiteOptions:
    """The options of :func:`normscope.ops.population.normalize_groups` that ``module`` uses."""
    if isinstance(module, PopulationNorm):
        return SiteOptions(module.eps, module.r_m, module.r_v, module.f_max, module.u_max)
    return SiteOptions(module.eps)


def site_output(module: nn.Module, q: Tensor) -> Tensor:
    """The site's output from normalized values q: ``R (gamma * q) + beta`` (R only for PopulationNorm)."""
    return affine_rotate(q, module.weight, module.bias, getattr(module, "rotation", None))


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but dim 1 (BatchNorm's partition)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(dim=1)
    return mean, (flat - mean[:, None]).pow(2).mean(dim=1)


def require_sites(model: nn.Module) -> dict[str, nn.Module]:
    """:func:`norm_sites`, raising :class:`NoNormSitesError` when there is none."""
    sites = norm_sites(model)
    if not sites:
        raise NoNormSitesError(
            f"{type(model).__name__} has no BatchNorm-style layer (BatchNorm1d/2d/3d, SyncBatchNorm, PopulationNorm)"
        )
    return sites


@contextlib.contextmanager
def override(
    model: nn.Module, fn: Callable[[str, nn.Module, Tensor], Tensor], stop_after: str | None = None
) -> Iterator[list[str]]:
    """Replace every site's output by ``fn(name, module, x)``; yields the site names in call order.

    ``stop_after``: raise :class:`StopForward` after that site has run (the caller catches it).
    """
    sites = require_sites(model)
    order: list[str] = []
    flags = {name: m.training for name, m in sites.items()}

    def hook(name: str) -> Callable:
        def run(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            order.append(name)
            out = fn(name, module, args[0])
            if name == stop_after:
                raise StopForward(name)
            return out

        return run

    handles = [m.register_forward_hook(hook(name)) for name, m in sites.items()]
    for m in sites.values():
        m.eval()
    try:
        yield order
    finally:
        for handle in handles:
            handle.remove()
        for name, m in sites.items():
            m.train(flags[name])


def forward_until(model: nn.Module, inputs: Tensor) -> Tensor | None:
    """Run ``model`` on ``inputs`` (:func:`normscope.batch.forward`); return None when a hook
    stopped it with :class:`StopForward`."""
    try:
        return forward(model, inputs)
    except StopForward:
        return None


def parameters(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name (``requires_grad`` only)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def grads_or_zeros(grads: tuple[Tensor | None, ...], tensors: list[Tensor]) -> list[Tensor]:
    """``torch.autograd.grad`` results with ``None`` (unused input) replaced by zeros."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
