"""The budget as a plan: headlines held first, unit costs re-measured, so a machine that slows down
mid-run cuts refinements, not headlines. The slowdown is injected on a virtual clock that advances
with every matrix product the analysis runs (deterministic work, no sleeping)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normscope
from normscope.budget import Budget
from normscope.models import build_model

aten = torch.ops.aten


class OpClock(TorchDispatchMode):
    """Virtual seconds: every matrix product or convolution (forward, backward, Hessian-vector
    products alike) costs ``unit``, ``slowdown`` times more once the clock has passed ``after``
    (a machine that gets loaded mid-run)."""

    COSTLY = {aten.mm, aten.addmm, aten.bmm, aten.convolution, aten.convolution_backward}

    def __init__(self, unit: float = 1.0, slowdown: float = 1.0, after: float = float("inf")) -> None:
        super().__init__()
        self.now, self.unit, self.slowdown, self.after = 0.0, unit, slowdown, after

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.COSTLY:
            self.now += self.unit * (self.slowdown if self.now >= self.after else 1.0)
        return func(*args, **(kwargs or {}))

    def __call__(self) -> float:
        return self.now


def _run(seconds: float, clock: OpClock, analyzers: str = "stats,gls,descent"):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with clock:
        return normscope.analyze(build_model("mlp_bn"), (x, y), batch_size=16, batches=2, analyzers=analyzers,
                                 budget=Budget(seconds, clock=clock))


HEADLINES = ("a_crit_train", "a_crit_eval", "lambda_max_train", "lambda_max_eval")


def test_a_binding_budget_holds_within_a_tenth_and_keeps_every_headline():
    seconds = 1500.0
    clock = OpClock(1.0)
    result = _run(seconds, clock)
    assert clock.now <= 1.1 * seconds, f"spent {clock.now:.0f} of a {seconds:.0f} s budget"
    assert result.meta["budget"]["cuts"], "this budget is too small for every piece"
    assert len(result.tables["stats_sites"]) == 2 and len(result.tables["gls_sites"]) == 2
    assert all(key in result.headline["descent"] for key in HEADLINES), result.meta["budget"]["cuts"]


def test_a_slowdown_mid_run_is_seen_and_cuts_refinements():
    """The machine gets 4x slower after a tenth of the budget: the products' deadline checks stop a
    stage that is running when the slowdown comes, the unit costs are re-measured on the products
    (the plan sees the slowdown) and refinements are cut; every headline stays. Before the deadlines
    (issue 21) this run took 1.16x its budget and lost train mode's λ_max."""
    seconds = 1500.0
    clock = OpClock(1.0, 4.0, after=0.1 * seconds)
    result = _run(seconds, clock)
    assert clock.now <= 1.1 * seconds, f"spent {clock.now:.0f} of a {seconds:.0f} s budget"
    costs = result.meta["budget"]["unit_costs"]
    quiet = OpClock(1.0)
    baseline = _run(seconds, quiet).meta["budget"]["unit_costs"]
    assert costs["hvp"] > 3.0 * baseline["hvp"] and costs["forward"] > 2.0 * baseline["forward"]
    cut = {c["what"] for c in result.meta["budget"]["cuts"]}
    assert {"the trace", "the quadratic model"} & cut
    assert len(result.tables["stats_sites"]) == 2 and len(result.tables["gls_sites"]) == 2
    assert all(key in result.headline["descent"] for key in HEADLINES), result.meta["budget"]["cuts"]
