"""Forward and forward+backward time of each normalization op / torch's native BatchNorm2d.

Shapes (N, C, H, W) = (32, 64, 32, 32) and (2, 64, 32, 32), float32, training mode, on CPU (CUDA
when present). Each op is timed interleaved with the native BatchNorm2d, ``--rounds`` times
(``torch.utils.benchmark`` blocked autorange per measurement); the ratio reported is the median
of the per-round ratios. The ops at the papers' settings are in the list (ghost-batch BN and renorm
over microbatches of 4, population norm per example and over microbatches, with a Hadamard rotation
and shrinkage, its fixed-mean arrangement); renorm is timed with its limits relaxed (the default
schedule would time BatchNorm). PopulationNorm's default, Algorithm 1, takes its mean over the
input of the conv feeding it: that case is timed as conv + op against conv + BatchNorm2d
(``conv3x3 +`` rows). Targets (issue 5): batch renorm and population normalization at most 1.5x,
median BN at most 3x on CUDA; CPU is reported as measured.

Run: python benchmarks/ops.py [--min-run-time SECONDS] [--rounds N] [--threads default,1]
(``--threads``: the thread counts to run one after the other, ``default`` being torch's; each
block prints the load average before and after it.)
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch
from torch import nn
from torch.utils import benchmark

from normscope.ops import create_norm, swap_norms

OPS: dict[str, tuple[str, dict]] = {
    "median (exact)": ("median", {}),
    "median (smoothed)": ("median", {"backward": "smoothed"}),
    "renorm": ("renorm", {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0}),
    "lsbn": ("lsbn", {}),
    "bn_ln": ("bn_ln", {}),
    "ln_bn": ("ln_bn", {}),
    "layernorm": ("layernorm", {}),
    "ghost_bn (k=4)": ("ghost_bn", {}),
    "ghost_renorm (k=4)": ("ghost_renorm", {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0}),
    "population (per example, output mean)": ("population", {}),
    "population (per example, fixed mean)": ("population", {"arrangement": "fixed_mean"}),
    "microbatch (k=4, output mean)": ("microbatch", {}),
    "population hadamard r_m=0 r_v=0.8": ("population", {"rotation": "hadamard", "r_m": 0.0, "r_v": 0.8}),
}
FED = {  # conv + op against conv + BatchNorm2d: Algorithm 1 with the mean over the conv's input
    "conv3x3 + population (Alg. 1, input mean)": {},
    "conv3x3 + microbatch k=4 (Alg. 1, input mean)": {"microbatch": 4},
}
SHAPES = [(32, 64, 32, 32), (2, 64, 32, 32)]
TARGETS = {"renorm": 1.5, "population (per example, output mean)": 1.5, "microbatch (k=4, output mean)": 1.5, "median (exact)": 3.0}


def timer(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, backward: bool) -> Callable[[float], float]:
    """A function of the minimum run time giving the median seconds of one forward (and backward) pass."""
    x = x.clone().requires_grad_()

    def step() -> None:
        x.grad = None
        y = module(x)
        if backward:
            y.backward(grad)

    step()
    return lambda min_run_time: benchmark.Timer(stmt="step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time).median


def ratio(op: Callable[[float], float], base: Callable[[float], float], rounds: int, min_run_time: float) -> tuple[float, float]:
    """(median op seconds, median of per-round op/base ratios), op and base interleaved."""
    pairs = [(op(min_run_time), base(min_run_time)) for _ in range(rounds)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[0] / p[1] for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="default,1",
                        help="comma-separated CPU thread counts, run in turn ('default': torch's). Default: default,1")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    try:
        counts = [default_threads if t.strip() == "default" else int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads takes thread counts or 'default' separated by commas (got {args.threads!r})")
    if any(c < 1 for c in counts):
        parser.error(f"--threads counts must be >= 1 (got {args.threads!r})")
    for threads in counts:
        torch.set_num_threads(threads)
        run(args, "default" if threads == default_threads else "set")


def run(args: argparse.Namespace, origin: str) -> None:
    """Every op at every shape and device at the current thread count, the load recorded around it."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"load average before {os.getloadavg()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({origin})"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'device':6} {'shape':18} {'op':46} {'fwd ms':>8} {'fwd x':>6} {'f+b ms':>8} {'f+b x':>6}  target (f+b)")
    for device in devices:
        for shape in SHAPES:
            torch.manual_seed(0)
            x, grad = torch.randn(shape, device=device), torch.randn(shape, device=device)
            native = nn.BatchNorm2d(shape[1]).to(device)
            cases = {label: (create_norm(name, shape[1], **options).to(device), native) for label, (name, options) in OPS.items()}
            pair = nn.Sequential(nn.Conv2d(shape[1], shape[1], 3, padding=1, bias=False), nn.BatchNorm2d(shape[1])).to(device)
            for label, options in FED.items():
                cases[label] = (swap_norms(pair, "population", **options).to(device), pair)
            for label, (module, base) in cases.items():
                fwd, fwd_ratio = ratio(timer(module, x, grad, False), timer(base, x, grad, False), args.rounds, args.min_run_time)
                both, both_ratio = ratio(timer(module, x, grad, True), timer(base, x, grad, True), args.rounds, args.min_run_time)
                target = TARGETS.get(label)
                verdict = "" if target is None else f"<= {target}x " + ("met" if both_ratio <= target else "missed")
                print(f"{device:6} {str(shape):18} {label:46} {fwd * 1e3:8.3f} {fwd_ratio:6.2f} {both * 1e3:8.3f} {both_ratio:6.2f}  {verdict}", flush=True)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
