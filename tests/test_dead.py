"""Dead units after normalization (normscope.analyzers.dead) against a direct computation."""

import torch
from torch import nn

import normscope
from normscope.models import build_model


def test_dead_units_equal_a_direct_count_and_cost_no_pass():
    model = build_model("mlp_bn").double()
    bn = model.net[2]
    with torch.no_grad():
        bn.bias[:5] = -20.0  # five channels far below zero after normalization
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (64,))
    result = normscope.analyze(model, (x, y), analyzers="stats,dead", batch_size=32, batches=2, budget=None)
    table = result.tables["dead_sites"].set_index("site")
    outputs = []
    handle = bn.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    try:
        model.train()
        with torch.no_grad():
            for part in x.split(32):
                model(part)
    finally:
        handle.remove()
    direct = ~(torch.cat(outputs) > 0).any(dim=0)
    assert table.loc["net.2", "dead_units"] == int(direct.sum()) >= 5
    assert table.loc["net.2", "dead_fraction"] == float(direct.double().mean())
    assert table.loc["net.2", "consumer"] == "ReLU"
    assert result.meta["passes"]["forwards"] == 2  # read from the passes stats runs: no pass of its own


def test_layer_norm_features_are_the_units():
    model = build_model("transformer_ln").double()
    norm = model.blocks[0].norm1 if hasattr(model, "blocks") else next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    with torch.no_grad():
        norm.bias[:3] = -50.0
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    table = normscope.analyze(model, (x, y), analyzers="dead", batch_size=16, batches=1, budget=None).tables["dead_sites"]
    row = table[table["kind"] == "layernorm"].iloc[0]
    assert row["units"] == norm.normalized_shape[0] and row["dead_units"] >= 3
