"""One recorded call of one normalization site, and the per-partition reductions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from normscope.registry import Layout, affine_like, normalize_rows, partition_moments, to_rows

REDUCTION_KEYS = ("n", "mean", "var", "scale", "sum_x", "sum_x2", "sum_z", "sum_z2", "sum_g", "sum_g2", "sum_gz")


@dataclass
class Site:
    """A normalization site: a module (``layer1.0.bn1``) or a functional call inside one
    (``blocks.0:F.layer_norm#0``). ``reading``: the candidate reading that reproduced a custom
    class's output where its registry reading did not (:func:`normscope.capture.verify.read_by_behaviour`)."""

    name: str
    kind: str
    module_type: str
    functional: bool = False
    reading: str = ""


@dataclass
class SiteRecord:
    """What one forward (and its backward) of a site left behind.

    Tensors are in the input's shape: ``x`` the input, ``y`` the output (before any in-place op
    that follows), ``dy`` = dL/dy and ``dx`` = dL/dx through this site only. ``z`` and
    ``g = dL/dz = (gamma + offset) * dL/dy`` are derived on demand. With ``storage="reductions"``
    the tensors are dropped after backward and ``reductions`` holds per-partition sums instead.
    Under ``capture(..., graph=True)``: ``feeder`` is the leaf module whose output tensor is ``x``
    itself, ``upstream`` the nearest sites whose outputs ``x`` depends on through autograd
    (:mod:`normscope.capture.graph`; ``None`` without an autograd graph).
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
    feeder: str | None = None
    upstream: tuple[str, ...] | None = None
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


def partial_sums(record: SiteRecord) -> dict[str, torch.Tensor]:
    """The passes over the record's activations that :func:`finish_reductions` needs, then drop them.

    Per partition, on x's device: ``n``, ``mean = sum x / n`` and ``sum_c2 = sum c^2`` with
    ``c = x - mean`` (two passes over x; no cancellation of ``sum x^2 - n mean^2``) and, after
    backward, ``sum_u``, ``sum_u2``, ``sum_uc`` of ``u = dL/dy`` for per-channel partitions with an
    affine (``gamma`` is factored out) and ``u = g = (gamma + offset) dL/dy`` otherwise (three dot
    products over u). Partial sums over the contiguous items run in the input's dtype with torch's
    cascade summation; the outer sums are float64 (float64 inputs: float64 throughout). Running
    statistics that normalize the record (``batch_stats`` False) are copied here, as float64.
    """
    x, layout = record.x, record.layout
    v = _partition_view(x, layout)
    n = torch.full((v.shape[1],), float(v.shape[0] * v.shape[2]), dtype=torch.float64, device=x.device)
    mean = _sum(v) / n
    centered = v - mean.to(v.dtype)[None, :, None]
    sums = {"n": n, "mean": mean, "sum_c2": _dot(centered, centered)}
    if _mode(layout) == "running":
        given = (layout.center, layout.scale.square() - layout.eps) if layout.center is not None else (layout.running_mean, layout.running_var)
        sums["running_mean"], sums["running_var"] = (t.detach().to(x.device, torch.float64) for t in given)
    if record.dy is not None:
        dy = record.dy if _per_channel(layout) else gradient_wrt_z(record.dy, layout, None)
        u = dy.contiguous().view(v.shape) if v.shape[0] > 1 else to_rows(dy, layout).contiguous().unsqueeze(0)
        sums.update(sum_u=_sum(u), sum_u2=_dot(u, u), sum_uc=_dot(u, centered))
    record.x = record.y = record.dy = record.dx = None
    return sums


BATCH_NORM_NODES = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0")


def batch_norm_node(y: torch.Tensor, layout: Layout):
    """The autograd node of torch's BatchNorm kernel that produced ``y`` when the kernel's own
    per-channel sums can stand in for passes over x and dL/dy (:func:`kernel_sums`): a per-channel
    affine layout normalizing with batch statistics, the node's saved batch mean and ``1/sqrt(var +
    eps)`` and its eps equal to the layout's; else ``None``."""
    node = y.grad_fn
    if (node is None or type(node).__name__ not in BATCH_NORM_NODES or _mode(layout) != "centered"
            or not _per_channel(layout) or float(node._saved_eps) != layout.eps):
        return None
    return node


def kernel_sums(record: SiteRecord, mean: torch.Tensor, invstd: torch.Tensor, grads: tuple) -> dict[str, torch.Tensor]:
    """:func:`partial_sums` from what torch's BatchNorm kernel computed, with one pass (over u) instead of six.

    The forward saved the batch ``mean`` and ``invstd = 1 / sqrt(var + eps)`` (biased var), and the
    backward returns ``grads = (dL/dx, dL/dgamma, dL/dbeta)`` with ``dL/dbeta = sum u`` and
    ``dL/dgamma = sum u (x - mean) invstd`` (u = dL/dy; Ioffe and Szegedy (2015), §3). These are
    kept as they are (``invstd``, ``sum_u``, ``grad_weight``) with ``sum_u2``, the one pass, over u;
    :func:`finish_reductions` turns them into ``var = 1/invstd^2 - eps`` (:func:`kernel_variance`) and
    ``sum_uc = grad_weight / invstd`` in float64. ``grads`` without ``dL/dgamma`` or ``dL/dbeta`` (frozen affine parameters) fall back
    to :func:`partial_sums`.
    """
    _, grad_weight, grad_bias = grads
    if grad_weight is None or grad_bias is None:
        return partial_sums(record)
    channels = record.shape[1]
    u = _partition_view(record.dy, record.layout)
    n = torch.full((channels,), float(record.dy.numel() // channels), dtype=torch.float64, device=mean.device)
    sums = {"n": n, "mean": mean.detach(), "invstd": invstd.detach(), "sum_u": grad_bias.detach(), "sum_u2": _dot(u, u),
            "grad_weight": grad_weight.detach(), "roundoff": torch.full_like(n, torch.finfo(invstd.dtype).eps)}
    record.x = record.y = record.dy = record.dx = None
    return sums


def kernel_variance(invstd: torch.Tensor, eps: float, roundoff: torch.Tensor) -> torch.Tensor:
    """The biased batch variance from a BatchNorm kernel's ``invstd = 1 / sqrt(var + eps)``, in float64:
    ``var = 1/invstd^2 - eps``, and 0 where that is within the rounding of ``invstd``'s dtype.

    ``invstd`` carries a relative rounding error of a few units ``u`` (``roundoff``, its dtype's
    machine epsilon), so ``1/invstd^2 = (var + eps)(1 + d)`` with ``|d| <= 4u``: a variance below
    ``4u (var + eps)`` cannot be told from 0 and reads 0 (a constant float32 channel at eps 1e-5
    would otherwise read 8e-13, or a negative variance).
    """
    total = 1 / invstd**2
    var = total - eps
    return torch.where(var > 4 * roundoff * total, var, torch.zeros_like(var))


def _mode(layout: Layout) -> str:
    """How a layout normalizes: ``weight`` (weight norm), ``running`` (running statistics),
    ``centered`` or ``uncentered`` (batch statistics)."""
    if layout.rule == "weight":
        return "weight"
    if not layout.batch_stats or layout.center is not None:  # given statistics: the op's own center and scale
        return "running"
    return "centered" if layout.kind.centered else "uncentered"


def _per_channel(layout: Layout) -> bool:
    return layout.rule == "channel" and layout.weight is not None


def _shift_scale(mode: str, eps: float, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 running: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-partition ``(shift, scale)`` of :func:`partition_moments`: weight norm ``(0, sqrt(n (var + mean^2)))``,
    running statistics ``(running_mean, sqrt(running_var + eps))``, centered ``(mean, sqrt(var + eps))``,
    uncentered ``(0, sqrt(var + mean^2 + eps))``."""
    if mode == "weight":
        return torch.zeros_like(mean), torch.sqrt(n * (var + mean * mean))
    if mode == "running":
        return running[0], torch.sqrt(running[1] + eps)
    if mode == "centered":
        return mean, torch.sqrt(var + eps)
    return torch.zeros_like(mean), torch.sqrt(var + mean * mean + eps)


def finish_reductions(pending: list[tuple[SiteRecord, dict[str, torch.Tensor]]]) -> None:
    """Set each record's ``reductions`` from its :func:`partial_sums`, the records of one kind of
    normalization (mode, eps, affine, with or without backward) in one concatenated computation.

    Per partition (MATH.md §1-2): ``n``, ``mean``, ``var = sum_c2 / n`` (biased; ``1/invstd^2 - eps``
    from a BatchNorm kernel, :func:`kernel_sums`, whose ``sum_uc`` is ``grad_weight / invstd``), ``scale`` (the
    normalizer s, :func:`_shift_scale`), ``sum_x = n mean``, ``sum_x2 = n (var + mean^2)`` and, with
    ``z = (x - shift) / s`` and ``o = mean - shift``, ``sum_z = n o / s``, ``sum_z2 = n (var + o^2) / s^2``;
    after backward ``sum_g = a sum_u``, ``sum_g2 = a^2 sum_u2``, ``sum_gz = (a sum_uc + o sum_g) / s`` with
    ``a = gamma + offset`` for per-channel partitions with an affine and ``a = 1`` otherwise (u is g there).
    Elementwise float64, so each record's sums are bit-identical to computing it alone.
    """
    groups: dict[tuple, list[tuple[SiteRecord, dict[str, torch.Tensor]]]] = {}
    for record, sums in pending:
        layout = record.layout
        key = (_mode(layout), layout.eps, "sum_u" in sums, "invstd" in sums, _per_channel(layout), layout.weight_offset,
               sums["n"].device)
        groups.setdefault(key, []).append((record, sums))
    for (mode, eps, grad, kernel, per_channel, weight_offset, _), members in groups.items():
        def cat(key: str) -> torch.Tensor:
            return torch.cat([sums[key] for _, sums in members]).to(torch.float64)
        n, mean = cat("n"), cat("mean")
        invstd = cat("invstd") if kernel else None
        var = kernel_variance(invstd, eps, cat("roundoff")) if kernel else cat("sum_c2") / n
        shift, scale = _shift_scale(mode, eps, n, mean, var, (cat("running_mean"), cat("running_var")) if mode == "running" else None)
        offset = mean - shift
        red = {"n": n, "mean": mean, "var": var, "scale": scale, "sum_x": n * mean, "sum_x2": n * (var + mean * mean),
               "sum_z": n * offset / scale, "sum_z2": n * (var + offset * offset) / scale**2}
        if grad:
            sum_g, sum_g2, sum_gc = cat("sum_u"), cat("sum_u2"), cat("grad_weight") / invstd if kernel else cat("sum_uc")
            if per_channel:
                gamma = torch.cat([r.layout.weight.detach().reshape(-1) for r, _ in members]).to(torch.float64) + weight_offset
                sum_g, sum_g2, sum_gc = gamma * sum_g, gamma * gamma * sum_g2, gamma * sum_gc
            red.update(sum_g=sum_g, sum_g2=sum_g2, sum_gz=(sum_gc + offset * sum_g) / scale)
        sizes = [sums["n"].numel() for _, sums in members]
        parts = {key: value.split(sizes) for key, value in red.items()}
        for i, (record, _) in enumerate(members):
            record.reductions = {key: part[i] for key, part in parts.items()}


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
