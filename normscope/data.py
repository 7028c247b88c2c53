"""scikit-learn's bundled digits (1797 images of 8x8 pixels, no download) as tensors."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def load_digits(dtype: torch.dtype = torch.float32, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images ``(N, 1, 8, 8)`` scaled to [0, 1], labels ``(N,)`` int64.

    ``split`` is ``"all"``, ``"train"`` (the first 1400 images) or ``"test"`` (the rest).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
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
) -> DataLoader:
    """A DataLoader over the digits, seeded so that two calls give the same batches."""
    images, labels = load_digits(dtype=dtype, split=split)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(images, labels),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
    )
