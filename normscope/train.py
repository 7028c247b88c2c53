"""The built-in default: a small reference model trained for a few seconds on the digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normscope.data import digits_loader
from normscope.models import DEFAULT_MODEL, build_model


def train_reference(
    name: str = DEFAULT_MODEL,
    epochs: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 0.05,
) -> nn.Module:
    """Train the reference model ``name`` on the digits' training split and return it in eval mode.

    Minimizes the cross-entropy with SGD (momentum 0.9, learning rate ``lr``) for ``epochs`` passes
    over the first 1400 digits in seeded minibatches of ``batch_size``. Weights, batch order and
    the result depend only on ``seed``; the global random state is left as it was.

    Args:
        name: a name from :data:`normscope.models.MODELS`. Default: ``"mlp_bn"``.
        epochs: passes over the training split. Default: 8.
        batch_size: minibatch size. Default: 64.
        seed: seed of the initial weights and of the batch order. Default: 0.
        lr: SGD learning rate. Default: 0.05.
    """
    model = build_model(name, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = digits_loader(batch_size=batch_size, seed=seed, split="train", drop_last=True)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(epochs):
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()

