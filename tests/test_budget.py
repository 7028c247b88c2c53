"""The time budget (normscope.budget): work planned from injected unit costs on a planned clock
(no timing in the test), cut where it does not fit, finished tables kept and the cuts stated."""

import math

import pytest
import torch

import normscope
from normscope.analyzers import ANALYZERS
from normscope.analyzers.descent import QUICK, descent_tables, findings
from normscope.analyzers.spectrum import MIN_TRACE_SAMPLES
from normscope.budget import MEMORY_FLOOR, Budget, as_budget, chunk_for_memory, memory_budget, step_memory
from normscope.errors import InvalidArgumentError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model

COSTS = {"hvp": 1.0, "gradient": 0.5, "forward": 0.1, "example_chunk": 2.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small products: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unlimited(digits64):
    model = build_model("mlp_bn")
    x, y = digits64[0][:32].float(), digits64[1][:32]
    tables, _ = descent_tables(model, x, y, budget=Budget(None, dict(COSTS)))
    return model, x, y, tables


def test_budget_arithmetic_on_a_planned_clock():
    budget = Budget(10.0, dict(COSTS), clock="planned")
    assert budget.affordable("hvp", 100) == 10 and budget.affordable("hvp", 3) == 3
    assert budget.allows("stage", {"hvp": 4, "gradient": 2})
    budget.spend("hvp", 4)
    budget.spend("gradient", 2)
    assert budget.elapsed() == pytest.approx(5.0) and budget.remaining() == pytest.approx(5.0)
    assert not budget.allows("big stage", {"hvp": 6}) and budget.cuts[-1].what == "big stage"
    share = budget.share("descent", ["descent", "stats"])
    assert share.seconds == pytest.approx(5.0 * 4 / 5)  # descent weighs 4, stats 1
    share.spend("hvp", 2)
    assert budget.remaining() == pytest.approx(3.0)  # a share spends its parent's time
    share.cut("x", "y")
    assert budget.cuts[-1].analyzer == "descent"
    report = budget.report()
    assert report["clock"] == "planned" and len(report["cuts"]) == 2 and report["unit_costs"] == COSTS
    assert as_budget(None).remaining() == math.inf and as_budget(0).limited is False
    with pytest.raises(InvalidArgumentError):
        Budget(-1.0)
    with pytest.raises(InvalidArgumentError):
        Budget(1.0, {"flops": 1.0})


def test_an_injected_cost_is_not_measured():
    budget = Budget(10.0, {"hvp": 0.25})
    assert budget.cost("hvp", lambda: pytest.fail("measured")) == 0.25
    assert budget.cost("forward", lambda: 0.5) == 0.5 and budget.costs["forward"] == 0.5


@pytest.mark.parametrize("seconds", [6.0, 60.0])
def test_descent_stays_within_its_budget_and_keeps_what_finished(unlimited, seconds):
    model, x, y, free = unlimited
    before = snapshot(model)
    budget = Budget(seconds, dict(COSTS), clock="planned")
    tables, _ = descent_tables(model, x, y, budget=budget)
    assert_unchanged(model, before)
    assert budget.elapsed() <= seconds + 1e-9
    directions = tables["descent_directions"]
    assert set(directions.query("group == 'total'")["mode"]) == {"train", "eval"}  # the essentials of both modes
    assert budget.cuts, "this budget is too small for every stage"
    assert sum(len(t) for t in tables.values()) < sum(len(t) for t in free.values())
    for cut in budget.cuts:
        assert cut.analyzer.startswith("descent (") and cut.why
    trace = tables["descent_trace"]
    if len(trace):
        assert (trace["products"] <= QUICK["trace_products"]).all()
        measured = trace["n_samples"] >= MIN_TRACE_SAMPLES  # fewer samples: the trace is not measured (issue 23)
        assert (trace.loc[measured, "trace_stderr"] >= 0).all() and trace.loc[~measured, "trace"].isna().all()
    spectrum = tables["descent_spectrum"]
    stopped = spectrum[~spectrum["converged"].astype(bool)]
    assert (stopped["residual"] > 0).all()  # an unconverged value states the accuracy it reached
    # the same budget twice plans the same work: no timing in the plan
    again = Budget(seconds, dict(COSTS), clock="planned")
    repeat, _ = descent_tables(model, x, y, budget=again)
    assert [len(t) for t in repeat.values()] == [len(t) for t in tables.values()]
    assert [c.what for c in again.cuts] == [c.what for c in budget.cuts]


def test_sites_restrict_the_per_layer_work(digits64):
    model = build_model("mlp_bn")
    x, y = digits64[0][:32].float(), digits64[1][:32]
    tables, _ = descent_tables(model, x, y, modes=("train",), sites="net.1")
    assert set(tables["descent_directions"]["group"]) == {"total", "net.1"}
    assert set(tables["descent_trace"]["group"]) == {"total", "net.1"}
    assert set(tables["descent_scale_invariance"]["layer"]) == {"net.1"}  # net.1 feeds the BatchNorm net.2


def test_analyze_states_the_budget_and_its_cuts(digits64, tmp_path):
    model = build_model("mlp_bn")
    before = snapshot(model)
    x, y = digits64[0].float(), digits64[1]
    budget = Budget(20.0, dict(COSTS), clock="planned")
    result = normscope.analyze(model, (x, y), analyzers=["stats", "descent"], batch_size=32, batches=1, budget=budget)
    assert_unchanged(model, before)
    meta = result.meta["budget"]
    assert meta["seconds"] == 20.0 and meta["cuts"] and meta["unit_costs"]["hvp"] == 1.0
    assert result.meta["settings"] == "quick"
    assert any("time budget" in f for f in result.findings["budget"])
    assert {"stats_sites", "descent_directions"} <= set(result.tables)
    result.save(tmp_path / "out")
    assert (tmp_path / "out" / "summary.json").is_file()


def interrupting_analyzer(ctx):
    raise KeyboardInterrupt


def test_an_interrupt_keeps_the_finished_analyzers(digits64, monkeypatch):
    monkeypatch.setitem(ANALYZERS, "interrupting", "tests.test_budget:interrupting_analyzer")
    model = build_model("mlp_bn")
    before = snapshot(model)
    x, y = digits64[0].float(), digits64[1]
    result = normscope.analyze(model, (x, y), analyzers=["stats", "interrupting", "descent"], batch_size=32, batches=1)
    assert_unchanged(model, before)
    assert "stats_sites" in result.tables and "descent_directions" not in result.tables
    assert "interrupted during analyzer interrupting" in result.meta["analyzer_errors"]["interrupted"]
    assert result.findings["budget"][0].startswith("Analysis interrupted")
    with pytest.raises(KeyboardInterrupt):
        normscope.analyze(model, (x, y), analyzers=["interrupting"], batch_size=32, batches=1)


def test_the_lanczos_cap_is_no_budget_cut(unlimited, monkeypatch):
    model, x, y, _ = unlimited
    monkeypatch.setitem(QUICK, "lanczos_products", 3)
    roomy = Budget(1000.0, dict(COSTS), clock="planned")
    tables, _ = descent_tables(model, x, y, budget=roomy)
    top = tables["descent_spectrum"].query("group == 'total'")
    assert (top["products"] == 3).all() and not top["converged"].astype(bool).any()
    assert not [c for c in roomy.cuts if "Lanczos" in c.what]
    notes = [f for f in findings(tables, True, 0.1) if "cap of 3 products" in f]
    assert len(notes) == 2  # said once per mode, as a cap
    monkeypatch.setitem(QUICK, "lanczos_products", 6)  # above the headline's floor of 3 products (HEADLINE_PRODUCTS)
    tight = Budget(7.5, {**COSTS, "forward": 0.0}, clock="planned")  # train: 3.75 s, 1.5 s of directions, room for 2 products
    tables, _ = descent_tables(model, x, y, budget=tight)
    assert [c.what for c in tight.cuts if "Lanczos" in c.what]


def test_a_product_not_measured_yet_is_priced_in_gradients(unlimited):
    """Before the first Hessian-vector product measures its cost, the direction rows are priced at
    FIRST_PRODUCT_GRADIENTS gradients a product: a share that holds the gradients but not that is cut."""
    from normscope.analyzers.descent import FIRST_PRODUCT_GRADIENTS

    model, x, y, _ = unlimited
    costs = {"gradient": 0.5, "forward": 0.0}
    needed = 0.5 * (1 + FIRST_PRODUCT_GRADIENTS)  # one direction (no optimizer): its gradient and first product
    short = Budget(0.9 * needed, dict(costs), clock="planned")
    tables, _ = descent_tables(model, x, y, budget=short, modes=("train",))
    assert [c.what for c in short.cuts] == ["every table of this mode"] and tables["descent_directions"].empty
    enough = Budget(1.1 * needed, dict(costs), clock="planned")
    tables, _ = descent_tables(model, x, y, budget=enough, modes=("train",))
    assert not tables["descent_directions"].empty


def test_step_memory_counts_weights_gradients_and_saved_activations_of_a_copy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    state = snapshot(model)
    small = step_memory(model, (x, y), torch.nn.functional.cross_entropy)
    large = step_memory(model, (torch.cat([x] * 4), torch.cat([y] * 4)), torch.nn.functional.cross_entropy)
    assert_unchanged(model, state)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert small > 2 * weights + 16 * 32 * 4  # at least the saved BatchNorm input
    assert large - 2 * weights > 3.5 * (small - 2 * weights)  # the saved part grows with the examples
    assert memory_budget(small) == MEMORY_FLOOR and memory_budget(10 * MEMORY_FLOOR) == 20 * MEMORY_FLOOR
    assert chunk_for_memory(1000, 8, 10**9) == 64 > chunk_for_memory(1000, 8, 240_000) == 10 > chunk_for_memory(1000, 8, 1) == 1


def test_a_headline_runs_past_its_share_while_the_whole_analysis_has_time():
    """``allows_headline``: a stage the share cannot hold still runs when the root budget has time
    for it and for the later headlines' floors; otherwise it is cut like ``allows``."""
    budget = Budget(10.0, {"hvp": 1.0}, clock="planned")
    share = budget.share("descent", ["descent", "stats"])  # a part of the 10 s
    assert share.remaining() < 9.0
    assert not share.allows("nine products", {"hvp": 9})
    assert share.allows_headline("nine products", {"hvp": 9}, {"hvp": 1})  # 9 + 1 <= 10 left in all
    assert not share.allows_headline("nine products", {"hvp": 9}, {"hvp": 3})  # 9 + 3 > 10
    assert [cut.what for cut in share.cuts].count("nine products") == 2  # the cuts list is shared with the root
