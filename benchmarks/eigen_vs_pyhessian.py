"""λ_max: wall time and products of normscope's Lanczos against PyHessian and against the Krylov floor.

On each model (eval mode, PyHessian's mode), in one process, at relative tolerance ``--tol``:

* normscope, as the descent analyzer runs it: ``BatchLoss`` in the model's dtype
  (``precision="model"``), a fresh ``HessianOperator`` (backend caches cleared, so the backend
  choice, trying ``torch.func`` within the analyzer's allowance, and the symmetry check are paid
  again), ``spectrum.lanczos(op, k=1, tol)`` (float64
  basis and tridiagonal, stopped when the residual bound is below ``tol |theta|``). The time
  includes the copy, the backend choice, the symmetry check and the first graph.
* PyHessian (``pip install --no-deps pyhessian``; not a project dependency):
  ``hessian(model, criterion, data)`` (its setup: the gradient's graph) and
  ``eigenvalues(top_n=1, tol)`` (power iteration, float32), products counted by wrapping
  ``pyhessian.hessian.hessian_vector_product``.
* The Krylov floor: ``scipy.sparse.linalg.eigsh(k=1, which="LA", tol)`` on the same model-dtype
  operator, for every ``ncv`` from 2 to 20; the floor is the fewest products over the ``ncv`` whose
  value lies within ``tol`` of the reference (float64 Lanczos at tol 1e-10).

Models: the trained reference models ``mlp_bn`` and ``resnet_bn`` on 128 digits, and a BERT built from
a ``transformers`` config (``BertForSequenceClassification``, float32, 32 sequences of 32 tokens, the
last 8 of each the padding token 0). Runs of the two tools alternate; the time is the median of
``--repeats``. Prints one row per model, the thread count and the load average before and after.

Run: ``python benchmarks/eigen_vs_pyhessian.py [--threads 1] [--models mlp_bn,resnet_bn,bert] [--tol 1e-3]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch.nn.attention import SDPBackend, sdpa_kernel

from normscope.analyzers.hvp import BACKEND_CACHE, SYMMETRY_CACHE, BatchLoss, HessianOperator, curvature_dtype
from normscope.analyzers.descent import TRIAL_SHARE
from normscope.analyzers.spectrum import lanczos
from normscope.budget import DEFAULT_BUDGET
from normscope.data import load_digits
from normscope.train import train_reference


TRIAL = TRIAL_SHARE * DEFAULT_BUDGET / 2
"""What the analyzer lets the backend choice spend trying ``torch.func``: its share of one mode's half of the default budget."""


def logits_loss(outputs, targets):
    return F.cross_entropy(getattr(outputs, "logits", outputs), targets)


def bert():
    import transformers

    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (32, 32), generator=generator)
    ids[:, -8:] = 0
    return model, ids, torch.randint(0, 2, (32,), generator=generator)


def workload(name: str):
    if name == "bert":
        return bert()
    x, y = load_digits(torch.float32)
    return train_reference(name), x[:128], y[:128]


def ours(model, x, y, tol: float):
    BACKEND_CACHE.clear()
    SYMMETRY_CACHE.clear()
    start = time.perf_counter()
    op = HessianOperator(BatchLoss(model, x, y, logits_loss, "eval", curvature_dtype(model, "model")), trial_seconds=TRIAL)
    found = lanczos(op, 1, tol, seed=0)
    seconds = time.perf_counter() - start
    setup = op.selection_products + op.symmetry["products"]
    return float(found.values[0]), found.products, setup, seconds, op


def pyhessian(model, x, y, tol: float):
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    plain, count = ph.hessian_vector_product, [0]

    def counted(gradsH, params, v):
        count[0] += 1
        return plain(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        model = copy.deepcopy(model)
        start = time.perf_counter()
        with sdpa_kernel(SDPBackend.MATH):  # the attention kernel with a double backward, as normscope's BatchLoss uses
            h = ph.hessian(model, logits_loss, data=(x, y), cuda=False)
            values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=1)
        return float(values[0]), count[0], time.perf_counter() - start
    finally:
        ph.hessian_vector_product = plain


def krylov_floor(op: HessianOperator, reference: float, tol: float) -> tuple[int | None, int | None]:
    """The fewest products of ``eigsh(k=1, ncv, tol)`` over ``ncv`` in 2..20 whose value is within
    ``tol`` of ``reference``, and that ``ncv``."""
    best = (None, None)
    v0 = np.random.default_rng(0).standard_normal(op.numel)
    for ncv in range(2, 21):
        op.products = 0
        try:
            value = float(eigsh(op.linear_operator(), k=1, which="LA", ncv=ncv, tol=tol, v0=v0, maxiter=2000,
                                return_eigenvectors=False)[0])
        except ArpackNoConvergence:
            continue
        if abs(value - reference) <= tol * abs(reference) and (best[0] is None or op.products < best[0]):
            best = (op.products, ncv)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="mlp_bn,resnet_bn,bert")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {args.tol:g}, load before {os.getloadavg()}")
    print("| model | params | normscope s | PyHessian s | normscope / PyHessian time | normscope Lanczos products (+ setup) "
          "| PyHessian products | Krylov floor (ncv) | Lanczos / floor | normscope error | PyHessian error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, x, y = workload(name)
        exact = HessianOperator(BatchLoss(model, x, y, logits_loss, "eval", torch.float64), backend="double_backward")
        reference = float(lanczos(exact, 1, 1e-10, seed=1).values[0])
        del exact
        mine, theirs = [], []
        for _ in range(args.repeats):
            mine.append(ours(model, x, y, args.tol))
            try:
                theirs.append(pyhessian(model, x, y, args.tol))
            except ImportError:
                pass
        value, products, setup, _, op = mine[-1]
        floor, ncv = krylov_floor(HessianOperator(op.loss, backend=op.backend), reference, args.tol)
        our_s = float(np.median([m[3] for m in mine]))
        error = abs(value - reference) / abs(reference)
        if theirs:
            their_s = float(np.median([t[2] for t in theirs]))
            their = (f"{their_s:.3f}", f"{our_s / their_s:.2f}", str(theirs[-1][1]), f"{abs(theirs[-1][0] - reference) / abs(reference):.1e}")
        else:
            their = ("not installed", "", "", "")
        ratio = f"{products / floor:.2f}" if floor else "not reached"
        print(f"| {name} | {op.numel:,} | {our_s:.3f} | {their[0]} | {their[1]} | {products} (+{setup}) | {their[2]} | "
              f"{floor} ({ncv}) | {ratio} | {error:.1e} | {their[3]} |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
