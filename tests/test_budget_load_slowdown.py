"""The budget at any load (issue 21): a machine that gets 4x slower mid-run keeps the analysis
within 1.1x its budget with every headline, on the built-in mlp_bn and on a tiny Qwen3 (q/k
RMSNorms) built from a config; the curvature loops stop between products with honest bounds.

The slowdown is injected on the virtual clock of tests/test_budget_plan.py (every matrix product
costs a unit, 4 units after the slowdown), so the runs are deterministic and take seconds. Before
the deadlines inside the loops, the mlp_bn run (after 10%) took 1.25x with train mode's λ_max
missing, the Qwen3 run 1.88x with the same headline missing."""

import numpy as np
import pytest
import torch

import normscope
from normscope.analyzers.hvp import BatchLoss, HessianOperator
from normscope.analyzers.spectrum import MIN_TRACE_SAMPLES, dense_hessian, krylov_trace, lanczos
from normscope.budget import Budget
from normscope.models import build_model
from tests.test_budget import one_thread  # noqa: F401 - the module's products on 1 thread
from tests.test_budget_plan import HEADLINES, OpClock
from tests.test_hvp import tiny_batch, tiny_model




def _analyze(model, data, seconds: float, clock: OpClock, batch_size: int):
    with clock:
        return normscope.analyze(model, data, batch_size=batch_size, batches=2, budget=Budget(seconds, clock=clock))


def _check(result, clock: OpClock, seconds: float, sites: int) -> None:
    assert clock.now <= 1.1 * seconds, f"spent {clock.now:.0f} of a {seconds:.0f} s budget"
    assert result.meta["budget"]["cuts"], "this budget is too small for every piece"
    assert len(result.tables["stats_sites"]) == sites and len(result.tables["gls_sites"]) == sites
    assert result.tables["gls_sites"]["r2_mean"].notna().all()  # gls R² per site
    missing = [key for key in HEADLINES if key not in result.headline.get("descent", {})]
    assert not missing, (missing, result.meta["budget"]["cuts"])


@pytest.mark.parametrize("after", [0.1, 0.6])
def test_mlp_bn_slowed_4x_mid_run_stays_within_the_budget_with_every_headline(after):
    seconds = 1500.0
    torch.manual_seed(0)
    data = (torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    clock = OpClock(1.0, 4.0, after=after * seconds)
    result = _analyze(build_model("mlp_bn"), data, seconds, clock, 16)
    _check(result, clock, seconds, sites=2)
    assert "bias_batchnorm_b4" in result.headline["bias"]  # bias at its smallest batch size


def test_a_tiny_qwen3_slowed_4x_mid_run_stays_within_the_budget_with_every_headline():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    model, data = transformers.Qwen3ForCausalLM(config), {"input_ids": torch.randint(0, 64, (16, 8))}
    seconds = 3000.0  # the whole analysis costs about 9,100 on this clock unslowed
    clock = OpClock(1.0, 4.0, after=0.1 * seconds)
    result = _analyze(model, data, seconds, clock, 8)
    _check(result, clock, seconds, sites=5)  # two layer norms, q and k norms, the final norm


class _After:
    """A deadline that says stop after ``n`` calls (a budget running out mid-loop)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.stopped = n, 0, False

    def __call__(self) -> bool:
        self.calls += 1
        self.stopped = self.calls >= self.n
        return self.stopped


def test_a_lanczos_stopped_by_its_deadline_returns_its_value_with_a_bound_that_holds():
    loss = BatchLoss(tiny_model(), *tiny_batch(), mode="train")
    op = HessianOperator(loss, backend="double_backward")
    eigenvalues = np.linalg.eigvalsh((lambda H: (H + H.T) / 2)(dense_hessian(op)))
    op.products = 0
    found = lanczos(op, 1, 1e-10, seed=0, stop=_After(3))
    assert found.products == op.products == 3 and not found.converged
    assert found.residuals[0] > 0
    assert np.min(np.abs(eigenvalues - found.values[0])) <= found.errors[0] * (1 + 1e-9)  # Kahan's bound holds


def test_a_trace_stopped_by_its_deadline_keeps_its_samples_and_is_not_measured_below_the_minimum():
    loss = BatchLoss(tiny_model(), *tiny_batch(), mode="eval")
    op = HessianOperator(loss, backend="double_backward")
    exact = float(np.trace(dense_hessian(op)))
    op.products = 0
    stopped = krylov_trace(op, 30, seed=1, stop=_After(10 + MIN_TRACE_SAMPLES))  # the basis (20) stops at 16
    assert op.products == 16
    t, se, samples = stopped["total"]
    assert samples == 0 and np.isnan(se)
    op.products = 0
    late = _After(19 + 8)  # the basis whole (checked after each product but its last), then 8 of the 10 samples
    t, se, samples = krylov_trace(op, 30, seed=1, stop=late)["total"]
    assert op.products == 28 and samples == 8
    assert abs(t - exact) <= 6 * se + 1e-9 * abs(exact)


def test_bias_prices_its_jacobian_check_and_cuts_it_when_it_does_not_fit():
    """Bias's Jacobian check (two-stage backprop on all examples, about 4 passes of g*) is priced
    from the measured g* before it runs: on a budget it does not fit, it is cut and recorded,
    and descent's headlines after it still come within the budget."""
    seconds = 1500.0
    torch.manual_seed(0)
    data = (torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    clock = OpClock(1.0)
    with clock:
        result = normscope.analyze(build_model("mlp_bn"), data, batch_size=16, batches=2, analyzers="bias,descent",
                                   budget=Budget(seconds, clock=clock))
    assert clock.now <= 1.1 * seconds
    assert any(cut["analyzer"] == "bias" and "Jacobian check" in cut["what"] for cut in result.meta["budget"]["cuts"])
    assert len(result.tables["bias_jacobian"]) == 0 and "bias_jacobian_relative_gap" not in result.headline["bias"]
    assert "bias_batchnorm_b4" in result.headline["bias"]
    assert not [key for key in HEADLINES if key not in result.headline["descent"]]
