"""The run report (``normscope report RUN``): analyze's template and rules over time, side by side
with an analysis, read in headless Chromium."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from normscope import rules
from normscope.api import analyze
from normscope.cli.app import app
from normscope.data import load_digits
from normscope.models import build_model
from normscope.reports.timeseries import FINDINGS_FILE, REPORT_FILE, curvature, findings, render_run, states

STEPS = list(range(0, 100, 10))
# The variance ratio of a freshly initialized BatchNorm: near 0.03 at first, back inside 0.5-2 from step 50.
RATIO = [0.03, 0.05, 0.09, 0.2, 0.45, 0.8, 0.95, 1.0, 1.0, 1.02]
DRIFT = [0.2, 0.7, 2.5, 0.6, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]


def _rows() -> pd.DataFrame:
    records = []
    for i, step in enumerate(STEPS):
        for site, ratio in (("net.2", RATIO[i]), ("net.5", 1.0)):
            records += [(step, site, "var_ratio_median", ratio), (step, site, "mean_drift_mean", DRIFT[i] if site == "net.2" else 0.1),
                        (step, site, "eps_fraction_max", 0.2 if site == "net.5" and step >= 60 else 0.01),
                        (step, site, "eps_dominated_fraction", 0.0), (step, site, "r2_median", 0.05), (step, site, "r2_mean", 0.05)]
        records.append((step, "model", "lr", 0.1))
        if step % 30 == 0:
            records += [(step, "model", "a_crit", 0.5 if step < 60 else 0.08), (step, "model", "lambda_max", 5.0),
                        (step, "model", "stability_limit", 0.4)]
    return pd.DataFrame([(s, 0, site, m, v) for s, site, m, v in records], columns=["step", "rank", "site", "metric", "value"])


@pytest.fixture()
def run_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    _rows().to_parquet(folder / "part-0-1-0.parquet")
    return folder


@pytest.fixture(scope="module")
def analysis_folder(tmp_path_factory):
    x, y = load_digits(torch.float64)
    result = analyze(build_model("mlp_bn").double(), data=(x[:128], y[:128]), analyzers="stats", batch_size=64, batches=1)
    folder = tmp_path_factory.mktemp("analysis") / "final"
    result.save(folder)
    return folder


def test_findings_over_time_use_analyzes_rules_and_thresholds():
    found = findings(_rows())
    ratio = found[(found["site"] == "net.2") & (found["label"] == "stale running variance")]
    assert ratio[["step", "last_step", "severity"]].values.tolist() == [[0, 40, "critical"]]
    assert ratio["finding"].iloc[0].startswith("net.2: stale running variance from step 0 to step 40 (variance ratio (batch / running) 0.03 at step 0")
    drift = found[found["label"] == "stale running mean"]
    assert drift[["site", "step", "last_step", "severity"]].values.tolist() == [["net.2", 10, 30, "critical"]]
    eps = found[found["label"] == "eps dominates"]
    assert eps[["site", "step", "last_step", "severity"]].values.tolist() == [["net.5", 60, 90, "note"]]
    assert "to the last recorded step (90)" in eps["finding"].iloc[0]
    crit = found[found["site"] == "model"]
    assert crit[["label", "step"]].values.tolist() == [["not a descent step", 60]]


def test_moving_analyzes_threshold_moves_the_run_finding(monkeypatch):
    monkeypatch.setattr(rules, "VAR_RATIO_BAND", (0.1, 2.0))
    found = states(_rows())
    assert sorted(found.loc[found["label"] == "stale running variance", "step"]) == [0, 10, 20]


def test_curvature_verdicts_are_analyzes_descent_rule():
    table = curvature(_rows())
    assert table["step"].tolist() == [0, 30, 60, 90]
    for row in table.itertuples():
        assert (row.verdict, row.severity) == rules.descent_verdict(row.lr, row.a_crit, row.lambda_max, math.nan)
    assert table["verdict"].tolist() == ["stable", "stable", "not a descent step", "not a descent step"]


def test_report_command_writes_the_analyze_styled_page_and_compares(run_folder, analysis_folder):
    result = CliRunner().invoke(app, ["report", str(run_folder), "--compare", str(analysis_folder)])
    assert result.exit_code == 0, result.output
    page = (run_folder / REPORT_FILE).read_text()
    assert '<header class="masthead">' in page and "Training run report" in page
    assert "What happened to each normalization layer during training, and when" in page
    for site in ("net.2", "net.5"):
        assert f'title="{site}"' in page
    assert page.count('data-figure="run_') == 3 and 'data-table="run_analysis"' in page
    assert f'<a href="../../{analysis_folder.parent.name}/final/report.html">its report</a>' in page
    assert (run_folder / FINDINGS_FILE).exists()
    side = page.split('data-table="run_analysis"')[1].split("</table>")[0]
    assert side.count("<tr>") == 1 + 2


@pytest.mark.browser
def test_run_report_first_screen_in_headless_chromium(run_folder, analysis_folder, browser):
    path = render_run(run_folder, compare=analysis_folder)
    browser.set_window_size(1280, 800)
    browser.get(path.as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    screen = browser.execute_script(
        "const t = document.querySelector('table[data-table=\"run_overview\"]'); const r = t.getBoundingClientRect();"
        "return [r.top, r.bottom, Array.from(t.tBodies[0].rows, row => Array.from(row.cells, c => c.innerText))];")
    top, bottom, cells = screen
    assert 0 < top and bottom <= 800, "the per-site table lies within the first 800 px"
    assert [row[0] for row in cells] == ["net.2", "net.5"]
    assert cells[0][1] == "0.03 → 1.02" and "stale running variance (critical) steps 0–40" in cells[0][5]
    assert cells[0][6] == "within thresholds since step 50"
    assert cells[1][6] == "eps dominates (since step 60)" and "eps dominates (note) steps 60–90" in cells[1][5]
    images = browser.execute_script("return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) == 3 and all(done and width > 0 for _, done, width in images)
    sections = browser.execute_script("return Array.from(document.querySelectorAll('section[data-section]'), s => s.id)")
    assert sections == ["summary", "findings", "curvature", "sites", "analysis", "glossary"]
    link = browser.execute_script("const a = document.querySelector('#analysis a'); return a ? a.href : ''")
    assert link.endswith("/final/report.html")


def test_a_noisy_run_lists_the_first_findings_and_counts_the_rest(tmp_path):
    from normscope.reports.timeseries import MAX_EVENTS, MAX_LISTED

    steps = range(0, 4 * (MAX_LISTED + 10), 2)  # the variance ratio crosses 0.5 at every other recorded step
    rows = pd.DataFrame([(s, 0, "net.2", m, v) for s in steps for m, v in (("var_ratio_median", 0.3 if s % 4 else 1.0),
                                                                              ("mean_drift_mean", 0.1), ("eps_fraction_max", 0.01))],
                        columns=["step", "rank", "site", "metric", "value"])
    folder = tmp_path / "noisy"
    folder.mkdir()
    rows.to_parquet(folder / "part-0-1-0.parquet")
    page = render_run(folder).read_text()
    found = pd.read_csv(folder / FINDINGS_FILE)
    assert len(found) == len(steps) // 2 > MAX_LISTED
    listed = page.split('id="findings"')[1].split("</ul>")[0]
    assert listed.count("<li") == MAX_LISTED and f"and {len(found) - MAX_LISTED} more, in the table below" in page
    first = page.split('data-table="run_overview"')[1].split("</table>")[0]
    assert first.count("stale running variance (warning) steps") + first.count("stale running variance (warning) at step") == MAX_EVENTS
    assert f"; and {len(found) - MAX_EVENTS} more" in first
