"""Monitor overhead: (training time with normscope.Monitor) / (the same loop without it).

Reference ResNet (``build_model("resnet_bn")``, 10 BatchNorm sites) at batch 128 on digits images,
SGD with momentum, one process. Configurations: the capture alone (``storage="reductions"``, no
links, re-entered every step as the monitor does, no metrics), the monitor with statistics and GLS
every step and every 10 steps, every 10 steps plus curvature every 100 steps (the defaults: lambda_max
and the step's a_crit at every curvature step, the trace and 2 layers' a_crit at every 10th,
``curvature_full_every=10``) and the same with every curvature step full (``curvature_full_every=1``,
the cost before the cadence). The Hessian-vector products spent per curvature step (mean of the
``products`` rows) are printed beside. Each configuration is timed in blocks of 100 steps
(``--rounds 10`` blocks hold one whole cadence of full curvature steps, 1000 steps), alternating
with blocks of the plain loop so that load from other jobs affects both alike; each ratio is (all monitored blocks + the monitor's closing flush) / (all plain blocks), in
wall time and in process CPU time: the monitor computes its rows when it flushes, so its cost comes
in bursts that a median would leave out (the median ratio is printed beside it). The load average (``os.getloadavg()``) is printed before, after each configuration and after.

Every configuration runs at each thread count of ``--threads`` (default: 2, the benchmark's
default count, then 1);
a target counts at the default count. Then the Lightning and Hugging Face ``Trainer`` callbacks
(:mod:`normscope.integrations`) on short real runs: whole ``fit``/``train`` calls of ``--fit-steps``
steps with and without the callback, alternated, each from the same initial weights (ratio of totals
and median).

Run: ``python benchmarks/monitor_overhead.py [--rounds 10] [--block 100] [--threads 2,1] [--device cuda] [--fits 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

import normscope
from normscope.capture import capture
from normscope.data import load_digits
from normscope.models import build_model

FULL_EVERY_CURVATURE = "the same, every curvature step full"
TARGETS = {"stats+GLS every step": 1.15, "stats+GLS every 10": 1.03, "every 10 + curvature every 100": 1.10,
           "capture (reductions) every step": 1.05,
           "Lightning callback, every 10": 1.03, "Lightning callback, every 10 + curvature every 100": 1.10,
           "HF Trainer callback, every 10": 1.03, "HF Trainer callback, every 10 + curvature every 100": 1.10}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _products_per_curvature_step(folder: str) -> float:
    """The mean of the run's ``products`` rows (NaN without curvature)."""
    import pandas as pd

    rows = pd.read_parquet(folder)
    return float(rows.loc[rows["metric"] == "products", "value"].mean())


def run(device: torch.device, rounds: int, block: int, batch: int = 128) -> Iterator[tuple[str, float, float, float, float, float, float, float]]:
    images, labels = load_digits()
    x, y = images[:batch].to(device), labels[:batch].to(device)
    model = build_model("resnet_bn").to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain_step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    session = capture(model, storage="reductions", functional=False, preserve=False, links=False)  # re-entered, as Monitor does

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

    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "capture (reductions) every step": (capture_step, None),
            "stats+GLS every step": (None, dict(every=1)),
            "stats+GLS every 10": (None, dict(every=10)),
            "every 10 + curvature every 100": (None, dict(every=10, every_curvature=100, optimizer=optimizer)),
            FULL_EVERY_CURVATURE: (None, dict(every=10, every_curvature=100, optimizer=optimizer, curvature_full_every=1)),
        }
        for name, (step, kwargs) in configs.items():
            folder = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
            monitor = normscope.Monitor(model, folder, **kwargs) if kwargs else None
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
            products = _products_per_curvature_step(folder) if kwargs and kwargs.get("every_curvature") else float("nan")
            yield (name, plain / block / rounds * 1e3, watched / block / rounds * 1e3, watched / plain, median,
                   watched_cpu / plain_cpu, products, os.getloadavg()[0])


def block_seconds_of(work: Callable[[], None]) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - start, time.process_time() - cpu


def _interleaved(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each run, the runs alternated ``rounds`` times after one warm-up round."""
    for run_once in runs.values():
        run_once()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run_once in runs.items():
            start = time.perf_counter()
            run_once()
            times[name].append(time.perf_counter() - start)
    return times


def lightning_rows(rounds: int, steps: int) -> list[tuple[str, float, float, float, float, float]]:
    """``trainer.fit`` of the reference ResNet on digits (batch 128, SGD with momentum) for ``steps``
    steps, plain and with :class:`~normscope.integrations.lightning.NormscopeCallback`."""
    import copy

    import lightning
    from normscope.integrations.lightning import NormscopeCallback

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model("resnet_bn")

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    images, labels = load_digits()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=128, shuffle=True,
                                       drop_last=True)
    initial = Classifier()

    def fit(**monitor) -> Callable[[], None]:
        def run_once() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                callbacks = [NormscopeCallback(tmp, **monitor)] if monitor else []
                trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
                trainer.fit(copy.deepcopy(initial), data)
        return run_once

    times = _interleaved({"plain": fit(), "every 10": fit(every=10),
                          "every 10 + curvature every 100": fit(every=10, every_curvature=100)}, rounds)
    return _callback_rows("Lightning callback", times, steps)


def transformers_rows(rounds: int, steps: int) -> list[tuple[str, float, float, float, float, float]]:
    """``Trainer.train`` of a small BERT (2 layers, hidden 64, 5 LayerNorms) on digits as 64-token
    sequences (batch 32) for ``steps`` steps, plain and with
    :class:`~normscope.integrations.transformers.NormscopeCallback`."""
    import copy

    import transformers
    from normscope.integrations.transformers import NormscopeCallback

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=17, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=10)
    transformers.set_seed(0)
    initial = transformers.BertForSequenceClassification(config)
    images, labels = load_digits()
    tokens = (images.reshape(len(images), 64) * 16).round().long()
    dataset = [{"input_ids": tokens[i], "labels": labels[i]} for i in range(len(tokens))]

    def train(**monitor) -> Callable[[], None]:
        def run_once() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                args = transformers.TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=32,
                                                      learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                                      logging_strategy="no", seed=0, disable_tqdm=True)
                callbacks = [NormscopeCallback(os.path.join(tmp, "run"), **monitor)] if monitor else []
                transformers.Trainer(model=copy.deepcopy(initial), args=args, train_dataset=dataset, callbacks=callbacks).train()
        return run_once

    times = _interleaved({"plain": train(), "every 10": train(every=10),
                          "every 10 + curvature every 100": train(every=10, every_curvature=100)}, rounds)
    return _callback_rows("HF Trainer callback", times, steps)


def _callback_rows(framework: str, times: dict[str, list[float]], steps: int) -> list[tuple[str, float, float, float, float, float]]:
    plain = times.pop("plain")
    return [(f"{framework}, {name}", sum(plain) / len(plain) / steps * 1e3, sum(t) / len(t) / steps * 1e3,
             sum(t) / sum(plain), statistics.median(t) / statistics.median(plain), os.getloadavg()[0])
            for name, t in times.items()]


def _target(name: str) -> str:
    return f"{TARGETS[name]:>8.2f}" if name in TARGETS else f"{'-':>8}"


def _verdict(name: str, ratio: float, threads: int) -> str:
    """met / missed against the target (ratio of totals); a target counts at the default count, 2 threads."""
    if name not in TARGETS:
        return f"{'-':>9}"
    verdict = "met" if ratio <= TARGETS[name] else "missed"
    return f"{verdict if threads == 2 else '(' + verdict + ')':>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="blocks of each loop, alternated (0: only the callbacks)")
    parser.add_argument("--block", type=int, default=100, help="steps per block (a multiple of 100)")
    parser.add_argument("--threads", default="2,1",
                        help="torch.set_num_threads for each pass, comma-separated (default: 2, the default count, then 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fits", type=int, default=3, help="alternated fit/train calls of each callback run (0: none)")
    parser.add_argument("--fit-steps", type=int, default=200, help="steps of each fit/train call (200: curvature at steps 0 and 100)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, default threads {torch.get_num_threads()}, load before {os.getloadavg()}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\nthreads {threads}: resnet_bn, batch 128, blocks of {args.block} steps x {args.rounds} rounds")
        print(f"{'configuration':<52}{'plain ms':>10}{'with ms':>10}{'ratio':>8}{'median':>8}{'cpu ratio':>10}"
              f"{'products':>10}{'target':>8}{'verdict':>9}{'load':>6}")
        for name, plain, watched, ratio, median, cpu_ratio, products, load in (run(device, args.rounds, args.block) if args.rounds else []):
            print(f"{name:<52}{plain:>10.2f}{watched:>10.2f}{ratio:>8.3f}{median:>8.3f}{cpu_ratio:>10.3f}{products:>10.1f}"
                  f"{_target(name)}{_verdict(name, ratio, threads)}{load:>6.1f}", flush=True)
        if args.fits and device.type == "cpu":
            print(f"threads {threads}: callbacks, {args.fit_steps}-step runs x {args.fits} rounds (ms per step include the framework's set-up)")
            for name, plain, watched, ratio, median, load in lightning_rows(args.fits, args.fit_steps) + transformers_rows(args.fits, args.fit_steps):
                print(f"{name:<52}{plain:>10.2f}{watched:>10.2f}{ratio:>8.3f}{median:>8.3f}{'':>10}{'':>10}"
                      f"{_target(name)}{_verdict(name, ratio, threads)}{load:>6.1f}", flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
