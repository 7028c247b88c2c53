"""Inference folding ("Extreme Normalization" (under review) Alg. 1): the folded layer's outputs equal the unfolded ones (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normscope.errors import InvalidArgumentError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model
from normscope.ops.folding import fold, fold_model
from normscope.ops.norm_sites import is_norm_site
from normscope.ops.population import PopulationNorm

DT = torch.float64


def _randomize(norm: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    c = norm.num_features
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c, generator=g, dtype=DT) + 0.5)
        norm.bias.copy_(torch.randn(c, generator=g, dtype=DT))
        norm.running_mean.copy_(torch.randn(c, generator=g, dtype=DT))
        norm.running_var.copy_(torch.rand(c, generator=g, dtype=DT) + 0.5)
    return norm.eval()


@pytest.mark.parametrize(
    "layer,norm,x_shape",
    [
        (nn.Linear(5, 8), PopulationNorm(8, rotation="hadamard"), (4, 5)),
        (nn.Linear(5, 6, bias=False), PopulationNorm(6, rotation="random"), (4, 5)),
        (nn.Conv2d(3, 4, 3, padding=1), PopulationNorm(4), (2, 3, 6, 6)),
        (nn.Conv1d(3, 6, 3), PopulationNorm(6, rotation="auto"), (2, 3, 7)),
        (nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), (2, 3, 6, 6)),
    ],
)
def test_fold_equals_layer_then_norm(layer: nn.Module, norm: nn.Module, x_shape: tuple[int, ...]) -> None:
    layer, norm = layer.to(DT), _randomize(norm.to(DT), 3)
    x = torch.randn(*x_shape, dtype=DT)
    folded = fold(layer, norm)
    assert type(folded) is type(layer) and folded.bias is not None
    torch.testing.assert_close(folded(x), norm(layer(x)), rtol=0, atol=1e-12)


def test_fold_model_on_resnet_with_population_norm_and_rotation() -> None:
    model = build_model("resnet_bn").to(DT)
    for i, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            norm = _randomize(PopulationNorm(module.num_features, rotation="auto").to(DT), i)
            setattr(model.get_submodule(parent) if parent else model, child, norm)
    model.eval()
    state = snapshot(model)
    x = torch.randn(3, 1, 8, 8, dtype=DT)
    folded = fold_model(model)
    assert not any(is_norm_site(m) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-12)
    assert_unchanged(model, state)


def test_fold_rejects_what_it_cannot_fold() -> None:
    with pytest.raises(InvalidArgumentError, match="Linear or Conv"):
        fold(nn.ReLU(), PopulationNorm(4))
    with pytest.raises(InvalidArgumentError, match="8 outputs"):
        fold(nn.Linear(3, 8), PopulationNorm(4))
    with pytest.raises(InvalidArgumentError, match="running statistics"):
        fold(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
