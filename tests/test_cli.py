"""The CLI end to end: the built-in default, a user checkpoint, sites, report, and the boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from normscope.cli.app import app
from normscope.result import AnalysisResult
from tests.cli_helpers import small_bn_net

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """``normscope analyze --analyzers stats`` on the built-in default, once for the module."""
    out = tmp_path_factory.mktemp("default") / "out"
    return out, runner.invoke(app, ["analyze", "--analyzers", "stats", "--out", str(out), "--batches", "2"])


def test_default_run_writes_tables_summary_and_report(default_run):
    out, result = default_run
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    for name in ("stats_channels", "stats_sites"):
        csv, parquet = pd.read_csv(out / "tables" / f"{name}.csv"), pd.read_parquet(out / "tables" / f"{name}.parquet")
        assert len(parquet) > 0 and list(csv.columns) == list(parquet.columns)
        pd.testing.assert_frame_equal(csv, parquet, check_dtype=False, rtol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["model"]["name"] == "mlp_bn (trained on digits)"
    assert [site["name"] for site in summary["meta"]["sites"]] == ["net.2", "net.5"]
    assert summary["meta"]["data"] == {
        "source": "digits", "batch_size": 128, "batches": 2, "input_shape": [1, 8, 8], "examples": 1400, "spec": "digits"
    }
    assert summary["headline"]["stats"] and summary["findings"]["stats"]
    assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert "normscope analyze" in result.stdout
    progress = result.stderr.splitlines()  # off a terminal: one progress line per stage, no warning or error
    assert progress and all(line.startswith("normscope: ") for line in progress)
    assert not any(word in line for line in progress for word in ("warning", "error", "Warning"))
    assert any(line.startswith("normscope: analyzers") and "done" in line for line in progress)
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_report_rebuilds_the_page_from_saved_tables(default_run, tmp_path):
    out, _ = default_run
    page = out / "report.html"
    page.unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(page) and page.stat().st_size > 0
    compare = tmp_path / "compare"
    trained = runner.invoke(app, ["compare", "--ops", "bn,renorm", "--batch-size", "4", "--steps", "2", "--out", str(compare)])
    assert trained.exit_code == 0, trained.output
    assert "renorm" not in page.read_text()
    result = runner.invoke(app, ["report", str(out), "--compare", str(compare)])
    assert result.exit_code == 0, result.output
    assert "renorm" in page.read_text() and "compare_summary" in page.read_text()
    missing = runner.invoke(app, ["report", str(out), "--compare", str(tmp_path)])
    assert missing.exit_code == 1 and missing.stderr.count("\n") == 1 and "no compare_* tables" in missing.stderr


def test_report_on_a_folder_that_is_not_an_output(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr == f"normscope: error: {tmp_path} is not a normscope output folder (no summary.json); pass a folder written by normscope analyze\n"


def test_user_checkpoint_with_factory_model(tmp_path):
    model = small_bn_net()
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, tmp_path / "user.pt")
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(tmp_path / "user.pt"), "--model", "tests.cli_helpers:small_bn_net",
                                 "--analyzers", "stats", "--out", str(out), "--batch-size", "32", "--batches", "1"])
    assert result.exit_code == 0, result.output
    saved = AnalysisResult.load(out)
    assert saved.meta["model"]["name"] == "user.pt (tests.cli_helpers:small_bn_net)"
    assert saved.meta["sites"] == [{"name": "2", "kind": "batchnorm", "module_type": "BatchNorm1d", "functional": False}]
    assert saved.meta["data"]["batch_size"] == 32
    channels = saved.tables["stats_channels"]
    expected = model.state_dict()["2.running_mean"].double().numpy()
    assert channels["running_mean"].to_numpy() == pytest.approx(expected, rel=1e-6)


def test_sites_lists_modules_functional_calls_and_unrecognized(tmp_path):
    torch.save(small_bn_net().state_dict(), tmp_path / "user.pt")
    listed = runner.invoke(app, ["sites", str(tmp_path / "user.pt"), "--model", "tests.cli_helpers:small_bn_net"])
    assert listed.exit_code == 0 and "BatchNorm1d" in listed.stdout and "batchnorm" in listed.stdout
    functional = runner.invoke(app, ["sites", "--model", "tests.cli_helpers:functional_ln_net"])
    assert functional.exit_code == 0 and "F.layer_norm" in functional.stdout and "layernorm" in functional.stdout
    unknown = runner.invoke(app, ["sites", "--model", "tests.cli_helpers:bn_and_unknown_norm_net"])
    assert unknown.exit_code == 0 and "ZNorm" in unknown.stdout and "not recognized" in unknown.stdout
    builtin = runner.invoke(app, ["sites", "--model", "transformer_rms"])
    assert builtin.exit_code == 0 and builtin.stdout.count("rmsnorm") == 5
    none = runner.invoke(app, ["sites", "--model", "tests.cli_helpers:no_norm_net"])
    assert none.exit_code == 1 and none.stderr.startswith("normscope: error: ") and none.stderr.count("\n") == 1


def test_unknown_analyzer_and_device_are_named_with_the_valid_choices(tmp_path):
    result = runner.invoke(app, ["analyze", "--analyzers", "stats,nope", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr == "normscope: error: unknown analyzer 'nope'; valid names: bias, dead, descent, gls, stats\n"
    result = runner.invoke(app, ["analyze", "--device", "tpu9", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "unknown device 'tpu9'" in result.stderr and "cpu" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_folder_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    arguments = ["analyze", "--model", "tests.cli_helpers:small_bn_net", "--analyzers", "stats", "--batches", "1", "--out", str(out)]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 1 and "already exists" in refused.stderr and (out / "keep.txt").exists()
    replaced = runner.invoke(app, arguments + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists() and (out / "summary.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupt_leaves_no_output_and_says_so(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", "--model", "tests.cli_helpers:small_bn_net", "--data", "tests.cli_helpers:interrupting_loader",
                                 "--batch-size", "16", "--batches", "3", "--analyzers", "stats", "--out", str(out)])
    assert result.exit_code == 130
    assert result.stderr == "normscope: interrupted; nothing was written\n"
    assert list(tmp_path.iterdir()) == []


def test_missing_analyzer_module_is_reported_for_that_name_only(tmp_path, monkeypatch):
    from normscope.analyzers import ANALYZERS

    monkeypatch.setitem(ANALYZERS, "ghost", "normscope.analyzers.ghost_not_written_yet:analyze")
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", "--model", "tests.cli_helpers:small_bn_net", "--analyzers", "stats,ghost",
                                 "--batches", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "normscope: warning: analyzer ghost is not available (No module named 'normscope.analyzers.ghost_not_written_yet')"
    )
    assert AnalysisResult.load(out).meta["analyzers"] == ["stats"]
    alone = runner.invoke(app, ["analyze", "--model", "tests.cli_helpers:small_bn_net", "--analyzers", "ghost",
                                "--out", str(tmp_path / "alone")])
    assert alone.exit_code == 1 and "no analyzer could run" in alone.stderr and not (tmp_path / "alone").exists()


def run_cli(*arguments: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "normscope.cli.app", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_real_subprocess_default_run_and_error_boundary(tmp_path):
    out = tmp_path / "out"
    done = run_cli("analyze", "--analyzers", "stats", "--batches", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "summary.json").exists() and (out / "tables" / "stats_sites.parquet").exists()
    missing = run_cli("analyze", str(tmp_path / "gone.pt"), "--model", "mlp_bn", "--out", str(tmp_path / "x"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"normscope: error: checkpoint file not found: {tmp_path / 'gone.pt'}; check the path\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["analyze", "sites", "report", "compare", "recalibrate", "train"])
def test_help_shows_boolean_options_as_flags(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--debug" in result.output and "--help" in result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output, result.output
