"""normscope.recalibrate against fvcore's update_bn_stats (precise BN), side by side.

Both recompute the running statistics of a trained mlp_bn whose first BatchNorm's running
variance was multiplied by 100. fvcore averages train-mode batch moments in place; normscope
computes the population moments level by level on a copy. Printed: the largest difference of the
first site's moments (one batch of all examples, where both must agree up to float32 rounding),
eval accuracy after each, and the time ratio (normscope / fvcore) over interleaved repeats, both
passing batches of 64 over the 1400 training digits, torch.set_num_threads(1).

Run: python benchmarks/recalibrate.py   (needs `pip install fvcore`; it does not pull torch)
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch

from normscope.data import load_digits
from normscope.recalibration import evaluate, recalibrate
from normscope.train import train_reference

REPEATS = 7


def fvcore_copy(model, inputs, batch_size):
    from fvcore.nn.precise_bn import update_bn_stats

    work = copy.deepcopy(model).train()
    chunks = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    update_bn_stats(work, chunks, num_iters=len(chunks))
    return work.eval()


def main() -> None:
    torch.set_num_threads(1)
    model = train_reference(epochs=3)
    model.net[2].running_var.mul_(100)
    x, y = load_digits(split="train")
    print(f"load average {os.getloadavg()}")
    ours = recalibrate(model, (x, y))
    theirs = fvcore_copy(model, x, len(x))
    mean_diff = float((ours.net[2].running_mean - theirs.net[2].running_mean).abs().max())
    var_diff = float(((ours.net[2].running_var - theirs.net[2].running_var) / theirs.net[2].running_var).abs().max())
    n = len(x)
    bessel = float(((ours.net[2].running_var * (n - 1) / n - theirs.net[2].running_var) / theirs.net[2].running_var).abs().max())
    print(f"first site, one batch of {n}: max |mean diff| {mean_diff:.2e}, max relative var diff {var_diff:.2e} "
          f"(1/n = {1 / n:.2e}: fvcore keeps the biased variance); ours x (n-1)/n against fvcore: {bessel:.2e}")
    theirs64 = fvcore_copy(model, x, 64)
    later = float(((ours.net[5].running_var - theirs64.net[5].running_var) / ours.net[5].running_var).abs().max())
    print(f"second site, fvcore with batches of 64 (train-mode batch moments): max relative var diff {later:.2e}")
    for name, net in (("stale", model), ("normscope", ours), ("fvcore b=64", theirs64)):
        print(f"{name:>12}: eval accuracy {evaluate(net, (x, y))['accuracy']:.4f}")
    ratios = []
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
    for _ in range(REPEATS):
        start = time.perf_counter()
        recalibrate(model, batches)
        mine = time.perf_counter() - start
        start = time.perf_counter()
        fvcore_copy(model, x, 64)
        peer = time.perf_counter() - start
        ratios.append(mine / peer)
    print(f"time normscope / fvcore: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}, {REPEATS} repeats)")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
