"""One population-moments implementation (recalibration.Moments): Chan's mergeable (count, mean, M2),
exact at input offsets where the one-pass E x^2 - (E x)^2 loses the variance (issue 23)."""

import pytest
import torch
from torch import nn

from normscope.recalibration import Moments, population_moments


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
def test_chunked_moments_equal_the_float64_two_pass_at_offsets(offset):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, 3, 5, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 0.1, 10.0])[:, None]) + offset
    moments = Moments()
    for chunk in x.split([1, 7, 300, 2, 690]):  # uneven chunks, one of a single example
        moments.add(chunk)
    mean, var, count = moments.variance(unbiased=True)
    flat = x.transpose(0, 1).reshape(3, -1)
    assert count == 5000
    torch.testing.assert_close(mean, flat.mean(1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(var, flat.var(1, correction=1), rtol=1e-8, atol=0)
    if offset == 1e6:  # the one-pass formula this replaces misses the variance of the narrow channel by far more
        one_pass = (flat.pow(2).sum(1) - 5000 * flat.mean(1) ** 2) / 4999
        assert ((one_pass - flat.var(1)).abs() / flat.var(1)).max() > 1e-6


def test_merge_is_order_free_and_equals_one_chunk():
    x = torch.randn(64, 4, dtype=torch.float64) + 5.0
    a, b = Moments(), Moments()
    for chunk in x.split(16):
        a.add(chunk)
    for chunk in reversed(x.split(8)):
        b.add(chunk)
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a.variance(), b.variance()
    assert n_a == n_b == 64
    torch.testing.assert_close(mean_a, mean_b, rtol=1e-15, atol=0)
    torch.testing.assert_close(var_a, var_b, rtol=1e-14, atol=0)
    torch.testing.assert_close(a.variance()[1], x.var(0, correction=0))


def test_population_moments_at_an_offset_of_a_million():
    model = nn.Sequential(nn.BatchNorm1d(3)).double()
    x = torch.randn(512, 3, dtype=torch.float64) * 0.01 + 1e6
    moments = population_moments(model, (x, torch.zeros(512)))
    mean, var = moments["0"]
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(var, x.var(0, correction=1), rtol=1e-8, atol=0)
