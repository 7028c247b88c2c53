"""Missing is a state: a number the analysis did not measure says why, in the overview, the verdict
and the first screen of the report (read in headless Chromium)."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

from normscope.api import analyze
from normscope.budget import Budget
from normscope.data import load_digits
from normscope.findings import findings_table, seconds
from normscope.missing import cut_line, reason
from normscope.models import build_model
from normscope.overview import sites_overview
from normscope.reports.render import FOLD_AFTER, render_html

# Hessian-vector products priced far above the budget: descent is cut in both modes, on a planned clock.
CUT_DESCENT = {"forward": 0.01, "gradient": 0.5, "hvp": 100.0, "example_chunk": 1.0}


@pytest.fixture(scope="module")
def cut_run():
    x, y = load_digits(torch.float64)
    return analyze(build_model("mlp_bn").double(), data=(x[:128], y[:128]), analyzers="stats,gls,descent", batch_size=64,
                   batches=1, lr=0.1, budget=Budget(4.0, dict(CUT_DESCENT), clock="planned"))


def _healthy_stats(sites: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"site": sites, "kind": "batchnorm", "mean_drift_mean": 0.1, "var_ratio_median": 1.0, "eps_fraction_max": 0.01})


def _meta(sites: list[str], kinds: list[str] | None = None, **extra) -> dict:
    kinds = kinds or ["batchnorm"] * len(sites)
    return {"sites": [{"name": s, "kind": k} for s, k in zip(sites, kinds)], "analyzers": ["stats", "descent"],
            "analyzer_errors": {}, "budget": {"seconds": 120.0, "cuts": []}} | extra


def test_a_verdict_built_on_numbers_cut_by_the_budget_says_not_measured():
    sites = ["a.bn", "b.bn"]
    cuts = [{"analyzer": "descent (train mode)", "what": "every table of this mode", "why": "needs about 48 s, 0 s left"}]
    meta = _meta(sites, budget={"seconds": 120.0, "cuts": cuts})
    overview = sites_overview({"stats_sites": _healthy_stats(sites)}, findings_table({}), meta["sites"], meta)
    assert list(overview["verdict"]) == ["not measured (descent: budget)"] * 2
    assert list(overview["severity"]) == ["note", "note"]
    assert "a_crit: not measured: budget" in overview["missing"].iloc[0] and "r2_median: not run" in overview["missing"].iloc[0]
    uncut = _meta(sites)
    uncut["analyzers"] = ["stats"]
    fine = sites_overview({"stats_sites": _healthy_stats(sites)}, findings_table({}), uncut["sites"], uncut)
    assert list(fine["verdict"]) == ["no problem found"] * 2, "analyzers not selected are no gap in what was asked"


def test_reasons_for_each_missing_state():
    meta = _meta(["n"], analyzers=["stats"], analyzer_errors={"descent": "analyzer descent failed (RuntimeError: x)",
                                                                 "bias": "analyzer bias skipped: needs BatchNorm"})
    assert reason("var_ratio", "layernorm", meta) == "not applicable"
    assert reason("a_crit", "batchnorm", meta) == "analyzer failed"
    assert reason("r2_median", "batchnorm", meta) == "not run"
    assert reason("a_crit", "batchnorm", meta | {"analyzers": ["stats", "descent"], "analyzer_errors": {}}, has_parameters=False) == "not applicable"
    assert reason("eps_share", "batchnorm", meta) == "not measured", "stats ran untouched: nothing explains it"
    assert cut_line(meta) == ""


def test_durations_read_as_seconds_never_exponents():
    assert [seconds(v) for v in (1e-9, 0.049, 2.04, 48.1, 200, None, float("nan"))] == [
        "0 s", "0 s", "2.0 s", "48 s", "3 min 20 s", "no limit", "not measured"]


def test_cut_run_says_so_in_cells_verdicts_and_one_first_screen_line(cut_run):
    why = " ".join(c["why"] for c in cut_run.meta["budget"]["cuts"])
    assert cut_run.meta["budget"]["cuts"] and not re.search(r"\de-\d", why), why
    line = cut_line(cut_run.meta)
    assert line.startswith("Not measured, cut by the 4.0 s budget: ") and "descent (every table (train and eval mode))" in line
    assert "--budget" in line
    overview = cut_run.overview
    assert (overview["verdict"] != "no problem found").all()
    page = render_html(cut_run)
    first = page.split('id="summary"')[1].split("</section>")[0]
    assert first.count('data-cut="budget"') == 1 and "nothing critical or worth a warning)" not in first
    cells = re.findall(r'<span class="missing">([^<]+)</span>', first)
    assert cells == ["not measured: budget"] * len(overview), "lr / a_crit of every site says it was cut"
    descent = page.split('id="descent"')[1].split("</section>")[0]
    assert "The analyzer reported no findings" not in descent
    assert re.findall(r'data-cut="descent">([^<]+)<', descent) == [
        f"not measured: every table of this mode ({mode} mode) ({cut['why']})"
        for mode, cut in zip(("train", "eval"), cut_run.meta["budget"]["cuts"][-2:])]


def test_long_overview_folds_healthy_sites_under_a_count():
    sites = [f"model.layers.{i}.input_layernorm" for i in range(FOLD_AFTER + 3)]
    stats = _healthy_stats(sites)
    stats.loc[2, "var_ratio_median"] = 0.01
    from normscope.rules import stats_findings

    stats = stats.assign(nonfinite=0, eps_dominated_fraction=0.0, relu_zero_fraction=0.0)
    meta = _meta(sites) | {"analyzers": ["stats"]}
    from normscope.result import AnalysisResult

    result = AnalysisResult(tables={"stats_sites": stats}, findings={"stats": stats_findings(stats)}, meta=meta)
    page = render_html(result)
    shown = page.split('data-table="sites_overview"')[1].split("</table>")[0]
    folded = page.split('data-table="sites_overview_rest"')[1].split("</table>")[0]
    assert shown.count("<tr>") == 1 + 1 and folded.count("<tr>") == 1 + len(sites) - 1
    assert f"<summary>{len(sites) - 1} more sites with no problem found</summary>" in page
    assert 'title="model.layers.2.input_layernorm">model.<wbr>layers.<wbr>2.<wbr>input_layernorm<' in shown


@pytest.mark.browser
def test_first_screen_says_what_the_budget_cut(cut_run, browser, tmp_path):
    path = tmp_path / "cut.html"
    path.write_text(render_html(cut_run), encoding="utf-8")
    browser.set_window_size(1280, 800)
    browser.get(path.as_uri())
    line = browser.execute_script(
        "const e = document.querySelector('[data-cut=\"budget\"]'); const r = e.getBoundingClientRect();"
        "return [e.innerText, r.top, r.bottom, getComputedStyle(e).display];")
    text, top, bottom, display = line
    assert 0 < top and bottom <= 800 and display != "none", "the cut line lies within the first 800 px"
    assert "descent" in text and "--budget" in text
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('table[data-table=\"sites_overview\"] .missing'),"
        " e => [e.innerText, e.getBoundingClientRect().bottom])")
    assert cells and all(t == "not measured: budget" and b <= 800 for t, b in cells), cells
    verdicts = browser.execute_script("return Array.from(document.querySelectorAll('.verdict'), e => e.innerText)")
    assert verdicts and "no problem found" not in verdicts
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('td.site-name'), e => [e.title, e.innerText.replace(/\\n/g, '')])")
    assert all(title == shown for title, shown in names)
