"""The op factory and the BatchNorm swap: names, constructor contract, copies, and an untouched original."""

import importlib.util
from functools import partial

import pytest
import torch
from torch import nn

from normscope.errors import InvalidArgumentError, NoNormSitesError, UnknownNameError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model
from normscope.ops import NORMS, BatchRenorm, MedianBatchNorm, create_norm, swap_norms
from normscope.ops.layer_norm import TokenNorm
from normscope.ops.swap import convert_layer_norm

HAS_POPULATION = importlib.util.find_spec("normscope.ops.population") is not None
SEED_004 = {"population", "microbatch"}
STATELESS = {"layernorm"}


def op_names():
    return [
        pytest.param(name, marks=pytest.mark.skipif(name in SEED_004 and not HAS_POPULATION, reason="normscope.ops.population not written yet"))
        for name in NORMS
    ]


@pytest.mark.parametrize("name", op_names())
def test_every_op_has_the_batchnorm_contract(name):
    torch.manual_seed(0)
    norm = create_norm(name, 6, eps=1e-3, momentum=0.2, affine=True).double()
    stateless = name in STATELESS  # LayerNorm has no running statistics
    for attr in ("weight", "bias") + (() if stateless else ("running_mean", "running_var", "num_batches_tracked")):
        assert isinstance(getattr(norm, attr), torch.Tensor), attr
    assert (norm.num_features, norm.eps, norm.momentum) == (6, 1e-3, 0.2)
    assert str(6) in norm.extra_repr()
    for shape in [(4, 6), (3, 6, 2, 2)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = norm(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all()
    assert stateless or int(norm.num_batches_tracked) == 2
    with torch.no_grad():
        norm.weight.fill_(3.0)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(6, dtype=torch.float64))
    norm.reset_running_stats()
    assert stateless or (int(norm.num_batches_tracked) == 0 and not norm.running_mean.any())


def test_names_classes_and_partials():
    assert isinstance(create_norm("Median", 4), MedianBatchNorm)
    assert create_norm("BN-LN", 4).order == "bn_ln" and create_norm("ln_bn", 4).order == "ln_bn"
    assert isinstance(create_norm(BatchRenorm, 4, rmax=2.0), BatchRenorm)
    assert create_norm(partial(MedianBatchNorm, backward="smoothed"), 4).backward == "smoothed"
    with pytest.raises(UnknownNameError) as info:
        create_norm("groupnorm", 4)
    message = str(info.value)
    assert "'groupnorm'" in message and all(name in message for name in NORMS)


@pytest.mark.parametrize("op", op_names())
@pytest.mark.parametrize("model_name", ["mlp_bn", "resnet_bn"])
def test_swap_leaves_the_original_bit_identical(model_name, op):
    torch.manual_seed(1)
    model = build_model(model_name).double()
    model(torch.rand(8, 1, 8, 8, dtype=torch.float64)).sum().backward()  # running stats and .grad set
    model.eval()
    state = snapshot(model)
    swapped = swap_norms(model, op)
    swapped.train()
    swapped(torch.rand(4, 1, 8, 8, dtype=torch.float64)).sum().backward()
    assert_unchanged(model, state)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, old in bns.items():
        new = swapped.get_submodule(name)
        assert new is not old and new.num_features == old.num_features
        assert (type(new) is type(old)) == (op == "bn")


@pytest.mark.parametrize("op", ["bn", "renorm", "lsbn", "median"])
def test_swap_copies_parameters_buffers_and_flags(op):
    torch.manual_seed(2)
    model = build_model("resnet_bn")
    for _ in range(3):
        model(torch.rand(8, 1, 8, 8))
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.eval()
    swapped = swap_norms(model, op, momentum=0.5)
    new, old = swapped.layer1[0].bn1, model.layer1[0].bn1
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name
    assert not new.weight.requires_grad and not new.training and new.momentum == 0.5
    x = torch.rand(5, 1, 8, 8)  # eval mode normalizes with the copied running statistics
    torch.testing.assert_close(swapped(x), model(x))


def test_swap_selected_sites_by_pattern_and_errors():
    model = build_model("resnet_bn")
    swapped = swap_norms(model, "median", sites=["layer1.*.bn1", "bn1"], backward="smoothed")
    kinds = {n: type(m).__name__ for n, m in swapped.named_modules()}
    assert kinds["bn1"] == kinds["layer1.0.bn1"] == kinds["layer1.1.bn1"] == "MedianBatchNorm"
    assert kinds["layer1.0.bn2"] == kinds["layer2.0.bn1"] == kinds["layer2.0.downsample.1"] == "BatchNorm2d"
    assert swapped.bn1.backward == "smoothed"
    with pytest.raises(NoNormSitesError, match="layer1.0.bn1"):
        swap_norms(model, "median", sites="head.*")
    with pytest.raises(NoNormSitesError):
        swap_norms(build_model("cnn_gn"), "median")
    with pytest.raises(UnknownNameError, match="median"):
        swap_norms(model, "medain")


def test_swap_keeps_dtype_and_device():
    model = build_model("mlp_bn").double()
    swapped = swap_norms(model, "renorm")
    assert swapped.net[2].weight.dtype == torch.float64 and swapped.net[2].running_var.dtype == torch.float64
    assert swapped(torch.rand(4, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_ops_package_lists_every_public_name():
    import normscope.ops as ops

    missing = [name for name in ops.__all__ if not hasattr(ops, name)]
    assert not missing
    with pytest.raises(AttributeError, match="no attribute"):
        ops.not_an_op  # noqa: B018


class MyBatchNorm(nn.BatchNorm1d):
    """A user's BatchNorm subclass."""


def test_a_batchnorm_subclass_is_swapped_in_as_given():
    model = build_model("mlp_bn")
    swapped = swap_norms(model, MyBatchNorm)
    assert type(swapped.net[2]) is MyBatchNorm and type(swapped.net[5]) is MyBatchNorm
    assert type(swap_norms(model, "bn").net[2]) is nn.BatchNorm1d  # "bn" keeps the model's own class
    back = swap_norms(swapped, "bn")
    assert type(back.net[2]) is MyBatchNorm


def test_unknown_keyword_options_name_the_valid_ones():
    model = build_model("mlp_bn")
    with pytest.raises(InvalidArgumentError, match=r"takes no option 'rmaxx'.*rmax"):
        swap_norms(model, "renorm", rmaxx=2.0)
    with pytest.raises(InvalidArgumentError, match="microbatch"):
        swap_norms(model, "bn", microbatch=2)
    assert swap_norms(model, "renorm", rmax=2.0, ghost=2).net[2].ghost == 2


def test_population_keeps_its_own_ema_rate():
    model = build_model("mlp_bn")
    assert swap_norms(model, "population").net[2].momentum == 0.2  # not BatchNorm's 0.1
    assert swap_norms(model, "population", momentum=0.0).net[2].momentum == 0.0
    assert swap_norms(model, "renorm").net[2].momentum == model.net[2].momentum


@pytest.mark.parametrize("op,kind", [("rmsnorm", nn.RMSNorm), ("layernorm", nn.LayerNorm), ("bn_ln", TokenNorm), ("ln_bn", TokenNorm)])
def test_layer_norm_sites_take_the_ops_that_apply(op, kind):
    torch.manual_seed(3)
    model = build_model("transformer_ln").double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    state = snapshot(model)
    swapped = swap_norms(model, op)
    assert_unchanged(model, state)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for name in names:
        new, old = swapped.get_submodule(name), model.get_submodule(name)
        assert isinstance(new, kind)
        torch.testing.assert_close(new.weight, old.weight)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    out = swapped.train()(x)
    assert out.shape == (4, 10) and out.dtype == torch.float64
    if op == "layernorm":
        torch.testing.assert_close(swapped.eval()(x), model.eval()(x))


def test_token_chain_is_the_chain_over_flattened_tokens():
    torch.manual_seed(4)
    norm = nn.LayerNorm(6).double()
    new = convert_layer_norm(norm, "bn_ln")
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    flat = x.reshape(15, 6)
    bn = (flat - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt()
    expected = ((bn - bn.mean(1, keepdim=True)) / (bn.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(x.shape)
    torch.testing.assert_close(new.train()(x), expected)
    rms = swap_norms(build_model("transformer_rms"), "layernorm")
    assert all(not isinstance(m, nn.RMSNorm) for m in rms.modules())
