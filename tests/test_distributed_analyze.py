"""``normscope.analyze`` under torch.distributed (README "Data beyond one process"): two gloo
CPU processes against one process, in float64, on 101 examples (shards of 50 and 51)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import normscope
from normscope.distributed import World, shard, shard_slice
from normscope.errors import DataShapeError
from normscope.result import AnalysisResult
from tests.distributed_helpers import EXAMPLES, data, two_level_net

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"batch_size": 32, "batches": 2, "seed": 0, "budget": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank as torchrun starts it: only the environment says it is distributed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model = two_level_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = normscope.analyze(model, data(), **SETTINGS)
    unchanged = model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    initialized = torch.distributed.is_initialized()  # analyze destroys the group it created
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump({"tables": result.tables, "meta": result.meta, "headline": result.headline, "unchanged": unchanged,
                     "initialized": initialized}, f)


def _assert_close(single: pd.DataFrame, spread: pd.DataFrame, name: str) -> None:
    """Every cell equal: numbers to 1e-10 relative (with a floor of 1e-10 of the column's largest
    value, for cells that are rounding noise in both runs), everything else exactly."""
    assert list(single.columns) == list(spread.columns) and len(single) == len(spread), name
    for column in single.columns:
        a, b = single[column].to_numpy(), spread[column].to_numpy()
        if (name, column) == ("descent_operator", "symmetry_error"):  # rounding noise of differently ordered sums
            assert (a < 1e-12).all() and (b < 1e-12).all(), name
        elif a.dtype.kind == "f":
            scale = np.abs(a[np.isfinite(a)]).max(initial=0.0)
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10 * scale, err_msg=f"{name}.{column}")
        else:
            assert (a == b).all(), f"{name}.{column}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    torch.set_num_threads(1)
    single = normscope.analyze(two_level_net(), data(), **SETTINGS)
    return single, ranks


def test_the_distributed_run_equals_the_single_process_one(runs):
    single, ranks = runs
    assert ranks[0]["meta"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert single.meta["distributed"] == {"world_size": 1, "backend": None}
    assert ranks[0]["meta"]["analyzer_errors"] == {} and single.meta["analyzer_errors"] == {}
    assert set(ranks[0]["tables"]) == set(single.tables)
    for name, table in ranks[0]["tables"].items():  # the ranks agree with each other
        _assert_close(table, ranks[1]["tables"][name], name)
    for name, table in single.tables.items():
        spread = ranks[0]["tables"][name]
        if name == "findings":  # the sentence on how g* was computed differs; the figures must not
            differ = table["sentence"] != spread["sentence"]
            assert differ.sum() == 1 and spread.loc[differ, "sentence"].str.contains("each rank of 2 streaming its shard").all()
            table, spread = table.drop(columns="sentence"), spread.drop(columns="sentence")
        _assert_close(table, spread, name)
    recalibrated = single.tables["stats_recalibration"]
    assert recalibrated["examples"].tolist() == [EXAMPLES, EXAMPLES]  # every example once, over the two shards
    assert single.tables["descent_trace"]["trace"].notna().all() and len(single.tables["bias_jacobian"])
    for r in ranks:  # eval mode's products were split over the ranks; train mode's BatchNorm couples the examples
        assert (r["headline"]["descent"]["hvp_ranks_eval"], r["headline"]["descent"]["hvp_ranks_train"]) == (2, 1)
    assert "hvp_ranks_eval" not in single.headline["descent"]


def test_the_split_products_are_within_1e_10_of_one_process(runs):
    """The eval-mode rows that come from the split operator (the total's and the layers' direction
    rows, the quadratic model, the top eigenvalues): the largest relative difference, reported."""
    single, ranks = runs
    worst = 0.0
    for name, columns in {"descent_directions": ["slope", "curvature", "a_crit"], "descent_quadratic": ["quadratic"],
                          "descent_spectrum": ["eigenvalue"]}.items():
        a, b = single.tables[name], ranks[0]["tables"][name]
        a, b = a[a["mode"] == "eval"], b[b["mode"] == "eval"]
        assert len(a) and len(a) == len(b)
        for column in columns:
            x, y = a[column].to_numpy(dtype=float), b[column].to_numpy(dtype=float)
            finite = np.isfinite(x)
            assert (np.isfinite(y) == finite).all()
            worst = max(worst, float((np.abs(x[finite] - y[finite]) / np.maximum(np.abs(x[finite]), 1e-300)).max(initial=0.0)))
    print(f"largest relative difference of the split eval-mode figures: {worst:.2e}")
    assert worst <= 1e-10


def test_the_model_is_left_bit_identical_on_every_rank(runs):
    _, ranks = runs
    assert all(r["unchanged"] for r in ranks)
    assert not any(r["initialized"] for r in ranks)


def _budget_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of an analysis whose wall-clock budget is too small for all of it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    result = normscope.analyze(two_level_net(), data(), **{**SETTINGS, "budget": 1.5})
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump({"tables": result.tables, "budget": result.meta["budget"]}, f)


def test_a_budget_cuts_the_same_work_on_every_rank(tmp_path):
    """Under torch.distributed the budget holds and the ranks agree on every cut (their clocks and
    timings are made the largest over the ranks): the run ends, with the same cuts and tables on both."""
    context = mp.start_processes(_budget_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish: a budget decision differed between them")
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert ranks[0]["budget"]["seconds"] == 1.5 and ranks[0]["budget"]["cuts"]
    assert ranks[0]["budget"]["cuts"] == ranks[1]["budget"]["cuts"]
    assert ranks[0]["budget"]["unit_costs"] == ranks[1]["budget"]["unit_costs"]
    for name, table in ranks[0]["tables"].items():
        _assert_close(table, ranks[1]["tables"][name], name)


def test_shards_cover_a_non_divisible_data_set_once():
    slices = [shard_slice(EXAMPLES, World(r, 2, "gloo")) for r in range(2)]
    assert slices == [slice(0, 50), slice(50, 101)]
    inputs, targets = data()
    parts = [shard((inputs, targets), World(r, 2, "gloo")) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), inputs) and torch.equal(torch.cat([p[1] for p in parts]), targets)
    assert shard_slice(5, World(2, 3, "gloo")) == slice(3, 5)
    with pytest.raises(DataShapeError, match="cannot be shared out over 4 ranks"):
        shard_slice(3, World(0, 4, "gloo"))


def test_torchrun_cli_writes_the_output_on_rank_0_only(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "normscope.cli", "analyze", "--model", "tests.distributed_helpers:two_level_net",
               "--data", "tests.distributed_helpers:data", "--analyzers", "stats", "--device", "cpu",
               "--batch-size", "32", "--batches", "2", "--budget", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("normscope analyze") == 1 and done.stdout.rstrip().endswith(str(out))  # one summary: rank 0
    saved = AnalysisResult.load(out)
    assert saved.meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert int(saved.tables["stats_recalibration"]["examples"].iloc[0]) == EXAMPLES
