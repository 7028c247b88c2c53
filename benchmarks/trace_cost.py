"""Trace estimates at equal HVP count: Krylov Hutch++ (``krylov_trace``, what the descent analyzer
runs) and Hutch++ against plain Hutchinson, on the trained reference models, against the exact trace.

For each model (digits, batch 128, float64 ``BatchLoss`` as the analyzer builds it) and mode, the
exact ``tr H`` is the sum of ``e_i^T H e_i`` over all unit vectors (double backward batched over
chunks of unit vectors, ``is_grads_batched``). Each estimator runs with ``--seeds`` seeds at each
product count; the figure is the root-mean-square relative error, and the ratio Hutchinson /
Hutch++. Also checks that Hutch++'s stated standard error matches its spread (the mean of the
stated SE over the observed RMS error, about 1 when honest) and how often the 95% Student-t
interval the analyzer prints (``spectrum.trace_interval``) covers the exact trace, beside the
normal interval +-2 SE. Prints the load average.

Run: ``python benchmarks/trace_cost.py [--threads 2] [--models mlp_bn,cnn_gn] [--seeds 10]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import hutchinson_trace, hutchpp_trace, krylov_trace, trace_interval
from normscope.data import load_digits
from normscope.train import train_reference


def exact_trace(op: HessianOperator, chunk: int = 256) -> float:
    """``sum_i (H e_i)_i`` with batched double backward on the operator's graph."""
    op(torch.zeros(op.numel, dtype=op.dtype))  # builds the gradient graph
    leaves, grads = op._graph
    total = 0.0
    for start in range(0, op.numel, chunk):
        idx = torch.arange(start, min(op.numel, start + chunk))
        eye = torch.zeros(len(idx), op.numel, dtype=op.dtype)
        eye[torch.arange(len(idx)), idx] = 1.0
        parts = [t.reshape(len(idx), *s) for t, s in zip(eye.split(op.sizes, dim=1), op.shapes)]
        try:
            hv = torch.autograd.grad(grads, leaves, grad_outputs=parts, retain_graph=True, is_grads_batched=True, allow_unused=True)
            flat = torch.cat([(torch.zeros(len(idx), sz, dtype=op.dtype) if h is None else h.reshape(len(idx), -1))
                              for h, sz in zip(hv, op.sizes)], dim=1)
            total += float(flat[torch.arange(len(idx)), idx].double().sum())
        except RuntimeError:  # a layer without a batched double backward (GroupNorm): one product per unit vector
            total += float(sum(op(row)[i] for row, i in zip(eye, idx.tolist())))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="mlp_bn,cnn_gn")
    parser.add_argument("--modes", default="eval,train")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--products", default="30,99")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    x, y = load_digits(torch.float32)
    x, y = x[:128], y[:128]
    print("| model | mode | params | exact trace | products | Hutchinson RMS rel. error | Hutch++ | Krylov Hutch++ | "
          "ratio Hutchinson / Krylov Hutch++ | Krylov stated SE / RMS error | samples | t-interval coverage | +-2 SE coverage |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = train_reference(name)
        for mode in args.modes.split(","):
            op = HessianOperator(BatchLoss(model, x, y, mode=mode, dtype=torch.float64), backend="double_backward")
            started = time.perf_counter()
            exact = exact_trace(op)
            exact_s = time.perf_counter() - started
            for n in map(int, args.products.split(",")):
                plain = np.array([hutchinson_trace(op, n, seed)["total"][0] for seed in range(args.seeds)])
                pp = np.array([hutchpp_trace(op, n, seed)["total"][0] for seed in range(args.seeds)])
                runs = [krylov_trace(op, n, seed)["total"] for seed in range(args.seeds)]
                kr = np.array([t for t, _, _ in runs])
                rms = lambda v: float(np.sqrt(np.mean((v - exact) ** 2)) / abs(exact))
                stated = float(np.mean([se for _, se, _ in runs])) / (rms(kr) * abs(exact))
                covered = np.mean([low <= exact <= high for low, high in (trace_interval(*r) for r in runs)])
                normal = np.mean([abs(t - exact) <= 2 * se for t, se, _ in runs])
                print(f"| {name} | {mode} | {op.numel} | {exact:.6g} (exact in {exact_s:.0f} s) | {n} | {rms(plain):.2e} | "
                      f"{rms(pp):.2e} | {rms(kr):.2e} | {rms(plain) / rms(kr):.1f} | {stated:.2f} | {runs[0][2]} | "
                      f"{covered:.2f} | {normal:.2f} |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
