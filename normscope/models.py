"""Reference models built by name, all taking digits images of shape (N, 1, 8, 8).

The names are the ones the CLI's ``--model`` accepts:

========================  =====================================================
``mlp_bn``                MLP, Linear -> BatchNorm1d -> ReLU, twice, then Linear
``resnet_bn``             small ResNet (BasicBlocks with BatchNorm2d)
``cnn_gn``                CNN with GroupNorm
``transformer_ln``        pre-norm transformer over the 8 image rows, LayerNorm
``transformer_rms``       the same with RMSNorm
========================  =====================================================
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from normscope.errors import UnknownNameError

NUM_CLASSES = 10


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU blocks on the flattened image."""

    def __init__(self, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = 64
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A two-stage ResNet for 8x8 images; module names follow torchvision (layer1.0.bn1)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class GroupNormCNN(nn.Module):
    """Conv -> GroupNorm -> ReLU, twice, then pooling and a linear head."""

    def __init__(self, width: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.gn1 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.gn2 = nn.GroupNorm(groups, 2 * width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.gn1(self.conv1(x)))
        x = self.relu(self.gn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A tiny transformer that reads the 8 image rows as 8 tokens of 8 pixels."""

    def __init__(self, norm: Callable[[int], nn.Module], dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp_bn": MLP,
    "resnet_bn": ResNet,
    "cnn_gn": GroupNormCNN,
    "transformer_ln": lambda: Transformer(nn.LayerNorm),
    "transformer_rms": lambda: Transformer(nn.RMSNorm),
}

DEFAULT_MODEL = "mlp_bn"


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Build the reference model ``name`` with weights drawn from ``torch.manual_seed(seed)``."""
    key = name.strip().lower()
    if key not in MODELS:
        raise UnknownNameError("model", name, list(MODELS))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MODELS[key]()
