"""Lanczos to a tolerance and Hutch++ traces (normscope.analyzers.spectrum) against the dense
float64 Hessian of a tiny model."""

import numpy as np
import pytest
import torch

from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import (
    dense_hessian, hutchinson_trace, hutchpp_split, hutchpp_trace, krylov_trace, lanczos, lanczos_basis)
from tests.test_hvp import tiny_batch, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny products: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["train", "eval"])
def dense(request):
    loss = BatchLoss(tiny_model(), *tiny_batch(), mode=request.param)
    op = HessianOperator(loss, backend="double_backward")
    H = dense_hessian(op)
    return op, (H + H.T) / 2


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_lanczos_reaches_the_tolerance_and_its_bound_holds(dense, k, tol):
    op, H = dense
    exact = np.linalg.eigvalsh(H)[::-1][:k]
    op.products = 0
    found = lanczos(op, k, tol, seed=3)
    assert found.converged and found.products == op.products < op.numel
    error = np.abs(found.values - exact)
    assert np.all(error <= tol * np.abs(exact) * 1.01 + 1e-13)
    assert np.all(error <= found.errors * 1.01 + 1e-13)  # the a-posteriori bound covers the real error
    assert np.all(found.errors <= found.residuals + 1e-15)


def test_lanczos_residuals_are_those_of_the_ritz_pairs(dense):
    """r = beta_m |s_m| equals ||H y - theta y|| for the Ritz vector y, checked by rerunning
    Lanczos densely on H: the same start vector gives the same Krylov space."""
    op, H = dense
    found = lanczos(op, 2, 1e-12, seed=0, max_products=6)
    assert not found.converged and found.products == 6
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    V = [v / np.linalg.norm(v)]
    for _ in range(5):
        w = H @ V[-1]
        for _ in range(2):
            w -= np.stack(V, 1) @ (np.stack(V, 1).T @ w)
        V.append(w / np.linalg.norm(w))
    Q = np.stack(V, 1)
    theta, s = np.linalg.eigh(Q.T @ H @ Q)
    for i, value in enumerate(found.values):
        y = Q @ s[:, -1 - i]
        assert value == pytest.approx(theta[-1 - i], rel=1e-10)
        assert found.residuals[i] == pytest.approx(np.linalg.norm(H @ y - theta[-1 - i] * y), rel=1e-6, abs=1e-12)


def _block_traces(op, H, blocks):
    offsets = np.cumsum([0] + op.sizes)
    where = {n: range(offsets[i], offsets[i + 1]) for i, n in enumerate(op.names)}
    return {g: sum(H[j, j] for n in names for j in where[n]) for g, names in blocks.items()}


@pytest.mark.parametrize("estimator", [hutchpp_trace, krylov_trace])
def test_hutchpp_is_exact_once_the_sketch_spans_the_space(dense, estimator):
    op, H = dense
    blocks = op.loss.layers()
    traces = estimator(op, 3 * op.numel + 3, seed=1, blocks=blocks)
    assert traces["total"][0] == pytest.approx(np.trace(H), rel=1e-10)
    assert traces["total"][1] < 1e-10
    for g, expected in _block_traces(op, H, blocks).items():
        assert traces[g][0] == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("estimator", [hutchpp_trace, krylov_trace])
def test_hutchpp_is_unbiased_with_an_honest_standard_error(dense, estimator):
    op, H = dense
    blocks = op.loss.layers()
    runs = [estimator(op, 20, seed=s, blocks=blocks) for s in range(60)]
    truth = {"total": np.trace(H), **_block_traces(op, H, blocks)}
    for g, expected in truth.items():
        values = np.array([r[g][0] for r in runs])
        stated = np.mean([r[g][1] for r in runs])
        assert abs(values.mean() - expected) < 4 * values.std(ddof=1) / np.sqrt(len(values)), g
        assert 0.5 < stated / values.std(ddof=1) < 2.0, g
        assert sum(r[g][0] for g in blocks for r in runs[:1]) == pytest.approx(runs[0]["total"][0], rel=1e-10)


def test_hutchinson_is_unbiased(dense):
    op, H = dense
    values = np.array([hutchinson_trace(op, 10, seed=s)["total"][0] for s in range(60)])
    assert abs(values.mean() - np.trace(H)) < 4 * values.std(ddof=1) / np.sqrt(len(values))


def test_hutchpp_split():
    assert hutchpp_split(2) == (0, 2) and hutchpp_split(30) == (10, 10) and hutchpp_split(99) == (33, 33)
    with pytest.raises(Exception, match="at least 2"):
        hutchpp_split(1)


def test_lanczos_basis_satisfies_the_lanczos_relation(dense):
    op, H = dense
    V, C, r = lanczos_basis(op, 12, seed=2)
    Hm = torch.as_tensor(H)
    torch.testing.assert_close(V.T @ V, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    relation = V @ C
    relation[:, -1] += r
    torch.testing.assert_close(Hm @ V, relation, atol=1e-10, rtol=1e-10)
    assert float((V.T @ r).abs().max()) < 1e-10


def test_top_vector_is_the_top_eigenvector_and_a_warm_start_from_it_is_cheap(dense):
    """The returned unit Ritz vector y has ||H y - theta y|| equal to the stated residual, and
    lies along the dense top eigenvector; Lanczos started there needs fewer products than cold."""
    op, H = dense
    values, vectors = np.linalg.eigh(H)
    cold = lanczos(op, 1, 1e-10, seed=5)
    y = cold.top_vector.cpu().numpy()
    assert abs(np.linalg.norm(y) - 1) < 1e-12
    assert np.linalg.norm(H @ y - cold.values[0] * y) <= cold.residuals[0] * (1 + 1e-6) + 1e-12
    gap = values[-1] - values[-2]
    assert 1 - abs(y @ vectors[:, -1]) <= (cold.residuals[0] / gap) ** 2 + 1e-10
    warm = lanczos(op, 1, 1e-10, seed=5, start=cold.top_vector)
    assert abs(warm.values[0] - values[-1]) <= 1e-10 * abs(values[-1]) * 1.01 + 1e-13
    assert warm.products < cold.products
