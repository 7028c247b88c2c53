"""Cost of the gradient-least-squares analysis: (full analysis of one captured step) / (training step).

Reference ResNet (``build_model("resnet_bn")``) at batch 128 on digits images. The analysis is
:func:`normscope.analyzers.gls.gls_tables` on the capture of one step (every site, tensors kept
on the device): partitions, sites, kinds, scatter, two-step and what-if tables, all in float64.
It runs in float64 (the default) and in the captured dtype (``dtype=None``, float32 here). It is divided by the plain training step (forward, backward, SGD step) and by the same step with
capture (the step that produced the data). Also the reductions-only path (sums, no tensors).
One process; each figure is the median of repeated runs after warm-up; CPU and CUDA when present.

Run: ``python benchmarks/gls_cost.py [--repeats 20]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from normscope.analyzers.gls import gls_tables
from normscope.capture import capture
from normscope.data import load_digits
from normscope.models import build_model


def _median_time(fn, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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

    def captured(storage: str):
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with capture(model, storage=storage, preserve=False) as cap:
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            caps[storage] = cap
        return step

    base = _median_time(plain, device, repeats)
    step_device = _median_time(captured("device"), device, repeats)
    _median_time(captured("reductions"), device, 1)
    analysis = _median_time(lambda: gls_tables(caps["device"]), device, repeats)
    analysis_native = _median_time(lambda: gls_tables(caps["device"], dtype=None), device, repeats)
    analysis_red = _median_time(lambda: gls_tables(caps["reductions"]), device, repeats)
    return [
        ("plain training step (ms)", base * 1e3),
        ("step with capture, device storage (ms)", step_device * 1e3),
        ("gls_tables on the captured step (ms)", analysis * 1e3),
        ("gls_tables in the captured dtype (ms)", analysis_native * 1e3),
        ("gls_tables on a reductions capture (ms)", analysis_red * 1e3),
        ("analysis / plain step (target <= 0.25)", analysis / base),
        ("analysis / captured step", analysis / step_device),
        ("captured-dtype analysis / plain step", analysis_native / base),
        ("reductions analysis / plain step", analysis_red / base),
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
        print(f"\nresnet_bn, batch 128, {device.type}")
        for name, value in run(device, args.repeats):
            print(f"{name:<45}{value:>10.3f}")


if __name__ == "__main__":
    main()
