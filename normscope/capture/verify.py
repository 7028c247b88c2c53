"""Self-verifying readings: does a site's reading reproduce what the site actually computed?

A reading (:class:`~normscope.registry.Layout`: partition rule, eps, affine parameters, weight
offset, running statistics) predicts the site's output from its input,
``y_hat = (gamma + offset) * (x - shift_P) / scale_P + beta`` (MATH.md §1), recomputed in float64.
Capture checks it on each site's first recorded call against the output ``y`` the site returned:

    ``error = max |y - y_hat| / max |y_hat|  <=  TOLERANCE[y.dtype]``

The tolerance allows the model's own float32 arithmetic inside a float64 model (an RMSNorm that
computes in float32) but not a wrong partition, a missing affine or offset, or the wrong eps at
the usual sizes. A site that fails is *unverified*: capture drops its records, so no analysis
uses numbers from a wrong reading, and lists it with what was compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from normscope.registry import Layout, affine_like, from_rows, normalize_rows

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


@dataclass
class Verification:
    """The check of one site's reading on its first call.

    ``error``: ``max |y - y_hat| / max |y_hat|`` (NaN when nothing could be compared);
    ``compared``: a sentence naming the shapes, the reading and the figure.
    """

    site: str
    module_type: str
    kind: str
    rule: str
    error: float
    tolerance: float
    compared: str

    @property
    def verified(self) -> bool:
        return self.error <= self.tolerance

    def as_dict(self) -> dict:
        return {"name": self.site, "module_type": self.module_type, "kind": self.kind, "rule": self.rule,
                "error": None if self.error != self.error else float(self.error), "tolerance": self.tolerance,
                "compared": self.compared}


def predicted_output(x: Tensor, layout: Layout) -> Tensor:
    """``y_hat`` in float64 and the input's shape: the reading applied to ``x``."""
    z = from_rows(normalize_rows(x, layout), x.shape, layout)
    if layout.rule == "weight":
        return z * layout.weight.detach().to(z.device, torch.float64)
    gamma = affine_like(layout.weight, z, layout)
    if gamma is not None:
        z = z * (gamma.detach().double() + layout.weight_offset)
    beta = affine_like(layout.bias, z, layout)
    return z if beta is None else z + beta.detach().double()


def verify(site: str, module_type: str, layout: Layout, x: Tensor, y: object) -> Verification:
    """Check that ``layout`` reproduces the output ``y`` of the site from its input ``x``."""
    rule = layout.rule
    tolerance = TOLERANCE.get(getattr(y, "dtype", None), TOLERANCE[torch.float32])
    reading = f"{layout.kind.name}/{rule}, eps={layout.eps:g}" + (f", weight offset {layout.weight_offset:g}" if layout.weight_offset else "")

    def result(error: float, text: str) -> Verification:
        return Verification(site, module_type, layout.kind.name, rule, error, tolerance, text)

    if not isinstance(y, Tensor) or y.shape != x.shape:
        what = f"output {tuple(y.shape)}" if isinstance(y, Tensor) else f"a {type(y).__name__} output"
        return result(float("nan"), f"input {tuple(x.shape)} and {what} differ in shape, so the reading ({reading}) cannot be checked")
    try:
        expected = predicted_output(x, layout)
    except (RuntimeError, ValueError, IndexError) as error:
        return result(float("nan"), f"the reading ({reading}) does not apply to input {tuple(x.shape)}: {str(error).splitlines()[0]}")
    actual = y.detach().to(expected.device, torch.float64)
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not bool(finite.any()):
        if torch.equal(torch.isfinite(expected), torch.isfinite(actual)):  # e.g. a NaN input spread over a whole batch
            return result(0.0, f"input {tuple(x.shape)}: no finite output; the reading ({reading}) is non-finite exactly where the output is")
        return result(float("nan"), f"input {tuple(x.shape)}: no finite output to compare")
    scale = float(expected[finite].abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    error = float((actual - expected)[finite].abs().max()) / scale
    return result(error, f"max |y - y_hat| / max |y_hat| = {error:.2g} (tolerance {tolerance:g}) over input {tuple(x.shape)} "
                         f"with the reading {reading}")
