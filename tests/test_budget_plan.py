"""The budget as a plan: headlines held first, unit costs re-measured, so a machine that slows down
mid-run cuts refinements, not headlines. The slowdown is injected on a virtual clock that advances
with every leaf-module forward (deterministic and fast: no sleeping, no timing)."""

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

import normscope
from normscope.budget import Budget
from normscope.models import build_model


class ForwardClock:
    """Virtual seconds: each leaf-module forward costs ``unit``, ``slowdown`` times more once the
    clock has passed ``after`` (a machine that gets loaded mid-run)."""

    def __init__(self, unit: float, slowdown: float = 1.0, after: float = float("inf")) -> None:
        self.now, self.unit, self.slowdown, self.after = 0.0, unit, slowdown, after
        self.handle = register_module_forward_hook(self._tick)

    def _tick(self, module, args, output) -> None:
        if next(module.children(), None) is None:
            self.now += self.unit * (self.slowdown if self.now >= self.after else 1.0)

    def __call__(self) -> float:
        return self.now

    def close(self) -> None:
        self.handle.remove()


def _run(seconds: float, clock: ForwardClock):
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    try:
        return normscope.analyze(build_model("mlp_bn"), (x, y), batch_size=32, batches=2,
                                 budget=Budget(seconds, clock=clock))
    finally:
        clock.close()


HEADLINES = ("a_crit_train", "a_crit_eval", "lambda_max_train", "lambda_max_eval")


@pytest.fixture(scope="module")
def unlimited():
    clock = ForwardClock(1.0)
    result = _run(1e9, clock)
    return result, clock.now


def test_the_unlimited_run_holds_every_piece(unlimited):
    result, spent = unlimited
    assert not result.meta["budget"]["cuts"]
    assert all(key in result.headline["descent"] for key in HEADLINES)
    assert spent > 0


@pytest.mark.parametrize("share, slowdown", [(0.5, 1.0), (0.5, 4.0), (0.25, 4.0)])
def test_a_slowdown_cuts_refinements_within_the_budget_and_keeps_the_headlines(unlimited, share, slowdown):
    _, spent = unlimited
    seconds = share * spent
    clock = ForwardClock(1.0, slowdown, after=0.1 * seconds)
    result = _run(seconds, clock)
    assert clock.now <= 1.1 * seconds, f"spent {clock.now:.0f} of a {seconds:.0f} s budget"
    assert result.meta["budget"]["cuts"], "this budget is too small for every piece"
    assert len(result.tables["stats_sites"]) == 2 and len(result.tables["gls_sites"]) == 2
    assert len(result.tables["bias_estimators"])
    assert all(key in result.headline["descent"] for key in HEADLINES), result.meta["budget"]["cuts"]
    if slowdown > 1:
        assert result.meta["budget"]["pace"] > 1.5  # the plan saw the machine slow down
