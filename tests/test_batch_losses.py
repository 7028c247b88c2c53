"""The batch forms of normscope.batch, the loss presets of normscope.losses, and deterministic
training-mode analyses (normscope.determinism), each against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normscope
from normscope import batch as batches
from normscope.determinism import random_layers
from normscope.errors import DataShapeError
from normscope.losses import PRESETS, resolve


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.head = nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x, shift):
        return self.head(self.norm(x + shift))


class Keywords(TwoInputs):
    def forward(self, features, shift):  # noqa: D102 - a dict batch's keys
        return super().forward(features, shift)


def data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("form", ["dict", "dict_targets", "long_tuple"])
def test_every_batch_form_gives_the_gls_numbers_of_the_plain_pair(form):
    x, s, y = data()
    raw = {"dict": {"features": x, "shift": s, "labels": y}, "dict_targets": ({"features": x, "shift": s}, y),
           "long_tuple": (x, s, y)}[form]
    torch.manual_seed(0)
    model = (Keywords() if form != "long_tuple" else TwoInputs()).double()
    plain = nn.Sequential(model.norm, model.head)  # the same layers on the pair (x + s, y)
    reference = normscope.analyze(plain, (x + s, y), analyzers="gls", batch_size=12, batches=1, budget=None)
    result = normscope.analyze(model, raw, analyzers="gls", batch_size=12, batches=1, budget=None)
    a, b = reference.tables["gls_sites"], result.tables["gls_sites"]
    assert list(a["site"]) == ["0"] and list(b["site"]) == ["norm"]
    for column in ("r2_mean", "naive_gap", "identity_rel_max"):
        assert b[column].iloc[0] == pytest.approx(a[column].iloc[0], rel=1e-9, abs=1e-15, nan_ok=True)
    assert 0 < b["r2_mean"].iloc[0] <= 1


def test_slicing_concat_and_a_collate_whose_targets_differ():
    x, s, y = data()
    batch = ({"features": x, "shift": s}, y)
    part = batches.take(batch, torch.tensor([3, 1]))
    assert torch.equal(part[0]["features"], x[[3, 1]]) and torch.equal(part[1], y[[3, 1]])
    joined = batches.concat([batches.take(batch, slice(0, 5)), batches.take(batch, slice(5, 12))])
    assert torch.equal(joined[0]["shift"], s) and torch.equal(joined[1], y)
    moved = batches.to_device(({"features": x, "ids": y}, y), "cpu", torch.float32)
    assert moved[0]["features"].dtype == torch.float32 and moved[0]["ids"].dtype == torch.int64
    flat = ({"features": x}, torch.zeros(5 * 12))  # a collate that flattened the targets
    with pytest.raises(DataShapeError, match="cannot be sliced per example"):
        batches.take(flat, slice(0, 2))


def test_cross_entropy_mse_lm_and_model_presets_against_torch():
    g = torch.Generator().manual_seed(0)
    logits, classes = torch.randn(4, 5, 7, generator=g), torch.randint(0, 7, (4, 5), generator=g)
    assert torch.allclose(PRESETS["cross_entropy"](logits, classes), F.cross_entropy(logits.reshape(-1, 7), classes.reshape(-1)))
    target = torch.randn(4, 5, 7, generator=g)
    assert torch.allclose(PRESETS["mse"]({"logits": logits}, target), ((logits - target) ** 2).mean())
    ids, mask = torch.randint(0, 7, (4, 5), generator=g), torch.ones(4, 5, dtype=torch.long)
    mask[0, 3:] = 0
    inputs, tokens = PRESETS["lm"].batch({"input_ids": ids, "attention_mask": mask})
    assert set(inputs) == {"input_ids", "attention_mask"}
    kept = [(b, t) for b in range(4) for t in range(4) if mask[b, t + 1]]
    expected = torch.stack([F.cross_entropy(logits[b, t], ids[b, t + 1]) for b, t in kept]).mean()
    assert torch.allclose(PRESETS["lm"]((logits,), tokens), expected)
    inputs, labels = PRESETS["model"].batch({"input_ids": ids, "labels": classes})
    assert torch.equal(inputs["labels"], classes)
    loss = torch.tensor(2.5)
    assert PRESETS["model"]({"loss": loss, "logits": logits}, labels) is loss
    with pytest.raises(DataShapeError, match="needs a batch with labels"):
        PRESETS["model"].batch({"input_ids": ids})


def test_user_functions_by_callable_and_by_name_get_the_raw_outputs():
    seen = []
    fn = resolve(lambda outputs, targets: seen.append(type(outputs).__name__) or outputs[0].sum() * targets)
    assert float(fn((torch.ones(2),), torch.tensor(3.0))) == 6.0 and seen == ["tuple"]
    named = resolve("torch.nn.functional:cross_entropy")
    assert named.fn is F.cross_entropy and named.name == "torch.nn.functional:cross_entropy"
    with pytest.raises(normscope.errors.ModelImportError, match="cannot import loss"):
        resolve("no_such_module_here:fn")


def test_dropout_off_and_fixed_masks_and_the_rng_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.BatchNorm1d(6)).double().train()
    x = data()[0]
    state = torch.get_rng_state()
    with random_layers("off") as calls:
        off = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(off, model[2](model[0](x)))  # dropout is the identity, BN in train mode
    assert calls.calls["dropout"] == 1 and "turned off" in calls.describe()
    with random_layers("fixed", seed=3):
        first, second = model(x), model(x)
    assert torch.equal(first, second) and not torch.allclose(first, off)
    result = normscope.analyze(model, (x, torch.zeros(12, dtype=torch.long)), analyzers="stats", loss_fn="cross_entropy",
                               batch_size=12, batches=1, budget=None)
    assert result.meta["random_layers"].startswith("dropout turned off")


def test_digits_flat_is_chosen_for_a_flat_mlp_and_named_in_the_shape_error():
    mlp = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    result = normscope.analyze(mlp, analyzers="stats", batches=1, budget=None)
    assert result.meta["data"]["source"] == "digits-flat" and result.meta["data"]["input_shape"] == [64]
    wide = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    with pytest.raises(DataShapeError, match=r"the digits are \(N, 1, 8, 8\); --data digits-flat gives \(N, 64\)"):
        normscope.analyze(wide, analyzers="stats", batches=1)


@pytest.mark.parametrize("form", ["dict", "dict_targets", "long_tuple"])
def test_every_batch_form_gives_the_bias_numbers_of_the_plain_pair(form):
    """The bias analyzer (per-example gradients in memory-sized chunks, g*, minibatch draws) reads
    every batch form through normscope.batch: the same numbers as the plain pair."""
    x, s, y = data(48)
    raw = {"dict": {"features": x, "shift": s, "labels": y}, "dict_targets": ({"features": x, "shift": s}, y),
           "long_tuple": (x, s, y)}[form]
    torch.manual_seed(0)
    model = (Keywords() if form != "long_tuple" else TwoInputs()).double()
    plain = nn.Sequential(model.norm, model.head)
    reference = normscope.analyze(plain, (x + s, y), analyzers="bias", batch_size=16, batches=1, budget=None)
    result = normscope.analyze(model, raw, analyzers="bias", batch_size=16, batches=1, budget=None)
    assert not result.meta["analyzer_errors"], result.meta["analyzer_errors"]
    a, b = reference.tables["bias_estimators"], result.tables["bias_estimators"]
    assert len(b) == len(a) > 0
    numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
    for column in numeric:
        assert b[column].to_numpy() == pytest.approx(a[column].to_numpy(), rel=1e-9, abs=1e-12, nan_ok=True), column
