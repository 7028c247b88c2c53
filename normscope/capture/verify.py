"""Self-verifying readings: does a site's reading reproduce what the site actually computed?

A reading (:class:`~normscope.registry.Layout`: partition rule, centering, eps, affine
parameters, weight offset, running statistics, a fused activation) predicts the site's output
from its input, ``y_hat = act((gamma + offset) * (x - shift_P) / scale_P + beta)`` (MATH.md §1),
recomputed in float64. Capture checks it on each site's first recorded call against the output
``y`` the site returned, element by element, against a bound scaled to the output's magnitude
and to what rounding inside the site can do:

    ``error = max_i |y_i - y_hat_i| / (max |y_hat| + |gamma_i + offset| * max_P |x| / scale_P)``
    ``<= TOLERANCE[y.dtype]``

The second term is the rounding of ``x - shift`` (relative to the input's magnitude) divided by
the normalizer ``scale_P = sqrt(var_P + eps)``: a constant BatchNorm channel, a 1x1 feature map
or a variance of 1e-48 has an output that is rounding noise of size ``u |x| / sqrt(eps)`` around
``beta``, which a relative error ``/ max |y_hat|`` would divide by nearly zero. The tolerance
allows the model's own float32 arithmetic inside a float64 model (an RMSNorm that computes in
float32) but not a wrong partition, centering, a missing affine, offset or activation.

A class whose first reading fails is read by behaviour (:func:`read_by_behaviour`): candidate
readings (centered or not; over the last dim, the channel dim, groups or instances; weight
offset 0 or 1; no activation, the module's parameter-free children, ReLU, GELU or SiLU after it)
are tried against the same output, the first that reproduces it wins. A site no reading
reproduces is *unverified*: capture drops its records, so no analysis uses numbers from a wrong
reading, and lists it with what was compared and what was tried.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope.registry import KINDS, Layout, affine_like, from_rows, partition_moments, to_rows

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass
class Verification:
    """The check of one site's reading on its first call.

    ``error``: the bounded error of the module docstring (NaN when nothing could be compared);
    ``compared``: a sentence naming the shapes, the reading and the figure; ``reading``: the
    reading that was checked (the winning candidate when read by behaviour).
    """

    site: str
    module_type: str
    kind: str
    rule: str
    error: float
    tolerance: float
    compared: str
    reading: str = ""

    @property
    def verified(self) -> bool:
        return self.error <= self.tolerance

    def as_dict(self) -> dict:
        return {"name": self.site, "module_type": self.module_type, "kind": self.kind, "rule": self.rule,
                "error": None if self.error != self.error else float(self.error), "tolerance": self.tolerance,
                "compared": self.compared, "reading": self.reading}


@dataclass(frozen=True)
class Reading:
    """A candidate reading of a custom class: kind, partition rule, weight offset, the activation
    that follows (``None``, ``child:<attribute>`` for one of the module's children, or a name of
    :data:`ACTIVATIONS`). Applied to a call's base layout with :func:`apply_reading`."""

    kind: str
    rule: str
    weight_offset: float
    activation: str | None

    def describe(self) -> str:
        text = f"{self.kind}/{self.rule}"
        if self.weight_offset:
            text += f", weight offset {self.weight_offset:g}"
        return text + (f", then {self.activation.removeprefix('child:')}" if self.activation else "")


def describe_layout(layout: Layout, activation: str | None = None) -> str:
    text = f"{layout.kind.name}/{layout.rule}, eps={layout.eps:g}"
    if layout.weight_offset:
        text += f", weight offset {layout.weight_offset:g}"
    return text + (f", then {activation.removeprefix('child:')}" if activation else "")


def apply_reading(reading: Reading, base: Layout, module: nn.Module | None) -> Layout:
    """``base`` (the call's layout from the registry: eps, affine, groups) read as ``reading``."""
    activation = None
    if reading.activation is not None:
        activation = (getattr(module, reading.activation.removeprefix("child:")).forward
                      if reading.activation.startswith("child:") else ACTIVATIONS[reading.activation])
    groups = base.groups if base.groups > 1 else int(getattr(module, "num_groups", 1) or 1)
    return replace(base, kind=KINDS[reading.kind], rule=reading.rule, weight_offset=reading.weight_offset,
                   activation=activation, groups=groups, batch_stats=True, running_mean=None, running_var=None)


def _normalized(x: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """``z`` in float64 and the input's shape, and ``max_P |x| / scale_P`` per element (the
    rounding term of the bound; zero for weight norm, whose output is not centered data)."""
    rows = to_rows(x.detach().to(torch.float64), layout)
    shift, scale = partition_moments(rows, layout)
    z = from_rows((rows - shift) / scale, x.shape, layout)
    if layout.rule == "weight":
        return z, torch.zeros_like(z)
    reach = torch.maximum(rows.abs().amax(dim=1, keepdim=True), shift.abs()) / scale
    return z, from_rows(reach.expand_as(rows), x.shape, layout)


def _affine(z: Tensor, reach: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """``(y_hat, rounding term)`` from ``z``: the affine, the offset and the activation applied."""
    if layout.rule == "weight":
        return z * layout.weight.detach().to(z.device, torch.float64), reach
    gamma = affine_like(layout.weight, z, layout)
    if gamma is not None:
        a = gamma.detach().to(z.device, torch.float64) + layout.weight_offset
        z, reach = z * a, reach * a.abs()
    beta = affine_like(layout.bias, z, layout)
    y = z if beta is None else z + beta.detach().to(z.device, torch.float64)
    return (y if layout.activation is None else layout.activation(y)), reach


def predicted_output(x: Tensor, layout: Layout) -> Tensor:
    """``y_hat`` in float64 and the input's shape: the reading applied to ``x``."""
    return _affine(*_normalized(x, layout), layout)[0]


def pre_activation(x: Tensor, layout: Layout) -> Tensor:
    """``y = (gamma + offset) z + beta`` before a fused activation, in float64."""
    return predicted_output(x, replace(layout, activation=None))


def _bounded_error(actual: Tensor, expected: Tensor, reach: Tensor) -> float | None:
    """The error of the module docstring over the finite elements (None: none is finite)."""
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not bool(finite.any()):
        return None
    bound = (expected[finite].abs().max() + reach[finite]).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((actual - expected)[finite].abs() / bound).max())


def _moment_overflows(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``x**2`` exceeds the largest finite value of ``dtype`` somewhere (a kernel computing
    the variance in ``dtype`` overflows; the float64 reading does not)."""
    if not dtype.is_floating_point or not x.numel():
        return False
    largest = x.detach().abs().max().to(torch.float64)
    return bool(torch.isfinite(largest)) and float(largest) ** 2 > torch.finfo(dtype).max


def verify(site: str, module_type: str, layout: Layout, x: Tensor, y: object, activation: str | None = None) -> Verification:
    """Check that ``layout`` reproduces the output ``y`` of the site from its input ``x``."""
    rule = layout.rule
    tolerance = TOLERANCE.get(getattr(y, "dtype", None), TOLERANCE[torch.float32])
    reading = describe_layout(layout, activation)

    def result(error: float, text: str) -> Verification:
        return Verification(site, module_type, layout.kind.name, rule, error, tolerance, text, reading)

    if not isinstance(y, Tensor) or y.shape != x.shape:
        what = f"output {tuple(y.shape)}" if isinstance(y, Tensor) else f"a {type(y).__name__} output"
        return result(float("nan"), f"input {tuple(x.shape)} and {what} differ in shape, so the reading ({reading}) cannot be checked")
    try:
        expected, reach = _affine(*_normalized(x, layout), layout)
    except (RuntimeError, ValueError, IndexError) as error:
        return result(float("nan"), f"the reading ({reading}) does not apply to input {tuple(x.shape)}: {str(error).splitlines()[0]}")
    actual = y.detach().to(expected.device, torch.float64)
    if _moment_overflows(x, y.dtype) and not bool(torch.isfinite(actual).all()):
        return result(0.0, f"input {tuple(x.shape)}: its second moment overflows {y.dtype} (max |x| = "
                           f"{float(x.detach().abs().max()):.3g}), so the kernel's output is non-finite where the float64 "
                           f"reading ({reading}) is not; the reading is not checked on this input")
    error = _bounded_error(actual, expected, reach)
    if error is None:
        if torch.equal(torch.isfinite(expected), torch.isfinite(actual)):  # e.g. a NaN input spread over a whole batch
            return result(0.0, f"input {tuple(x.shape)}: no finite output; the reading ({reading}) is non-finite exactly where the output is")
        return result(float("nan"), f"input {tuple(x.shape)}: no finite output to compare")
    return result(error, f"max |y - y_hat| / (max |y_hat| + |gamma + offset| max|x| / scale) = {error:.2g} "
                         f"(tolerance {tolerance:g}) over input {tuple(x.shape)} with the reading {reading}")


def candidate_readings(module: nn.Module | None, base: Layout, x: Tensor) -> Iterator[Reading]:
    """The readings :func:`read_by_behaviour` tries, simplest first: the base reading's partition
    before the others, its centering before the other, its offset before the other, no activation
    before the module's parameter-free children and ReLU, GELU, SiLU. Partitions whose shape the
    affine parameters cannot fit are left out."""
    features = None if base.weight is None else base.weight.numel()
    partitions = [(base.kind.name, base.rule)]
    for rule in ("sample_last", "sample_channel", "group", "instance"):
        if rule in ("sample_channel", "group", "instance") and (x.dim() < 3 or features not in (None, x.shape[1])):
            continue
        if rule == "group" and base.groups <= 1 and int(getattr(module, "num_groups", 1) or 1) <= 1:
            continue
        if rule == "sample_last" and features not in (None, x.shape[-1]) and base.weight is not None and base.weight.shape != x.shape[-base.weight.dim():]:
            continue
        for centered in (True, False):
            kind = {"sample_last": "layernorm", "sample_channel": "layernorm", "group": "groupnorm", "instance": "instancenorm"}[rule]
            if not centered:
                if rule not in ("sample_last", "sample_channel"):
                    continue
                kind = "rmsnorm"
            partitions.append((kind, rule))
    if base.kind.name == "rmsnorm":  # its centered twin first: the commonest misreading
        partitions.insert(1, ("layernorm", base.rule))
    children = [] if module is None else [f"child:{name}" for name, child in module.named_children()
                                          if next(child.parameters(), None) is None]
    activations = [None, *children, *ACTIVATIONS]
    offsets = (base.weight_offset, 1.0 - base.weight_offset) if base.weight is not None else (0.0,)
    seen = set()
    for kind, rule in partitions:
        for offset in offsets:
            for activation in activations:
                reading = Reading(kind, rule, offset, activation)
                if reading not in seen:
                    seen.add(reading)
                    yield reading


def read_by_behaviour(site: str, module_type: str, module: nn.Module | None, base: Layout, x: Tensor,
                      y: Tensor) -> tuple[Reading | None, Layout, Verification]:
    """Try :func:`candidate_readings` against the site's output ``y``; the first that reproduces
    it wins. Returns ``(reading, layout, verification)``; with no winner the reading is None,
    the layout is ``base`` and the verification's sentence names every reading tried and the
    closest one."""
    tolerance = TOLERANCE.get(y.dtype, TOLERANCE[torch.float32])
    actual = y.detach().to(torch.float64)
    normalized: dict[tuple, tuple[Tensor, Tensor]] = {}
    tried: list[tuple[float, str]] = []
    readings = list(candidate_readings(module, base, x))
    for reading in readings:
        layout = apply_reading(reading, base, module)
        key = (reading.kind, reading.rule)
        try:
            if key not in normalized:
                normalized[key] = _normalized(x, layout)
            expected, reach = _affine(*normalized[key], layout)
        except (RuntimeError, ValueError, IndexError):
            continue
        error = _bounded_error(actual.to(expected.device), expected, reach)
        if error is None:
            continue
        tried.append((error, reading.describe()))
        if error <= tolerance:
            text = (f"read by behaviour as {reading.describe()}: error {error:.2g} (tolerance {tolerance:g}) over input "
                    f"{tuple(x.shape)}, after {len(tried) - 1} reading(s) that did not reproduce the output")
            check = Verification(site, module_type, reading.kind, reading.rule, error, tolerance, text,
                                 describe_layout(layout, reading.activation))
            return reading, layout, check
    best = min(tried, default=(float("nan"), "none"))
    partitions = ", ".join(dict.fromkeys(f"{r.kind}/{r.rule}" for r in readings))
    offsets = ", ".join(dict.fromkeys(f"{r.weight_offset:g}" for r in readings))
    activations = ", ".join(dict.fromkeys((r.activation or "none").removeprefix("child:") for r in readings))
    text = (f"no reading reproduces the output of input {tuple(x.shape)}; tried {len(readings)}: {partitions}, "
            f"each with weight offset {offsets} and activation {activations}; closest {best[1]} "
            f"(error {best[0]:.2g}, tolerance {tolerance:g})")
    return None, base, Verification(site, module_type, base.kind.name, base.rule, best[0], tolerance, text, best[1])
