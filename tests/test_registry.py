"""Recomputed z matches torch's own normalization for every kind, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import normscope
from normscope.capture import capture, find_sites, find_unrecognized
from normscope.errors import NoNormSitesError, NormscopeError, UnknownNameError
from normscope.registry import from_rows, to_rows, unregister_norm

torch.manual_seed(0)

# (module, input shape, kind)
CASES = {
    "bn1d": (lambda: nn.BatchNorm1d(5), (8, 5), "batchnorm"),
    "bn1d_seq": (lambda: nn.BatchNorm1d(5), (8, 5, 7), "batchnorm"),
    "bn2d": (lambda: nn.BatchNorm2d(4), (6, 4, 3, 5), "batchnorm"),
    "bn3d": (lambda: nn.BatchNorm3d(3), (4, 3, 2, 3, 2), "batchnorm"),
    "syncbn": (lambda: nn.SyncBatchNorm(4), (6, 4, 3, 3), "batchnorm"),
    "ln": (lambda: nn.LayerNorm(6), (4, 3, 6), "layernorm"),
    "ln2": (lambda: nn.LayerNorm((3, 6)), (4, 3, 6), "layernorm"),
    "gn": (lambda: nn.GroupNorm(2, 6), (4, 6, 3, 3), "groupnorm"),
    "in1d": (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 9), "instancenorm"),
    "in2d": (lambda: nn.InstanceNorm2d(3, affine=True), (4, 3, 4, 4), "instancenorm"),
    "in3d": (lambda: nn.InstanceNorm3d(3, affine=True), (2, 3, 3, 3, 3), "instancenorm"),
    "rms": (lambda: nn.RMSNorm(6, eps=1e-3), (4, 3, 6), "rmsnorm"),
}


def _randomize_affine(module: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if isinstance(p, torch.Tensor):
                p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recomputed_z_matches_torch(case, mode):
    make, shape, kind = CASES[case]
    module = make().double()
    _randomize_affine(module)
    if hasattr(module, "running_mean") and module.running_mean is not None:
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    module.train(mode == "train")
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    with capture(module) as cap:
        y = module(x)
    record = cap.records[0]
    assert record.site.kind == kind
    weight = record.layout.weight
    bias = record.layout.bias
    from normscope.registry import affine_like

    z_torch = (y - (0 if bias is None else affine_like(bias, y, record.layout))) / affine_like(weight, y, record.layout)
    z = from_rows(record.z_rows(), x.shape, record.layout)
    torch.testing.assert_close(z, z_torch, rtol=1e-10, atol=1e-10)


def test_weight_norm_z_is_unit_rows():
    layer = weight_norm(nn.Linear(5, 3).double())
    with capture(layer) as cap:
        layer(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    record = cap["weight"]
    assert record.site.kind == "weightnorm"
    v = layer.parametrizations.weight.original1
    torch.testing.assert_close(record.z_rows(), (v / v.norm(dim=1, keepdim=True)).double())


@pytest.mark.parametrize("case", ["bn2d", "ln2", "gn", "in2d"])
def test_rows_round_trip(case):
    make, shape, _ = CASES[case]
    module = make()
    x = torch.randn(shape)
    with capture(module) as cap:
        module(x)
    layout = cap.records[0].layout
    torch.testing.assert_close(from_rows(to_rows(x, layout), x.shape, layout), x)


class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


class GemmaStyleRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * (1.0 + self.weight)


class ConvNeXtLayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, data_format="channels_first"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.data_format, self.normalized_shape = eps, data_format, (dim,)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MyNorm(nn.Module):
    """A custom batch norm that normscope cannot know without registration."""

    def __init__(self, c, epsilon=1e-3):
        super().__init__()
        self.epsilon = epsilon
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        mean = x.mean(0, keepdim=True)
        var = x.var(0, unbiased=False, keepdim=True)
        return self.scale * (x - mean) / torch.sqrt(var + self.epsilon)


@pytest.mark.parametrize("cls,shape,kind", [
    (LlamaStyleRMSNorm, (3, 4, 6), "rmsnorm"),
    (GemmaStyleRMSNorm, (3, 4, 6), "rmsnorm"),
    (ConvNeXtLayerNorm, (3, 6, 2, 2), "layernorm"),
])
def test_structural_recognition(cls, shape, kind):
    module = cls(6).double()
    with torch.no_grad():
        module.weight.uniform_(0.2, 1.0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    with capture(module) as cap:
        module(x).pow(3).sum().backward()
    record = cap.records[0]
    assert record.site.kind == kind
    # the layer's own backward satisfies the least-squares identity only if z and g are right
    z, g, s = record.z_rows(), record.g_rows(), record.moments_rows()[1]
    fit = (g * z).mean(1, keepdim=True) * z
    if record.layout.kind.centered:
        fit = fit + g.mean(1, keepdim=True)
    torch.testing.assert_close(s * record.dx_rows(), g - fit, rtol=1e-9, atol=1e-10)


def test_gemma_offset_detected():
    with capture(GemmaStyleRMSNorm(4)) as cap:
        cap.model(torch.randn(2, 4))
    assert cap.records[0].layout.weight_offset == 1.0


def test_unknown_norm_reported_then_registered():
    model = nn.Sequential(nn.Linear(4, 5), MyNorm(5))
    assert find_unrecognized(model) == [("1", "MyNorm")]
    with pytest.raises(NoNormSitesError):
        find_sites(model)
    normscope.register_norm(MyNorm, "batchnorm", eps="epsilon", weight="scale", bias=None)
    try:
        assert find_unrecognized(model) == []
        assert [s.kind for s in find_sites(model)] == ["batchnorm"]
        with pytest.raises(NormscopeError, match="already registered"):
            normscope.register_norm(MyNorm, "batchnorm")
        model = model.double()
        x = torch.randn(7, 4, dtype=torch.float64)
        with capture(model) as cap:
            out = model(x)
        torch.testing.assert_close(from_rows(cap["1"].z_rows(), out.shape, cap["1"].layout) * model[1].scale, out)
    finally:
        unregister_norm(MyNorm)


def test_register_unknown_kind_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: batchnorm"):
        normscope.register_norm(MyNorm, "fancynorm")


def test_llama_from_transformers_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).double()
    sites = find_sites(model)
    assert {s.kind for s in sites} == {"rmsnorm"} and len(sites) == 3
    ids = torch.randint(0, 50, (2, 5))
    with capture(model) as cap:
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(cap.records) == 3 and all(r.has_grad for r in cap.records)
    record = cap.records[0]
    z, g, s = record.z_rows(), record.g_rows(), record.moments_rows()[1]
    # LlamaRMSNorm normalizes in float32 internally, so agreement is to float32 precision
    torch.testing.assert_close(s * record.dx_rows(), g - (g * z).mean(1, keepdim=True) * z, rtol=1e-5, atol=1e-7)
