"""The harness's cheaper paths measure the same thing: ShuffledBatches gives the DataLoader's
batches exactly, the chunked evaluation equals one forward over the test set, and the reshaped
group mean of PopulationNorm equals the membership-matrix mean (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from normscope.compare import EVAL_CHUNK, ShuffledBatches, evaluate
from normscope.models import build_model
from normscope.ops import swap_norms
from normscope.ops.population import group_mean


@pytest.mark.parametrize("batch_size,seed", [(2, 0), (32, 5), (7, 1_000_003)])
def test_shuffled_batches_are_the_dataloaders(batch_size, seed):
    x, y = torch.randn(103, 3), torch.arange(103)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)
    ours = ShuffledBatches((x, y), batch_size, seed)
    assert len(ours) == len(loader)
    for _ in range(3):  # every pass reshuffles the same way
        for (lx, ly), (ox, oy) in zip(loader, ours, strict=True):
            assert torch.equal(lx, ox) and torch.equal(ly, oy)


@pytest.mark.parametrize("op", ["bn", "population", "median"])
def test_chunked_evaluation_is_one_forward(op):
    torch.manual_seed(0)
    model = swap_norms(build_model("resnet_bn"), op).double()
    model.train()
    inputs = torch.randn(EVAL_CHUNK * 2 + 37, 1, 8, 8, dtype=torch.float64)
    targets = torch.randint(0, 10, (len(inputs),))
    loss, accuracy = evaluate(model, inputs, targets, F.cross_entropy)
    assert all(m.training for m in model.modules())  # the flags are put back
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    assert abs(loss - float(F.cross_entropy(outputs, targets))) < 1e-12
    assert accuracy == float((outputs.argmax(1) == targets).double().mean())


@pytest.mark.parametrize("n,k", [(12, 1), (12, 4), (12, 12), (13, 4), (3, 5)])
def test_group_mean_equals_the_membership_mean(n, k):
    values = torch.randn(n, 6, dtype=torch.float64)
    ids = torch.arange(n) // k
    expected = torch.stack([values[ids == g].mean(dim=0) for g in ids.tolist()])
    torch.testing.assert_close(group_mean(values, k), expected, rtol=1e-13, atol=1e-13)
