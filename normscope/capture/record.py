"""One recorded call of one normalization site, and the per-partition reductions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from normscope.registry import Layout, affine_like, normalize_rows, partition_moments, to_rows

REDUCTION_KEYS = ("n", "mean", "var", "scale", "sum_x", "sum_x2", "sum_z", "sum_z2", "sum_g", "sum_g2", "sum_gz")


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


def _partition_view(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``t`` as ``(outer, partitions, inner)`` with the items of a partition on dims 0 and 2: a view
    of a contiguous per-channel (N, C, ...) tensor, else the ``(1, P, items)`` rows."""
    if layout.rule == "channel" and t.dim() >= 2 and t.is_contiguous():
        return t.view(t.shape[0], t.shape[1], -1)
    return to_rows(t, layout).contiguous().unsqueeze(0)


def _sum(v: torch.Tensor) -> torch.Tensor:
    """Sum of a ``(outer, P, inner)`` view over dims 0 and 2: contiguous inner sums in the
    tensor's dtype (torch's cascade summation), then the outer sum in float64."""
    return v.sum(2).sum(0, dtype=torch.float64)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` of two ``(outer, P, inner)`` views over dims 0 and 2, without forming ``a * b``."""
    return torch.linalg.vecdot(a, b).sum(0, dtype=torch.float64)


def _shift_scale(n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-partition ``(shift, scale)`` of :func:`partition_moments` from the mean and variance of x."""
    if layout.rule == "weight":
        return torch.zeros_like(mean), torch.sqrt(n * (var + mean * mean))
    if not layout.batch_stats:
        rm, rv = (t.detach().to(mean.device, torch.float64) for t in (layout.running_mean, layout.running_var))
        repeat = n.shape[0] // rm.shape[0]
        return rm.repeat(repeat), torch.sqrt(rv.repeat(repeat) + layout.eps)
    if layout.kind.centered:
        return mean, torch.sqrt(var + layout.eps)
    return torch.zeros_like(mean), torch.sqrt(var + mean * mean + layout.eps)


def reduce_record(record: SiteRecord) -> None:
    """Replace the record's tensors by per-partition sums over items (MATH.md §1-2):
    ``n``, ``mean``, ``var`` (biased), ``scale`` (the normalizer s) and the sums of ``x``, ``x^2``, ``z``, ``z^2`` and, after
    backward, of ``g``, ``g^2``, ``g z``.

    Two passes over x (the sums, then ``c = x - mean`` and ``sum c^2``: no cancellation of
    ``sum x^2 - n mean^2``) and three over dL/dy (``sum dy``, ``sum dy^2``, ``sum dy c``, dot
    products that form no product tensor). Partial sums over the contiguous items run in the
    input's dtype with torch's cascade summation; the outer sums and everything after are float64
    (float64 inputs: float64 throughout). For per-channel partitions ``gamma`` is factored out
    (``sum g = gamma sum dy``, ...); other layouts form ``g = (gamma + offset) dL/dy`` once.
    The sums stay on x's device (:func:`to_host` moves a capture's records at once).
    The sums of z follow in closed form with ``z = (x - shift) / scale``:
    ``sum z = n (mean - shift) / scale``, ``sum z^2 = n (var + (mean - shift)^2) / scale^2``,
    ``sum g z = (sum g c + (mean - shift) sum g) / scale``.
    """
    x, layout = record.x, record.layout
    v = _partition_view(x, layout)
    n = torch.full((v.shape[1],), float(v.shape[0] * v.shape[2]), dtype=torch.float64, device=x.device)
    mean = _sum(v) / n
    centered = v - mean.to(v.dtype)[None, :, None]
    var = _dot(centered, centered) / n
    shift, scale = _shift_scale(n, mean, var, layout)
    offset = mean - shift
    red = {"n": n, "mean": mean, "var": var, "scale": scale, "sum_x": n * mean, "sum_x2": n * (var + mean * mean),
           "sum_z": n * offset / scale, "sum_z2": n * (var + offset * offset) / scale**2}
    if record.dy is not None:
        per_channel = layout.rule == "channel" and layout.weight is not None
        dy = record.dy if per_channel else gradient_wrt_z(record.dy, layout, None)
        u = dy.contiguous().view(v.shape) if v.shape[0] > 1 else to_rows(dy, layout).contiguous().unsqueeze(0)
        sum_g, sum_g2, sum_gc = _sum(u), _dot(u, u), _dot(u, centered)
        if per_channel:
            gamma = layout.weight.detach().to(torch.float64).reshape(-1) + layout.weight_offset
            sum_g, sum_g2, sum_gc = gamma * sum_g, gamma * gamma * sum_g2, gamma * sum_gc
        red.update(sum_g=sum_g, sum_g2=sum_g2, sum_gz=(sum_gc + offset * sum_g) / scale)
    record.reductions = red
    record.x = record.y = record.dy = record.dx = None


def to_host(records: list[SiteRecord]) -> None:
    """Move the reductions of ``records`` that lie on an accelerator to host memory in one
    transfer (one synchronisation per capture rather than one per site)."""
    held = [r for r in records if r.reductions and next(iter(r.reductions.values())).device.type != "cpu"]
    if not held:
        return
    tensors = [t for r in held for t in r.reductions.values()]
    parts = iter(torch.cat(tensors).cpu().split([t.numel() for t in tensors]))
    for r in held:
        r.reductions = {key: next(parts) for key in r.reductions}
