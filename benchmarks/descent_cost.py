"""Cost of the descent analyzer's Hessian-vector products (issue 8), one process.

Prints, on CPU and on CUDA when present:
* HVP time / gradient time at batch 128 (training-mode BN, float32) on ``resnet_bn`` and
  ``mlp_bn``, for a fresh product (forward + backward + backward of the backward) by double
  backward and by torch.func (forward-over-reverse), and for double backward with the gradient's
  graph kept (what Lanczos uses after its first product), and the backend ``auto`` picks;
* the number of HVPs to reach 1e-4 relative accuracy on the top 5 (and top 1) eigenvalues of the
  trained ``mlp_bn``'s eval-mode Hessian on 128 digits: Lanczos (``eigsh``) against power
  iteration with deflation (PyHessian's method, our implementation on the same operator) and
  PyHessian itself (``pip install --no-deps pyhessian``, not a project dependency) where it
  imports. Each method's count is the smallest over its tolerance settings that reaches the
  accuracy, against a float64 Lanczos reference at tol 1e-12.

Run: ``python benchmarks/descent_cost.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import importlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh

from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.data import load_digits
from normscope.models import build_model
from normscope.train import train_reference

ACCURACY = 1e-4
TOLS = [10.0 ** -e for e in range(1, 11)]


def seconds(fn, device: torch.device, repeats: int = 30) -> float:
    """Shortest wall time of ``fn()`` over ``repeats`` calls after two warm-ups (the least disturbed
    by other processes on a shared machine)."""
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
    return float(np.min(times))


def cost_ratios(name: str, device: torch.device) -> None:
    x, y = load_digits(torch.float32)
    x, y = x[:128].to(device), y[:128].to(device)
    loss = BatchLoss(build_model(name).to(device), x, y, mode="train")
    grad_s = seconds(lambda: loss.gradient(), device)
    ops = {b: HessianOperator(loss, backend=b) for b in ("double_backward", "func")}
    v = ops["func"].gradient()

    def fresh() -> None:
        ops["double_backward"]._graph = None
        ops["double_backward"](v)

    figures = {
        "double backward, fresh": seconds(fresh, device),
        "torch.func jvp(grad), fresh": seconds(lambda: ops["func"](v), device),
        "double backward, graph kept": seconds(lambda: ops["double_backward"](v), device),
    }
    auto = HessianOperator(loss).backend
    print(f"{device.type} {name}: gradient {grad_s * 1e3:.2f} ms; auto picks {auto}")
    for label, s in figures.items():
        print(f"  HVP {label}: {s * 1e3:.2f} ms, ratio to gradient {s / grad_s:.2f}")


def power_iteration(op: HessianOperator, k: int, tol: float, seed: int, max_iter: int = 2000) -> np.ndarray:
    """PyHessian's method on ``op``: per eigenvalue, power iteration on a random unit vector
    orthogonalized against the eigenvectors found so far, stopping when the Rayleigh quotient
    changes by less than ``tol`` relative (PyHessian's rule, ``|new - old| / (|old| + 1e-6)``)."""
    generator = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    values = []
    for _ in range(k):
        v = torch.randn(op.numel, generator=generator, dtype=torch.float64)
        v /= v.norm()
        value = None
        for _ in range(max_iter):
            for u in found:
                v -= (v @ u) * u
            v /= v.norm()
            hv = op(v.to(op.dtype)).double().cpu()
            new = float(hv @ v)
            v = hv / hv.norm()
            if value is not None and abs(value - new) / (abs(value) + 1e-6) < tol:
                value = new
                break
            value = new
        for u in found:
            v -= (v @ u) * u
        found.append(v / v.norm())
        values.append(value)
    return np.sort(np.asarray(values))[::-1]


def accurate(values: np.ndarray, reference: np.ndarray) -> bool:
    return len(values) == len(reference) and bool(np.all(np.abs(values - reference) <= ACCURACY * np.abs(reference)))


def fewest(runs) -> str:
    """The fewest products among the runs (products, values, reference) that are accurate."""
    ok = [n for n, values, reference in runs if accurate(values, reference)]
    return str(min(ok)) if ok else "not reached"


def lanczos_runs(op: HessianOperator, k: int, reference: np.ndarray):
    for ncv in sorted({2 * k + 1, 4 * k, 20}):
        for tol in TOLS:
            op.products = 0
            v0 = np.random.default_rng(0).standard_normal(op.numel)
            values = np.sort(eigsh(op.linear_operator(), k=k, which="LA", ncv=ncv, tol=tol, v0=v0,
                                   return_eigenvectors=False))[::-1]
            yield op.products, values, reference[:k]


def power_runs(op: HessianOperator, k: int, reference: np.ndarray):
    for tol in TOLS:
        op.products = 0
        values = power_iteration(op, k, tol, seed=0)
        yield op.products, values, reference[:k]


def pyhessian_runs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, reference: np.ndarray, cuda: bool):
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)

    plain = ph.hessian_vector_product
    count = [0]

    def counted(gradsH, params, v):
        count[0] += 1
        return plain(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        for tol in TOLS:
            torch.manual_seed(0)
            model.zero_grad(set_to_none=True)
            h = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=cuda)
            count[0] = 0
            values, _ = h.eigenvalues(maxIter=2000, tol=tol, top_n=k)
            yield count[0], np.sort(np.asarray(values))[::-1], reference[:k]
    finally:
        ph.hessian_vector_product = plain


def product_counts(device: torch.device) -> None:
    x, y = load_digits(torch.float32)
    x, y = x[:128].to(device), y[:128].to(device)
    model = train_reference("mlp_bn").to(device)
    exact = HessianOperator(BatchLoss(model, x, y, mode="eval", dtype=torch.float64), backend="double_backward")
    v0 = np.random.default_rng(1).standard_normal(exact.numel)
    reference = np.sort(eigsh(exact.linear_operator(), k=5, which="LA", tol=1e-12, v0=v0, return_eigenvectors=False))[::-1]
    magnitude = np.sort(np.abs(eigsh(exact.linear_operator(), k=5, which="LM", tol=1e-12, v0=v0, return_eigenvectors=False)))[::-1]
    print(f"{device.type} trained mlp_bn, eval mode, 128 digits: top-5 eigenvalues {np.round(reference, 5).tolist()}"
          f" (top-5 by magnitude equal: {bool(np.allclose(magnitude, reference, rtol=1e-8))})")
    op = HessianOperator(BatchLoss(model, x, y, mode="eval"), backend="double_backward")
    for k in (5, 1):
        lanczos = fewest(lanczos_runs(op, k, reference))
        power = fewest(power_runs(op, k, reference))
        line = f"  top {k}: HVPs to {ACCURACY:g} relative accuracy: Lanczos {lanczos}, power iteration {power}"
        try:
            line += f", PyHessian {fewest(pyhessian_runs(model.float(), x, y, k, reference, device.type == 'cuda'))}"
        except ImportError:
            line += ", PyHessian not installed"
        if lanczos.isdigit() and power.isdigit():
            line += f"; power / Lanczos = {int(power) / int(lanczos):.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for name in ("resnet_bn", "mlp_bn"):
            cost_ratios(name, device)
        product_counts(device)


if __name__ == "__main__":
    main()
