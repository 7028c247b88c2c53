"""The monitor under ``torch.distributed`` (e.g. ``torchrun``): every rank's rows to rank 0.

Each rank reduces its own step (its batch's moments, its regression figures); rank 0 gathers the
rows of all ranks (``all_gather_object``, any backend, gloo on CPU) and writes them with their
``rank``. On statistics steps rank 0 also writes the spread of the running statistics between
ranks after the step's forward, which plain DDP lets diverge between its buffer broadcasts:
``running_mean_rank_drift`` = mean over channels and ranks of
``|running_mean_r - mean_r running_mean| / sqrt(mean_r running_var + eps)`` and
``running_var_rank_ratio`` = mean over channels of ``max_r running_var / min_r running_var`` (site rows
with ``rank = -1``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

Row = tuple[str, str, float]
ALL_RANKS = -1


def active() -> bool:
    """Is a process group of more than one rank initialized?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(rows: list[Row]) -> list[list[Row]]:
    """Every rank's ``rows``, indexed by rank (on every rank)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    return out


def running_spread_rows(per_rank: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], eps: dict[str, float]) -> list[Row]:
    """Spread of the running statistics between ranks, per module (see the module docstring)."""
    rows = []
    for site in per_rank[0]:
        if site not in eps:
            continue
        means = np.stack([r[site][0].double().cpu().numpy() for r in per_rank])
        variances = np.stack([r[site][1].double().cpu().numpy() for r in per_rank])
        scale = np.sqrt(variances.mean(0) + eps[site])
        rows.append((site, "running_mean_rank_drift", float((np.abs(means - means.mean(0)) / scale).mean())))
        rows.append((site, "running_var_rank_ratio", float((variances.max(0) / variances.min(0)).mean())))
    return rows
