"""Population normalization with per-example or microbatch gradients ("Extreme Normalization" (under review) §3.1, MATH.md §4).

The forward pass normalizes with the EMA moments (mu-bar, nu-bar), so training and inference see
the same values; the backward pass sends the gradient to the example's (microbatch size 1) or the
microbatch's own moments through :func:`scale_grad`, with shrinkage ``r_m``, ``r_v``, the cap
``min(nu-bar / nu_b, f_max)`` on the second-moment gradient and the ``u_max`` clip of the
normalized activations. Microbatch size 1 needs no interaction between examples; size k > 1 is
the seed's improved batch renormalization (§5). An optional fixed rotation sits between the
normalization and the nonlinearity ("Extreme Normalization" (under review) §2.2).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from normscope.errors import DataShapeError, InvalidArgumentError, UnknownNameError
from normscope.ops.base import channel_view, stats_dtype

ROTATIONS = ("hadamard", "random", "auto")
NO_ROTATION = (None, "none")


def scale_grad(value: Tensor, source: Tensor, r: Tensor | float) -> Tensor:
    """ScaleGrad(S, Q, r) of "Extreme Normalization" (under review) §3.1: value ``S``, gradient ``r * dL/dS`` sent to ``Q``.

    .. math:: \\mathrm{ScaleGrad}(S, Q, r) = \\mathrm{sg}(r)\\,Q + \\mathrm{sg}(S - rQ)

    ``sg`` is stop-gradient. Written with ``detach`` only, so it composes with ``torch.func``.
    """
    r = r.detach() if isinstance(r, Tensor) else r
    return r * source + (value - r * source).detach()


def rotation_matrix(width: int, kind: str = "auto", seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fixed orthogonal ``(width, width)`` matrix R ("Extreme Normalization" (under review) §2.2), computed in float64 and
    cast once to ``dtype`` (so ``R R^T = I`` to the rounding of ``dtype``).

    ``"hadamard"``: the Sylvester Hadamard matrix / sqrt(width) (width a power of 2);
    ``"random"``: a Haar-random orthogonal matrix drawn with ``seed``;
    ``"auto"``: Hadamard where the width is a power of 2, else random.
    """
    from scipy.linalg import hadamard
    from scipy.stats import ortho_group

    if kind not in ROTATIONS:
        raise UnknownNameError("rotation", kind, ROTATIONS)
    power_of_two = width >= 1 and width & (width - 1) == 0
    if kind == "hadamard" and not power_of_two:
        raise InvalidArgumentError(f"a Hadamard rotation needs a width that is a power of 2 (got {width}); use 'random' or 'auto'")
    if kind == "hadamard" or (kind == "auto" and power_of_two):
        matrix = hadamard(width) / math.sqrt(width)
    elif width == 1:
        matrix = np.ones((1, 1))
    else:
        matrix = ortho_group.rvs(width, random_state=seed)
    return torch.as_tensor(matrix, dtype=dtype)


def example_moments(x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example moments ``mu_b = E_i x_{b,i}`` and ``nu_b = E_i (x_{b,i} - mu-bar)^2``, shape (N, C).

    ``E_i`` runs over the spatial positions of one example and channel ("Extreme Normalization" (under review) §3.1).
    """
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2), (flat - mean.view(1, -1, 1)).pow(2).mean(dim=2)


def clip_factor(nu_b: Tensor, var: Tensor, eps: float, u_max: float) -> Tensor:
    """The ``u_max`` clip ``sg(min(1, u_max * sqrt((nu-bar + eps) / (nu_b + eps))))`` ("Extreme Normalization" (under review) Alg. 1)."""
    ratio = ((var + eps) / (nu_b + eps)).detach()
    return (u_max * ratio.sqrt()).clamp(max=1.0)


def normalize_shared(x: Tensor, mean: Tensor, var: Tensor, eps: float, u_max: float = math.inf) -> Tensor:
    """``q = (x - mean) / sqrt(var + eps) * clip_b`` with shared moments ``mean``, ``var`` (C,).

    The moments may carry gradients (the second tower of "Extreme Normalization" (under review) §3.4 uses mu-double-dagger and
    nu-double-dagger here); ``clip_b`` is the per-example ``u_max`` clip, a constant.
    """
    scale = torch.rsqrt(var + eps)
    q = (x - channel_view(mean, x)) * channel_view(scale, x)
    if math.isfinite(u_max):
        _, nu_b = example_moments(x.detach(), mean.detach())
        clip = clip_factor(nu_b, var, eps, u_max)
        q = q * clip.view(*clip.shape, *([1] * (x.dim() - 2)))
    return q


def _group_norm(
    xg: Tensor, mean: Tensor, var: Tensor, eps: float, r_m: float, r_v: float, f_max: float, u_max: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``xg`` of shape (G, k, C, S): G groups of k examples, S positions."""
    mu_g = xg.mean(dim=(1, 3))
    mu_d = scale_grad(mean.expand_as(mu_g), mu_g, r_m)
    p = xg - mu_d[:, None, :, None]
    nu_g = (xg - mean.detach()[None, None, :, None]).pow(2).mean(dim=(1, 3))
    ratio = ((var + eps) / (nu_g + eps)).detach()
    nu_d = scale_grad(var.expand_as(nu_g), nu_g, r_v * ratio.clamp(max=f_max))
    factor = torch.rsqrt(nu_d + eps) * (u_max * ratio.sqrt()).clamp(max=1.0)
    return p * factor[:, None, :, None], mu_g, nu_g


def normalize_groups(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    *,
    microbatch: int = 1,
    eps: float = 1e-5,
    r_m: float = 1.0,
    r_v: float = 1.0,
    f_max: float = 2.0,
    u_max: float = 5.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Population normalization with gradients to the group moments ("Extreme Normalization" (under review) §3.1).

    Examples are split in order into groups of ``microbatch`` (the last group takes the rest).
    Per group g and channel: ``mu_g = E x``, ``mu† = ScaleGrad(mu-bar, mu_g, r_m)``,
    ``p = x - mu†``, ``nu_g = E (x - mu-bar)^2`` (the value of ``E p^2``),
    ``nu† = ScaleGrad(nu-bar, nu_g, r_v min((nu-bar + eps) / (nu_g + eps), f_max))``,

    .. math:: q = \\frac{p}{\\sqrt{\\nu^\\dagger + \\epsilon}}\\,
              \\mathrm{sg}\\Big(\\min\\big(1, u_{max}\\sqrt{\\tfrac{\\bar\\nu + \\epsilon}{\\nu_g + \\epsilon}}\\big)\\Big)

    The value of q is ``(x - mu-bar) / sqrt(nu-bar + eps)`` (times the clip). This is the
    ``"fixed_mean"`` arrangement, not Algorithm 1 as written (:func:`algorithm1_q`): ``nu_g`` is
    taken about the constant mu-bar with no gradient through the mean (at the population the
    Jacobian of nu to the mean, ``-2 E(x - mu)``, is zero), and the mean is taken after the layer.
    It is the arrangement for which the two-stage estimate with one normalization layer is exact
    (MATH.md §4). Returns
    ``(q, mu_g, nu_g)`` with q shaped like ``x`` (N, C, *) and the moments (groups, C).
    """
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n, c, -1)
    k = min(microbatch, n)
    head = (n // k) * k
    pieces = [(flat[:head], k)] + ([(flat[head:], n - head)] if head < n else [])
    outputs = [
        _group_norm(part.reshape(-1, size, c, part.shape[-1]), mean, var, eps, r_m, r_v, f_max, u_max)
        for part, size in pieces
    ]
    q = torch.cat([out[0].reshape(-1, c, flat.shape[-1]) for out in outputs]).reshape(x.shape)
    return q, torch.cat([out[1] for out in outputs]), torch.cat([out[2] for out in outputs])


class _FusedGroupNorm(torch.autograd.Function):
    """``gamma * q`` of :func:`normalize_groups` with its ScaleGrad backward written out, for
    ``x`` (N, C, S) in groups of k (N divisible by k). Per group and channel, with
    ``s^2 = nu-bar + eps``, ``a = clip / s``, ``c = r_v min((nu-bar + eps) / (nu_g + eps), f_max)``,
    ``G = gamma * dL/d(gamma q)`` and means over the group's examples and positions:

    .. math:: \\frac{\\partial L}{\\partial x} = a\\Big(G - r_m \\overline{G}
              - c\\,\\frac{x - \\bar\\mu}{s^2}\\,\\overline{G\\,(x - \\bar\\mu)}\\Big)

    Two reductions and one pass, like BatchNorm's backward, instead of autograd through the
    ScaleGrad graph; :func:`normalize_groups` is its reference (tests compare the two).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mean, var, weight, k, eps, r_m, r_v, f_max, u_max):  # type: ignore[override]
        n, c, positions = x.shape
        centered = x.reshape(n // k, k, c, positions) - mean[None, None, :, None]
        nu_g = centered.pow(2).mean(dim=(1, 3))
        ratio = (var + eps) / (nu_g + eps)
        a = (u_max * ratio.sqrt()).clamp(max=1.0) * torch.rsqrt(var + eps)
        q = centered * a[:, None, :, None]
        return (q * weight[None, None, :, None]).reshape(n, c, positions), q, nu_g, r_v * ratio.clamp(max=f_max), a

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, _, var, weight, k, eps, r_m, _, _, _ = inputs
        _, q, nu_g, coef, a = output
        ctx.save_for_backward(var, weight, q, coef, a)
        ctx.eps, ctx.r_m = eps, r_m
        ctx.mark_non_differentiable(q, nu_g, coef, a)

    @staticmethod
    def backward(ctx, grad_y, _q, _nu, _coef, _a):  # type: ignore[override]
        var, weight, q, coef, a = ctx.saved_tensors
        groups, k, c, positions = q.shape
        gy = grad_y.reshape(groups, k, c, positions)
        gyq = (gy * q).mean(dim=(1, 3))
        gy_mean = gy.mean(dim=(1, 3))
        w = weight[None, :]
        # (x - mu-bar) = q / a, so mean(G (x - mu-bar)) = w * gyq / a and its term is q * slope
        slope = coef * w * gyq / (a * a * (var + ctx.eps))
        grad_x = torch.addcmul(
            (-ctx.r_m * a * w * gy_mean)[:, None, :, None] - q * (a * slope)[:, None, :, None],
            gy,
            (a * w)[:, None, :, None],
        )
        grad_weight = (gyq * (k * positions)).sum(dim=0)
        return grad_x.reshape(groups * k, c, positions), None, None, grad_weight, None, None, None, None, None, None


def fused_normalize_groups(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    *,
    microbatch: int = 1,
    eps: float = 1e-5,
    r_m: float = 1.0,
    r_v: float = 1.0,
    f_max: float = 2.0,
    u_max: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """``(gamma * q, nu)``: q and its gradient those of :func:`normalize_groups` ("Extreme Normalization" (under review) §3.1),
    computed by :class:`_FusedGroupNorm`, and each example's group second moment ``nu_g`` (N, C),
    a constant. The EMA moments get no gradient (ScaleGrad stops it)."""
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n, c, -1)
    w = torch.ones(c, dtype=x.dtype, device=x.device) if weight is None else weight
    k = min(microbatch, n)
    head = (n // k) * k
    parts = [(flat[:head], k)] + ([(flat[head:], n - head)] if head < n else [])
    mean, var = mean.detach().clone(), var.detach().clone()
    outs = [_FusedGroupNorm.apply(part, mean, var, w, size, eps, r_m, r_v, f_max, u_max) for part, size in parts]
    y = outs[0][0] if len(outs) == 1 else torch.cat([out[0] for out in outs])
    nu_b = torch.cat([out[2].repeat_interleave(size, dim=0) for out, (_, size) in zip(outs, parts)])
    return y.reshape(x.shape), nu_b


def affine_rotate(q: Tensor, weight: Tensor | None, bias: Tensor | None, rotation: Tensor | None) -> Tensor:
    """``y = R (gamma * q) + beta`` over the channel dim 1 ("Extreme Normalization" (under review) Alg. 1: Rotate(q ⊙ γ) + β)."""
    y = q if weight is None else q * channel_view(weight, q)
    if rotation is not None:
        y = torch.movedim(torch.movedim(y, 1, -1) @ rotation.T, -1, 1)
    return y if bias is None else y + channel_view(bias, q)


ARRANGEMENTS = ("algorithm1", "fixed_mean")


def group_mean(values: Tensor, k: int) -> Tensor:
    """Each row of ``values`` (N, C) replaced by the mean over its group: examples in order in
    groups of ``k``, the last group taking the rest."""
    n = values.shape[0]
    if k == 1:
        return values
    if n % k == 0:  # equal groups: a reshape, no (groups, N) membership matrix
        return values.reshape(n // k, k, -1).mean(dim=1, keepdim=True).expand(n // k, k, values.shape[1]).reshape(values.shape)
    ids = torch.arange(n, device=values.device) // k
    members = torch.nn.functional.one_hot(ids).to(values.dtype).T  # (groups, N)
    means = (members @ values) / members.sum(dim=1, keepdim=True)
    return means[ids]


def algorithm1_q(
    y: Tensor,
    source: Tensor,
    source_mean: Tensor,
    var: Tensor,
    center: Callable[[Tensor], Tensor],
    *,
    microbatch: int = 1,
    eps: float = 1e-5,
    r_m: float = 1.0,
    r_v: float = 1.0,
    f_max: float = 2.0,
    u_max: float = 5.0,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalized values q of "Extreme Normalization" (under review) Algorithm 1, groups of ``microbatch`` examples (§3.1, §5).

    ``y`` (N, C, *) is the layer's output ``conv(x, W)``; ``source`` (N, C_s, *) is what the mean is
    taken over: the layer's input x (C_s = C_in) or, without one, ``y`` itself; ``source_mean``
    (C_s,) its EMA mu-bar; ``center`` maps a mean (N, C_s) to what is subtracted from ``y`` (N, C):
    ``mu . sum W + b`` with the current weights, or the identity. ``var`` is nu-bar without eps.
    Per example b of group g, ``mu_b = E_i source_{b,i}``,

    .. math:: \\mu^\\ddagger = \\mathrm{ScaleGrad}(\\bar\\mu, E_{g}\\mu_b, r_m),\\quad
              p = y - \\mathrm{center}(\\mu^\\ddagger),\\quad \\nu_b = E_i p_{b,i}^2 + \\epsilon,

    .. math:: \\nu^\\ddagger = \\mathrm{ScaleGrad}\\big(\\bar\\nu + \\epsilon, E_g \\nu_b,
              r_v \\min(\\tfrac{\\bar\\nu + \\epsilon}{E_g \\nu_b}, f_{max})\\big),\\quad
              q = \\frac{p}{\\sqrt{\\nu^\\ddagger}}\\,
              \\mathrm{sg}\\Big(\\min\\big(1, u_{max}\\sqrt{\\tfrac{\\bar\\nu + \\epsilon}{\\nu_b}}\\big)\\Big)

    (k = 1: the per-example mu-dagger, nu-dagger; k > 1: the improved batch renormalization of §5,
    mu-double-dagger and nu-double-dagger over the microbatch). nu keeps its gradient through
    mu-dagger; the ``u_max`` clip is per example, as the paper clips "the per-example second
    moment". The value of q is ``(y - center(mu-bar)) / sqrt(nu-bar + eps)`` times the clip.
    With ``weight`` (gamma, C) the first output is ``gamma * q``, gamma folded into the per-example
    factor (one elementwise product fewer, forward and backward).
    Returns ``(q, mu_b, nu_b - eps)``: q like ``y``, the per-example moments (N, C_s), (N, C).
    """
    n = y.shape[0]
    k = min(microbatch, n)
    # sums over positions divided afterwards: the division acts on (N, C), not on every element in the backward
    mu_b = source.reshape(n, source.shape[1], -1).sum(dim=2) / source[0, 0].numel()
    mu_dd = scale_grad(source_mean.detach().expand_as(mu_b), group_mean(mu_b, k), r_m)
    shape = (n, y.shape[1]) + (1,) * (y.dim() - 2)
    p = y + (-center(mu_dd)).reshape(shape)  # the sign flips on (N, C), not on the gradient of every element
    nu_b = p.reshape(n, y.shape[1], -1).square().sum(dim=2) / y[0, 0].numel() + eps
    nu_g = group_mean(nu_b, k)
    nu_bar = (var.detach() + eps).expand_as(nu_b)
    ratio = (nu_bar / nu_g).detach()
    nu_dd = scale_grad(nu_bar, nu_g, r_v * ratio.clamp(max=f_max))
    clip = (u_max * (nu_bar / nu_b).detach().sqrt()).clamp(max=1.0)
    factor = torch.rsqrt(nu_dd) * clip
    q = p * (factor if weight is None else factor * weight).reshape(shape)
    return q, mu_b.detach(), nu_b.detach() - eps


def producer_center(producer: nn.Module, mean: Tensor) -> Tensor:
    """``mean . sum W + b`` ("Extreme Normalization" (under review) Alg. 1, §3.3): what ``producer`` (Linear or Conv, one group)
    gives for an input equal to ``mean`` (M, C_in) at every position, circular padding assumed, with
    its current weights; (M, C_out)."""
    weight = producer.weight
    summed = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2)
    out = mean.to(weight.dtype) @ summed.T
    return out if producer.bias is None else out + producer.bias


class _FeedInput:
    """Forward pre-hook of a producer: hands the layer's input to its PopulationNorm (a callable
    object, not a closure, so ``copy.deepcopy`` of the model points it at the copied norm)."""

    def __init__(self, norm: "PopulationNorm") -> None:
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.norm.__dict__["_feed"] = args[0] if args and isinstance(args[0], Tensor) else None


def population_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    microbatch: int = 1,
    r_m: float = 1.0,
    r_v: float = 1.0,
    f_max: float = 2.0,
    u_max: float = 5.0,
    rotation: Tensor | None = None,
) -> Tensor:
    """Functional :class:`PopulationNorm`: ``y = R (gamma * q) + beta`` ("Extreme Normalization" (under review) §3.1, Alg. 1).

    Training: q from :func:`fused_normalize_groups` (the values and gradient of
    :func:`normalize_groups`, backward written out), then the EMAs move in place towards the batch
    moments, ``mu-bar <- (1 - m) mu-bar + m E_b mu_b`` and ``nu-bar <- (1 - m) nu-bar + m E_b nu_b``
    with ``nu_b`` the second moment about the old mu-bar (no Bessel correction: the seed's
    definition); ``momentum`` 0 or None leaves them as they are (None: the caller averages).
    Eval: ``q = (x - mu-bar) / sqrt(nu-bar + eps)`` with no clip.
    """
    compute = stats_dtype(x)
    xc = x.to(compute)
    mean, var = running_mean.to(compute), running_var.to(compute)
    w = None if weight is None else weight.to(compute)
    if training:
        qw, nu_b = fused_normalize_groups(
            xc, mean, var, w, microbatch=microbatch, eps=eps, r_m=r_m, r_v=r_v, f_max=f_max, u_max=u_max
        )
        if momentum:
            with torch.no_grad():
                batch_mean = xc.detach().mean(dim=[0, *range(2, x.dim())])
                running_mean.lerp_(batch_mean.to(running_mean.dtype), momentum)
                running_var.lerp_(nu_b.mean(0).to(running_var.dtype), momentum)
    else:
        qw = normalize_shared(xc, mean, var, eps)
        qw = qw if w is None else qw * channel_view(w, x)
    rot = None if rotation is None else rotation.to(compute)
    b = None if bias is None else bias.to(compute)
    return affine_rotate(qw, None, b, rot).to(x.dtype)


class PopulationNorm(_NormBase):
    """Population normalization with per-example / microbatch gradients ("Extreme Normalization" (under review) §3.1, Algorithm 1).

    .. math:: y = R\\Big(\\gamma \\odot \\frac{p}{\\sqrt{\\nu^\\dagger}}\\Big) + \\beta,
              \\quad p = \\mathrm{conv}(x, W) - \\mu^\\dagger \\textstyle\\sum W,\\;
              \\mu^\\dagger = \\mathrm{ScaleGrad}(\\bar\\mu, \\mu_g, r_m),\\;
              \\nu^\\dagger = \\mathrm{ScaleGrad}(\\bar\\nu, E p^2 + \\epsilon, r_v\\min(\\bar\\nu/\\nu_g, f_{max}))

    The forward value always uses the EMAs, so training and inference agree; in training the
    gradient goes to the moments of each group of ``microbatch`` examples (1: per example, no
    interaction between examples; k: the seed's improved batch renormalization, §5). Statistics
    are per channel (dim 1) over the group's examples and all positions, for inputs ``(N, C)`` or
    ``(N, C, *)``.

    Two arrangements (``arrangement``):

    * ``"algorithm1"`` (default), the paper's Algorithm 1 (:func:`algorithm1_q`). Where the op
      knows the Linear/Conv feeding it (:func:`normscope.ops.swap.swap_norms` attaches it,
      :meth:`attach_producer`), mu-bar is the EMA of that layer's *input* (buffer ``input_mean``,
      C_in) and ``p = conv(x, W) - mu-dagger . sum W`` with the current weights (§3.3); elsewhere
      mu-bar is the EMA of the op's input (``running_mean``). Either way ``nu = E p^2 + eps``
      keeps its gradient through mu-dagger. With a producer, ``running_mean`` holds
      ``mu-bar . sum W + b`` at the last training step (for the statistics tables and folding).
    * ``"fixed_mean"``: nu about the fixed EMA mean mu-bar with no gradient through the mean, the
      mean after the layer (:func:`population_norm`). With one normalization level this is the
      arrangement for which two-stage backprop equals the population gradient exactly (MATH.md §4);
      :func:`normscope.ops.two_stage.two_stage_step` always uses it.

    With ``running_mean``/``running_var`` equal to the batch mean and biased variance, r_m = r_v = 1,
    ``microbatch >= N`` and no producer, the output and its gradient equal ``torch.nn.BatchNorm``
    in training (both arrangements).

    Args:
        num_features: channels C.
        eps: added to nu before the square root. Default: 1e-5.
        momentum: the EMA rate, the weight of each batch in mu-bar and nu-bar; 0 freezes the EMAs
            (no in-place update, so the layer runs under ``torch.func`` transforms), None gives a
            cumulative average. It is this op's own rate: :func:`normscope.ops.swap.swap_norms`
            does not copy the replaced BatchNorm's momentum into it. Default: 0.2 ("Extreme Normalization" (under review) §5).
        affine: learn gamma and beta. Default: True.
        microbatch: examples per normalization group. Default: 1 (per example, "Extreme Normalization" (under review) §3.1).
        r_m: shrinkage of the gradient through the mean. Default: 1.0 ("Extreme Normalization" (under review) §5: not used unless noted).
        r_v: shrinkage of the gradient through the second moment. Default: 1.0 ("Extreme Normalization" (under review) §5).
        f_max: cap of the rescaling ``nu-bar / nu_g`` of that gradient. Default: 2.0 ("Extreme Normalization" (under review) §2.2, §5).
        u_max: clip of the RMS of normalized activations per group, in training. Default: 5.0 ("Extreme Normalization" (under review) §5).
        rotation: None or ``"none"``, ``"hadamard"``, ``"random"`` or ``"auto"`` (Hadamard if C is
            a power of 2). Default: None ("Extreme Normalization" (under review) §5 adds it for small microbatches).
        rotation_seed: seed of the random rotation. Default: 0.
        warmup: EMA-only training steps (forward passes that move the EMAs, no weight update)
            before the first weight update; read by the training loop
            (:func:`normscope.ops.ema.ema_schedule`), not by ``forward``. Default: 200 ("Extreme Normalization" (under review) §5).
        refresh: EMA-only steps after each of the first ``refresh_updates`` weight updates.
            Default: 50 ("Extreme Normalization" (under review) §5).
        refresh_updates: how many of the first weight updates are followed by ``refresh`` EMA-only
            steps. Default: 50 ("Extreme Normalization" (under review) §5).
        arrangement: ``"algorithm1"`` or ``"fixed_mean"`` (above). Default: ``"algorithm1"``.

    Shape:
        Input ``(N, C)`` or ``(N, C, *)``; output the same.

    Example::

        >>> norm = PopulationNorm(16, microbatch=2, rotation="hadamard")
        >>> y = norm(torch.randn(8, 16, 4, 4))
    """

    own_momentum = True  # swap_norms keeps this op's EMA rate instead of copying BatchNorm's momentum

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.2,
        affine: bool = True,
        microbatch: int = 1,
        *,
        r_m: float = 1.0,
        r_v: float = 1.0,
        f_max: float = 2.0,
        u_max: float = 5.0,
        rotation: str | None = None,
        rotation_seed: int = 0,
        warmup: int = 200,
        refresh: int = 50,
        refresh_updates: int = 50,
        arrangement: str = "algorithm1",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        if not isinstance(microbatch, int) or microbatch < 1:
            raise InvalidArgumentError(f"microbatch must be an integer >= 1 (got {microbatch!r})")
        for name, value in (("r_m", r_m), ("r_v", r_v)):
            if not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(f"{name} must be in [0, 1] (got {value!r})")
        for name, value in (("f_max", f_max), ("u_max", u_max)):
            if not value > 0:
                raise InvalidArgumentError(f"{name} must be > 0 (got {value!r})")
        for name, value in (("warmup", warmup), ("refresh", refresh), ("refresh_updates", refresh_updates)):
            if not (isinstance(value, int) and value >= 0):
                raise InvalidArgumentError(f"{name} must be an integer >= 0 (got {value!r})")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise InvalidArgumentError(f"momentum (the EMA rate) must be in [0, 1] or None (got {momentum!r})")
        if arrangement not in ARRANGEMENTS:
            raise UnknownNameError("PopulationNorm arrangement", arrangement, ARRANGEMENTS)
        self.arrangement = arrangement
        self.microbatch, self.r_m, self.r_v, self.f_max, self.u_max = microbatch, r_m, r_v, f_max, u_max
        self.warmup, self.refresh, self.refresh_updates = warmup, refresh, refresh_updates
        rotation = None if rotation in NO_ROTATION else rotation
        self.rotation_kind, self.rotation_seed = rotation, rotation_seed
        # float64 master: every cast of the module (.double(), .to(dtype)) recasts the buffer from it,
        # so a float64 module gets a float64-orthogonal R, not a float32 matrix cast up (see _apply)
        self._rotation64 = None if rotation is None else rotation_matrix(num_features, rotation, rotation_seed, torch.float64)
        buffer = None if self._rotation64 is None else self._rotation64.to(device=device, dtype=dtype or torch.get_default_dtype())
        self.register_buffer("rotation", buffer, persistent=False)

    def freeze_statistics(self) -> None:
        """Stop moving the EMAs (momentum 0): the training-mode function then stays the one at the
        current mu-bar, nu-bar, as the curvature analyzers' private copies need (each forward of a
        Hessian-vector product would otherwise move them, and change the function being differentiated)."""
        self.momentum = 0.0

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.rotation is not None:
            self.rotation = self._rotation64.to(device=self.rotation.device, dtype=self.rotation.dtype)
        return self

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise DataShapeError(
                f"PopulationNorm expected input (N, {self.num_features}, *) (got shape {tuple(x.shape)})"
            )

    @property
    def producer(self) -> nn.Module | None:
        """The Linear/Conv feeding this op, attached by :meth:`attach_producer` (not a submodule)."""
        return self.__dict__.get("_producer")

    def attach_producer(self, producer: nn.Module) -> bool:
        """Take the mean over ``producer``'s input ("Extreme Normalization" (under review) Alg. 1, §3.3): register a
        forward pre-hook on it that hands its input to this op, and an ``input_mean`` buffer
        (C_in, zeros: the EMA-only warm-up fills it). Only for the ``"algorithm1"`` arrangement and
        a Linear or one-group Conv with ``num_features`` outputs; returns whether it attached."""
        groups = getattr(producer, "groups", 1)
        weight = getattr(producer, "weight", None)
        if (
            self.arrangement != "algorithm1" or self.producer is not None or groups != 1
            or not isinstance(producer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            or weight is None or weight.shape[0] != self.num_features
        ):
            return False
        self.register_buffer("input_mean", torch.zeros(weight.shape[1], device=weight.device, dtype=self.running_mean.dtype))
        self.__dict__["_producer"] = producer
        producer.register_forward_pre_hook(_FeedInput(self))
        return True

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        momentum = self.momentum
        if self.training and momentum != 0:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        if self.arrangement == "fixed_mean":
            return population_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=self.training,
                momentum=momentum,
                eps=self.eps,
                microbatch=self.microbatch,
                r_m=self.r_m,
                r_v=self.r_v,
                f_max=self.f_max,
                u_max=self.u_max,
                rotation=self.rotation,
            )
        return self._algorithm1(x, momentum)

    def _algorithm1(self, x: Tensor, momentum: float | None) -> Tensor:
        compute = stats_dtype(x)
        xc = x.to(compute)
        var = self.running_var.to(compute)
        feed = self.__dict__.pop("_feed", None)
        producer = self.producer
        fed = producer is not None and (not self.training or (feed is not None and feed.shape[0] == x.shape[0]))
        if fed:
            source_mean = self.input_mean
            center: Callable[[Tensor], Tensor] = lambda mean: producer_center(producer, mean).to(compute)
        else:
            source_mean = self.running_mean
            center = lambda mean: mean
        w = None if self.weight is None else self.weight.to(compute)
        if self.training:
            source = feed.to(compute) if fed else xc
            q, mu_b, nu_b = algorithm1_q(
                xc, source, source_mean.to(compute), var, center, microbatch=self.microbatch, eps=self.eps,
                r_m=self.r_m, r_v=self.r_v, f_max=self.f_max, u_max=self.u_max, weight=w,
            )
            w = None  # folded into q
            if momentum:
                with torch.no_grad():
                    source_mean.lerp_(mu_b.mean(0).to(source_mean.dtype), momentum)
                    self.running_var.lerp_(nu_b.mean(0).to(self.running_var.dtype), momentum)
                    if fed:
                        self.running_mean.copy_(center(self.input_mean[None].to(compute))[0])
        else:
            shift = center(source_mean[None].to(compute))[0]
            q = (xc - channel_view(shift, xc)) * channel_view(torch.rsqrt(var + self.eps), xc)
        b = None if self.bias is None else self.bias.to(compute)
        rot = None if self.rotation is None else self.rotation.to(compute)
        return affine_rotate(q, w, b, rot).to(x.dtype)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"microbatch={self.microbatch}, r_m={self.r_m}, r_v={self.r_v}, f_max={self.f_max}, u_max={self.u_max}, "
            f"warmup={self.warmup}, refresh={self.refresh}, refresh_updates={self.refresh_updates}, "
            f"arrangement={self.arrangement!r}" + (", producer attached" if self.producer is not None else "")
        )
        return text if self.rotation_kind is None else f"{text}, rotation={self.rotation_kind!r}"
