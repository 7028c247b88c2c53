"""The terminal summary of ``normscope analyze``: every line built from a list lists all of it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from normscope.api import analyze
from normscope.budget import Budget
from normscope.cli.summary import print_summary, summary_parts
from normscope.data import load_digits
from normscope.models import build_model
from normscope.result import AnalysisResult

CUT_DESCENT = {"forward": 0.01, "gradient": 0.5, "hvp": 100.0, "example_chunk": 1.0}
ITEM = re.compile(r"^\s*(•|[a-z]+ \(|critical|warning)")


def _printed(result: AnalysisResult, width: int = 100) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    print_summary(result, Path("out"), console, elapsed=2.5)
    return [line.strip("│╭╮╰╯─ ").rstrip() for line in console.export_text().splitlines()]


def _no_dangling_colon(lines: list[str]) -> None:
    for index, line in enumerate(lines):
        if line.endswith(":"):
            following = [ln for ln in lines[index + 1:] if ln.strip()]
            assert following and following[0].lstrip().startswith(("•", "descent", "gls", "bias", "stats")), (line, following[:1])


@pytest.fixture(scope="module")
def cut_run():
    x, y = load_digits(torch.float64)
    return analyze(build_model("mlp_bn").double(), data=(x[:128], y[:128]), analyzers="stats,descent", batch_size=64,
                   batches=1, lr=0.1, budget=Budget(4.0, dict(CUT_DESCENT), clock="planned"))


def test_budget_list_is_printed_whole(cut_run):
    budget = [str(s) for s in cut_run.findings["budget"]]
    assert budget[0].endswith(":") and len(budget) == 1 + len(cut_run.meta["budget"]["cuts"])
    text = " ".join(_printed(cut_run, width=400))
    for sentence in budget:
        assert sentence in text, sentence
    _no_dangling_colon(_printed(cut_run, width=400))


def test_lists_with_no_items_leave_no_title_or_colon_behind(cut_run):
    bare = AnalysisResult(tables={}, findings={"gls": []}, headline={"stats": {}},
                          meta={**cut_run.meta, "sites": [], "budget": {"seconds": 120.0, "cuts": []}})
    lines = _printed(bare)
    assert any(re.match(r"sites\s+none recorded$", line) for line in lines)
    assert not any(line in ("gls", "stats", "most severe findings") for line in lines), lines
    _no_dangling_colon(lines)
    titles = [part.title for part in summary_parts(bare, Path("out")) if getattr(part, "title", None)]
    assert titles == [], "no section without rows"


def test_times_read_as_seconds(cut_run):
    line = next(line for line in _printed(cut_run) if line.startswith("time"))
    assert re.match(r"time\s+2\.5 s in all \(analysis \d+(\.\d)? s;", line), line
