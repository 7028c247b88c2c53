"""The compare engine and ``normscope compare``: short seeded runs, the table contract, no mutation."""

import copy
import importlib.util
import math
from functools import partial

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from normscope.compare import compare, default_data, findings, parse_variants, run_status
from normscope.errors import InvalidArgumentError, NoNormSitesError, UnknownNameError
from normscope.ops.renorm import BatchRenorm
from normscope.seed_stats import compare_means
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model

HAS_POPULATION = importlib.util.find_spec("normscope.ops.population") is not None
CURVE_COLUMNS = ["op", "batch_size", "step", "epoch", "split", "loss", "accuracy"]
SUMMARY_COLUMNS = ["op", "batch_size", "final_train_loss", "final_test_loss", "final_test_accuracy", "seconds"]


FAST_EMA = "warmup=2,refresh=1,refresh_updates=1"


def test_short_run_gives_finite_curves_and_the_summary_table():
    ops = ["bn", "median", "renorm", "lsbn"] + ([f"population:{FAST_EMA}"] if HAS_POPULATION else [])
    model = build_model("mlp_bn", seed=1)
    state = snapshot(model)
    result = compare(model, ops, batch_sizes=(2, 8), steps=4, points=2, seed=0)
    assert_unchanged(model, state)
    curves, summary = result.tables["compare_curves"], result.tables["compare_summary"]
    assert list(curves.columns[: len(CURVE_COLUMNS)]) == CURVE_COLUMNS
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == SUMMARY_COLUMNS
    assert len(summary) == len(ops) * 2 and set(summary["op"]) == set(ops)
    assert set(curves["split"]) == {"train", "test"} and set(curves["step"]) == {2, 4}
    numbers = curves[["loss", "accuracy", "epoch"]].to_numpy()
    assert pd.notna(numbers).all() and (abs(numbers) < float("inf")).all()
    assert curves["accuracy"].between(0, 1).all()
    assert (summary["steps"] == 4).all() and not summary["diverged"].any()
    assert set(summary["status"]) <= {"ok", "did not learn"}
    assert summary.loc[summary["batch_size"] == 8, "lr"].eq(0.05 * 8 / 32).all()
    assert result.findings[0].startswith("Equal budget in steps") and result.headline
    stats = result.tables["compare_stats"]
    assert len(stats) == len(ops) * 2 and (stats["seeds"] == 1).all()
    assert set(stats["verdict"]) == {"baseline", "one seed"}


def test_bn_run_equals_a_plain_training_loop():
    """The baseline run against an independent SGD loop on the same seeded batches (float64)."""
    model = build_model("mlp_bn", seed=2).double()
    steps, batch_size, lr = 5, 4, 0.05
    result = compare(model, ["bn"], batch_sizes=(batch_size,), steps=steps, points=1, lr=lr, reference_batch_size=batch_size, seed=3)
    train_x, train_y, test_x, test_y = default_data(torch.device("cpu"), torch.float64)
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=True)
    losses = []
    for _, (x, y) in zip(range(steps), loader):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        test_loss = F.cross_entropy(net(test_x), test_y).item()
    row = result.tables["compare_summary"].iloc[0]
    assert row["final_test_loss"] == pytest.approx(test_loss, rel=1e-12)
    assert row["final_train_loss"] == pytest.approx(sum(losses) / steps, rel=1e-12)


def test_seeded_runs_repeat_and_options_reach_the_op():
    first = compare("mlp_bn", ["median"], batch_sizes=(4,), steps=4, points=2, op_options={"median": {"backward": "smoothed"}})
    second = compare("mlp_bn", ["median"], batch_sizes=(4,), steps=4, points=2, op_options={"median": {"backward": "smoothed"}})
    exact = compare("mlp_bn", ["median"], batch_sizes=(4,), steps=4, points=2)
    loss = lambda r: r.tables["compare_curves"]["loss"].to_numpy()  # noqa: E731
    assert (loss(first) == loss(second)).all()
    assert not (loss(first) == loss(exact)).all()


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="got 1"):
        compare("mlp_bn", ["bn"], batch_sizes=(1,))
    with pytest.raises(UnknownNameError, match="median"):
        compare("mlp_bn", ["meadian"])


def test_cli_writes_tables_atomically_and_rejects_bad_input(tmp_path):
    from normscope.cli.app import app

    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["compare", "--ops", "bn,renorm", "--batch-size", "2,4", "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "tables").iterdir())
    assert names == [f"compare_{t}.{e}" for t in ("curves", "stats", "summary") for e in ("csv", "parquet")]
    summary = pd.read_parquet(out / "tables" / "compare_summary.parquet")
    assert len(summary) == 4 and summary.drop(columns="chance_loss").equals(pd.read_csv(out / "tables" / "compare_summary.csv").drop(columns="chance_loss"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    for args, message in [
        (["--ops", "bn,foo"], "unknown normalization op 'foo'"),
        (["--ops", "renorm:rmaxx=2"], "takes no option 'rmaxx'"),
        (["--ops", "microbatch=2"], "comes before any op"),
        (["--loss", "hinge"], "unknown --loss"),
        (["--batch-size", "1,8"], "--batch-size"),
        (["--out", str(out)], "already exists"),
    ]:
        bad = runner.invoke(app, ["compare", "--steps", "2", "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_two_variants_of_one_class_keep_their_labels_and_options():
    ops = "renorm:ghost=2,bn_steps=0,rmax_steps=0,dmax_steps=0,renorm:rmax=1.5,bn_steps=0,rmax_steps=0,dmax_steps=0,renorm"
    variants = parse_variants(ops)
    assert [v.label for v in variants] == [
        "renorm:ghost=2,bn_steps=0,rmax_steps=0,dmax_steps=0", "renorm:rmax=1.5,bn_steps=0,rmax_steps=0,dmax_steps=0", "renorm",
    ]
    built = [v.build(build_model("mlp_bn")).net[2] for v in variants]
    assert (built[0].ghost, built[0].rmax) == (2, 3.0) and (built[1].ghost, built[1].rmax) == (None, 1.5)
    assert built[2].bn_steps == 5000  # Ioffe's schedule by default
    result = compare("mlp_bn", ops, batch_sizes=(4,), steps=3, points=1)
    summary = result.tables["compare_summary"]
    assert list(summary["op"]) == [v.label for v in variants]
    assert summary["final_test_loss"].nunique() == 3
    same = compare("mlp_bn", [partial(BatchRenorm, ghost=2), partial(BatchRenorm, ghost=4), "bn", "bn"], batch_sizes=(4,), steps=2, points=1)
    assert list(same.tables["compare_summary"]["op"]) == ["BatchRenorm:ghost=2", "BatchRenorm:ghost=4", "bn", "bn #2"]


def test_parse_variants_reads_the_papers_settings():
    (bn, pop, two) = parse_variants("bn,population:microbatch=1,rotation=hadamard,r_m=0,r_v=0.8,ema=0.2,warmup=200;two_stage:chunk=4,label=ts")
    assert bn.op == "bn" and bn.options == {}
    assert pop.options == {"microbatch": 1, "rotation": "hadamard", "r_m": 0, "r_v": 0.8, "momentum": 0.2, "warmup": 200}
    assert (two.label, two.op, two.trainer, two.chunk_size) == ("ts", "population", "two_stage", 4)
    norm = pop.build(build_model("mlp_bn")).net[2]
    assert (norm.momentum, norm.r_m, norm.r_v, norm.warmup, norm.rotation_kind) == (0.2, 0, 0.8, 200, "hadamard")


def test_equal_examples_budget_ema_steps_and_two_stage():
    result = compare(
        "mlp_bn", f"bn,population:{FAST_EMA},two_stage:{FAST_EMA}", batch_sizes=(2, 8), examples=32, points=1,
    )
    summary = result.tables["compare_summary"]
    assert (summary["examples"] == 32).all() and (summary["budget"] == "examples").all()
    assert summary.groupby("batch_size")["steps"].first().to_dict() == {2: 16, 8: 4}
    assert summary.set_index(["op", "batch_size"])["ema_steps"].to_dict() == {
        (op, b): (0 if op == "bn" else 2 + 1) for op in summary["op"].unique() for b in (2, 8)
    }
    assert list(summary["trainer"].unique()) == ["backprop", "two_stage"]
    assert "16 steps, 32 examples" in result.findings[0] and "4 steps, 32 examples" in result.findings[0]
    assert (summary["seconds_per_step"] > 0).all()


def test_seeds_give_mean_and_std_and_a_winner_only_beyond_the_spread():
    result = compare("mlp_bn", ["bn", "lsbn"], batch_sizes=(8,), steps=3, points=1, seeds=2, seed=5)
    summary, stats = result.tables["compare_summary"], result.tables["compare_stats"]
    assert sorted(summary["seed"].unique()) == [5, 6] and len(summary) == 4
    row = stats.set_index("op").loc["lsbn"]
    accs = summary.loc[summary["op"] == "lsbn", "final_test_accuracy"]
    assert row["test_accuracy_mean"] == pytest.approx(accs.mean()) and row["test_accuracy_std"] == pytest.approx(accs.std(ddof=1))
    assert compare_means([0.9, 0.92], [0.5, 0.52]) == "higher" and compare_means([0.9, 0.5], [0.7, 0.71]) == "within spread"
    assert compare_means([0.9], [0.5]) == "one seed"
    tied = pd.DataFrame(dict(op=["a", "a", "b", "b"], batch_size=8, final_test_accuracy=[0.9, 0.5, 0.7, 0.72],
                             final_test_loss=1.0, status="ok", diverged=False, seed=[0, 1, 0, 1]))
    assert "no winner" in " ".join(findings(tied))


def test_did_not_learn_and_diverged_against_chance():
    model = build_model("mlp_bn", seed=0)
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.zero_()
    flat = compare(model, ["bn"], batch_sizes=(4,), steps=2, lr=0.0, points=1)
    row = flat.tables["compare_summary"].iloc[0]
    assert row["final_test_loss"] == pytest.approx(math.log(10)) and row["status"] == "did not learn"
    assert "did not learn" in flat.findings[-1]
    blown = compare("mlp_bn", ["bn"], batch_sizes=(4,), steps=20, lr=1e4, points=1).tables["compare_summary"].iloc[0]
    assert blown["status"] == "diverged" and blown["diverged"]
    assert run_status(float("nan"), 1.0, 2.3) == "diverged" and run_status(0.1, 7.0, 2.3) == "diverged"
    assert run_status(0.1, 0.2, 2.3) == "ok" and run_status(0.1, 5.0, None) == "ok"


def test_layer_norm_models_swap_layernorm_and_rmsnorm_sites():
    result = compare("transformer_ln", "model,rmsnorm,bn_ln", batch_sizes=(4,), steps=2, points=1)
    assert list(result.tables["compare_summary"]["op"]) == ["model", "rmsnorm", "bn_ln"]
    assert result.tables["compare_summary"]["final_test_loss"].nunique() == 3
    with pytest.raises(NoNormSitesError):
        compare("transformer_ln", ["bn"], batch_sizes=(4,), steps=1)


def test_cli_options_seeds_data_and_loss(tmp_path):
    from normscope.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "compare", "--model", "mlp_bn", "--ops", f"bn,population:microbatch=2,rotation=hadamard,{FAST_EMA}", "-b", "4",
        "--steps", "2", "--seeds", "2", "--data", "digits-flat", "--loss", "cross_entropy", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    stats = pd.read_csv(out / "tables" / "compare_stats.csv")
    assert list(stats["seeds"]) == [2, 2] and "Equal budget in steps" in result.output
