"""The monitor under torch.distributed: 2 CPU processes (gloo), DDP; rank 0 writes every rank's rows."""

from __future__ import annotations

import os
import sys

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import normscope
from normscope.data import load_digits
from normscope.models import build_model


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        images, labels = load_digits()
        model = build_model("mlp_bn", seed=0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        with normscope.Monitor(model, out, every=1, optimizer=optimizer, flush_seconds=0) as monitor:
            for step in range(3):
                start = (2 * step + rank) * 32
                x, y = images[start:start + 32] * (1 + rank), labels[start:start + 32]
                with monitor.step():
                    F.cross_entropy(ddp(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_write_every_ranks_rows_on_rank_0(tmp_path):
    out = tmp_path / "run"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(2, init, str(out)), nprocs=2, join=True, start_method="spawn")
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert files and all(name.startswith("part-000-") for name in files)  # only rank 0 wrote
    rows = pd.read_parquet(out)
    assert set(rows["rank"]) == {-1, 0, 1}
    r2 = rows[rows["metric"] == "r2_mean"].pivot_table(index=["step", "site"], columns="rank", values="value")
    assert len(r2) == 6 and not (r2[0] == r2[1]).any()  # each rank's own batch
    drift = rows[rows["metric"] == "mean_drift_mean"].pivot_table(index=["step", "site"], columns="rank", values="value")
    first = drift.xs("net.2", level="site")  # rank 1's inputs are scaled by 2: farther from the shared running mean
    assert (first[1] > first[0]).all()
    spread = rows[(rows["rank"] == -1) & (rows["metric"] == "running_mean_rank_drift")]
    assert len(spread) == 6 and (spread["value"] > 0).all()
    ratio = rows[(rows["rank"] == -1) & (rows["metric"] == "running_var_rank_ratio")]
    assert (ratio["value"] > 1).all()
