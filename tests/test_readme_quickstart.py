"""The README's quick start is copy-paste complete, and ``.ci/run`` runs it as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_blocks() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_clones_enters_and_activates_a_virtual_environment():
    main, tests = _quick_start_blocks()
    assert re.fullmatch(r"git clone \S.* normscope && cd normscope", main[0]), main[0]
    assert main[1] == "python3 -m venv .venv && source .venv/bin/activate"
    assert main[2] == "pip install torch==2.13.0 && pip install -e . && normscope analyze"
    assert tests == ['pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q']


def test_ci_runs_the_quick_start_lines_as_written_in_order():
    main, tests = _quick_start_blocks()
    expected = main[1:] + tests  # all but the clone: CI runs in the checkout
    commands = _ci_commands()
    positions = [commands.index(line) for line in expected]
    assert positions == sorted(positions) and positions[-1] == len(commands) - 1, commands
    assert "apt-get install -y -qq chromium chromium-driver >/dev/null" in commands
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "apt-get install chromium chromium-driver" in readme
