"""normscope.Monitor under misuse and failure: re-entry only adds rows, the monitor's own failures are
rows (never exceptions in the loop), non-finite gradients and swapped norm layers are found."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normscope
from normscope.models import build_model
from tests.test_monitor import _state


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so that NaNs compare equal when they are the same NaN."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _loop(model, optimizer, x, y, steps: int, monitor=None, poison: int | None = None) -> None:
    for step in range(steps):
        pick = torch.randperm(x.shape[0])[:32]
        batch = (x[pick].clone(), y[pick])
        if step == poison:
            batch[0][0, 0] = float("nan")
        with monitor.step(batch) if monitor else torch.enable_grad():
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
        optimizer.zero_grad()


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(build_model("mlp_bn"), nn.Dropout(0.2))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_a_monitor_entered_again_only_adds_rows(digits32, tmp_path):
    """The same monitor in a second ``with``, then a new monitor on the same folder: every row of the
    first block is still there, and steps go on (0-2, 3-5, 6-8)."""
    x, y = digits32
    model, optimizer = _setup()
    monitor = normscope.Monitor(model, tmp_path / "run", every=1, flush_seconds=0)
    with monitor:
        _loop(model, optimizer, x, y, 3, monitor)
    first = pd.read_parquet(tmp_path / "run")
    with monitor:
        _loop(model, optimizer, x, y, 3, monitor)
    second = pd.read_parquet(tmp_path / "run")
    with normscope.Monitor(model, tmp_path / "run", every=1, flush_seconds=0) as again:
        _loop(model, optimizer, x, y, 3, again)
    third = pd.read_parquet(tmp_path / "run")
    assert sorted(set(first["step"])) == [0, 1, 2]
    assert sorted(set(second["step"])) == list(range(6)) and sorted(set(third["step"])) == list(range(9))
    assert len(second) == 2 * len(first) and len(third) == 3 * len(first)
    key = ["step", "site", "metric"]
    kept = first.merge(third, on=key, suffixes=("", "_after"))
    assert len(kept) == len(first) and (kept["value"] == kept["value_after"]).all()
    assert not third.duplicated(key).any()


def test_a_second_lightning_fit_with_the_same_callback_only_adds_rows(tmp_path):
    lightning = pytest.importorskip("lightning")
    from normscope.data import load_digits
    from normscope.integrations.lightning import NormscopeCallback

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model("mlp_bn")

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    lightning.seed_everything(0, verbose=False)
    images, labels = load_digits()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:128], labels[:128]), batch_size=32)
    module = Classifier()
    callback = NormscopeCallback(tmp_path / "run", every=1, flush_seconds=0)
    counts = []
    for _ in range(2):
        trainer = lightning.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(module, data)
        counts.append(len(pd.read_parquet(tmp_path / "run")))
    rows = pd.read_parquet(tmp_path / "run")
    assert counts[1] == 2 * counts[0] > 0
    assert sorted(set(rows["step"])) == list(range(6))
    assert not rows.duplicated(["step", "site", "metric"]).any()


def test_nan_in_the_batch_at_a_curvature_step_is_rows_not_an_exception(digits32, tmp_path):
    """A NaN in one example at a curvature step: training goes on bit-identical to the same run without
    the monitor (NaNs included), the curvature's failure is an error row with its message, the
    non-finite gradients are rows from that step on, and the warning comes once."""
    x, y = digits32
    model, optimizer = _setup()
    _loop(model, optimizer, x, y, 8, poison=3)
    plain = _state(model, optimizer)
    model, optimizer = _setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with normscope.Monitor(model, tmp_path / "run", every=1, every_curvature=3, optimizer=optimizer,
                               flush_seconds=0) as monitor:
            _loop(model, optimizer, x, y, 8, monitor, poison=3)
    watched = _state(model, optimizer)
    assert plain.keys() == watched.keys()
    assert all(torch.equal(_bits(plain[k]), _bits(watched[k])) for k in plain), "changed by the monitor"
    assert torch.isnan(watched["p:0.net.1.weight"]).all()  # the NaN did spread: the test is not vacuous
    rows = pd.read_parquet(tmp_path / "run")
    errors = rows[rows["metric"] == "error"]
    assert sorted(errors["step"]) == [3, 6]  # both curvature steps after the NaN, none before
    assert errors["site"].str.startswith("curvature: FloatingPointError: the gradient").all()
    nonfinite = rows[rows["metric"] == "nonfinite_gradient"]
    assert sorted(set(nonfinite["step"])) == [3, 4, 5, 6, 7]
    assert {"0.net.1", "0.net.2", "0.net.7"} <= set(nonfinite["site"])
    assert rows.loc[rows["step"] == 0, "metric"].eq("lambda_max").any()
    assert sum("curvature: FloatingPointError" in str(w.message) for w in caught) == 1


def test_a_failing_loss_of_the_monitor_is_an_error_row(digits32, tmp_path):
    """Any exception in the monitor's own work (here its curvature loss) is a row; the loop does not see it."""
    x, y = digits32
    model, optimizer = _setup()

    def broken(output, target):
        raise ValueError("no such loss")

    with pytest.warns(RuntimeWarning, match="no such loss"):
        with normscope.Monitor(model, tmp_path / "run", every=2, every_curvature=2, loss_fn=broken,
                               optimizer=optimizer, flush_seconds=0) as monitor:
            _loop(model, optimizer, x, y, 4, monitor)
    rows = pd.read_parquet(tmp_path / "run")
    errors = rows[rows["metric"] == "error"]
    assert list(errors["step"]) == [0, 2] and (errors["site"] == "curvature: ValueError: no such loss").all()
    assert set(rows.loc[rows["metric"] == "r2_mean", "step"]) == {0, 2}


def test_a_replaced_removed_or_added_norm_layer_is_found_at_the_next_recorded_step(digits32, tmp_path):
    x, y = digits32
    model, optimizer = _setup()
    net = model[0].net
    with normscope.Monitor(model, tmp_path / "run", every=2, flush_seconds=0) as monitor:
        _loop(model, optimizer, x, y, 3, monitor)  # steps 0-2
        net[2] = nn.BatchNorm1d(64)
        optimizer.add_param_group({"params": list(net[2].parameters())})
        with pytest.warns(RuntimeWarning, match="0.net.2 replaced"):
            _loop(model, optimizer, x, y, 2, monitor)  # 3, 4
        net[5] = nn.Identity()
        net[3] = nn.Sequential(nn.LayerNorm(64), nn.ReLU())
        with pytest.warns(RuntimeWarning, match="site"):
            _loop(model, optimizer, x, y, 2, monitor)  # 5, 6
    rows = pd.read_parquet(tmp_path / "run")
    changes = rows[rows["metric"].str.startswith("site_")]
    assert set(zip(changes["step"], changes["site"], changes["metric"])) == {
        (4, "0.net.2", "site_replaced"), (6, "0.net.5", "site_removed"), (6, "0.net.3.0", "site_added")}
    stats = rows[rows["metric"] == "r2_mean"]
    assert set(stats.loc[stats["site"] == "0.net.2", "step"]) == {0, 2, 4, 6}
    assert set(stats.loc[stats["site"] == "0.net.5", "step"]) == {0, 2, 4}
    assert set(stats.loc[stats["site"] == "0.net.3.0", "step"]) == {6}
