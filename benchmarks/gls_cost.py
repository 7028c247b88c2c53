"""Cost of the gradient-least-squares analysis: (full analysis of one captured step) / (training step).

Reference ResNet (``build_model("resnet_bn")``) at batch 128 on digits images. The analysis is
:func:`normscope.analyzers.gls.gls_tables` on the capture of one step (every site, tensors kept
on the device): partitions, sites, kinds, scatter, two-step and what-if tables, all in float64.
It runs in float64 (the default) and in the captured dtype (``dtype=None``, float32 here). It is divided by the plain training step (forward, backward, SGD step) and by the same step with
capture (the step that produced the data). Also the reductions-only path (sums, no tensors).
One process; the functions run in turn, round after round, so that they share the load of a busy
machine; each figure is the best (and the median) of the rounds after warm-up, ratios of bests and
of medians; CPU and CUDA when present.

Run: ``python benchmarks/gls_cost.py [--repeats 20]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from normscope.analyzers.gls import gls_tables
from normscope.capture import capture
from normscope.data import load_digits
from normscope.models import build_model


def _interleaved_times(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Each function once per round, in turn, so that all of them see the same load of a shared
    machine; two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 2):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def run(device: torch.device, repeats: int, batch: int = 128) -> list[tuple[str, float]]:
    images, labels = load_digits()
    x, y = images[:batch].to(device), labels[:batch].to(device)
    model = build_model("resnet_bn").to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    caps = {}

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def captured(storage: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        with capture(model, storage=storage, preserve=False) as cap:
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        caps[storage] = cap

    captured("reductions")
    captured("device")
    times = _interleaved_times({
        "plain": plain,
        "step_device": lambda: captured("device"),
        "analysis": lambda: gls_tables(caps["device"]),
        "analysis_native": lambda: gls_tables(caps["device"], dtype=None),
        "analysis_red": lambda: gls_tables(caps["reductions"]),
    }, device, repeats)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    return [
        ("plain training step (ms)", best["plain"] * 1e3, median["plain"] * 1e3),
        ("step with capture, device storage (ms)", best["step_device"] * 1e3, median["step_device"] * 1e3),
        ("gls_tables on the captured step (ms)", best["analysis"] * 1e3, median["analysis"] * 1e3),
        ("gls_tables in the captured dtype (ms)", best["analysis_native"] * 1e3, median["analysis_native"] * 1e3),
        ("gls_tables on a reductions capture (ms)", best["analysis_red"] * 1e3, median["analysis_red"] * 1e3),
        ("analysis / plain step (target <= 0.25)", best["analysis"] / best["plain"], median["analysis"] / median["plain"]),
        ("analysis / captured step", best["analysis"] / best["step_device"], median["analysis"] / median["step_device"]),
        ("captured-dtype analysis / plain step", best["analysis_native"] / best["plain"],
         median["analysis_native"] / median["plain"]),
        ("reductions analysis / plain step", best["analysis_red"] / best["plain"], median["analysis_red"] / median["plain"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for device in devices:
        print(f"\nresnet_bn, batch 128, {device.type}{'':<24}{'best':>10}{'median':>10}")
        for name, best, median in run(device, args.repeats):
            print(f"{name:<45}{best:>10.3f}{median:>10.3f}")


if __name__ == "__main__":
    main()
