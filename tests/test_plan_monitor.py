"""analyze and the monitor on the same model and batch give the same number for every shared quantity."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import normscope
from normscope.models import build_model
from normscope.monitor.metrics import DRIFT_METRICS, GLS_METRICS, STATS_METRICS


def analyze_and_monitor(model, x, y, analyzers: str, tmp_path):
    """``analyze`` of one batch and a monitor's rows (indexed by site and metric) of one training step on it."""
    result = normscope.analyze(model, (x, y), analyzers=analyzers, batch_size=len(y), batches=1, budget=None)
    with normscope.Monitor(model, tmp_path / "run", every=1) as monitor:
        with monitor.step():
            F.cross_entropy(model(x), y).backward()
    return result, pd.read_parquet(tmp_path / "run").set_index(["site", "metric"])["value"]


@pytest.mark.parametrize("name", ["mlp_bn", "cnn_gn"])
def test_analyze_and_the_monitor_agree_on_every_shared_quantity(name, digits64, tmp_path):
    x, y = digits64[0][:32].double(), digits64[1][:32]
    model = build_model(name).double().train()
    with torch.no_grad():  # running statistics away from their initial values
        model(x * 2 + 0.5)
    result, rows = analyze_and_monitor(model, x, y, "stats,gls", tmp_path)
    stats = result.tables["stats_sites"].set_index("site")
    gls = result.tables["gls_sites"].set_index("site")
    compared = 0
    for site in stats.index:
        for metric in (*STATS_METRICS, *DRIFT_METRICS, *GLS_METRICS):
            if (site, metric) not in rows.index:
                continue
            mine = gls.loc[site, metric] if metric in GLS_METRICS else stats.loc[site, metric]
            assert math.isclose(rows[(site, metric)], mine, rel_tol=1e-9, abs_tol=1e-12) or (
                math.isnan(mine) and math.isnan(rows[(site, metric)])), (site, metric, rows[(site, metric)], mine)
            compared += 1
    assert compared >= len(stats) * (len(STATS_METRICS) - 1 + len(GLS_METRICS))
