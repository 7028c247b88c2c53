"""Capture overhead: (training step with capture of every site) / (plain training step).

Reference ResNet (``build_model("resnet_bn")``) at batch 128 on digits images, for each storage
option, with and without functional-call capture, on CPU and on CUDA when present: one capture
entered at every step, as ``normscope.Monitor`` does (the sites are found and their readings
verified once), and, for ``reductions``, a new capture each step (every site's reading verified
against its output at every step). One process; each figure is the median of repeated steps after
warm-up, captured and plain steps timed alternately so that load from other jobs affects both alike.

Every figure at each thread count of ``--threads`` (default: torch's own count, then 1), with the
load average (``os.getloadavg()``) after it; a target counts at the default count.

Run: ``python benchmarks/capture_overhead.py [--repeats 30] [--threads 2,1]``
"""

from __future__ import annotations

import argparse
import os
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


def time_pair(step, base, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``step`` and of ``base``, timed alternately so that a machine shared
    with other jobs slows both alike."""
    for _ in range(3):
        step()
        base()
    times: dict[str, list[float]] = {"step": [], "base": []}
    for _ in range(repeats):
        for name, fn in (("step", step), ("base", base)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["step"]), statistics.median(times["base"])


def run(device: torch.device, repeats: int, batch: int = 128, size: int = 8) -> list[tuple[str, float, float, float]]:
    images, labels = load_digits()
    x, y = images[:batch].to(device), labels[:batch].to(device)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear")
    model = build_model("resnet_bn").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def captured(storage: str, functional: bool, fresh: bool = False):
        session = capture(model, storage=storage, functional=functional, preserve=False)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with capture(model, storage=storage, functional=functional, preserve=False) if fresh else session:
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return step

    rows = []
    for storage in ("reductions", "device", "cpu"):
        for functional in (False, True):
            t, base = time_pair(captured(storage, functional), plain, device, repeats)
            rows.append((f"{storage}{' + functional' if functional else ''}", t, base, t / base))
    t, base = time_pair(captured("reductions", False, fresh=True), plain, device, repeats)
    rows.append(("reductions, a new capture each step", t, base, t / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", default="8,32", help="image sizes (digits are 8x8; larger ones are upsampled)")
    parser.add_argument("--threads", default=f"{torch.get_num_threads()},1",
                        help="torch.set_num_threads for each pass, comma-separated (default: torch's own count, then 1)")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, load before {os.getloadavg()}")
    sizes = [int(v) for v in args.sizes.split(",")]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for device, size in ((d, s) for d in devices for s in sizes):
            print(f"\nthreads {threads}: resnet_bn, batch 128, {size}x{size} images, {device.type}")
            print(f"{'configuration':<38}{'ms/step':>10}{'plain ms':>10}{'ratio':>8}{'load':>6}")
            for name, seconds, base, ratio in run(device, args.repeats, size=size):
                print(f"{name:<38}{seconds * 1e3:>10.2f}{base * 1e3:>10.2f}{ratio:>8.2f}{os.getloadavg()[0]:>6.1f}")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
