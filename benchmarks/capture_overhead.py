"""Capture overhead: (training step with capture of every site) / (plain training step).

Reference ResNet (``build_model("resnet_bn")``) at batch 128 on digits images, for each storage
option, with and without functional-call capture, on CPU and on CUDA when present. One process;
each figure is the median of repeated timed steps after warm-up.

Run: ``python benchmarks/capture_overhead.py [--repeats 30]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from normscope.capture import capture
from normscope.data import load_digits
from normscope.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device: torch.device, repeats: int, batch: int = 128) -> list[tuple[str, float, float]]:
    images, labels = load_digits()
    x, y = images[:batch].to(device), labels[:batch].to(device)
    model = build_model("resnet_bn").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def captured(storage: str, functional: bool):
        def step():
            optimizer.zero_grad(set_to_none=True)
            with capture(model, storage=storage, functional=functional, preserve=False):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return step

    base = time_steps(plain, device, repeats)
    rows = [("plain step", base, 1.0)]
    for storage in ("reductions", "device", "cpu"):
        for functional in (False, True):
            t = time_steps(captured(storage, functional), device, repeats)
            rows.append((f"{storage}{' + functional' if functional else ''}", t, t / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for device in devices:
        print(f"\nresnet_bn, batch 128, {device.type}")
        print(f"{'configuration':<28}{'ms/step':>10}{'ratio':>8}")
        for name, seconds, ratio in run(device, args.repeats):
            print(f"{name:<28}{seconds * 1e3:>10.2f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
