"""Capture: functional calls, storage options, in-place ops, no_grad, repeated forwards, and the
guarantee that the model comes out bit-identical with every hook removed."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.capture import capture, find_sites
from normscope.capture.verify import verify
from normscope.errors import UnknownNameError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import MODELS, build_model


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]


def _identity_error(record) -> float:
    z, g, s = record.z_rows(), record.g_rows(), record.moments_rows()[1]
    fit = (g * z).mean(1, keepdim=True) * z
    if record.layout.kind.centered:
        fit = fit + g.mean(1, keepdim=True)
    return float((s * record.dx_rows() - (g - fit)).abs().max())


class FunctionalNet(nn.Module):
    """Calls every functional norm inside its own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = self.conv(x)
        h = F.batch_norm(h, self.rm, self.rv, self.gamma, None, training=self.training, eps=1e-3)
        h = F.group_norm(torch.relu(h), 2, eps=1e-4)
        h = F.instance_norm(h)
        h = F.layer_norm(h, h.shape[-2:])
        h = F.rms_norm(h, h.shape[-1:], eps=1e-5)
        h = F.layer_norm(h, h.shape[-1:])
        return self.head(h.flatten(1))


def test_functional_calls_are_sites_named_after_their_module(digits64):
    x, y = digits64
    model = FunctionalNet().double()
    with capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    names = [s.name for s in cap.sites]
    assert names == ["model:F.batch_norm#0", "model:F.group_norm#0", "model:F.instance_norm#0",
                     "model:F.layer_norm#0", "model:F.rms_norm#0", "model:F.layer_norm#1"]
    assert [s.kind for s in cap.sites] == ["batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm", "layernorm"]
    assert cap.records[0].consumer_type == "relu"
    assert cap.records[0].layout.eps == 1e-3 and cap.records[4].layout.eps == 1e-5
    for record in cap.records:
        assert _identity_error(record) < 1e-12, record.site.name


def test_module_norms_are_not_captured_twice(digits64):
    model = build_model("resnet_bn").double()
    with capture(model) as cap:
        model(digits64[0])
    assert len(cap.records) == len(find_sites(model)) == 10
    assert not any(s.functional for s in cap.sites)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_capture_every_reference_model(name, digits64):
    x, y = digits64
    model = build_model(name).double()
    with capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    assert sorted(s.name for s in cap.sites) == sorted(s.name for s in find_sites(model))
    for record in cap.records:
        assert record.has_grad and record.dx is not None
        assert _identity_error(record) < 1e-12, record.site.name


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("storage", ["device", "reductions"])
def test_model_unchanged_and_hooks_removed(name, storage, digits32):
    x, y = digits32
    model = build_model(name)
    F.cross_entropy(model(x), y).backward()  # an existing .grad that must survive
    model.layer1[0].bn1.eval() if name == "resnet_bn" else None
    state, hooks = snapshot(model), _hook_counts(model)
    with capture(model, storage=storage) as cap:
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(model(x[:16]), y[:16]).backward()
    assert len(cap.records) == 2 * len(find_sites(model))
    assert_unchanged(model, state)
    assert _hook_counts(model) == hooks


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_unchanged_when_user_code_raises(name, digits32):
    x, y = digits32
    model = build_model(name)
    state, hooks = snapshot(model), _hook_counts(model)
    with pytest.raises(RuntimeError, match="user error"):
        with capture(model):
            F.cross_entropy(model(x), y).backward()
            raise RuntimeError("user error")
    assert_unchanged(model, state)
    assert _hook_counts(model) == hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_preserve_false_keeps_training_effects(digits32):
    x, y = digits32
    model = build_model("mlp_bn")
    before = model.net[2].running_mean.clone()
    with capture(model, preserve=False):
        model(x)
    assert not torch.equal(before, model.net[2].running_mean)


def test_inplace_relu_after_norm_gets_pre_inplace_gradient(digits64):
    x, y = digits64
    model = build_model("resnet_bn").double()
    with capture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    # autograd's gradient w.r.t. the norm output, by a recomputation without the in-place ReLU
    y_bn = model.bn1(model.conv1(x)).detach().requires_grad_(True)
    rest = torch.relu(y_bn)
    out = model.fc(torch.flatten(model.pool(model.layer2(model.layer1(rest))), 1))
    (dy,) = torch.autograd.grad(F.cross_entropy(out, y), y_bn)
    record = cap["bn1"]
    assert record.consumer_type == "ReLU"
    torch.testing.assert_close(record.dy, dy, rtol=1e-9, atol=1e-12)
    assert (record.y < 0).any(), "y must be kept before the in-place ReLU"


def test_no_grad_forward_is_marked(digits32):
    model = build_model("mlp_bn")
    with capture(model) as cap, torch.no_grad():
        model(digits32[0])
    assert all(not r.grad_enabled and not r.has_grad for r in cap.records)
    with pytest.raises(ValueError, match="no gradient"):
        cap.records[0].g_rows()


def test_repeated_forwards_give_several_records(digits32):
    x, y = digits32
    model = build_model("mlp_bn")
    with capture(model) as cap:
        (model(x[:32]).sum() + model(x[32:]).sum()).backward()
    first = cap.records_for("net.2")
    assert [r.index for r in first] == [0, 1] and all(r.has_grad for r in first)
    assert first[0].x.shape[0] == 32


def test_selection_by_pattern_and_kind(digits32):
    model = build_model("resnet_bn")
    with capture(model, sites="layer1.*") as cap:
        model(digits32[0])
    assert {s.name for s in cap.sites} == {"layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"}
    with capture(build_model("transformer_ln"), kinds="rmsnorm") as cap:
        cap.model(digits32[0])
    assert cap.records == []
    with pytest.raises(UnknownNameError, match="valid names"):
        capture(model, kinds="foonorm").__enter__()


def test_storage_options_agree(digits64):
    x, y = digits64
    model = build_model("cnn_gn").double()
    results = {}
    for storage in ("device", "cpu", "reductions"):
        with capture(model, storage=storage) as cap:
            F.cross_entropy(model(x), y).backward()
        results[storage] = cap.records
    full, cpu, reduced = results["device"], results["cpu"], results["reductions"]
    for a, b, r in zip(full, cpu, reduced):
        assert b.x.device.type == "cpu"
        torch.testing.assert_close(a.dy, b.dy)
        assert a.x is not None and r.x is None and r.dy is None
        z, g = a.z_rows(), a.g_rows()
        torch.testing.assert_close(r.reductions["sum_gz"], (g * z).sum(1))
        torch.testing.assert_close(r.reductions["sum_g2"], g.pow(2).sum(1))
        torch.testing.assert_close(r.reductions["sum_x"], a.rows(a.x).sum(1))
        torch.testing.assert_close(r.reductions["n"], torch.full_like(r.reductions["n"], z.shape[1]))


def _reference_sums(record) -> dict[str, torch.Tensor]:
    """Per-partition sums from the full float64 tensors of a ``storage="device"`` record."""
    x, z, g = record.rows(record.x), record.z_rows(), record.g_rows()
    return {"n": torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64), "mean": x.mean(1),
            "var": x.var(1, correction=0), "sum_x2": x.pow(2).sum(1), "sum_z": z.sum(1), "sum_z2": z.pow(2).sum(1),
            "sum_g": g.sum(1), "sum_g2": g.pow(2).sum(1), "sum_gz": (g * z).sum(1)}


def _assert_sums_close(reduced: dict, reference: dict, rtol: float) -> None:
    """Each sum within ``rtol`` of the scale of its terms (sum |t| <= sqrt(n sum t^2)), so that
    sums that cancel to about 0, such as the sum of z, are compared on that scale."""
    n = reference["n"]
    scales = {"mean": (reference["sum_x2"] / n).sqrt(), "sum_z": (n * reference["sum_z2"]).sqrt(),
              "sum_g": (n * reference["sum_g2"]).sqrt(), "sum_gz": (reference["sum_g2"] * reference["sum_z2"]).sqrt()}
    for key, expected in reference.items():
        error = float(((reduced[key] - expected).abs() / scales.get(key, expected.abs()).clamp_min(1e-300)).max())
        assert error <= rtol, f"{key}: relative error {error:.3g} > {rtol:g}"


@pytest.mark.parametrize("name", ["resnet_bn", "mlp_bn", "functional", "frozen_gamma"])
def test_batch_norm_kernel_sums_equal_full_tensor_sums(name, digits64):
    """With storage="reductions" a training-mode BatchNorm's sums come from its kernel (saved mean
    and invstd, dL/dgamma, dL/dbeta); they equal the float64 sums over the full tensors, also where
    the kernel gives no dL/dgamma or dL/dbeta (a functional call without bias, a frozen gamma)."""
    x, y = digits64
    model = FunctionalNet().double() if name == "functional" else build_model("mlp_bn" if name == "mlp_bn" else "resnet_bn").double()
    if name == "frozen_gamma":
        model.bn1.weight.requires_grad_(False)
    records = {}
    for storage in ("device", "reductions"):
        with capture(model, storage=storage) as cap:
            F.cross_entropy(model(x), y).backward()
        records[storage] = cap.records
    batch_norms = [r for r in records["device"] if r.layout.kind.name == "batchnorm"]
    assert batch_norms and len(records["device"]) == len(records["reductions"])
    for full, reduced in zip(records["device"], records["reductions"]):
        assert full.site == reduced.site
        _assert_sums_close(reduced.reductions, _reference_sums(full), 1e-12)


def test_batch_norm_kernel_sums_in_float32_and_no_hook_left(digits64):
    """float32: the kernel's sums agree with float64 references to float32 accuracy; a backward of
    a retained graph after the block changes no record (the node hooks are removed on exit)."""
    x, y = digits64
    model = build_model("resnet_bn")
    twin = copy.deepcopy(model).double()
    with capture(twin, storage="device") as full:
        F.cross_entropy(twin(x), y).backward()
    with capture(model, storage="reductions") as cap:
        loss = F.cross_entropy(model(x.float()), y)
        loss.backward(retain_graph=True)
    kept = [{k: v.clone() for k, v in r.reductions.items()} for r in cap.records]
    loss.backward()
    for reference, reduced, before in zip(full.records, cap.records, kept):
        assert all(torch.equal(reduced.reductions[k], before[k]) for k in before)
        _assert_sums_close(reduced.reductions, _reference_sums(reference), 1e-5)


def test_reductions_without_backward(digits32):
    model = build_model("mlp_bn")
    with capture(model, storage="reductions") as cap, torch.no_grad():
        model(digits32[0])
    assert set(cap.records[0].reductions) == {"n", "mean", "var", "scale", "sum_x", "sum_x2", "sum_z", "sum_z2"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_capture_on_cuda(digits32):
    x, y = (t.cuda() for t in digits32)
    model = build_model("resnet_bn").cuda()
    with capture(model, storage="cpu") as cap:
        F.cross_entropy(model(x), y).backward()
    assert cap.records[0].x.device.type == "cpu" and cap.records[0].has_grad
    with capture(model, storage="reductions") as cap:
        F.cross_entropy(model(x), y).backward()
    assert all(t.device.type == "cpu" for r in cap.records for t in r.reductions.values())
    assert len(cap.records) == 10 and all(r.has_grad for r in cap.records)


def test_reentered_capture_records_as_a_fresh_one_and_verifies_once(digits64, monkeypatch):
    session = sys.modules["normscope.capture.session"]
    calls = []
    monkeypatch.setattr(session, "verify", lambda *args: calls.append(args[0]) or verify(*args))
    x, y = digits64
    model = build_model("resnet_bn").double()
    reused = capture(model, storage="reductions", preserve=False)
    for batch in (slice(0, 32), slice(32, 64), slice(0, 48)):
        twin = copy.deepcopy(model)
        with capture(twin, storage="reductions", preserve=False) as fresh:
            F.cross_entropy(twin(x[batch]), y[batch]).backward()
        calls.clear()
        with reused as cap:
            F.cross_entropy(model(x[batch]), y[batch]).backward()
        # the first block and a new input shape verify every site; the same shape again none
        assert len(calls) == (0 if batch.start == 32 else 10)
        assert [s.name for s in cap.sites] == [s.name for s in fresh.sites] and len(cap.records) == 10
        for r, f in zip(cap.records, fresh.records):
            assert (r.site, r.index, r.producer, r.consumer, r.consumer_type) == (f.site, f.index, f.producer, f.consumer, f.consumer_type)
            assert r.reductions.keys() == f.reductions.keys()
            assert all(torch.equal(r.reductions[k], f.reductions[k]) for k in r.reductions)
        assert _hook_counts(model) == [0] * len(_hook_counts(model))
