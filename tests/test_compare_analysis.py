"""`compare --analyzers`: each variant's trained model analyzed in place, side by side per seed."""

from __future__ import annotations

import math

from normscope.compare import compare


def test_each_trained_variant_is_analyzed():
    out = compare("mlp_bn", "bn,median", (16,), steps=4, seeds=1, points=1, analyzers=["stats", "gls"], analysis_budget=30)
    table = out.tables["compare_analysis"]
    assert list(table["op"]) == ["bn", "median"] and list(table["seed"]) == [0, 0]
    assert table[["mean_drift_max", "gls_r2_mean", "gls_identity_rel_max"]].notna().all().all()
    assert table[["lambda_max_train", "a_crit_train"]].isna().all().all()  # descent not asked for
    # median's backward is not the residual; BatchNorm's is (up to float32 rounding)
    by_op = table.set_index("op")["gls_identity_rel_max"]
    assert by_op["median"] > 1e-2 > 1e-4 > by_op["bn"]
    stats = out.tables["compare_stats"].set_index("op")
    assert math.isclose(stats.loc["median", "gls_r2_mean_mean"], table.set_index("op").loc["median", "gls_r2_mean"])
