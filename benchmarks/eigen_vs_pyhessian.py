"""Top eigenvalues: HVPs and wall time of normscope's Lanczos against PyHessian, side by side.

On each trained reference model (digits, batch 128, eval mode: the mode PyHessian runs), in one
process, for top-1 and top-5 at relative tolerance 1e-3 and 1e-4:

* normscope: ``spectrum.lanczos`` exactly as the descent analyzer calls it (float64 ``BatchLoss``,
  the analyzer's HVP backend choice, stopping rule ``min(r, r^2/gap) <= tol |theta|``);
* PyHessian (``pip install --no-deps pyhessian``; not a project dependency): ``hessian.eigenvalues``
  (power iteration with deflation, its own stopping rule, float32 as it runs), its products counted
  by wrapping ``pyhessian.hessian.hessian_vector_product``.

Each run's achieved accuracy is the largest relative error of its values against a float64
reference (Lanczos at tol 1e-12). Wall time is the fastest of ``--repeats`` runs. Prints one
row per (model, k, tol) and the load average.

Run: ``python benchmarks/eigen_vs_pyhessian.py [--threads 2] [--models mlp_bn,...] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import lanczos
from normscope.data import load_digits
from normscope.models import MODELS
from normscope.train import train_reference


def relative_error(values, reference) -> float:
    values = np.sort(np.asarray(values, dtype=float))[::-1]
    return float(np.max(np.abs(values - reference[: len(values)]) / np.abs(reference[: len(values)])))


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def pyhessian_run(model, x, y, k: int, tol: float, cuda: bool):
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    plain, count = ph.hessian_vector_product, [0]

    def counted(gradsH, params, v):
        count[0] += 1
        return plain(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):  # the attention kernel with a double backward, as normscope's BatchLoss uses
            h = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=cuda)
            values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=k)
        return values, count[0]
    finally:
        ph.hessian_vector_product = plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, load {os.getloadavg()}")
    x, y = load_digits(torch.float32)
    x, y = x[:128].to(device), y[:128].to(device)
    print("| model | params | k | tol | normscope HVPs | normscope error | normscope s | PyHessian HVPs | PyHessian error | PyHessian s | HVP ratio PyHessian/normscope |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = train_reference(name).to(device)
        op = HessianOperator(BatchLoss(model, x, y, mode="eval", dtype=torch.float64))
        reference = lanczos(op, 5, 1e-12, seed=1).values
        for k in (1, 5):
            for tol in (1e-3, 1e-4):
                runs = []
                for _ in range(args.repeats):
                    ours, ours_s = timed(lambda: lanczos(op, k, tol, seed=0), device)
                    try:
                        (theirs, count), theirs_s = timed(lambda: pyhessian_run(model, x, y, k, tol, device.type == "cuda"), device)
                    except ImportError:
                        theirs, count, theirs_s = None, 0, float("nan")
                    runs.append((ours_s, theirs_s))
                ours_s, theirs_s = min(r[0] for r in runs), min(r[1] for r in runs)
                ph = ("not installed", "", "") if theirs is None else (count, f"{relative_error(theirs, reference):.1e}", f"{theirs_s:.3f}")
                ratio = f"{count / ours.products:.2f}" if theirs is not None else ""
                print(f"| {name} | {op.numel} | {k} | {tol:g} | {ours.products} | {relative_error(ours.values, reference):.1e} | "
                      f"{ours_s:.3f} | {ph[0]} | {ph[1]} | {ph[2]} | {ratio} |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
