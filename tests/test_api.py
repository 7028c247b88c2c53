"""The notebook API: same numbers as the CLI, Parquet round trip, atomic output, no mutation."""

from __future__ import annotations

import copy
import html
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import normscope
from normscope.analyzers import ANALYZERS
from normscope.cli.app import app
from normscope.data import load_digits
from normscope.errors import AnalyzerError, DataShapeError, NoNormSitesError, OutputError, UnknownNameError
from normscope.guard import assert_unchanged, snapshot
from normscope.models import build_model
from normscope.result import AnalysisResult
from normscope.train import train_reference
from tests.cli_helpers import interrupting_loader, no_norm_net, small_bn_net


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return train_reference()


@pytest.fixture(scope="module")
def api_result(trained) -> AnalysisResult:
    return normscope.analyze(trained, analyzers="stats", batches=2)


def test_api_gives_the_same_numbers_as_the_cli(api_result, tmp_path):
    out = tmp_path / "cli"
    run = CliRunner().invoke(app, ["analyze", "--analyzers", "stats", "--batches", "2", "--out", str(out)])
    assert run.exit_code == 0, run.output
    saved = AnalysisResult.load(out)
    assert sorted(saved.tables) == sorted(api_result.tables)
    for name, table in api_result.tables.items():
        pd.testing.assert_frame_equal(saved.tables[name], table.reset_index(drop=True), check_exact=True)
    assert saved.headline == api_result.summary()["headline"]
    assert saved.findings == api_result.findings


def test_tables_round_trip_through_parquet(api_result, tmp_path):
    api_result = copy.deepcopy(api_result)
    api_result.findings["model"] = ["a sentence"]
    api_result.headline["stats"]["not_a_number"] = float("nan")
    out = api_result.save(tmp_path / "out")
    loaded = AnalysisResult.load(out)
    for name, table in api_result.tables.items():
        pd.testing.assert_frame_equal(loaded.tables[name], table.reset_index(drop=True), check_exact=True)
    assert loaded.findings == api_result.findings
    assert loaded.headline["stats"]["not_a_number"] is None
    assert loaded.meta["sites"] == api_result.meta["sites"]
    assert sorted(p.name for p in (out / "tables").iterdir()) == sorted(
        f"{name}.{ext}" for name in api_result.tables for ext in ("csv", "parquet")
    )


def test_to_html_and_repr_html_embed_the_rendered_report(api_result, tmp_path):
    path = api_result.to_html(tmp_path / "sub" / "r.html")
    page = path.read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html") and "net.5" in page
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]
    shown = api_result._repr_html_()
    assert shown.startswith('<iframe srcdoc="') and shown.endswith("></iframe>")
    embedded = html.unescape(shown[len('<iframe srcdoc="'):shown.index('" style=')])
    assert embedded.lstrip().lower().startswith("<!doctype html") and "net.5" in embedded


class Bomb:
    """A value whose text form raises, as a Ctrl-C or a failing disk would, mid-write."""

    def __init__(self, error: type[BaseException]) -> None:
        self.error = error

    def __str__(self) -> str:
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupt_or_error_while_saving_leaves_no_folder(api_result, tmp_path, error):
    broken = AnalysisResult(tables={**api_result.tables, "zz_broken": pd.DataFrame({"site": [Bomb(error)]})},
                            findings=api_result.findings, headline=api_result.headline, meta=api_result.meta)
    expected = KeyboardInterrupt if error is KeyboardInterrupt else OutputError
    with pytest.raises(expected) as caught:
        broken.save(tmp_path / "out")
    if expected is OutputError:
        assert "nothing was written" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_analysis_propagates_and_writes_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        normscope.analyze(small_bn_net(), data=interrupting_loader(batch_size=8), analyzers="stats", batches=3)


def test_save_refuses_a_non_empty_folder(api_result, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="already exists"):
        api_result.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_model_is_not_mutated_in_train_mode_with_grads_and_frozen_params():
    model = small_bn_net().train()
    images, labels = load_digits(split="test")
    torch.nn.functional.cross_entropy(model(images[:16]), labels[:16]).backward()
    model[2].weight.requires_grad_(False)
    model[4].weight.grad = None
    before = snapshot(model)
    result = normscope.analyze(model, data=(images[:32], labels[:32]), analyzers="stats,gls", batch_size=16, batches=1)
    assert_unchanged(model, before)
    assert result.meta["analyzers"] == ["stats", "gls"]
    assert result.meta["data"]["examples"] == 32


def test_model_is_not_mutated_on_the_reference_resnet():
    model = build_model("resnet_bn", seed=1).train()
    images, labels = load_digits(split="test")
    before = snapshot(model)
    result = normscope.analyze(model, data=(images[:32], labels[:32]), analyzers="stats", batch_size=16, batches=2)
    assert_unchanged(model, before)
    assert len(result.meta["sites"]) == 10


def test_data_forms_tuple_loader_and_float64_model():
    images, labels = load_digits(torch.float32, split="test")
    model = small_bn_net().double()
    loader = DataLoader(TensorDataset(images[:40], labels[:40]), batch_size=20)
    from_loader = normscope.analyze(model, data=loader, analyzers="stats", batches=2)
    from_tuple = normscope.analyze(model, data=(images[:40], labels[:40]), analyzers="stats", batch_size=20, batches=2)
    assert from_loader.meta["data"]["batches"] == from_tuple.meta["data"]["batches"] == 2
    assert from_loader.meta["data"]["source"] == "DataLoader(TensorDataset)"
    assert from_loader.tables["stats_channels"]["running_var"].tolist() == model[2].running_var.tolist()


def test_data_that_does_not_fit_gives_a_clear_error():
    model = small_bn_net()
    with pytest.raises(DataShapeError, match=r"inputs of shape \(10, 3\) do not fit Sequential"):
        normscope.analyze(model, data=(torch.randn(10, 3), torch.zeros(10, dtype=torch.int64)), analyzers="stats")
    with pytest.raises(DataShapeError, match=r"loss cross_entropy does not fit model outputs Tensor \(10, 10\) and targets \(10, 4\)"):
        normscope.analyze(model, data=(torch.randn(10, 64), torch.zeros(10, 4, dtype=torch.int64)), analyzers="stats")
    with pytest.raises(DataShapeError, match="has tensors of 9 and 10 examples"):
        normscope.analyze(model, data=(torch.randn(10, 64), torch.zeros(9, dtype=torch.int64)), analyzers="stats")
    with pytest.raises(DataShapeError, match=r"the batch \(10, 64\) has no targets; pass a loss"):
        normscope.analyze(model, data=torch.randn(10, 64), analyzers="stats")
    with pytest.raises(DataShapeError, match="must be a DataLoader"):
        normscope.analyze(model, data=object(), analyzers="stats")
    with pytest.raises(DataShapeError, match="must hold tensors"):
        normscope.analyze(model, data=[1, 2, 3], analyzers="stats")


def test_no_sites_unknown_and_missing_analyzers(monkeypatch):
    with pytest.raises(NoNormSitesError, match="Sequential has no normalization layer"):
        normscope.analyze(no_norm_net(), analyzers="stats")
    with pytest.raises(UnknownNameError, match="valid names: bias, dead, descent, gls, stats"):
        normscope.analyze(small_bn_net(), analyzers="stats,typo")
    monkeypatch.setitem(ANALYZERS, "ghost", "normscope.analyzers.ghost_not_written_yet:analyze")
    partial = normscope.analyze(small_bn_net(), analyzers=["ghost", "stats"], batches=1)
    assert list(partial.meta["analyzer_errors"]) == ["ghost"] and "stats_sites" in partial.tables
    with pytest.raises(AnalyzerError, match="analyzer ghost is not available"):
        normscope.analyze(small_bn_net(), analyzers=["ghost"], batches=1)


def test_load_rejects_a_folder_that_is_not_an_output(tmp_path: Path):
    with pytest.raises(OutputError, match="not a normscope output folder"):
        AnalysisResult.load(tmp_path)
