"""The HTML report: rendered from real analyzer tables, checked as text and in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from markupsafe import escape

from normscope.analyzers import ANALYZERS, AnalysisContext, get_analyzer
from normscope.api import analyze
from normscope.compare import compare as run_compare
from normscope.data import load_digits
from normscope.models import build_model
from normscope.reports.figures import FIGURES, missing_data, render_figures
from normscope.reports.findings import compare_findings
from normscope.reports.glossary import headline_label
from normscope.reports.render import MAX_ROWS, SECTIONS, render_html
from normscope.result import AnalysisResult, read_tables, write_tables

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICKER = {"bias_repeats": 6}


@pytest.fixture(scope="module")
def data():
    images, labels = load_digits(torch.float64)
    return images[:128], labels[:128], images[1400:1528], labels[1400:1528]


@pytest.fixture(scope="module")
def result(data) -> AnalysisResult:
    """Every registered analyzer on mlp_bn and 128 digits in float64 (bias with fewer repeats, to
    keep the test fast)."""
    x, y, _, _ = data
    model = build_model("mlp_bn").double()
    result = analyze(model, data=(x, y), analyzers=[n for n in ANALYZERS if n != "bias"], batch_size=64, batches=2, lr=0.1)
    ctx = AnalysisContext(model=model, batches=[(x[:64], y[:64])], dataset=(x, y), lr=0.1, options=QUICKER)
    output = get_analyzer("bias")(ctx)
    result.tables.update(output.tables)
    result.findings["bias"] = list(output.findings)
    result.headline["bias"] = dict(output.headline)
    result.meta["analyzers"].append("bias")
    assert result.meta["analyzer_errors"] == {}, "every analyzer must run for the report test"
    return result


@pytest.fixture(scope="module")
def compare_output(data):
    """``normscope compare`` on short seeded runs of three ops at two batch sizes."""
    x, y, xt, yt = (t.float() if t.is_floating_point() else t for t in data)
    return run_compare("mlp_bn", ("bn", "renorm", "median"), batch_sizes=(4, 32), steps=8, points=4, data=(x, y, xt, yt))


@pytest.fixture(scope="module")
def compare(compare_output) -> dict[str, pd.DataFrame]:
    return compare_output.tables


@pytest.fixture(scope="module")
def page(result, compare) -> str:
    return render_html(result, compare)


def _figures(page: str) -> list[tuple[str, bytes, int, int]]:
    found = re.findall(r'<figure class="figure" data-figure="(\w+)">\s*<h3>.*?</h3>\s*<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" height="(\d+)"', page)
    return [(key, base64.b64decode(data), int(w), int(h)) for key, data, w, h in found]


def test_page_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "url(" not in page and "@import" not in page
    assert "<style>" in page and "<script>" in page


def test_every_registered_figure_is_drawn_as_png(page, result, compare):
    figures = _figures(page)
    assert sorted(key for key, *_ in figures) == sorted(spec.key for spec in FIGURES)
    for key, png, width, height in figures:
        assert png.startswith(PNG_SIGNATURE), key
        png_width, png_height = struct.unpack(">II", png[16:24])
        assert (png_width, png_height) == (width, height), key
        assert width > 100 and height > 100


def test_compare_findings_match_normscope_compare(page, compare_output):
    expected = compare_output.findings
    tables = {"compare_summary": compare_output.tables["compare_summary"].drop(columns=["diverged"])}
    assert compare_findings(tables) == expected and len(expected) == 2
    for finding in expected:
        assert str(escape(finding)) in page


def test_sections_findings_and_headline(page, result):
    for spec in SECTIONS:
        assert f'id="{spec.key}"' in page
        assert "not-run-line" not in page.split(f'id="{spec.key}"')[1].split("</section>")[0]
    for name, findings in result.findings.items():
        for finding in findings:
            assert str(escape(finding)) in page
    for label in result.headline["stats"]:
        assert str(escape(headline_label(label))) in page


def test_tables_have_every_row_and_column(page, result, compare):
    views = {name: view for spec in SECTIONS for name, view in spec.views.items()}
    tables = {**result.tables, **compare}
    for spec in SECTIONS:
        for name in spec.tables:
            if name not in tables or tables[name].empty:
                assert f'data-table="{name}"' not in page
                continue
            body = page.split(f'data-table="{name}"')[1].split("</table>")[0]
            table = tables[name].query(views[name]) if name in views else tables[name]
            assert body.count("<tr>") == min(len(table), MAX_ROWS) + 1
        assert re.findall(r"<th [^>]*>([^<]+)</th>", body) == list(table.columns)


def test_sites_from_meta(page, result):
    body = page.split('data-table="sites"')[1].split("</table>")[0]
    for site in result.meta["sites"]:
        assert f">{site['name']}<" in body and f">{site['kind']}<" in body


def test_analyzer_not_run_is_one_line():
    x, y = load_digits(torch.float64)
    result = analyze(build_model("mlp_bn").double(), data=(x[:64], y[:64]), analyzers="stats", batch_size=32, batches=1)
    page = render_html(result)
    for key in ("gls", "bias", "descent", "compare"):
        section = page.split(f'id="{key}"')[1].split("</section>")[0]
        assert len(re.findall(r'class="not-run-line"', section)) == 1
        assert "<figure" not in section and "<table" not in section
    assert len(_figures(page)) == sum(spec.section == "stats" for spec in FIGURES)


def test_figure_skips_itself_naming_what_is_missing(result):
    tables = dict(result.tables)
    tables["gls_sites"] = tables["gls_sites"].drop(columns=["naive_gap"])
    tables.pop("gls_scatter")
    figures = {f.key: f for f in render_figures("gls", tables)}
    assert figures["gls_naive_gap"].skipped == "needs gls_sites.naive_gap"
    assert figures["gls_scatter"].skipped == "needs gls_scatter (no table)"
    assert figures["gls_r2_depth"].png_base64 and not figures["gls_r2_depth"].skipped
    assert missing_data({"gls_sites": tables["gls_sites"].iloc[:0]}, {"gls_sites": ("site",)}) == ["gls_sites (empty)"]
    page = render_html(AnalysisResult(tables={"gls_sites": tables["gls_sites"]}))
    assert "Figure skipped: needs gls_sites.naive_gap." in page
    assert "Figure skipped: needs gls_scatter (no table)." in page


def test_cells_escape_and_sort_keys():
    table = pd.DataFrame({"site": ["<b>x</b>", "y"], "value": [np.nan, np.inf], "n": [3, 4], "ok": [True, False]})
    result = AnalysisResult(tables={"stats_sites": table}, findings={"stats": ["a <script>alert(1)</script> finding"]})
    page = render_html(result)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert '<td data-sort="&lt;b&gt;x&lt;/b&gt;">&lt;b&gt;x&lt;/b&gt;</td>' in page
    assert '<td data-sort="">–</td>' in page and '<td data-sort="Infinity">∞</td>' in page
    assert '<td data-sort="1">yes</td>' in page and '<td data-sort="4">4</td>' in page


def test_renders_tables_and_summary_read_back_from_disk(result, tmp_path):
    write_tables(tmp_path, result.tables)
    summary = json.loads(json.dumps(result.summary(), allow_nan=False))
    loaded = AnalysisResult(read_tables(tmp_path), summary["findings"], summary["headline"], summary["meta"])
    page = render_html(loaded)
    assert sorted(key for key, *_ in _figures(page)) == sorted(spec.key for spec in FIGURES if spec.section != "compare")
    for site in result.meta["sites"]:
        assert f">{site['name']}<" in page


def _skip_or_fail(reason: str) -> None:
    """Skip the browser test, except where the environment variable CI is set: there it must run."""
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI is set, so the browser test must run")
    pytest.skip(reason)


@pytest.fixture()
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        _skip_or_fail(f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        _skip_or_fail("the browser test needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="normscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.browser
def test_report_in_headless_chromium(page, result, browser, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    sections = browser.execute_script("return Array.from(document.querySelectorAll('section[data-section]'), s => s.id)")
    assert sections == ["model"] + [spec.key for spec in SECTIONS]
    sizes = browser.execute_script(
        "return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])"
    )
    assert len(sizes) == len(FIGURES)
    for alt, complete, natural_width, natural_height, shown_width in sizes:
        assert complete and natural_width > 0 and natural_height > 0 and shown_width > 0, alt

    table, column = "bias_estimators", "rel_bias"
    header = browser.find_element(By.XPATH, f'//table[@data-table="{table}"]//th[normalize-space()="{column}"]')
    index = list(result.tables[table].columns).index(column)
    read = f"return Array.from(document.querySelectorAll('table[data-table=\"{table}\"] tbody tr'), r => r.cells[{index}].dataset.sort)"
    browser.execute_script("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", header)
    for direction in ("ascending", "descending"):
        header.click()
        keys = browser.execute_script(read)
        values = [float(k) for k in keys if k != ""]
        assert keys[: len(values)] == [k for k in keys if k != ""], "missing values sort last"
        assert values == sorted(values, reverse=direction == "descending") and len(set(values)) > 1
        assert header.get_attribute("aria-sort") == direction

    ARTIFACTS.mkdir(exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACTS / "report.png"))
