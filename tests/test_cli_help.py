"""``normscope --help`` and every command's help at 80 columns: flags as flags, no text cut short."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from normscope.cli.app import app

COMMANDS = ["analyze", "sites", "report", "compare", "recalibrate", "train"]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}, prog_name="normscope")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]], ids=["normscope", *COMMANDS])
def test_help_at_80_columns_shows_flags_as_flags_and_cuts_nothing(command):
    text = _help(*command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "<bool>" not in text
    assert "…" not in text, [line for line in text.splitlines() if "…" in line]


def test_loss_help_is_whole():
    text = " ".join(line.strip("│ ") for line in _help("analyze").splitlines())
    assert "pkg.module:function called as fn(outputs, targets)." in " ".join(text.split())
    assert "[default: (cross_entropy with targets, lm for token ids)]" in " ".join(text.split())
