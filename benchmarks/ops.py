"""Forward+backward time of each normalization op / torch's native BatchNorm2d, one process.

Shapes (N, C, H, W) = (32, 64, 32, 32) and (2, 64, 32, 32), float32, training mode, on CPU and on
CUDA when present. The ops at the papers' settings (ghost-batch BN and renorm over microbatches of 4,
LayerNorm at a BatchNorm site, population norm with a Hadamard rotation and shrinkage) are in the
list too; renorm is timed with its limits relaxed (the default schedule would time BatchNorm). Targets (issue 5): batch renorm and population normalization at most 1.5x,
median BN at most 3x on CUDA; CPU is reported as measured.

Run: python benchmarks/ops.py [--min-run-time SECONDS] [--threads N]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.utils import benchmark

from normscope.ops import create_norm

OPS: dict[str, tuple[str, dict]] = {
    "median (exact)": ("median", {}),
    "median (smoothed)": ("median", {"backward": "smoothed"}),
    "renorm": ("renorm", {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0}),
    "lsbn": ("lsbn", {}),
    "bn_ln": ("bn_ln", {}),
    "ln_bn": ("ln_bn", {}),
    "population (per example)": ("population", {}),
    "microbatch (k=4)": ("microbatch", {}),
    "ghost_bn (k=4)": ("ghost_bn", {}),
    "ghost_renorm (k=4)": ("ghost_renorm", {"bn_steps": 0, "rmax_steps": 0, "dmax_steps": 0}),
    "layernorm": ("layernorm", {}),
    "population hadamard r_m=0 r_v=0.8": ("population", {"rotation": "hadamard", "r_m": 0.0, "r_v": 0.8}),
    "microbatch k=2 hadamard": ("population", {"microbatch": 2, "rotation": "hadamard"}),
}
SHAPES = [(32, 64, 32, 32), (2, 64, 32, 32)]
TARGETS = {"renorm": 1.5, "population (per example)": 1.5, "microbatch (k=4)": 1.5, "median (exact)": 3.0}


def step_time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, min_run_time: float) -> float:
    """Median seconds of one forward and backward pass (CUDA synchronized by torch.utils.benchmark)."""
    x = x.clone().requires_grad_()

    def step() -> None:
        x.grad = None
        module(x).backward(grad)

    step()
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads" + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'device':6} {'shape':18} {'op':34} {'ms':>9} {'ratio':>7}  target")
    for device in devices:
        for shape in SHAPES:
            torch.manual_seed(0)
            x = torch.randn(shape, device=device)
            grad = torch.randn(shape, device=device)
            base = step_time(nn.BatchNorm2d(shape[1]).to(device), x, grad, args.min_run_time)
            print(f"{device:6} {str(shape):18} {'BatchNorm2d (native)':34} {base * 1e3:9.3f} {1.0:7.2f}")
            for label, (name, options) in OPS.items():
                seconds = step_time(create_norm(name, shape[1], **options).to(device), x, grad, args.min_run_time)
                target = TARGETS.get(label)
                verdict = "" if target is None else f"<= {target}x " + ("met" if seconds / base <= target else "missed")
                print(f"{device:6} {str(shape):18} {label:34} {seconds * 1e3:9.3f} {seconds / base:7.2f}  {verdict}")


if __name__ == "__main__":
    main()
