"""Advice that fits the run: the recalibration a stale-statistics finding recommends follows how
the model was given (a checkpoint, a factory, the built-in default, the API)."""

from __future__ import annotations

import pandas as pd
import torch
from typer.testing import CliRunner

from normscope.api import analyze
from normscope.cli.app import app
from normscope.result import AnalysisResult
from normscope.rules import RECALIBRATE_HINT, advise, recalibrate_hint
from tests.cli_helpers import small_bn_net

FACTORY = "tests.cli_helpers:small_bn_net"
ARGS = ["--analyzers", "stats", "--batch-size", "32", "--batches", "1"]


def _stale(result: AnalysisResult) -> list[str]:
    return [str(f) for f in result.findings["stats"] if "population statistics" in str(f)]


def test_api_analysis_advises_the_api_call(digits32):
    result = analyze(small_bn_net(), data=digits32, analyzers="stats", batch_size=32, batches=1)
    stale = _stale(result)
    assert stale and all(RECALIBRATE_HINT in s or RECALIBRATE_HINT[0].upper() + RECALIBRATE_HINT[1:] in s for s in stale)
    hint = recalibrate_hint("ckpt.pt", "resnet_bn", "mymod:loader")
    advised = advise(result.findings, hint)["stats"]
    for before, after in zip(result.findings["stats"], advised):
        assert after.record() | {"sentence": ""} == before.record() | {"sentence": ""}
        assert ("`normscope recalibrate ckpt.pt --model resnet_bn --data mymod:loader --out fixed.pt`" in after) == (before in stale)


def test_cli_factory_without_checkpoint_gets_the_api_call_everywhere(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", "--model", FACTORY, "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    saved = AnalysisResult.load(out)
    stale = _stale(saved)
    assert stale and all("`normscope.recalibrate(small_bn_net(), data)` (after `from tests.cli_helpers import small_bn_net`)" in s
                         for s in stale)
    written = pd.read_csv(out / "tables" / "findings.csv")["sentence"]
    page = (out / "report.html").read_text()
    assert not written.str.contains("normscope recalibrate ").any() and "normscope recalibrate " not in page


def test_cli_checkpoint_gets_the_command_with_its_model(tmp_path):
    torch.save(small_bn_net().state_dict(), tmp_path / "user.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "user.pt"), "--model", FACTORY, "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    command = f"`normscope recalibrate {tmp_path / 'user.pt'} --model {FACTORY} --out fixed.pt`"
    assert all(command in s for s in _stale(AnalysisResult.load(out))) and _stale(AnalysisResult.load(out))


def test_built_in_default_has_no_checkpoint_to_recalibrate():
    hint = recalibrate_hint(None, None)
    assert hint.startswith("the built-in model was trained for this analysis and not saved") and RECALIBRATE_HINT in hint
