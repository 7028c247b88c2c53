"""The monitor's curvature cadence: every curvature step measures lambda_max and the step's a_crit;
every curvature_full_every-th also the trace and the layers' a_crit, at the products stated."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import normscope
from normscope.errors import InvalidArgumentError
from normscope.models import MLP
from tests.test_monitor import _dense_curvature


def test_light_and_full_curvature_steps_spend_the_stated_products(digits64, tmp_path):
    x, y = digits64[0][:32], digits64[1][:32]
    torch.manual_seed(0)
    model = MLP(width=4, depth=1).double().train()
    dense = []
    with normscope.Monitor(model, tmp_path / "run", every=0, every_curvature=2, lr=0.3, curvature_layers=2,
                           curvature_samples=3, curvature_full_every=2) as monitor:
        for step in range(7):
            if step % 2 == 0:
                dense.append(_dense_curvature(model, x, y))
            with monitor.step((x, y)):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.3 * p.grad
                    p.grad = None
    rows = pd.read_parquet(tmp_path / "run").set_index(["step", "site", "metric"])["value"]
    for i, step in enumerate((0, 2, 4, 6)):
        full = i % 2 == 0  # curvature steps 0, 4 are full; 2, 6 light
        assert rows[(step, "model", "curvature_full")] == float(full)
        layers = [site for (s, site, metric) in rows.index if s == step and metric == "a_crit" and site != "model"]
        assert len(layers) == (2 if full else 0)
        assert ((step, "model", "trace") in rows.index) == full
        assert rows[(step, "model", "products")] == 1 + rows[(step, "model", "lambda_max_products")] + (2 + 3 if full else 0)
        _, _, g, h = dense[i]
        d = -g  # no optimizer: d = -dL/dtheta with the given lr
        assert math.isclose(rows[(step, "model", "a_crit")], float(2 * d @ d / (d @ h @ d)), rel_tol=1e-8)
        top = float(torch.linalg.eigvalsh(h)[-1])
        lam = rows[(step, "model", "lambda_max")]
        assert lam <= top * (1 + 1e-12) and top - lam <= rows[(step, "model", "lambda_max_residual")] + 1e-12
        assert top - lam <= 0.05 * top  # the default curvature_tol


@pytest.mark.parametrize("bad", [dict(curvature_full_every=0), dict(curvature_tol=0.0), dict(curvature_tol=1.0)])
def test_curvature_cadence_and_tolerance_are_checked(bad, tmp_path):
    with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
        normscope.Monitor(MLP(width=4, depth=1), tmp_path / "run", **bad)
