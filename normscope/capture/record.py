"""One recorded call of one normalization site, and the per-partition reductions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from normscope.registry import Layout, affine_like, normalize_rows, partition_moments, to_rows

REDUCTION_KEYS = ("n", "sum_x", "sum_x2", "sum_z", "sum_z2", "sum_g", "sum_g2", "sum_gz")


@dataclass
class Site:
    """A normalization site: a module (``layer1.0.bn1``) or a functional call inside one
    (``blocks.0:F.layer_norm#0``)."""

    name: str
    kind: str
    module_type: str
    functional: bool = False


@dataclass
class SiteRecord:
    """What one forward (and its backward) of a site left behind.

    Tensors are in the input's shape: ``x`` the input, ``y`` the output (before any in-place op
    that follows), ``dy`` = dL/dy and ``dx`` = dL/dx through this site only. ``z`` and
    ``g = dL/dz = (gamma + offset) * dL/dy`` are derived on demand. With ``storage="reductions"``
    the tensors are dropped after backward and ``reductions`` holds per-partition sums instead.
    """

    site: Site
    index: int
    layout: Layout
    shape: torch.Size
    dtype: torch.dtype
    grad_enabled: bool
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    producer: str | None = None
    consumer: str | None = None
    consumer_type: str | None = None
    _dx_expected: bool = field(default=False, repr=False)
    reductions: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def has_grad(self) -> bool:
        return self.dy is not None or "sum_g" in self.reductions

    def rows(self, t: torch.Tensor, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        """``t`` (input-shaped) as ``(partitions, items)`` rows, cast to ``dtype``."""
        return to_rows(t if dtype is None else t.to(dtype), self.layout)

    def z_rows(self, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        """Normalized activations recomputed from ``x`` (in float64 by default)."""
        if self.x is None:
            raise ValueError(f"site {self.site.name}: x was not kept (storage='reductions')")
        return normalize_rows(self.x, self.layout, dtype)

    def g_rows(self, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        """``g = dL/dz = (gamma + offset) * dL/dy`` as rows; dL/dy itself without an affine."""
        if self.dy is None:
            raise ValueError(f"site {self.site.name}: no gradient was recorded (no backward, or a no_grad forward)")
        return self.rows(gradient_wrt_z(self.dy, self.layout, dtype), None)

    def dx_rows(self, dtype: torch.dtype | None = torch.float64) -> torch.Tensor | None:
        return None if self.dx is None else self.rows(self.dx, dtype)

    def moments_rows(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-partition ``(shift, scale)``, each (P, 1), with ``z = (x - shift) / scale``."""
        if self.x is None:
            raise ValueError(f"site {self.site.name}: x was not kept (storage='reductions')")
        return partition_moments(self.rows(self.x, dtype), self.layout)


def gradient_wrt_z(dy: torch.Tensor, layout: Layout, dtype: torch.dtype | None) -> torch.Tensor:
    """``dL/dz = (gamma + offset) * dL/dy`` in the input's shape (``dL/dy`` when no affine)."""
    dy = dy if dtype is None else dy.to(dtype)
    gamma = affine_like(layout.weight, dy, layout)
    if gamma is None:
        return dy
    return dy * (gamma.to(dy.dtype) + layout.weight_offset)


def reduce_record(record: SiteRecord) -> None:
    """Replace the record's tensors by per-partition sums over items, computed in float64:
    ``n``, sums of ``x``, ``x^2``, ``z``, ``z^2`` and, after backward, of ``g``, ``g^2``, ``g z``."""
    x64 = record.rows(record.x)
    shift, scale = partition_moments(x64, record.layout)
    z = (x64 - shift) / scale
    red = {"n": torch.full((z.shape[0],), z.shape[1], dtype=torch.float64), "sum_x": x64.sum(1),
           "sum_x2": x64.pow(2).sum(1), "sum_z": z.sum(1), "sum_z2": z.pow(2).sum(1)}
    if record.dy is not None:
        g = record.g_rows()
        red.update(sum_g=g.sum(1), sum_g2=g.pow(2).sum(1), sum_gz=(g * z).sum(1))
    record.reductions = {k: v.cpu() for k, v in red.items()}
    record.x = record.y = record.dy = record.dx = None
