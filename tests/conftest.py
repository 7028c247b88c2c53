import pytest
import torch

from normscope.data import load_digits


@pytest.fixture(scope="session")
def digits64():
    """The first 64 digits in float64."""
    images, labels = load_digits(torch.float64)
    return images[:64], labels[:64]


@pytest.fixture(scope="session")
def digits32():
    images, labels = load_digits(torch.float32)
    return images[:64], labels[:64]
