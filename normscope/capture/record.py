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


def _partition_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per-partition sums of ``t``, accumulated in float64 without reshaping copies."""
    if layout.rule == "channel":
        return t.sum(dim=[0, *range(2, t.dim())], dtype=torch.float64)
    return to_rows(t, layout).sum(dim=1, dtype=torch.float64)


def _moments_from_sums(n: torch.Tensor, sum_x: torch.Tensor, sum_x2: torch.Tensor, layout: Layout):
    """Per-partition ``(shift, scale)`` of :func:`partition_moments` from the sums of x and x^2."""
    if layout.rule == "weight":
        return torch.zeros_like(sum_x), sum_x2.sqrt()
    if not layout.batch_stats:
        mean, var = layout.running_mean.double(), layout.running_var.double()
        repeat = n.shape[0] // mean.shape[0]
        return mean.repeat(repeat), torch.sqrt(var.repeat(repeat) + layout.eps)
    if layout.kind.centered:
        mean = sum_x / n
        return mean, torch.sqrt((sum_x2 / n - mean * mean).clamp_min(0) + layout.eps)
    return torch.zeros_like(sum_x), torch.sqrt(sum_x2 / n + layout.eps)


def reduce_record(record: SiteRecord) -> None:
    """Replace the record's tensors by per-partition sums over items, accumulated in float64:
    ``n``, sums of ``x``, ``x^2``, ``z``, ``z^2`` and, after backward, of ``g``, ``g^2``, ``g z``.

    The sums of z follow from those of x without forming z (``z = (x - shift) / scale``):
    ``sum z = (sum x - n shift) / scale``, ``sum z^2 = (sum x^2 - 2 shift sum x + n shift^2) / scale^2``,
    ``sum g z = (sum g x - shift sum g) / scale``; the variance is ``sum x^2 / n - mean^2`` in
    float64, exact for float64 inputs and to float64 rounding of the float32 values otherwise.
    """
    x, layout = record.x, record.layout
    sum_x, sum_x2 = _partition_sum(x, layout), _partition_sum(x * x, layout)
    n = torch.full_like(sum_x, x.numel() / sum_x.numel())
    shift, scale = _moments_from_sums(n, sum_x, sum_x2, layout)
    red = {"n": n, "sum_x": sum_x, "sum_x2": sum_x2, "sum_z": (sum_x - n * shift) / scale,
           "sum_z2": (sum_x2 - 2 * shift * sum_x + n * shift * shift) / scale**2}
    if record.dy is not None:
        g = gradient_wrt_z(record.dy, layout, None)
        sum_g = _partition_sum(g, layout)
        red.update(sum_g=sum_g, sum_g2=_partition_sum(g * g, layout),
                   sum_gz=(_partition_sum(g * x, layout) - shift * sum_g) / scale)
    record.reductions = {k: v.cpu() for k, v in red.items()}
    record.x = record.y = record.dy = record.dx = None
