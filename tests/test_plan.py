"""The driver runs each captured pass once; the site graph from its first pass replaces the probe forwards."""

import pytest
import torch

import normscope
from normscope.analyzers.population_gradient import population_gradient
from normscope.capture.graph import site_graph
from normscope.models import build_model
from normscope.ops.norm_sites import norm_sites
from normscope.plan import Pass, merge


def test_merge_keeps_one_pass_per_mode_and_batch_with_a_backward_when_any_needs_it():
    merged = merge([Pass("train", 1), Pass("eval", 0), Pass("train", 0), Pass("train", 0, backward=True)])
    assert merged == [Pass("train", 0, True), Pass("train", 1, False), Pass("eval", 0, False)]


def _count_batch0(model, calls):
    def hook(module, args, kwargs):
        calls.append(args[0].detach().clone() if args else next(iter(kwargs.values())).detach().clone())
    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", ["mlp_bn", "resnet_bn"])
def test_batch_zero_runs_once_across_stats_and_gls(name):
    model = build_model(name)
    calls: list[torch.Tensor] = []
    handle = _count_batch0(model, calls)
    try:
        result = normscope.analyze(model, analyzers="stats,gls", batches=2, batch_size=64, budget=None)
    finally:
        handle.remove()
    first = calls[0]
    same = sum(1 for x in calls if x.shape == first.shape and torch.equal(x, first))
    assert same == 1, f"batch 0 ran {same} times"
    assert result.meta["passes"] == {"forwards": 2, "backwards": 1}
    assert len(result.tables["gls_sites"]) and len(result.tables["stats_sites"])


def _probe_levels(model, x):
    """Levels by autograd on the moments themselves (the probe forward the graph replaces): each BN's
    moments become leaves; a site's level is 1 + the highest level of the leaves its moments reach."""
    from normscope.ops.norm_sites import channel_moments, override, site_output
    from normscope.ops.population import normalize_shared

    leaves, level, order = {}, {}, []

    def probe(name, module, inputs):
        mean, var = channel_moments(inputs)
        earlier = [(n, t) for n in order for t in leaves[n]]
        deps = torch.autograd.grad(mean.sum() + var.sum(), [t for _, t in earlier], allow_unused=True,
                                   retain_graph=True) if earlier else []
        level[name] = 1 + max((level[n] for (n, _), g in zip(earlier, deps) if g is not None), default=0)
        order.append(name)
        leaves[name] = (mean.detach().requires_grad_(), var.detach().requires_grad_())
        return site_output(module, normalize_shared(inputs, *leaves[name], module.eps))

    with torch.enable_grad(), override(model, probe):
        model(x)
    return level


def test_graph_levels_equal_the_autograd_probe_of_the_moments():
    model = build_model("resnet_bn").eval()
    x = torch.randn(2, 1, 8, 8)
    graph = site_graph(model, x)
    level = graph.levels(norm_sites(model))
    assert level == _probe_levels(model, x[:1])
    # a block's projected shortcut BN is parallel to its first BN; two blocks per stage
    assert level["layer2.0.bn1"] == level["layer2.0.downsample.1"] == 6 and level["layer2.1.bn2"] == 9
    # looking through the sites outside the subset: only the blocks' second BNs
    seconds = [s for s in level if s.endswith("bn2")]
    assert graph.levels(seconds) == {"layer1.0.bn2": 1, "layer1.1.bn2": 2, "layer2.0.bn2": 3, "layer2.1.bn2": 4}


def test_graph_feeding_layers_and_single_value_sites():
    model = build_model("mlp_bn")
    graph = site_graph(model, torch.randn(4, 1, 8, 8))
    assert graph.feeding_layers(model) == {"net.1": "net.2", "net.4": "net.5"}
    assert graph.single_value(norm_sites(model)) == ["net.2", "net.5"]
    resnet = build_model("resnet_bn")
    graph = site_graph(resnet, torch.randn(2, 1, 8, 8))
    pairs = graph.feeding_layers(resnet)
    assert pairs["conv1"] == "bn1" and pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert graph.single_value(norm_sites(resnet)) == []


def test_population_gradient_levels_from_the_graph(digits32):
    model = build_model("resnet_bn").double()
    x, y = digits32[0][:16].double(), digits32[1][:16]
    assert population_gradient(model, x, y).levels == 9
