"""Reproduce the papers' claims at small scale on the digits, with seeds, equal budgets and a verdict.

Claims, each rerun with ``normscope.compare`` (same initial weights per seed, same batches, same
budget in weight updates, linear learning-rate scaling from 0.05 at batch 32, SGD momentum 0.9):

* "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission), Table 1 (BN/LN
  chains at batch 128) and Table 2 with Appendix C (least-squares regularized BN over the paper's
  grid, and batch renorm, at batch 2), on the built-in ResNet (``resnet_bn``, it has skips like the
  paper's ResNet-34-v2).
* Ioffe 2017, "Batch Renormalization", §4.2: renorm against BatchNorm over microbatches of 4.
* "Extreme Normalization: Approximating Full-Data Batch Normalization with Single Examples", §5:
  two-stage backprop, microbatch (improved batch renorm), Hadamard rotation, shrinkage and per-example
  normalization, on a CNN without skip connections (the paper's Inception-v3 has none).

Verdicts (``normscope.seed_stats``): for a claim "a beats b", *reproduced* when ``mean(a) - mean(b)``
of the final test accuracy exceeds ``std(a) + std(b)`` over the seeds, *not reproduced* when it is
below ``-(std(a) + std(b))``, *inconclusive* otherwise. For a claim "a is at most tol worse than b",
with ``deficit = mean(b) - mean(a)`` and the same spread: reproduced when ``deficit + spread <= tol``,
not reproduced when ``deficit - spread > tol``, inconclusive otherwise.

Run: python benchmarks/papers.py [--seeds 3] [--out docs/reproductions.md] [--quick]
(``--quick``: one seed and a few steps per variant, a smoke test of every variant, no verdicts.)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope.compare import Variant, compare, make_variant
from normscope.models import build_model
from normscope.ops.base import ChannelNorm, channel_view, mean_var, reduce_dims, update_running
from normscope.seed_stats import difference, format_mean_std, mean_std

LR, REFERENCE_BATCH = 0.05, 32
CHECK_EPS = 1e-12  # the paper's z+- = +-1 holds exactly only without eps; at eps 1e-5 and batch 2 tiny variances differ
LSBN_GRID = [(m, w) for m in (0.003, 0.5) for w in (1, 2, 4, 8)]  # App. C: momentum {.997, .5}, weights {1, 2, 4, 8}


class AppendixCBatchNorm(ChannelNorm):
    """A direct implementation of App. C of the least-squares paper, independent of ``LSBatchNorm``:
    the batch with ``w`` copies of ``x+ = mu_B + sigma_B`` and of ``x- = mu_B - sigma_B`` appended
    (held constant) goes through torch's own ``F.batch_norm``; in the backward pass the appended
    items receive ``alpha* + beta*`` and ``alpha* - beta*`` and torch's BatchNorm backward of the
    whole concatenation gives the real items' gradient. ``alpha*``, ``beta*`` are running averages
    of ``mean(dL/dz)`` and ``mean(dL/dz z)`` with weight ``grad_momentum``, started from the first
    batch. Integer ``virtual_weight`` only."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, virtual_weight: int = 1, grad_momentum: float = 0.5) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.virtual_weight, self.grad_momentum = int(virtual_weight), grad_momentum
        self.register_buffer("grad_moments", torch.zeros(2, num_features))
        self.register_buffer("started", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        factor, running_mean, running_var = self._begin_call(x)
        if not self.training:
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps)
        mean, var = mean_var(x.detach())
        update_running(running_mean, running_var, mean, var, x, factor)
        z = _AppendedItems.apply(x, self)
        return torch.addcmul(channel_view(self.bias, x), z, channel_view(self.weight, x))


class _AppendedItems(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm: AppendixCBatchNorm) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.norm = norm
        return F.batch_norm(x, None, None, None, None, True, 0.0, norm.eps)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        norm, w = ctx.norm, ctx.norm.virtual_weight
        dims = reduce_dims(x)
        with torch.enable_grad():
            mean = x.mean(dims, keepdim=True)
            sigma = x.var(dims, unbiased=False, keepdim=True).sqrt()
            plus, minus = (mean + sigma).expand(w, *x.shape[1:]), (mean - sigma).expand(w, *x.shape[1:])
            items = torch.cat([x, plus, minus]).detach().requires_grad_()
            z = F.batch_norm(items, None, None, None, None, True, 0.0, norm.eps)
            z_real = z[: len(x)].detach()
            alpha, beta = g.mean(dims), (g * z_real).mean(dims)
            state = norm.grad_moments
            if not bool(norm.started):
                state.copy_(torch.stack([alpha, beta]))
                norm.started.fill_(True)
            view = (1, -1) + (1,) * (x.dim() - 2)
            g_plus = (state[0] + state[1]).view(view).expand_as(plus)
            g_minus = (state[0] - state[1]).view(view).expand_as(minus)
            (grad,) = torch.autograd.grad(z, items, torch.cat([g, g_plus, g_minus]))
        state.lerp_(torch.stack([alpha, beta]), norm.grad_momentum)
        return grad[: len(x)], None


def cnn_bn() -> nn.Module:
    """Conv-BN-ReLU x 3 (16, 32, 32 channels, no skip connections), pooling, a linear head."""
    layers: list[nn.Module] = []
    cin = 1
    for cout, stride in ((16, 1), (32, 2), (32, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def seeded(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


@dataclass
class Experiment:
    name: str
    model: str
    batch_size: int
    steps: int
    variants: list[Variant]
    dtype: torch.dtype = torch.float32


@dataclass
class Claim:
    paper: str
    text: str
    numbers: str
    experiment: str
    a: str | list[str]
    b: str
    kind: str = "greater"  # or "within": a at most tol worse than b
    tol: float = 0.0
    pick: str = ""  # "best" / "worst" of the labels in a
    rows: dict[str, Any] = field(default_factory=dict)


def renorm_schedule(steps: int) -> dict[str, int]:
    """Ioffe 2017's schedule scaled to a run of ``steps`` updates: BatchNorm for the first 4%
    (5k of ~130k steps), rmax at 3 by 30% (40k), dmax at 5 by 20% (25k)."""
    bn_steps = max(1, round(0.04 * steps))
    return {"bn_steps": bn_steps, "rmax_steps": max(1, round(0.3 * steps) - bn_steps), "dmax_steps": max(1, round(0.2 * steps) - bn_steps)}


def population_options(quick: bool) -> dict[str, Any]:
    """Extreme Normalization §5: EMA rate 0.2, 200 EMA-only warm-up steps, 50 EMA-only steps after
    each early update (scaled here to the first 5 updates of a run of a few hundred), u_max 5, f_max 2."""
    if quick:
        return {"momentum": 0.2, "warmup": 2, "refresh": 1, "refresh_updates": 1}
    return {"momentum": 0.2, "warmup": 200, "refresh": 50, "refresh_updates": 5}


def experiments(quick: bool) -> list[Experiment]:
    def steps(n: int) -> int:
        return 3 if quick else n

    pop = population_options(quick)
    v = make_variant
    t2_steps, en_steps = steps(500), steps(175)
    return [
        Experiment("table1", "resnet_bn", 128, steps(150), [v("bn", {}), v("bn_ln", {}), v("ln_bn", {}), v("layernorm", {})]),
        Experiment("table2", "resnet_bn", 2, t2_steps, [
            v("bn", {}), v("renorm", {**renorm_schedule(t2_steps), "label": "renorm"}),
            *[v("lsbn", {"grad_momentum": m, "virtual_weight": float(w), "label": f"lsbn m={m} w={w}"}) for m, w in LSBN_GRID],
        ]),
        Experiment("extreme", "cnn_bn", 32, en_steps, [
            v("bn", {}),
            v("ghost_bn", {"ghost": 4, "label": "ghost bn k=4"}),
            v("ghost_renorm", {"ghost": 4, **renorm_schedule(en_steps), "label": "ghost renorm k=4"}),
            v("two_stage", {**pop, "label": "two-stage"}),
            v("population", {**pop, "microbatch": 4, "label": "improved renorm k=4"}),
            v("population", {**pop, "microbatch": 2, "label": "k=2"}),
            v("population", {**pop, "microbatch": 2, "rotation": "hadamard", "label": "k=2 hadamard"}),
            v("population", {**pop, "microbatch": 2, "rotation": "hadamard", "r_m": 0.5, "r_v": 0.5, "label": "k=2 hadamard r=0.5"}),
            v("population", {**pop, "microbatch": 1, "label": "per-example"}),
            v("population", {**pop, "microbatch": 1, "rotation": "hadamard", "label": "per-example hadamard"}),
            v("population", {**pop, "microbatch": 1, "rotation": "hadamard", "r_m": 0.0, "r_v": 0.8, "label": "per-example hadamard r_m=0 r_v=0.8"}),
        ]),
    ]


LS = "Least-squares paper (ICLR 2019 sub.)"
EN = "Extreme Normalization"
CLAIMS = [
    Claim(LS, "Table 1: BN then LN beats BN (batch 128)", "0.9259 vs 0.9209", "table1", "bn_ln", "bn"),
    Claim(LS, "Table 1: LN then BN beats BN (batch 128)", "0.9245 vs 0.9209", "table1", "ln_bn", "bn"),
    Claim(LS, "Table 1: BN beats LN (batch 128)", "0.9209 vs 0.9102", "table1", "bn", "layernorm"),
    Claim(LS, "Table 2: best LS-regularized BN beats BN (batch 2)", "0.9091 vs 0.8903", "table2", [f"lsbn m={m} w={w}" for m, w in LSBN_GRID], "bn", pick="best"),
    Claim(LS, "Table 2: worst LS-regularized BN beats BN (batch 2)", "0.9005 vs 0.8903", "table2", [f"lsbn m={m} w={w}" for m, w in LSBN_GRID], "bn", pick="worst"),
    Claim(LS, "Table 2: batch renorm beats BN (batch 2)", "0.9033 vs 0.8903", "table2", "renorm", "bn"),
    Claim("Ioffe 2017", "§4.2: renorm beats BN over microbatches of 4", "76.5% vs 74.2%", "extreme", "ghost renorm k=4", "ghost bn k=4"),
    Claim(EN, "two-stage backprop within 1 point of BN", "77.8% vs 78.5% at 120k", "extreme", "two-stage", "bn", "within", 0.01),
    Claim(EN, "improved renorm beats Ioffe's renorm at microbatch 4", "76.7% vs 76.5% at 130k", "extreme", "improved renorm k=4", "ghost renorm k=4"),
    Claim(EN, "microbatch 2: Hadamard rotation helps", "73.5% vs 70.5% at 120k", "extreme", "k=2 hadamard", "k=2"),
    Claim(EN, "microbatch 2 + Hadamard: shrinkage r_m = r_v = 0.5 helps", "77.2% vs 73.5% at 120k", "extreme", "k=2 hadamard r=0.5", "k=2 hadamard"),
    Claim(EN, "per example: Hadamard rotation helps", "65.8% vs 60% at 120k", "extreme", "per-example hadamard", "per-example"),
    Claim(EN, "per example + Hadamard: shrinkage r_m = 0, r_v = 0.8 helps", "73.7% vs 65.8% at 120k", "extreme", "per-example hadamard r_m=0 r_v=0.8", "per-example hadamard"),
    Claim(EN, "per example (rotation, shrinkage) within 5 points of BN", "73.7% vs 78.5% at 120k", "extreme", "per-example hadamard r_m=0 r_v=0.8", "bn", "within", 0.05),
]


def verdict(claim: Claim, a: list[float], b: list[float]) -> tuple[str, float, float]:
    """The verdict of the module docstring, with the difference of means and the spread."""
    delta, spread = difference(a, b)
    if math.isnan(spread):
        return "inconclusive (one seed)", delta, spread
    if claim.kind == "within":
        deficit = -delta
        if deficit + spread <= claim.tol:
            return "reproduced", delta, spread
        return ("not reproduced" if deficit - spread > claim.tol else "inconclusive"), delta, spread
    if delta > spread:
        return "reproduced", delta, spread
    return ("not reproduced" if delta < -spread else "inconclusive"), delta, spread


def run_experiment(exp: Experiment, seeds: int) -> pd.DataFrame:
    model: Any = exp.model
    if exp.model == "cnn_bn" or exp.dtype != torch.float32:
        results = []
        for s in range(seeds):  # a module is one starting point for all seeds: build one per seed
            model = (seeded(cnn_bn, s) if exp.model == "cnn_bn" else build_model(exp.model, seed=s)).to(exp.dtype)
            out = compare(model, exp.variants, (exp.batch_size,), steps=exp.steps, lr=LR, reference_batch_size=REFERENCE_BATCH, seed=s, points=1)
            results.append(out.tables["compare_summary"])
        return pd.concat(results, ignore_index=True)
    out = compare(model, exp.variants, (exp.batch_size,), steps=exp.steps, lr=LR, reference_batch_size=REFERENCE_BATCH, seeds=seeds, points=1)
    return out.tables["compare_summary"]


def accuracies(summary: pd.DataFrame, label: str) -> list[float]:
    return summary.loc[summary["op"] == label, "final_test_accuracy"].tolist()


def judge(claim: Claim, summary: pd.DataFrame) -> dict[str, Any]:
    labels = claim.a if isinstance(claim.a, list) else [claim.a]
    means = {label: mean_std(accuracies(summary, label))[0] for label in labels}
    chosen = labels[0] if not claim.pick else (max if claim.pick == "best" else min)(means, key=means.get)
    a, b = accuracies(summary, chosen), accuracies(summary, claim.b)
    result, delta, spread = verdict(claim, a, b)
    return {
        "paper": claim.paper, "claim": claim.text, "paper numbers": claim.numbers, "a": chosen, "b": claim.b,
        "a accuracy": format_mean_std(a), "b accuracy": format_mean_std(b), "difference": delta, "spread": spread,
        "verdict": result,
    }


def markdown_table(frame: pd.DataFrame) -> str:
    cells = [[str(c) for c in frame.columns]] + [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:+.3f}" if abs(value) < 1 else f"{value:.3f}"
    return str(value).replace("|", "/")


def variant_table(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for label, runs in summary.groupby("op", sort=False):
        rows.append({
            "variant": label, "steps": int(runs["steps"].max()), "examples": int(runs["examples"].max()),
            "EMA-only steps": int(runs["ema_steps"].max()), "test accuracy": format_mean_std(runs["final_test_accuracy"].tolist()),
            "test loss": format_mean_std(runs["final_test_loss"].tolist()),
            "status": ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items()),
            "ms/step": f"{runs['seconds_per_step'].mean() * 1e3:.1f}",
        })
    return pd.DataFrame(rows)


def appendix_c_check(steps: int, seeds: int) -> str:
    """Train ``mlp_bn`` with ``LSBatchNorm`` at batch 2 in float64 and, at every step, compute the
    gradient of the same weights and batch with :class:`AppendixCBatchNorm` in its place (weights
    copied over, each keeping its own alpha*, beta*): the largest relative difference of the two
    parameter gradients over the run (all steps stacked: at batch 2 without spatial dims a
    BatchNorm passes exactly zero gradient below it on the first step, so per-step ratios of
    rounding noise would mean nothing), per grid point."""
    from torch.utils.data import DataLoader, TensorDataset

    from normscope.compare import default_data
    from normscope.ops.swap import swap_norms

    lines = []
    train_x, train_y, _, _ = default_data(torch.device("cpu"), torch.float64)
    for m, w in ((0.003, 8), (0.5, 2)):
        worst = 0.0
        for s in range(seeds):
            diff_sq, norm_sq = 0.0, 0.0
            base = build_model("mlp_bn", seed=s).double()
            op = swap_norms(base, "lsbn", grad_momentum=m, virtual_weight=float(w), eps=CHECK_EPS)
            direct = swap_norms(base, partial(AppendixCBatchNorm, virtual_weight=w, grad_momentum=m), eps=CHECK_EPS)
            optimizer = torch.optim.SGD(op.parameters(), lr=LR * 2 / REFERENCE_BATCH, momentum=0.9)
            loader = DataLoader(TensorDataset(train_x, train_y), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(s))
            for _, (x, y) in zip(range(steps), loader):
                with torch.no_grad():
                    for p, q in zip(direct.parameters(), op.parameters()):
                        p.copy_(q)
                grads = []
                for net in (op, direct):
                    net.zero_grad()
                    F.cross_entropy(net(x), y).backward()
                    grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
                diff_sq += float((grads[0] - grads[1]).square().sum())
                norm_sq += float(grads[1].square().sum())
                optimizer.step()
            worst = max(worst, math.sqrt(diff_sq / norm_sq))
        lines.append(
            f"- grad_momentum {m}, virtual weight {w}: relative difference of the parameter gradients, all steps stacked, over "
            f"{steps} steps x {seeds} seeds: {worst:.1e} (float64, eps 1e-12)."
        )
    return "\n".join(lines)


def render(claims: pd.DataFrame, tables: dict[str, pd.DataFrame], settings: dict[str, Any], check: str) -> str:
    failed = claims[claims["verdict"] == "not reproduced"]
    reproduced = claims[claims["verdict"] == "reproduced"]
    parts = [
        "# Reproductions at small scale",
        "",
        "Regenerate with `python benchmarks/papers.py` (writes this file). Each claim reruns at small scale on the "
        "scikit-learn digits (1400 training, 397 test images) with `normscope.compare`: same initial weights per seed, "
        "same batches, the same number of weight updates for every variant of an experiment, SGD with momentum 0.9 and "
        "learning rate 0.05 × B / 32. Accuracy is the final test accuracy, mean ± std over the seeds. "
        "A claim \"a beats b\" is *reproduced* when mean(a) − mean(b) exceeds std(a) + std(b), *not reproduced* when it is "
        "below −(std(a) + std(b)), else *inconclusive*; a claim \"a within tol of b\" is reproduced when the deficit plus "
        "the spread is at most tol, not reproduced when the deficit minus the spread exceeds tol. Small-scale results on "
        "digits test whether a mechanism shows up at all; they neither confirm nor refute the papers' ImageNet/CIFAR numbers.",
        "",
        f"Run: {settings['date']}, {settings['seeds']} seeds, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average before {settings['load_before']}, "
        f"after {settings['load_after']}, {settings['seconds']:.0f} s in all.",
        "",
        f"**{len(reproduced)} of {len(claims)} claims reproduced, {len(failed)} not reproduced, "
        f"{len(claims) - len(reproduced) - len(failed)} inconclusive.**",
        "",
        markdown_table(claims),
        "",
    ]
    if len(failed):
        parts += ["## Not reproduced", ""]
        parts += [f"- {r['paper']}, {r['claim']} (paper: {r['paper numbers']}): here {r['a']} {r['a accuracy']} against {r['b']} {r['b accuracy']}." for _, r in failed.iterrows()]
        parts.append("")
    parts += [
        "## Is LSBatchNorm the op or the claim? The op against a direct implementation of Appendix C",
        "",
        "`AppendixCBatchNorm` (in this script) appends the virtual items to the batch and lets torch's own BatchNorm "
        "backward do the regression; `LSBatchNorm` uses the closed form. Along a training run of `LSBatchNorm` (mlp_bn, batch 2), "
        "the gradient of the same weights on the same batch from both:",
        "",
        check,
        "",
        "Equal gradients (the remaining difference comes from eps: the paper's z± = ±1 holds exactly only without it) mean the op implements Appendix C as written; a claim that does not reproduce is then the claim's, at "
        "this scale, not the op's. (If the virtual items x± = μ_B ± σ_B were not held constant in the backward pass, the "
        "concatenation would be exactly BatchNorm: its statistics and z± = ±1 do not depend on x.)",
        "",
        "## Settings",
        "",
        "- Table 1: `resnet_bn` (ResNet with skips), batch 128, 150 updates (about 14 epochs: at 40 updates BatchNorm itself had not converged in 2 of 3 seeds, test loss above chance, which made every comparison with it meaningless); variants `bn`, `bn_ln`, `ln_bn`, `layernorm` (one per-channel affine after both norms).",
        "- Table 2: `resnet_bn`, batch 2; `lsbn` over the paper's grid, grad_momentum ∈ {0.003, 0.5} (the paper's momentum .997, .5), "
        "virtual weight ∈ {1, 2, 4, 8}, alpha*, beta* started from the first batch; `renorm` with Ioffe's schedule scaled to the run "
        "(BatchNorm for 4% of the steps, rmax 1→3 by 30%, dmax 0→5 by 20%).",
        "- Extreme Normalization and Ioffe: a CNN without skips (3 conv-BN-ReLU, 16/32/32 channels), batch 32; population ops at the "
        "paper's §5 settings: EMA rate 0.2, 200 EMA-only warm-up steps, 50 EMA-only steps after each of the first 5 updates "
        "(the paper: 50 updates of ~150k), u_max 5, f_max 2; microbatch k means normalization over groups of k examples "
        "inside the batch of 32 (the paper: 32 per worker, 1600 per step). The paper also lowers the head's learning rate 10× "
        "and adds noise and dropout; those are not used here.",
        "",
    ]
    for name, table in tables.items():
        parts += [f"### {name}: every variant", "", markdown_table(table), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed, 3 steps per variant: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "reproductions.md")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    start = time.perf_counter()
    summaries = {}
    for exp in experiments(args.quick):
        t0 = time.perf_counter()
        summaries[exp.name] = run_experiment(exp, seeds)
        print(f"{exp.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    claims = pd.DataFrame([judge(c, summaries[c.experiment]) for c in CLAIMS])
    settings = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seeds": seeds, "load_before": load_before,
        "load_after": tuple(round(x, 2) for x in os.getloadavg()), "seconds": time.perf_counter() - start,
    }
    tables = {name: variant_table(s) for name, s in summaries.items()}
    check = appendix_c_check(5 if args.quick else 200, seeds)
    text = render(claims, tables, settings, check)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(args.out)
    print(claims[["claim", "a accuracy", "b accuracy", "verdict"]].to_string())
    print(f"wrote {args.out} in {settings['seconds']:.0f} s")


if __name__ == "__main__":
    main()
