"""The compare engine and ``normscope compare``: short seeded runs, the table contract, no mutation."""

import copy
import importlib.util

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from normscope.compare import compare, default_data
from normscope.errors import InvalidArgumentError, UnknownNameError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model

HAS_POPULATION = importlib.util.find_spec("normscope.ops.population") is not None
CURVE_COLUMNS = ["op", "batch_size", "step", "epoch", "split", "loss", "accuracy"]
SUMMARY_COLUMNS = ["op", "batch_size", "final_train_loss", "final_test_loss", "final_test_accuracy", "seconds"]


def test_short_run_gives_finite_curves_and_the_summary_table():
    ops = ["bn", "median", "renorm", "lsbn"] + (["population"] if HAS_POPULATION else [])
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
    assert summary.loc[summary["batch_size"] == 8, "lr"].eq(0.05 * 8 / 32).all()
    assert len(result.findings) == 2 and result.headline


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
    assert names == ["compare_curves.csv", "compare_curves.parquet", "compare_summary.csv", "compare_summary.parquet"]
    summary = pd.read_parquet(out / "tables" / "compare_summary.parquet")
    assert len(summary) == 4 and summary.equals(pd.read_csv(out / "tables" / "compare_summary.csv"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    for args, message in [
        (["--ops", "bn,foo"], "unknown normalization op 'foo'"),
        (["--batch-size", "1,8"], "--batch-size"),
        (["--out", str(out)], "already exists"),
    ]:
        bad = runner.invoke(app, ["compare", "--steps", "2", "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
