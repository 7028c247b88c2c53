"""scikit-learn's bundled digits (1797 images of 8x8 pixels, no download) as tensors:
``digits`` as images ``(N, 1, 8, 8)``, ``digits-flat`` as vectors ``(N, 64)``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DIGITS = ("digits", "digits-flat")


def load_digits(dtype: torch.dtype = torch.float32, split: str = "all", flat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images ``(N, 1, 8, 8)`` (``flat``: ``(N, 64)``) scaled to
    [0, 1], labels ``(N,)`` int64.

    ``split`` is ``"all"``, ``"train"`` (the first 1400 images) or ``"test"`` (the rest).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
    images = images.flatten(1) if flat else images
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if split == "train":
        return images[:1400], labels[:1400]
    if split == "test":
        return images[1400:], labels[1400:]
    if split != "all":
        raise ValueError(f"split must be 'all', 'train' or 'test' (got {split!r})")
    return images, labels


def digits_loader(
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    split: str = "train",
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
    flat: bool = False,
) -> DataLoader:
    """A DataLoader over the digits (``flat``: ``(N, 64)``), seeded so that two calls give the same batches."""
    images, labels = load_digits(dtype=dtype, split=split, flat=flat)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(images, labels),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
    )


def digits_form(model: nn.Module) -> str:
    """``digits-flat`` when the model's first layer (first leaf module, e.g. not a ``Flatten``)
    is a Linear of 64 input features (a flat MLP), else ``digits``."""
    first = next((m for m in model.modules() if next(m.children(), None) is None), None)
    return "digits-flat" if isinstance(first, nn.Linear) and first.in_features == 64 else "digits"
