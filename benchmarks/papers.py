"""Reproduce the papers' claims at small scale, on two data sets, with paired seeds and decided verdicts.

Claims, each rerun with ``normscope.compare`` (per seed the same initial weights and the same
batches for every variant; the same budget in weight updates; SGD with momentum 0.9 and a learning
rate ``0.05 * B / 32`` decayed to 0 on a cosine):

* "Normalization Gradients are Least-Squares Residuals" (ICLR 2019 submission), Table 1 (BN/LN
  chains at batch 128) and Table 2 with Appendix C (least-squares regularized BN over the paper's
  grid, and batch renorm, at batch 2), on the built-in ResNet (``resnet_bn``, with skips like the
  paper's ResNet-34-v2).
* Ioffe 2017, "Batch Renormalization", §4.2: renorm against BatchNorm over microbatches of 4.
* "Extreme Normalization: Approximating Full-Data Batch Normalization with Single Examples", §5:
  two-stage backprop, microbatch (improved batch renorm), Hadamard rotation, shrinkage and
  per-example normalization (Algorithm 1), on a CNN without skip connections.

Data sets: the scikit-learn digits (1400 training, 397 test images) and ``shapes``
(:mod:`shapes`, generated here: 10,000 training and 10,000 test images, BatchNorm about 87%).

Verdicts (:mod:`normscope.seed_stats`), from the paired differences ``d_s = acc_a(s) - acc_b(s)``
of the final test accuracy over the reported seeds: "a beats b" is *reproduced* when the 95%
Student t interval of mean d lies above 0, *not reproduced* below 0, *inconclusive* otherwise;
"a within tol of b" by two one-sided tests at tol (the 90% interval inside ``(-tol, tol)``).
Before any run, each claim's paper effect is set against the resolution of the data set (the
interval's half-width under the test set's binomial noise alone); claims below it are declared
so. The least-squares grid picks its best and worst on selection seeds apart from the reported
ones. Each claim that is not reproduced is shown beside a check of its op against an independent
implementation (:mod:`op_checks`).

Run: python benchmarks/papers.py [--seeds 24] [--jobs 2] [--out docs/reproductions.md] [--quick]
(``--quick``: 2 seeds, a few steps and a small ``shapes``: a smoke test of every variant.)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_checks import appendix_c_check, population_check, renorm_check  # noqa: E402
from shapes import shapes_data  # noqa: E402

from normscope.compare import Variant, compare, default_data, make_variant  # noqa: E402
from normscope.safe_io import write_text  # noqa: E402
from normscope.seed_stats import beats, binomial_resolution, equivalence, format_mean_std, paired_interval  # noqa: E402

LR, REFERENCE_BATCH = 0.05, 32
SELECTION_SEEDS = (100, 101)
LSBN_GRID = [(m, w) for m in (0.003, 0.5) for w in (1, 2, 4, 8)]  # App. C: momentum {.997, .5}, weights {1, 2, 4, 8}
LS_STARTS = {"zero": "α*, β* from 0", "first": "α*, β* from the first batch"}
SMALL_BATCH_RATE = 0.01  # BatchRenorm's documented running-statistics rate at batches of 8 or fewer
SEEDS = 24  # reported paired seeds, the same for every claim of both data sets; fixed from the time budget before the runs
SEEDS_PER_JOB = 4


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


def dataset(name: str, quick: bool) -> tuple[torch.Tensor, ...]:
    if name == "digits":
        return default_data(torch.device("cpu"), torch.float32)
    return shapes_data(500, 500) if quick else shapes_data()


@dataclass
class Experiment:
    name: str
    model: str
    batch_size: int
    steps: int
    variants: list[Variant]
    datasets: tuple[str, ...]
    ls_grid: bool = False  # Table 2: the LS grid's best and worst are picked on SELECTION_SEEDS first


@dataclass
class Claim:
    paper: str
    text: str
    numbers: str
    experiment: str
    a: str
    b: str
    effect: float  # the paper's a - b (or deficit for "within"), accuracy units
    kind: str = "greater"  # or "within": a at most tol worse than b
    tol: float = 0.0


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


def ls_label(pick: str, start: str) -> str:
    return f"LS {pick} ({start} start)"


def ls_variant(m: float, w: int, start: str, label: str) -> Variant:
    return make_variant("lsbn", {"grad_momentum": m, "virtual_weight": float(w), "grad_init": start, "label": label})


def experiments(quick: bool) -> list[Experiment]:
    def steps(n: int) -> int:
        return 3 if quick else n

    pop = population_options(quick)
    v = make_variant
    t2_steps, en_steps = steps(500), steps(175)
    renorm_small = {**renorm_schedule(t2_steps), "momentum": SMALL_BATCH_RATE, "running_std": True}
    return [
        Experiment("table1", "resnet_bn", 128, steps(150), [v("bn", {}), v("bn_ln", {}), v("ln_bn", {}), v("layernorm", {})], ("shapes",)),
        Experiment("table2", "resnet_bn", 2, t2_steps, [v("bn", {}), v("renorm", {**renorm_small, "label": "renorm"})], ("shapes",), ls_grid=True),
        Experiment("extreme", "cnn_bn", 32, en_steps, [
            v("bn", {}),
            v("ghost_bn", {"ghost": 4, "label": "ghost bn k=4"}),
            v("ghost_renorm", {"ghost": 4, **renorm_schedule(en_steps), "running_std": True, "label": "ghost renorm k=4"}),
            v("two_stage", {**pop, "label": "two-stage"}),
            v("population", {**pop, "microbatch": 4, "label": "improved renorm k=4"}),
            v("population", {**pop, "microbatch": 2, "label": "k=2"}),
            v("population", {**pop, "microbatch": 2, "rotation": "hadamard", "label": "k=2 hadamard"}),
            v("population", {**pop, "microbatch": 2, "rotation": "hadamard", "r_m": 0.5, "r_v": 0.5, "label": "k=2 hadamard r=0.5"}),
            v("population", {**pop, "microbatch": 1, "label": "per-example"}),
            v("population", {**pop, "microbatch": 1, "arrangement": "fixed_mean", "label": "per-example, fixed mean (former op)"}),
            v("population", {**pop, "microbatch": 1, "rotation": "hadamard", "label": "per-example hadamard"}),
            v("population", {**pop, "microbatch": 1, "rotation": "hadamard", "r_m": 0.0, "r_v": 0.8, "label": "per-example hadamard r_m=0 r_v=0.8"}),
        ], ("digits", "shapes")),
    ]


LS = "Least-squares paper (ICLR 2019 sub.)"
EN = "Extreme Normalization"
CLAIMS = [
    Claim(LS, "Table 1: BN then LN beats BN (batch 128)", "0.9259 vs 0.9209", "table1", "bn_ln", "bn", 0.0050),
    Claim(LS, "Table 1: LN then BN beats BN (batch 128)", "0.9245 vs 0.9209", "table1", "ln_bn", "bn", 0.0036),
    Claim(LS, "Table 1: BN beats LN (batch 128)", "0.9209 vs 0.9102", "table1", "bn", "layernorm", 0.0107),
    Claim(LS, "Table 2: best LS-regularized BN beats BN (batch 2)", "0.9091 vs 0.8903", "table2", ls_label("best", "zero"), "bn", 0.0188),
    Claim(LS, "Table 2: worst LS-regularized BN beats BN (batch 2)", "0.9005 vs 0.8903", "table2", ls_label("worst", "zero"), "bn", 0.0102),
    Claim(LS, "Table 2: batch renorm beats BN (batch 2)", "0.9033 vs 0.8903", "table2", "renorm", "bn", 0.0130),
    Claim("Ioffe 2017", "§4.2: renorm beats BN over microbatches of 4", "76.5% vs 74.2%", "extreme", "ghost renorm k=4", "ghost bn k=4", 0.023),
    Claim(EN, "two-stage backprop within 1 point of BN", "77.8% vs 78.5% at 120k", "extreme", "two-stage", "bn", 0.007, "within", 0.01),
    Claim(EN, "improved renorm beats Ioffe's renorm at microbatch 4", "76.7% vs 76.5% at 130k", "extreme", "improved renorm k=4", "ghost renorm k=4", 0.002),
    Claim(EN, "microbatch 2: Hadamard rotation helps", "73.5% vs 70.5% at 120k", "extreme", "k=2 hadamard", "k=2", 0.030),
    Claim(EN, "microbatch 2 + Hadamard: shrinkage r_m = r_v = 0.5 helps", "77.2% vs 73.5% at 120k", "extreme", "k=2 hadamard r=0.5", "k=2 hadamard", 0.037),
    Claim(EN, "per example: Hadamard rotation helps", "65.8% vs 60% at 120k", "extreme", "per-example hadamard", "per-example", 0.058),
    Claim(EN, "per example + Hadamard: shrinkage r_m = 0, r_v = 0.8 helps", "73.7% vs 65.8% at 120k", "extreme", "per-example hadamard r_m=0 r_v=0.8", "per-example hadamard", 0.079),
    Claim(EN, "per example (rotation, shrinkage) within 5 points of BN", "73.7% vs 78.5% at 120k", "extreme", "per-example hadamard r_m=0 r_v=0.8", "bn", 0.048, "within", 0.05),
]


def run_line(iterable: Iterable, description: str = "", total: int | None = None) -> Iterator:
    """compare's ``track``: one line on stderr when a run ends (the harness runs in several processes)."""
    start = time.perf_counter()
    try:
        yield from iterable
    finally:  # the training loop stops iterating after its last step
        print(f"papers: {description} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def train(exp: Experiment, variants: list[Variant], data: tuple, seeds: Iterable[int], tag: str) -> pd.DataFrame:
    """compare's summary for ``variants`` over ``seeds``: per seed one starting point for all variants."""
    results = []
    for s in seeds:
        model: Any = seeded(cnn_bn, s) if exp.model == "cnn_bn" else exp.model
        out = compare(model, variants, (exp.batch_size,), steps=exp.steps, lr=LR, reference_batch_size=REFERENCE_BATCH,
                      seed=s, data=data, points=1, lr_schedule="cosine", track=run_line)
        results.append(out.tables["compare_summary"].assign(dataset=tag))
    return pd.concat(results, ignore_index=True)


def run_job(exp: Experiment, name: str, variants: list[Variant], seeds: list[int], quick: bool) -> tuple[str, str, pd.DataFrame, float]:
    """A worker's job: ``variants`` of one experiment on one data set over ``seeds``; returns its
    summary and its seconds (wall time of this one-thread process)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    summary = train(exp, variants, dataset(name, quick), seeds, name)
    return exp.name, name, summary, time.perf_counter() - start


def select_ls(exp: Experiment, name: str, quick: bool) -> tuple[pd.DataFrame, list[Variant], float]:
    """Table 2's grid on the selection seeds (a worker's job): the runs, and per start the best
    and worst grid point as variants to rerun on the reported seeds."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    grid = [ls_variant(m, w, start_, f"lsbn m={m} w={w} {start_}") for start_ in LS_STARTS for m, w in LSBN_GRID]
    selection = train(exp, grid, dataset(name, quick), SELECTION_SEEDS[: 1 if quick else None], name)
    means = selection.groupby("op")["final_test_accuracy"].mean()
    picked = []
    for start_ in LS_STARTS:
        for pick, choose in (("best", max), ("worst", min)):
            m, w = choose(LSBN_GRID, key=lambda mw: means[f"lsbn m={mw[0]} w={mw[1]} {start_}"])
            picked.append(ls_variant(m, w, start_, ls_label(pick, start_)))
            selection.loc[selection["op"] == f"lsbn m={m} w={w} {start_}", "picked"] = ls_label(pick, start_)
    return selection, picked, time.perf_counter() - start


def seed_chunks(seeds: list[int], size: int = SEEDS_PER_JOB) -> list[list[int]]:
    """``seeds`` in consecutive chunks of ``size``: the jobs two workers share evenly."""
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def accuracies(summary: pd.DataFrame, label: str) -> list[float]:
    runs = summary[summary["op"] == label].sort_values("seed")
    return runs["final_test_accuracy"].tolist()


def judge(claim: Claim, summary: pd.DataFrame, name: str, resolution: float) -> dict[str, Any]:
    a, b = accuracies(summary, claim.a), accuracies(summary, claim.b)
    level = 0.90 if claim.kind == "within" else 0.95
    mean, low, high = paired_interval(a, b, level)
    result = equivalence(a, b, claim.tol) if claim.kind == "within" else beats(a, b)
    below = (claim.tol <= resolution) if claim.kind == "within" else (abs(claim.effect) < resolution)
    return {
        "data": name, "paper": claim.paper, "claim": claim.text, "paper numbers": claim.numbers,
        "a": claim.a, "b": claim.b, "a accuracy": format_mean_std(a), "b accuracy": format_mean_std(b),
        "paired a − b": mean, "interval": f"{level:.0%} [{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else "—",
        "paper effect vs resolution": f"{claim.effect:.3f} {'<' if below else '≥'} {resolution:.3f}",
        "verdict": result,
    }


def op_check(label: str, exp: Experiment, quick: bool) -> str:
    """The independent-implementation check of the op behind variant ``label`` of ``exp``."""
    variant = next((v for v in exp.variants if v.label == label), None)
    if variant is None and label.startswith("LS "):
        return "see the Appendix C check below"
    if variant is None or variant.op in ("bn", "ghost_bn"):
        return "torch's own BatchNorm (ghost bn: BatchRenorm at rmax 1, dmax 0)"
    if variant.op in ("bn_ln", "ln_bn", "layernorm"):
        return "built from torch's F.batch_norm and F.layer_norm"
    if variant.trainer == "two_stage":
        return "no independent implementation in the harness (tests/test_two_stage.py: against two towers and the full-batch gradient)"
    if variant.op == "population":
        inputs = default_data(torch.device("cpu"), torch.float32)[0][:32]
        return population_check(variant.options, seeded(cnn_bn, 0), inputs)
    if variant.op in ("renorm", "ghost_renorm"):
        options = {k: v for k, v in variant.options.items()}
        return renorm_check(options, 10 if quick else 30)
    return "no independent check"


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
            "variant": label, "seeds": len(runs), "steps": int(runs["steps"].max()), "EMA-only steps": int(runs["ema_steps"].max()),
            "test accuracy": format_mean_std(runs["final_test_accuracy"].tolist()),
            "test loss": format_mean_std(runs["final_test_loss"].tolist()),
            "status": ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items()),
            "ms/step": f"{runs['seconds_per_step'].mean() * 1e3:.1f}",
        })
    return pd.DataFrame(rows)


def selection_table(selection: pd.DataFrame) -> pd.DataFrame:
    grouped = selection.groupby("op", sort=False)
    return pd.DataFrame([{
        "grid point": label, "selection-seed accuracy": format_mean_std(runs["final_test_accuracy"].tolist()),
        "picked as": runs["picked"].dropna().iloc[0] if "picked" in runs and runs["picked"].notna().any() else "",
    } for label, runs in grouped])


def render(claims: pd.DataFrame, summaries: dict, selections: dict, settings: dict[str, Any], checks: dict[str, str],
           appendix: str, resolutions: dict[str, float], per_example: list[float]) -> str:
    main = claims.drop(columns=["op check"])
    decided = claims[claims["verdict"].isin(["reproduced", "not reproduced"])]
    failed = claims[claims["verdict"] == "not reproduced"]
    per_claim = decided.groupby("claim").size()
    parts = [
        "# Reproductions at small scale",
        "",
        f"Regenerate with `python benchmarks/papers.py --jobs 2` (writes this file; {SEEDS} seeds by default). Each claim reruns at small scale with "
        "`normscope.compare`: per seed the same initial weights and the same batches for every variant (paired), the same "
        "number of weight updates for every variant of an experiment, SGD with momentum 0.9 and learning rate 0.05 × B / 32 "
        "decayed to 0 on a cosine. Accuracy is the final test accuracy, mean ± std over the reported seeds. "
        "\"a beats b\" is *reproduced* when the 95% t interval of the paired difference a − b lies above 0, *not reproduced* "
        "when below 0, else *inconclusive*; \"a within tol of b\" is decided by two one-sided tests at tol (the 90% interval "
        "inside (−tol, tol): reproduced; wholly below −tol: not reproduced). Small-scale results test whether a mechanism "
        "shows up at all; they neither confirm nor refute the papers' ImageNet/CIFAR numbers.",
        "",
        f"The number of reported seeds, {settings['seeds']} on both data sets and for every claim, is fixed before the runs "
        f"(`--seeds`; the default, {SEEDS}, was set from the time budget), never from a result.",
        "",
        f"Run: {settings['date']}, {settings['seeds']} reported seeds (0–{settings['seeds'] - 1}), LS grid selection seeds "
        f"{', '.join(map(str, SELECTION_SEEDS))}, torch {torch.__version__}, {settings['jobs']} process(es) of 1 thread, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average before {settings['load_before']}, "
        f"after {settings['load_after']}, {settings['seconds']:.0f} s in all (worker seconds per experiment: {settings['units']}).",
        "",
        "## Resolution, declared before the runs",
        "",
        "The half-width of the paired 95% interval if each run's accuracy carried only the binomial noise of its test set "
        f"(accuracy 0.9, {settings['seeds']} seeds): " + "; ".join(
            f"{name} ({n} test images): ±{r:.3f}" for name, (n, r) in resolutions.items()) + ". "
        "A claim whose paper effect is below it (column \"paper effect vs resolution\", `<`) cannot be decided on that data "
        "set except by an effect much larger than the paper's.",
        "",
        f"**{per_claim.size} of {len(CLAIMS)} claims decided on at least one data set; rows: "
        f"{(claims['verdict'] == 'reproduced').sum()} reproduced, {len(failed)} not reproduced, "
        f"{len(claims) - len(decided)} inconclusive or other, of {len(claims)}.**",
        "",
        "Per-example normalization without rotation (Algorithm 1, §5 settings) on digits: mean accuracy "
        + (format_mean_std(per_example) if per_example else "not run (did not finish)") + ".",
        "",
        markdown_table(main),
        "",
    ]
    if len(failed):
        parts += ["## Not reproduced: the op or the claim?", "",
                  "Each op beside a check against an independent implementation (float64):", ""]
        for _, r in failed.iterrows():
            parts.append(f"- {r['data']}: {r['claim']} (paper: {r['paper numbers']}); here {r['a']} {r['a accuracy']} against "
                         f"{r['b']} {r['b accuracy']}, paired {r['interval']}. Op check: {r['op check']}.")
        parts.append("")
    parts += [
        "## LSBatchNorm against a direct implementation of Appendix C",
        "",
        "`AppendixCBatchNorm` (benchmarks/op_checks.py) appends the virtual items to the batch and lets torch's own BatchNorm "
        "backward do the regression; `LSBatchNorm` uses the closed form. Along a training run of `LSBatchNorm` (mlp_bn, batch 2), "
        "the gradient of the same weights on the same batch from both:",
        "",
        appendix,
        "",
        "## Settings",
        "",
        "- Table 1 (shapes): `resnet_bn` (ResNet with skips), batch 128, 150 updates; `bn`, `bn_ln`, `ln_bn`, `layernorm` (one per-channel affine after both norms).",
        "- Table 2 (shapes): `resnet_bn`, batch 2, 500 updates; `renorm` with Ioffe's schedule scaled to the run (BatchNorm for 4% of the "
        f"steps, rmax 1→3 by 30%, dmax 0→5 by 20%), Ioffe's running σ_B and the small-batch running-statistics rate {SMALL_BATCH_RATE}; "
        "`lsbn` over the paper's grid, grad_momentum ∈ {0.003, 0.5} (the paper's momentum .997, .5), virtual weight ∈ {1, 2, 4, 8}, "
        "for both starts of α*, β* (0, and the first batch's); best and worst are picked per start on the selection seeds, then rerun on the reported seeds. "
        "The claims use the zero start; the first-batch start is in the variant table.",
        "- Extreme Normalization and Ioffe (digits and shapes): a CNN without skips (3 conv-BN-ReLU, 16/32/32 channels), batch 32, "
        "175 updates; population ops are Algorithm 1 (mean over the conv's input, ν with its gradient through μ†) at the paper's §5 "
        "settings: EMA rate 0.2, 200 EMA-only warm-up steps, 50 EMA-only steps after each of the first 5 updates (the paper: 50 "
        "updates of ~150k), u_max 5, f_max 2; microbatch k means normalization over groups of k examples inside the batch of 32. "
        "Two-stage backprop uses the fixed-mean arrangement, for which it is exact with one normalization level. The paper also "
        "lowers the head's learning rate 10× and adds noise and dropout; those are not used here.",
        "",
    ]
    for (exp, name), table in summaries.items():
        parts += [f"### {exp} on {name}: every variant", "", markdown_table(variant_table(table)), ""]
    for (exp, name), table in selections.items():
        parts += [f"### {exp} on {name}: the LS grid on the selection seeds", "", markdown_table(selection_table(table)), ""]
    return "\n".join(parts)


def claim_rows(summaries: dict, exps: dict[str, Experiment], resolutions: dict, checks: dict[str, str], quick: bool) -> pd.DataFrame:
    """One row per claim and data set: judged where its experiment has finished, else "not run"."""
    rows = []
    for claim in CLAIMS:
        exp = exps[claim.experiment]
        for name in exp.datasets:
            summary = summaries.get((claim.experiment, name))
            if summary is None:
                rows.append({"data": name, "paper": claim.paper, "claim": claim.text, "paper numbers": claim.numbers,
                             "a": claim.a, "b": claim.b, "verdict": "not run (did not finish)", "op check": ""})
                continue
            row = judge(claim, summary, name, resolutions[name][1])
            if row["verdict"] == "not reproduced":
                for label in (claim.a, claim.b):
                    if label not in checks:
                        checks[label] = op_check(label, exp, quick)
                row["op check"] = f"{claim.a}: {checks[claim.a]}; {claim.b}: {checks[claim.b]}"
            rows.append(row)
    columns = ["data", "paper", "claim", "paper numbers", "a", "b", "a accuracy", "b accuracy", "paired a − b", "interval",
               "paper effect vs resolution", "verdict", "op check"]
    return pd.DataFrame(rows, columns=columns).fillna("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes of one thread each")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 steps per variant, small shapes: a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "reproductions.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(2 if args.quick else args.seeds))
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    start = time.perf_counter()
    exps = {exp.name: exp for exp in experiments(args.quick)}
    order = {("extreme", "digits"): 0, ("extreme", "shapes"): 1, ("table2", "shapes"): 2, ("table1", "shapes"): 3}
    units = sorted(((exp, name) for exp in exps.values() for name in exp.datasets), key=lambda u: order.get((u[0].name, u[1]), 9))
    resolutions = {name: (n, binomial_resolution(n, len(seeds))) for name in ("digits", "shapes")
                   for n in [len(dataset(name, args.quick)[3])]}
    summaries, selections, times, checks = {}, {}, {}, {}

    def write(appendix: str) -> pd.DataFrame:
        """Render what has finished so far (a run cut short still leaves its finished experiments)."""
        claims = claim_rows(summaries, exps, resolutions, checks, args.quick)
        digits = summaries.get(("extreme", "digits"))
        per_example = [] if digits is None else accuracies(digits, "per-example")
        settings = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seeds": len(seeds), "jobs": args.jobs,
            "load_before": load_before, "load_after": tuple(round(x, 2) for x in os.getloadavg()),
            "seconds": time.perf_counter() - start,
            "units": ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + (
                "" if len(times) == len(units) else f"; not finished: {', '.join(f'{e.name}@{n}' for e, n in units if f'{e.name}@{n}' not in times)}"),
        }
        text = render(claims, summaries, selections, settings, checks, appendix, resolutions, per_example)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, text + "\n")  # a unique temporary file beside it, renamed: no link followed
        return claims

    per_job = 1 if args.quick else SEEDS_PER_JOB  # --quick: one seed per job, so the smoke test merges several jobs per unit
    parts: dict[tuple[str, str], list[pd.DataFrame]] = {}
    remaining = {f"{exp.name}@{name}": len(seed_chunks(seeds, per_job)) * (2 if exp.ls_grid else 1) + exp.ls_grid for exp, name in units}

    def finished(exp_name: str, name: str, summary: pd.DataFrame | None, seconds: float) -> None:
        key = f"{exp_name}@{name}"
        times[key] = times.get(key, 0.0) + seconds
        if summary is not None:
            parts.setdefault((exp_name, name), []).append(summary)
        remaining[key] -= 1
        if remaining[key] == 0:  # every job of the unit is in: its summary, in variant order
            labels = [v.label for v in exps[exp_name].variants] + [ls_label(p, s) for s in LS_STARTS for p in ("best", "worst")]
            summary = pd.concat(parts[(exp_name, name)], ignore_index=True)
            summary["order"] = summary["op"].map({label: i for i, label in enumerate(labels)})
            summaries[(exp_name, name)] = summary.sort_values(["order", "seed"], ignore_index=True).drop(columns="order")
            print(f"papers: {exp_name} on {name}: {times[key]:.0f} s", file=sys.stderr, flush=True)
            write("(not run yet: the check runs after every experiment has finished)")

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(select_ls, exp, name, args.quick): (exp, name) for exp, name in units if exp.ls_grid}
        for exp, name in units:
            for chunk in seed_chunks(seeds, per_job):
                futures[pool.submit(run_job, exp, name, list(exp.variants), chunk, args.quick)] = (exp, name)
        while futures:
            done = next(as_completed(futures))
            exp, name = futures.pop(done)
            if exp.ls_grid and isinstance(done.result()[1], list):  # the selection: rerun its picks on the reported seeds
                selection, picked, seconds = done.result()
                selections[(exp.name, name)] = selection
                for chunk in seed_chunks(seeds, per_job):
                    futures[pool.submit(run_job, exp, name, picked, chunk, args.quick)] = (exp, name)
                finished(exp.name, name, None, seconds)
                continue
            exp_name, _, summary, seconds = done.result()
            finished(exp_name, name, summary, seconds)
    appendix = "\n".join(appendix_c_check(5 if args.quick else 200, 1 if args.quick else 3, start_) for start_ in LS_STARTS)
    claims = write(appendix)
    print(claims[["data", "claim", "verdict"]].to_string())
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
