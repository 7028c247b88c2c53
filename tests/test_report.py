"""The HTML report: rendered from real analyzer tables, checked as text and in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from markupsafe import escape
from torch import nn

from normscope.analyzers import ANALYZERS, AnalysisContext, get_analyzer
from normscope.api import analyze
from normscope.compare import compare as run_compare
from normscope.data import load_digits
from normscope.models import build_model
from normscope.reports.figures import FIGURES, missing_data, render_figures
from normscope.reports.findings import compare_findings
from normscope.reports.glossary import headline_label
from normscope.reports.render import MAX_ROWS, SECTIONS, backticks, render_html
from normscope.result import AnalysisResult, read_tables, write_tables

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
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
    assert compare_findings(tables) == expected and len(expected) == 3 and expected[0].startswith("Equal budget in")
    for finding in expected:
        assert str(backticks(finding)) in page


def test_sections_findings_and_headline(page, result):
    for spec in SECTIONS:
        assert f'id="{spec.key}"' in page
        assert "not-run-line" not in page.split(f'id="{spec.key}"')[1].split("</section>")[0]
    for name, findings in result.findings.items():
        for finding in findings:
            assert str(backticks(finding)) in page
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
    assert sections == ["summary", "model"] + [spec.key for spec in SECTIONS] + ["glossary"]
    browser.set_window_size(1280, 800)
    top = browser.execute_script("return document.querySelector('table[data-table=\"sites_overview\"]').getBoundingClientRect()")
    assert 0 < top["top"] and top["bottom"] <= 800, "the per-site overview lies within the first 800 px"
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "report-first-screen.png"))
    browser.set_window_size(1280, 1000)
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

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACTS / "report.png"))


def test_every_finding_states_the_number_of_its_table(result):
    """Each finding's value is the statistic of its table's column over the rows it names, and
    the sentence has no ``nan``."""
    from normscope.findings import findings_table, table_value

    records = findings_table(result.findings)
    checked = 0
    for _, row in records.iterrows():
        assert not re.search(r"\bnan\b", row["sentence"], re.IGNORECASE), row["sentence"]
        if not row["table"]:
            continue
        value = table_value(result.tables, row["table"], row["where"], row["metric"], row["statistic"])
        assert value == pytest.approx(row["value"], rel=1e-12, nan_ok=True), row["sentence"]
        checked += 1
    from normscope.findings import Finding

    severe = [f for items in result.findings.values() for f in items if isinstance(f, Finding) and f.severity in ("critical", "warning")]
    assert all(f.table for f in severe) and checked > 20
    overview = result.overview
    sites = result.tables["stats_sites"].set_index("site")
    assert list(overview["site"]) == [s["name"] for s in result.meta["sites"]]
    assert np.allclose(overview.set_index("site")["var_ratio"], sites["var_ratio_median"])


class _Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width)

    def forward(self, x):
        return self.LayerNorm(x + self.dense(x))


class _Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(width, width)
        self.intermediate_batch_norm = nn.BatchNorm1d(width)
        self.attention_output = _Attention(width)

    def forward(self, x):
        return self.attention_output(torch.relu(self.intermediate_batch_norm(self.intermediate_dense(x))))


class HFStyleModel(nn.Module):
    """Module paths as long as a Hugging Face model's (model.encoder.layer.N.attention_output.LayerNorm)."""

    def __init__(self, width: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embeddings = nn.Linear(64, width)
        self.model.encoder = nn.Module()
        self.model.encoder.layer = nn.ModuleList(_Layer(width) for _ in range(layers))
        self.classifier = nn.Linear(width, 10)

    def forward(self, x):
        h = self.model.embeddings(x.flatten(1))
        for layer in self.model.encoder.layer:
            h = layer(h)
        return self.classifier(h)


def _axes_problems(fig) -> list[str]:
    """Axes with no finite data artist, or squeezed to (almost) no width or height."""
    problems = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        box = ax.get_position()
        data = [a for a in ax.lines + ax.collections + ax.patches + ax.images if _finite_artist(a)]
        if not data:
            problems.append(f"{ax.get_title() or ax.get_xlabel()}: no finite artist")
        if box.width < 0.05 or box.height < 0.05:
            problems.append(f"{ax.get_title() or ax.get_xlabel()}: {box.width:.3f} x {box.height:.3f}")
    return problems


def _finite_artist(artist) -> bool:
    if hasattr(artist, "get_xydata"):
        xy = np.asarray(artist.get_xydata(), float)
    elif hasattr(artist, "get_offsets") and len(artist.get_offsets()):
        xy = np.asarray(artist.get_offsets(), float)
    elif hasattr(artist, "get_paths") and artist.get_paths():
        xy = np.concatenate([p.vertices for p in artist.get_paths()])
    elif hasattr(artist, "get_width"):
        xy = np.array([[artist.get_width(), artist.get_height()]], float)
    else:
        return False
    return xy.size > 0 and bool(np.isfinite(xy).all(axis=-1).any())


@pytest.fixture(scope="module")
def long_names(data):
    x, y, _, _ = data
    model = HFStyleModel().double()
    return analyze(model, data=(x, y), analyzers=["stats", "gls", "descent"], batch_size=64, batches=1, lr=0.1)


def test_every_figure_has_finite_data_on_every_axes(result, compare, long_names):
    from matplotlib.figure import Figure

    from normscope.reports.figures import quiet

    for tables in ({**result.tables, **compare}, long_names.tables):
        for spec in FIGURES:
            if missing_data(tables, spec.requires):
                continue
            with quiet():
                fig = Figure(figsize=spec.size, layout="constrained")
                spec.draw(tables, fig)
                fig.savefig(io.BytesIO(), format="png")
            assert fig.axes and _axes_problems(fig) == [], spec.key
            assert min(fig.get_size_inches()) > 0


def test_long_site_names_are_shortened_without_clashes():
    from normscope.reports.figures import short_names

    names = [f"model.encoder.layer.{i}.attention_output.LayerNorm" for i in range(12)]
    short = short_names(names)
    assert len(set(short)) == 12 and all(len(n) <= 28 for n in short) and short[3].startswith("3.")
    assert short_names(["net.2", "net.5"]) == ["net.2", "net.5"]


@pytest.mark.browser
def test_long_hf_style_names_render_without_empty_figures(long_names, browser, tmp_path):
    path = tmp_path / "long.html"
    path.write_text(render_html(long_names), encoding="utf-8")
    browser.set_window_size(1280, 800)
    browser.get(path.as_uri())
    top = browser.execute_script("return document.querySelector('table[data-table=\"sites_overview\"]').getBoundingClientRect().top")
    assert 0 < top < 800
    sizes = browser.execute_script("return Array.from(document.images, i => [i.alt, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])")
    assert sizes and all(w > 0 and h > 0 and shown > 300 for _, w, h, shown in sizes), sizes
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "report-long-names-first-screen.png"))
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height)
    assert browser.save_screenshot(str(ARTIFACTS / "report-long-names.png"))
