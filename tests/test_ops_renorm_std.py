"""BatchRenorm's running sigma_B (Ioffe 2017, Algorithm 1) against a direct float64 loop."""

from __future__ import annotations

import pytest
import torch

from normscope.ops.renorm import BatchRenorm

DT = torch.float64


@pytest.mark.parametrize("ghost", [None, 2])
def test_running_std_follows_algorithm1(ghost):
    torch.manual_seed(0)
    eps, rate = 1e-3, 0.3
    norm = BatchRenorm(3, eps=eps, momentum=rate, rmax=2.0, dmax=1.0, bn_steps=0, rmax_steps=0, dmax_steps=0,
                       ghost=ghost, running_std=True).to(DT)
    plain = BatchRenorm(3, eps=eps, momentum=rate, rmax=2.0, dmax=1.0, bn_steps=0, rmax_steps=0, dmax_steps=0,
                        ghost=ghost).to(DT)
    mu, sigma = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT) * (1 + eps) ** 0.5
    for _ in range(4):
        x = torch.randn(4, 3, 5, dtype=DT) * 3 + 1
        with torch.no_grad():
            plain.running_mean.copy_(norm.running_mean)
            plain.running_var.copy_(norm.running_var)
        y, y_plain = norm(x), plain(x)
        torch.testing.assert_close(y, y_plain, rtol=0, atol=1e-12)  # the output does not depend on how the stats move
        groups = [x] if ghost is None else list(x.split(ghost))
        mean_b = torch.stack([g.mean(dim=(0, 2)) for g in groups]).mean(0)
        sigma_b = torch.stack([(g.var(dim=(0, 2), unbiased=False) + eps).sqrt() for g in groups]).mean(0)
        mu, sigma = mu + rate * (mean_b - mu), sigma + rate * (sigma_b - sigma)
        torch.testing.assert_close(norm.running_mean, mu, rtol=0, atol=1e-12)
        torch.testing.assert_close((norm.running_var + eps).sqrt(), sigma, rtol=0, atol=1e-12)
    assert not torch.allclose(norm.running_var, plain.running_var)  # the two rules differ after an update
