"""PopulationNorm with a rotation or an active u_max clip is read in place: the reading carries the
map after the affine (normscope.ops.readings.AfterAffine), so every site is verified, the record
holds gamma z + beta per channel and dL/dy through the map, and the gls tables measure the op's
backward against the residual (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normscope
from normscope.analyzers.gls import gls_step
from normscope.capture import capture
from normscope.models import build_model
from normscope.ops import batchnorm_sites, swap_norms
from normscope.ops.population import PopulationNorm
from normscope.ops.readings import AfterAffine

MODELS = {"mlp_bn": (16, 64), "resnet_bn": (16, 1, 8, 8)}
OPTIONS = [
    {"rotation": "hadamard"},
    {"u_max": 0.5},
    {"rotation": "random", "u_max": 0.5, "microbatch": 2},
    {"rotation": "hadamard", "u_max": 0.5, "microbatch": 4, "arrangement": "fixed_mean"},
]


def _swapped(model_name: str, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return swap_norms(build_model(model_name), "population", **options).double()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("train", [True, False])
def test_rotated_and_clipped_sites_are_verified_in_place(model_name, options, train):
    model = _swapped(model_name, **options).train(train)
    x = torch.randn(*MODELS[model_name], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with capture(model) as cap:
        model(x).sum().backward()
    assert not cap.unverified, [u.compared for u in cap.unverified]
    found = {s.name: s.module_type for s in cap.sites}
    assert all(found.get(path) == "PopulationNorm" for path in batchnorm_sites(build_model(model_name)))
    maps = [r.layout.activation for r in cap.records]
    if "rotation" in options:
        assert all(isinstance(m, AfterAffine) for m in maps)
    elif train:  # the clip is read where it acts
        assert any(isinstance(m, AfterAffine) and m.clip is not None for m in maps)
    if not train:
        assert all(m is None or m.clip is None for m in maps)  # no clip in eval


def test_record_holds_the_affine_output_and_the_gradient_through_the_map():
    """Independently of the capture: with the output's gradient G and the op's own clip c and
    rotation R, the record's y is gamma z + beta and its dL/dy is c * (R^T G) (float64)."""
    model = _swapped("mlp_bn", rotation="hadamard", u_max=0.5).train()
    norm = model.net[2]
    x = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen = {}
    handle = norm.register_forward_hook(lambda m, a, out: seen.update(inp=a[0].detach(), out=out) or out.retain_grad())
    with capture(model) as cap:
        model(x).square().sum().backward()
    handle.remove()
    record = cap["net.2"]
    center = norm.producer.weight @ norm.input_mean + norm.producer.bias
    scale = (norm.running_var + norm.eps).sqrt()
    z = (seen["inp"] - center) / scale
    nu = (seen["inp"] - center).square() + norm.eps  # one value per example and channel
    clip = (0.5 * ((norm.running_var + norm.eps) / nu).sqrt()).clamp(max=1.0)
    assert bool((clip < 1).any())  # the clip acts
    torch.testing.assert_close(record.y, z * norm.weight.detach() + norm.bias.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["out"].detach(), (clip * z * norm.weight.detach()) @ norm.rotation.T + norm.bias.detach(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(record.dy, clip * (seen["out"].grad @ norm.rotation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arrangement", ["algorithm1", "fixed_mean"])
def test_at_the_batch_moments_the_rotated_clipped_op_is_bn_and_its_identity_holds(arrangement):
    """One group of the whole batch with the EMAs at the batch moments and the mean taken over the op's
    own input (no producer): the op is BatchNorm followed by the clip and the rotation, so s dL/dx = g - alpha - beta z holds exactly for the g the
    capture takes back through the map; a wrong map (no R^T, no clip) would break it."""
    torch.manual_seed(0)
    norm = PopulationNorm(16, rotation="hadamard", u_max=0.6, microbatch=32, momentum=0.0, arrangement=arrangement)
    model = nn.Sequential(nn.Linear(8, 16), norm, nn.ReLU(), nn.Linear(16, 3)).double()  # no producer attached
    x = torch.randn(32, 8, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        y = model[0](x)
        norm.running_var.copy_(y.var(dim=0, unbiased=False))
        norm.running_mean.copy_(y.mean(dim=0))
    batch = (x, torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1)))
    with capture(model) as cap:
        model(x).sum().backward()
    assert not cap.unverified and cap["1"].layout.activation.clip is not None
    assert bool((cap["1"].layout.activation.clip < 1).any())
    sites = gls_step(model, batch)["gls_sites"]
    assert list(sites["residual_backward"]) == [False]  # stated: the op's backward is not the residual in general
    assert sites["identity_rel_max"].iloc[0] < 1e-10


@pytest.mark.parametrize("model_name", list(MODELS))
def test_analyze_reads_every_rotated_clipped_site(model_name):
    model = swap_norms(build_model(model_name), "population", rotation="auto", u_max=0.5)
    analyzers = "stats,gls,dead" + (",descent" if model_name == "mlp_bn" else "")  # descent: the MLP keeps the test lean
    result = normscope.analyze(model, analyzers=analyzers, budget=60, batches=1)
    if model_name == "mlp_bn":
        assert len(result.tables["descent_verdicts"]) == 2 and len(result.tables["descent_spectrum"])
    sites = batchnorm_sites(build_model(model_name))
    for table in ("stats_sites", "gls_sites", "dead_sites"):
        assert sorted(result.tables[table]["site"]) == sorted(sites), table
    gls = result.tables["gls_sites"]
    assert not gls["residual_backward"].astype(bool).any() and gls["identity_rel_max"].notna().all()
    sentences = [s for found in result.findings.values() for s in found]
    assert not any("not recognized" in s or "unverified" in s.lower() for s in sentences)
    assert sum("not the least-squares residual" in s for s in sentences) == len(sites)
    assert not any("rotation after it passes" in s for s in sentences)


def test_curvature_copies_keep_the_population_emas():
    """The Hessian-vector products' private copy (BatchLoss, train mode) freezes PopulationNorm's EMAs:
    its loss is the same function at every call, that of the model at its current EMAs (float64)."""
    from normscope.analyzers.hvp import BatchLoss

    model = _swapped("mlp_bn", rotation="hadamard", u_max=0.5).train()
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 64, dtype=torch.float64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    loss = BatchLoss(model, x, y, mode="train")
    first, second = float(loss()), float(loss())
    assert first == second
    torch.manual_seed(0)
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))  # the model itself, one step at its current EMAs
    assert abs(first - expected) < 1e-12
    assert float(F.cross_entropy(model(x), y)) != expected  # the model's own training forward moved its EMAs


@pytest.mark.parametrize("op,options", [
    ("population", {"rotation": "hadamard", "u_max": 0.5}),
    ("renorm", {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0, "running_std": True}),
    ("ghost_renorm", {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0}),
    ("lsbn", {"grad_init": "first"}),
])
def test_curvature_copies_differentiate_one_function(op, options):
    """In the curvature analyzers' train-mode copy every call sees the ops' state as it was: the
    gradient is the same at every call (ops whose training output or backward reads a state their
    calls move: EMAs, renorm's running statistics and schedule, LS's alpha*, beta*), float64."""
    from normscope.analyzers.hvp import BatchLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = swap_norms(build_model("mlp_bn"), op, **options).double().train()
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 64, dtype=torch.float64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    F.cross_entropy(model(x * 2 + 1), y).backward()  # one step of state away from the initial one
    model.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = BatchLoss(model, x, y, mode="train")
    params = [p for p in loss.model.parameters()]
    grads = [torch.autograd.grad(loss(dict(zip(loss.params, params))), params) for _ in range(3)]
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the user's model untouched


def test_bias_says_it_does_not_apply_to_a_population_model():
    """Its estimators replace torch BatchNorm: on a model whose sites are PopulationNorm already it
    says so in a finding instead of failing (the old code raised "no BatchNorm to replace")."""
    model = swap_norms(build_model("mlp_bn"), "population")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an analyzer failure is a warning
        result = normscope.analyze(model, analyzers="bias", budget=30, batches=1)
    assert not any(name.startswith("bias_") for name in result.tables)
    assert any("does not apply" in s for s in result.findings.get("bias", []))
