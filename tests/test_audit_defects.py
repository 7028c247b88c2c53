"""Float64 checks of issue #16's defects 2-6, each against an independent computation written
here (explicit grouping, a sweep over sizes without the reference size, an orthogonality check,
the op's own backward against the analyzer, a real transformers layer)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normscope.analyzers.gls import batch_size_sweep, fit_records, gls_tables, regularized_fit
from normscope.capture import capture
from normscope.ops.ls_bn import LSBatchNorm
from normscope.ops.population import PopulationNorm

D = torch.float64
EPS0 = 1e-300  # var + 1e-300 == var in float64: eps = 0 exactly, which torch refuses in training


def test_population_rotation_is_orthogonal_in_float64():
    """R R^T - I at 1e-14 whether the module is built in float64 or cast to it afterwards
    (the buffer used to be built in float32 and cast up: 4e-8)."""
    eye = torch.eye(12, dtype=torch.float64)
    for kind, width in (("random", 12), ("hadamard", 16)):
        eye = torch.eye(width, dtype=torch.float64)
        for norm in (PopulationNorm(width, rotation=kind, dtype=torch.float64),
                     PopulationNorm(width, rotation=kind).double(),
                     PopulationNorm(width, rotation=kind).to(torch.float64),
                     PopulationNorm(width, rotation=kind).double().float().double()):
            R = norm.rotation
            assert R.dtype == torch.float64
            assert float((R @ R.T - eye).abs().max()) < 1e-14, kind
    single = PopulationNorm(12, rotation="random")
    assert single.rotation.dtype == torch.float32
    assert float((single.rotation.double() @ single.rotation.double().T - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-6


def _regularized_by_the_analyzer(x, gamma, dy, a_star, b_star, weight, eps):
    """The gls analyzer's regularized s dL/dx, from a capture of a plain BatchNorm2d."""
    bn = nn.BatchNorm2d(x.shape[1], eps=eps).to(D)
    with torch.no_grad():
        bn.weight.copy_(gamma)
    with capture(bn) as cap:
        (bn(x) * dy).sum().backward()
    (fit,) = fit_records(cap)
    alpha_w, beta_w = regularized_fit(fit.z, fit.g, a_star, b_star, weight, x.shape[0])
    residual = fit.g - alpha_w - beta_w * fit.z
    rows = residual / fit.figures["scale"][:, None]  # (C, B * H * W), batch-major
    return rows.view(x.shape[1], x.shape[0], -1).transpose(0, 1).reshape(x.shape)


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_virtual_items_one_convention_for_conv_layers(weight):
    """BatchNorm2d at B = 2: the gls analyzer's regularized gradient equals LSBatchNorm's backward
    on the same batch and alpha*, beta*; with eps = 0 both equal s dL/dx of a plain BatchNorm over
    the batch with 2 w virtual batch items x = mu +- sigma appended by hand, each broadcast over
    (H, W) (Appendix C of "Normalization Gradients are Least-Squares Residuals", ICLR 2019 submission): the weight is counted in batch items (B + 2w), not in positions."""
    generator = torch.Generator().manual_seed(3)
    B, C, H, W = 2, 3, 4, 5
    x = torch.randn(B, C, H, W, generator=generator, dtype=D) * 1.7 + 0.4
    dy = torch.randn(B, C, H, W, generator=generator, dtype=D)
    gamma = torch.rand(C, generator=generator, dtype=D) + 0.5
    a_star, b_star = torch.randn(C, generator=generator, dtype=D), torch.randn(C, generator=generator, dtype=D)
    for eps in (1e-3, EPS0):
        op = LSBatchNorm(C, eps=eps, virtual_weight=weight).to(D).train()
        with torch.no_grad():
            op.weight.copy_(gamma)
            op.grad_moments.copy_(torch.stack([a_star, b_star]))
            op.grad_batches_tracked.fill_(1)
        leaf = x.clone().requires_grad_()
        (op(leaf) * dy).sum().backward()
        analyzer = _regularized_by_the_analyzer(x, gamma, dy, a_star, b_star, weight, eps)
        torch.testing.assert_close(analyzer, leaf.grad, rtol=1e-12, atol=1e-13)
    # eps = 0: the virtual items appended by hand, broadcast over (H, W), n_w copies of each
    n_w = int(weight)
    mu, sigma = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0).sqrt()
    plus, minus = (mu + sigma)[None, :, None, None], (mu - sigma)[None, :, None, None]
    leaf = x.clone().requires_grad_()
    every = torch.cat([leaf, plus.expand(n_w, C, H, W), minus.expand(n_w, C, H, W)])
    z = F.batch_norm(every, None, None, training=True, eps=EPS0)
    torch.testing.assert_close(z[B:B + n_w].detach(), torch.ones(n_w, C, H, W, dtype=D))
    g = gamma[None, :, None, None] * dy
    g_virtual = torch.cat([(a_star + b_star)[None, :, None, None].expand(n_w, C, H, W),
                           (a_star - b_star)[None, :, None, None].expand(n_w, C, H, W)])
    (by_hand,) = torch.autograd.grad((z * torch.cat([g, g_virtual])).sum(), leaf)
    torch.testing.assert_close(analyzer, by_hand, rtol=1e-11, atol=1e-12)


def _mlp() -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


def _scaled_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """B dL/dh at the BatchNorm's input h for the batch (x, y) of a mean-reduced loss, by autograd."""
    h = model[0](x).detach().requires_grad_()
    loss = F.cross_entropy(model[3](model[2](F.batch_norm(h, None, None, model[1].weight, model[1].bias,
                                                          training=True, eps=model[1].eps))), y)
    (dh,) = torch.autograd.grad(loss, h)
    return len(x) * dh


@pytest.mark.parametrize("batch_sizes", [(2, 4), None])
def test_batch_size_sweep_without_the_reference_size(batch_sizes):
    """L = 12 items, sizes (2, 4) or the default powers of 2 (also 2, 4): neither contains L, which
    used to raise KeyError; the distances are to one batch of all 12 items, by autograd."""
    model = _mlp()
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 5, generator=generator, dtype=D), torch.randint(0, 3, (12,), generator=generator)
    tables = batch_size_sweep(model, x, y, batch_sizes=batch_sizes)
    assert sorted(tables["gls_batch_sweep"]["batch_size"]) == [2, 4]
    reg = tables["gls_regularization"].set_index("batch_size")
    assert sorted(reg.index) == [2, 4]
    reference = _scaled_input_grad(model, x, y)
    for size in (2, 4):
        chunks = torch.cat([_scaled_input_grad(model, x[i:i + size], y[i:i + size]) for i in range(0, 12, size)])
        expected = float((chunks - reference).norm() / reference.norm())
        assert reg.loc[size, "dist_plain"] == pytest.approx(expected, rel=1e-9)
        assert 0 < reg.loc[size, "dist_regularized"] < 10


def _whatif_per_channel_by_hand(norm: nn.Module, x: torch.Tensor, dy: torch.Tensor, channel: int) -> float:
    """R^2 of one more regression of the residual r = s dL/dx on [1, z], fitted by least squares
    separately in each group of elements sharing an index along ``channel`` (all N and all other dims)."""
    leaf = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad((norm(leaf) * dy).sum(), leaf)
    dims = tuple(range(x.dim() - len(norm.normalized_shape), x.dim()))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
    s = (var + norm.eps).sqrt()
    z, r = (x - mean) / s, s * dx
    left = 0.0
    for c in range(x.shape[channel]):
        zc, rc = z.select(channel, c).reshape(-1), r.select(channel, c).reshape(-1)
        design = torch.stack([torch.ones_like(zc), zc], 1)
        coef = torch.linalg.lstsq(design, rc[:, None]).solution
        left += float((rc - (design @ coef)[:, 0]).pow(2).sum())
    return 1 - left / float(r.pow(2).sum())


@pytest.mark.parametrize("shape, normalized, channel", [((6, 3, 4, 5), (3, 4, 5), 1), ((6, 7, 4), (4,), 2)])
def test_whatif_per_channel_groups_by_the_channel_axis(shape, normalized, channel):
    """LayerNorm over (C, H, W) of (N, C, H, W): the what-if per-channel regression groups by C
    (dim 1), not by the last dim W; LayerNorm over C of (N, T, C) groups by the last dim."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=generator, dtype=D) * 1.3 + 0.2
    x = x + torch.arange(shape[1], dtype=D).view(1, -1, *[1] * (len(shape) - 2))  # channels differ
    dy = torch.randn(shape, generator=generator, dtype=D) * (1 + torch.rand(shape, generator=generator, dtype=D))
    norm = nn.LayerNorm(normalized, elementwise_affine=False, eps=1e-3).to(D)
    with capture(norm) as cap:
        (norm(x.clone().requires_grad_()) * dy).sum().backward()
    table = gls_tables(cap)["gls_whatif"].set_index("extra_partitioning")
    expected = _whatif_per_channel_by_hand(norm, x, dy, channel)
    assert table.loc["per_channel", "r2_extra"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if channel != x.dim() - 1:
        assert abs(_whatif_per_channel_by_hand(norm, x, dy, x.dim() - 1) - expected) > 1e-3  # the old, wrong grouping


def _convnext():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], patch_size=4, num_stages=2)
    return transformers.ConvNextModel(config).to(D).train()


def test_convnext_channels_first_layernorm():
    """The real transformers ConvNextLayerNorm (channels_first, from a ConvNeXt built from a small
    config) normalizes each (n, h, w) position over the C channels: N*H*W partitions whose alpha,
    beta and R^2 equal the explicit float64 computation, and the whole model's gls tables run."""
    model = _convnext()
    norm = model.embeddings.layernorm
    assert type(norm).__name__ == "ConvNextLayerNorm" and norm.data_format == "channels_first"
    generator = torch.Generator().manual_seed(6)
    N, C, H, W = 3, 8, 4, 4
    x = torch.randn(N, C, H, W, generator=generator, dtype=D) * 2 + 0.5
    dy = torch.randn(N, C, H, W, generator=generator, dtype=D)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
    with capture(norm) as cap:
        (norm(x.clone().requires_grad_()) * dy).sum().backward()
    (fit,) = fit_records(cap)
    positions = x.permute(0, 2, 3, 1).reshape(-1, C)  # one row per (n, h, w), over C
    g = (dy * norm.weight[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, C).detach()
    mean, var = positions.mean(1, keepdim=True), positions.var(1, correction=0, keepdim=True)
    z = (positions - mean) / (var + norm.eps).sqrt()
    alpha, beta = g.mean(1), (g * z).mean(1)
    r2 = 1 - (g - alpha[:, None] - beta[:, None] * z).pow(2).sum(1) / g.pow(2).sum(1)
    assert fit.figures["alpha"].numel() == N * H * W
    got, want = torch.argsort(fit.figures["alpha"]), torch.argsort(alpha)
    for name, expected in (("alpha", alpha), ("beta", beta), ("r2", r2)):
        torch.testing.assert_close(fit.figures[name][got], expected[want], rtol=1e-10, atol=1e-12)
    with capture(model) as cap:
        model(torch.randn(2, 3, 16, 16, generator=generator, dtype=D)).last_hidden_state.square().sum().backward()
    sites = gls_tables(cap)["gls_sites"].set_index("site")
    assert sites.loc["embeddings.layernorm", "n_partitions"] == 2 * 4 * 4
