"""Monitor overhead: (training time with normscope.Monitor) / (the same loop without it).

Reference ResNet (``build_model("resnet_bn")``, 10 BatchNorm sites) at batch 128 on digits images,
SGD with momentum, one process. Configurations: the capture alone (``storage="reductions"`` every
step, no metrics), the monitor with statistics and GLS every step and every 10 steps, every 10
steps plus curvature every 100 steps (the defaults: a_crit, lambda_max, a 4-sample trace) and the same
without the trace. Each configuration is timed in blocks of whole cadences
(100 steps), alternating with blocks of the plain loop so that load from other jobs affects both
alike; each ratio is (all monitored blocks + the monitor's closing flush) / (all plain blocks), in
wall time and in process CPU time: the monitor computes its rows when it flushes, so its cost comes
in bursts that a median would leave out (the median ratio is printed beside it). The load average (``os.getloadavg()``) is printed before, after each configuration and after.

Run: ``python benchmarks/monitor_overhead.py [--rounds 5] [--block 100] [--threads N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

import normscope
from normscope.capture import capture
from normscope.data import load_digits
from normscope.models import build_model

TARGETS = {"stats+GLS every step": 1.3, "stats+GLS every 10": 1.05, "every 10 + curvature every 100": 1.10,
           "capture (reductions) every step": 1.2, "the same, no trace (curvature_samples=0)": 1.10}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(device: torch.device, rounds: int, block: int, batch: int = 128) -> list[tuple[str, float, float, float, float, float]]:
    images, labels = load_digits()
    x, y = images[:batch].to(device), labels[:batch].to(device)
    model = build_model("resnet_bn").to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain_step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    session = capture(model, storage="reductions", functional=False, preserve=False)  # re-entered, as Monitor does

    def capture_step() -> None:
        with session:
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    def monitored(monitor: normscope.Monitor) -> Callable[[], None]:
        def step() -> None:
            with monitor.step((x, y)):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        return step

    def block_seconds(step: Callable[[], None]) -> tuple[float, float]:
        """Wall and process CPU seconds (CPU time is less disturbed by other jobs on a shared machine)."""
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(block):
            step()
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "capture (reductions) every step": (capture_step, None),
            "stats+GLS every step": (None, dict(every=1)),
            "stats+GLS every 10": (None, dict(every=10)),
            "every 10 + curvature every 100": (None, dict(every=10, every_curvature=100, optimizer=optimizer)),
            "the same, no trace (curvature_samples=0)": (None, dict(every=10, every_curvature=100, optimizer=optimizer,
                                                                     curvature_samples=0)),
        }
        for name, (step, kwargs) in configs.items():
            monitor = normscope.Monitor(model, os.path.join(tmp, name.replace(" ", "_")), **kwargs) if kwargs else None
            with monitor or torch.enable_grad():
                step = step or monitored(monitor)
                for _ in range(3):
                    plain_step()
                    step()
                times: dict[str, list[tuple[float, float]]] = {"plain": [], "monitored": []}
                for _ in range(rounds):
                    times["plain"].append(block_seconds(plain_step))
                    times["monitored"].append(block_seconds(step))
                if monitor is not None:  # the rows still waiting are computed and written at the end: part of the cost
                    times["monitored"].append(block_seconds_of(monitor.close))
            (plain, plain_cpu), (watched, watched_cpu) = ([sum(t) for t in zip(*times[k])] for k in ("plain", "monitored"))
            median = statistics.median(t for t, _ in times["monitored"][:rounds]) / statistics.median(t for t, _ in times["plain"])
            rows.append((name, plain / block / rounds * 1e3, watched / block / rounds * 1e3, watched / plain, median,
                         watched_cpu / plain_cpu, os.getloadavg()[0]))
    return rows


def block_seconds_of(work: Callable[[], None]) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="blocks of each loop, alternated")
    parser.add_argument("--block", type=int, default=100, help="steps per block (a multiple of 100)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, load before {os.getloadavg()}")
    print(f"resnet_bn, batch 128, blocks of {args.block} steps x {args.rounds} rounds")
    print(f"{'configuration':<42}{'plain ms':>10}{'with ms':>10}{'ratio':>8}{'median':>8}{'cpu ratio':>10}{'target':>8}{'load':>6}")
    for name, plain, watched, ratio, median, cpu_ratio, load in run(device, args.rounds, args.block):
        print(f"{name:<42}{plain:>10.2f}{watched:>10.2f}{ratio:>8.3f}{median:>8.3f}{cpu_ratio:>10.3f}{TARGETS[name]:>8.2f}{load:>6.1f}")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
