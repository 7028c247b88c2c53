"""Custom norm classes read by behaviour, verification that holds at tiny variance, weight
standardization, and batches beyond tensors (issue 23). Every figure is checked in float64 against
an independent computation (closed forms, autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normscope
from normscope.batch import concat, split, take, to_device
from normscope.capture.record import kernel_variance
from normscope.capture.verify import TOLERANCE, verify
from normscope.errors import DataShapeError
from normscope.guard import preserved
from normscope.losses import default_for
from normscope.registry import KINDS, Layout


class MeanSubtractingRMSNorm(nn.Module):
    """Cohere's LayerNorm: named and built like an RMSNorm (variance_epsilon, weight, no bias), but centered."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, size, dtype=torch.float64))
        self.variance_epsilon = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * (x - mean) * torch.rsqrt(var + self.variance_epsilon)


class GroupNormGELU(nn.GroupNorm):
    """BiT's BitGroupNormActivation: a GroupNorm subclass whose forward applies a child activation."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__(groups, channels)
        self.activation = nn.GELU()

    def forward(self, x):
        return self.activation(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class OffsetRMSNorm(nn.Module):
    """A 1 + w RMSNorm whose source does not spell ``(1 + self.weight)``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=torch.float64))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        scale = self.weight.add(1.0)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * scale


class ShiftedRMSNorm(OffsetRMSNorm):
    """Adds the mean |x| after normalizing: no reading reproduces it."""

    def forward(self, x):
        return super().forward(x) + x.abs().mean()


def _sequence(norm: nn.Module, width: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(5, width), norm, nn.Linear(width, 3)).double()


def test_a_mean_subtracting_class_named_like_an_rmsnorm_reads_as_layernorm():
    torch.manual_seed(0)
    model = _sequence(MeanSubtractingRMSNorm(6))
    x = torch.randn(7, 4, 5, dtype=torch.float64) + 2.0
    with normscope.capture(model) as cap:
        model(x).square().sum().backward()
    assert cap.unverified == [] and [s.kind for s in cap.sites] == ["layernorm"]
    assert cap.sites[0].reading == "layernorm/sample_last"
    check = cap.read_by_behaviour["1"]
    assert check.verified and check.error <= 1e-12 and "read by behaviour as layernorm/sample_last" in check.compared
    h = model[0](x)
    z = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(cap["1"].z_rows(), z.reshape(-1, 6), rtol=0, atol=1e-12)


def test_a_fused_norm_and_activation_reads_as_groupnorm_then_activation_with_the_gradient_before_it():
    torch.manual_seed(0)
    norm = GroupNormGELU(2, 4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.Flatten(), nn.Linear(4 * 25, 3)).double()
    x = torch.randn(3, 1, 7, 7, dtype=torch.float64)
    with normscope.capture(model) as cap:
        model(x).square().sum().backward()
    assert cap.unverified == [] and cap.sites[0].kind == "groupnorm"
    assert cap.sites[0].reading == "groupnorm/group, then activation"
    record = cap["1"]
    assert record.consumer_type == "GELU"
    # independently: the pre-activation output and dL/dz = gamma * dL/dy by autograd
    h = model[0](x).detach()
    y = F.group_norm(h, 2, norm.weight.detach(), norm.bias.detach(), norm.eps).requires_grad_()
    model[3](model[2](F.gelu(y))).square().sum().backward()
    torch.testing.assert_close(record.y, y.detach(), rtol=0, atol=1e-12)
    g = y.grad * norm.weight.detach()[None, :, None, None]
    torch.testing.assert_close(record.g_rows(), g.reshape(6, -1), rtol=1e-10, atol=1e-12)


def test_a_weight_offset_the_source_does_not_spell_is_found_by_behaviour_and_kept_for_later_calls():
    model = _sequence(OffsetRMSNorm(6))
    x = torch.randn(8, 5, dtype=torch.float64)
    with normscope.capture(model) as cap:
        model(x)
        model(x[:4])
    assert cap.unverified == [] and len(cap.records_for("1")) == 2
    assert cap.sites[0].reading == "rmsnorm/sample_last, weight offset 1"
    assert all(r.layout.weight_offset == 1.0 for r in cap.records_for("1"))
    with cap:  # a second block reads the site the same way without trying again
        model(x)
    assert cap["1"].layout.weight_offset == 1.0 and cap.unverified == []


def test_a_class_no_reading_reproduces_stays_unverified_and_says_what_was_tried():
    model = _sequence(ShiftedRMSNorm(6))
    with normscope.capture(model) as cap:
        model(torch.randn(8, 5, dtype=torch.float64))
    assert cap.sites == [] and [c.site for c in cap.unverified] == ["1"]
    text = cap.unverified[0].compared
    assert "no reading reproduces the output" in text
    for tried in ("rmsnorm/sample_last", "layernorm/sample_last", "weight offset 0, 1", "activation none, relu, gelu, silu"):
        assert tried in text, text
    assert cap.unverified[0].error > 1e-3


def _bn_check(x: torch.Tensor, eps: float = 1e-5, beta: bool = True):
    bn = nn.BatchNorm2d(x.shape[1], eps=eps).to(x.dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1) if beta else bn.bias.zero_()
    y = bn(x)
    layout = Layout(KINDS["batchnorm"], "channel", eps, bn.weight, bn.bias)
    return verify("bn", "BatchNorm2d", layout, x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stock_batchnorm_verifies_on_1x1_maps_constant_channels_and_tiny_variance(dtype):
    torch.manual_seed(0)
    one_by_one = torch.randn(128, 24, 1, 1, dtype=dtype)
    one_by_one[:, :5] = 0.75  # constant channels: the output is rounding noise of size u |x| / sqrt(eps) around beta
    assert _bn_check(one_by_one).verified
    # every channel constant and beta 0: y_hat is exactly 0, so a relative error would divide by 0
    constant = torch.randn(1, 24, 1, 1, dtype=dtype).add(0.3).expand(128, 24, 1, 1).contiguous()
    check = _bn_check(constant, beta=False)
    assert check.verified, check.compared
    tiny = torch.randn(16, 8, 3, 3, dtype=torch.float64) * 1e-24 + 1e-22  # variance about 1e-48
    check = _bn_check(tiny.to(dtype))
    assert check.verified, check.compared
    # the bound is not vacuous: the same data read without centering fails
    x = torch.randn(16, 8, 3, 3, dtype=dtype) + 3
    bn = nn.BatchNorm2d(8).to(dtype)
    wrong = Layout(KINDS["rmsnorm"], "channel", 1e-5, bn.weight, bn.bias)
    assert verify("bn", "BatchNorm2d", wrong, x, bn(x)).error > 100 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layernorm_verifies(dtype):
    torch.manual_seed(0)
    ln = nn.LayerNorm(64).to(dtype)
    x = (torch.randn(8, 64) * 4 + 1).to(dtype)
    x[0] = 2.5  # a constant row
    layout = Layout(KINDS["layernorm"], "sample_last", ln.eps, ln.weight, ln.bias)
    assert verify("ln", "LayerNorm", layout, x, ln(x)).verified


def test_a_constant_batchnorm_channel_reads_zero_variance_from_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
    with torch.no_grad():
        model[0].weight[0] = 0.0  # channel 0 is the conv bias alone: constant
    x = torch.randn(16, 1, 8, 8)
    with normscope.capture(model, storage="reductions") as cap:
        model.train()
        model(x).square().sum().backward()
    var = cap["1"].reductions["var"]
    assert var[0].item() == 0.0
    h = model[0](x).detach().double()
    expected = h.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=False)
    torch.testing.assert_close(var[1:], expected[1:], rtol=1e-5, atol=0)
    # the formula alone: 1/invstd^2 - eps at float32 rounding is not 0 (8e-13 in the issue), kernel_variance is
    invstd = torch.tensor([1 / (1e-5) ** 0.5], dtype=torch.float32)
    assert 1 / invstd.double() ** 2 - 1e-5 != 0
    assert kernel_variance(invstd.double(), 1e-5, torch.tensor([torch.finfo(torch.float32).eps], dtype=torch.float64)).item() == 0.0


class StandardizedConv(nn.Conv2d):
    """BiT's WeightStandardizedConv2d: F.batch_norm on the conv's own weight."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-8)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias)


class FunctionalLayerNorm(nn.Module):
    """OLMo's OlmoLayerNorm: no parameters, a F.layer_norm call."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.normalized_shape = (size,)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, None, None, 1e-5)


def test_weight_standardization_is_no_site_and_a_module_read_through_its_functional_call_is_not_unrecognized():
    model = nn.Sequential(StandardizedConv(1, 4, 3), nn.Flatten(2), FunctionalLayerNorm(36), nn.Flatten(), nn.Linear(144, 3)).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with normscope.capture(model) as cap:
        model(x)
    assert [s.name for s in cap.sites] == ["2:F.layer_norm#0"] and cap.unverified == []
    assert cap.unrecognized == []
    assert normscope.find_unrecognized(model) == [("2", "FunctionalLayerNorm")]  # the class alone is still named like a norm
    # under torch.func (per-example gradients) the weight call is still recognised
    params = {k: v.detach() for k, v in model.named_parameters()}
    with normscope.capture(model) as cap:
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    assert all(not s.name.startswith("0:") for s in cap.sites)


def test_non_tensor_values_pass_through_and_bad_batches_get_one_line():
    ids = torch.arange(12).reshape(4, 3)
    raw = {"input_ids": ids, "return_loss": True, "mode": "train"}
    inputs, targets = split(raw)
    assert inputs["return_loss"] is True and inputs["mode"] == "train" and targets is None
    moved = to_device((inputs, targets), "cpu", torch.float64)
    assert moved[0]["return_loss"] is True
    half = take(moved, slice(0, 2))
    assert half[0]["input_ids"].shape == (2, 3) and half[0]["mode"] == "train"
    joined = concat([half, take(moved, slice(2, 4))])
    assert torch.equal(joined[0]["input_ids"], ids) and joined[0]["return_loss"] is True
    with pytest.raises(DataShapeError, match=r"got a list of 2 dicts: collate them into one"):
        split([{"x": ids}, {"x": ids}])
    with pytest.raises(DataShapeError, match=r"\(got an empty tuple\)$"):
        split(())
    with pytest.raises(DataShapeError, match="must hold tensors"):
        split({"flag": True})
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    with pytest.raises(DataShapeError, match="holds no examples"):
        normscope.analyze(model, (torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long)), analyzers="stats")


class DenseLabels(nn.Module):
    def forward(self, pixel_values, labels=None):
        return pixel_values


def test_the_default_loss_is_the_models_own_for_dense_labels_when_the_forward_takes_them():
    dense = {"pixel_values": torch.randn(2, 3, 4, 4), "labels": torch.zeros(2, 4, 4, dtype=torch.long)}
    classes = {"pixel_values": torch.randn(2, 3, 4, 4), "labels": torch.zeros(2, dtype=torch.long)}
    assert default_for(dense, takes_labels=True).name == "model"
    assert default_for(dense, takes_labels=False).name == "cross_entropy"
    assert default_for(classes, takes_labels=True).name == "cross_entropy"


def test_a_compiled_model_is_analyzed_through_its_original_module():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = normscope.analyze(torch.compile(model), analyzers="stats", batch_size=16, batches=1, budget=None)
    assert [s["name"] for s in result.meta["sites"]] == ["1"]
    assert any("_orig_mod" in f for f in result.findings["model"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attributes_set_during_a_preserved_block_are_removed():
    class Marks(nn.Linear):
        def forward(self, x):
            self._hooks_installed = True
            return super().forward(x)

    model = nn.Sequential(Marks(3, 3))
    with preserved(model):
        model(torch.randn(2, 3))
        assert model[0]._hooks_installed
    assert not hasattr(model[0], "_hooks_installed")

