"""One self-contained HTML page from an :class:`~normscope.result.AnalysisResult`.

:func:`render_html` opens with the answer: the per-site overview (``sites_overview``, one row per
normalization layer with a coloured verdict) and the most severe findings. Below it, one section
per analyzer (and one for the ops comparison): the analyzer's findings in plain words, its
headline cards, its figures (``reports/figures.py``) as base64 PNG and its summary tables,
sortable by a click on a header; then a glossary and the references. CSS and JavaScript are
inline, so the page opens from disk with no network. Templates live in ``reports/templates``.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import jinja2
import pandas as pd
from markupsafe import Markup, escape

from normscope.findings import SEVERITIES, Finding, findings_table, percent
from normscope.missing import cut_line, cuts_by_analyzer, reason
from normscope.overview import sites_overview
from normscope.reports.figures import RenderedFigure, quiet, render_figures
from normscope.reports.findings import derived_findings
from normscope.reports.glossary import GLOSSARY, OVERVIEW_HEADERS, REFERENCES, headline_label
from normscope.result import AnalysisResult

MAX_ROWS = 200
TOP_FINDINGS = 5
FOLD_AFTER = 12
"""A per-site overview longer than this shows the sites needing attention and folds the rest under a count."""
ATTENTION = ("critical", "warning", "note")


@dataclass(frozen=True)
class SectionSpec:
    """A report section: the analyzer it shows, its heading, what it measures, which tables."""

    key: str
    title: str
    intro: str
    tables: tuple[str, ...]
    how_to_run: str
    views: dict[str, str] = field(default_factory=dict)


SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        "stats",
        "Norm-layer statistics",
        "Batch moments against the running statistics used at inference, how much eps weighs "
        "against the variance, the affine parameters, and the norm of the weight that feeds each BatchNorm.",
        ("stats_sites",),
        "not run: select it with `normscope analyze --analyzers stats`.",
    ),
    SectionSpec(
        "gls",
        "Gradient least squares",
        "Backpropagation through a normalization keeps the residual of a least-squares fit of "
        "g = dL/dz on z per partition (\"Normalization Gradients are Least-Squares Residuals\", ICLR 2019 submission): "
        "how much of the incoming gradient each site explains away.",
        ("gls_sites", "gls_kinds", "gls_two_step", "gls_whatif"),
        "not run: select it with `normscope analyze --analyzers gls`.",
    ),
    SectionSpec(
        "bias",
        "Estimator bias",
        "How far minibatch and per-example gradient estimates are from the population gradient g*, "
        "the gradient with moments over the whole data set (\"Extreme Normalization\", under review).",
        ("bias_slopes", "bias_jacobian", "bias_estimators"),
        "not run: select it with `normscope analyze --analyzers bias`.",
        {"bias_slopes": "group == 'total'", "bias_estimators": "group == 'total'"},
    ),
    SectionSpec(
        "descent",
        "Second-order descent",
        "Whether the gradient step is a descent step of the local quadratic model, the curvature "
        "spectrum, and the scale invariance of the weights that feed a normalization (Santurkar et al. 2018; Kohler et al. 2018).",
        ("descent_directions", "descent_trace", "descent_scale_invariance", "descent_reparam"),
        "not run: select it with `normscope analyze --analyzers descent`.",
    ),
    SectionSpec(
        "compare",
        "Normalization ops compared",
        "Short seeded training runs of each normalization op swapped in place of the model's BatchNorms.",
        ("compare_summary",),
        "not run: produce the tables with `normscope compare` and pass them to the report.",
    ),
)


@dataclass
class HtmlTable:
    """A table ready for the template: header, rows of ``(text, sort key)`` cells, row counts."""

    name: str
    columns: list[str]
    rows: list[list[tuple[str, str]]]
    total_rows: int
    view: str = ""


@dataclass(frozen=True)
class OverviewCell:
    """One cell of the per-site overview: text, sort key, the verdict's severity (verdict column
    only), whether the text is a site name, and whether it says why a number is missing."""

    text: str
    key: str
    severity: str = ""
    name: bool = False
    missing: bool = False


@dataclass
class Overview:
    """The per-site overview: rows needing attention first, the rest folded under a count when long."""

    columns: list[str]
    shown: list[list[OverviewCell]]
    folded: list[list[OverviewCell]]
    total_rows: int


@dataclass
class Section:
    """One rendered section of the page."""

    key: str
    title: str
    intro: str
    ran: bool
    not_run: str
    findings: list[tuple[str, str]] = field(default_factory=list)
    headline: list[tuple[str, str, str]] = field(default_factory=list)
    figures: list[RenderedFigure] = field(default_factory=list)
    tables: list[HtmlTable] = field(default_factory=list)
    other_tables: list[tuple[str, int]] = field(default_factory=list)
    cuts: list[str] = field(default_factory=list)


def render_html(result: AnalysisResult, compare: dict[str, pd.DataFrame] | None = None) -> str:
    """Render ``result`` (and the ``compare_*`` tables of ``normscope compare``, if given) as one
    self-contained HTML page: figures as base64 PNG, CSS and JavaScript inline."""
    tables = {**result.tables, **(compare or {})}
    meta = result.meta or {}
    fresh = any(isinstance(f, Finding) for items in result.findings.values() for f in items)
    records = findings_table(result.findings) if fresh or "findings" not in tables else tables["findings"]
    overview = tables.get("sites_overview")
    if (fresh or overview is None) and meta.get("sites"):
        overview = sites_overview(tables, records, meta.get("sites"), meta)
    with quiet():
        sections = [_section(spec, result, tables, records) for spec in SECTIONS]
    template = environment().get_template("report.html.j2")
    return template.render(
        kind="report",
        heading="Normalization report",
        nav=[("summary", "At a glance", True), ("model", "Model and sites", True),
             *((section.key, section.title, section.ran) for section in sections)],
        title=_model_name(meta),
        sites_overview=_overview_table(overview, meta),
        top_findings=_top_findings(records),
        cut_line=cut_line(meta),
        overview=_overview(meta),
        model_findings=[str(s) for key, items in result.findings.items() if key not in {spec.key for spec in SECTIONS} for s in items]
        + [str(error) for key, error in (meta.get("analyzer_errors") or {}).items() if key not in {spec.key for spec in SECTIONS}],
        sites=_rows_table("sites", meta.get("sites")),
        unrecognized=_rows_table("unrecognized", meta.get("unrecognized")),
        sections=sections,
        glossary=GLOSSARY,
        references=[text for _, text in REFERENCES],
    )


def _top_findings(records: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The most severe findings as ``(severity, analyzer, sentence)``: the critical and warning
    ones (up to :data:`TOP_FINDINGS`), filled up to three with notes."""
    if records is None or records.empty:
        return []
    ranked = records.sort_values("rank", kind="stable")
    severe = ranked[ranked["severity"].isin(("critical", "warning"))].head(TOP_FINDINGS)
    if len(severe) < 3:
        verdicts = ranked[(ranked["severity"] == "ok") & ranked["analyzer"].isin(("stats", "descent"))]
        severe = pd.concat([severe, verdicts, ranked[ranked["severity"] == "note"]]).head(3)
    return [(str(r["severity"]), str(r["analyzer"]), str(r["sentence"])) for _, r in severe.iterrows()]


def _overview_table(overview: pd.DataFrame | None, meta: dict) -> Overview | None:
    """``sites_overview`` with readable headers: a missing number says why (the ``missing``
    column, else :func:`normscope.missing.reason`), the verdict cell carries the severity, and
    past :data:`FOLD_AFTER` sites the sites needing attention come first and the rest is folded."""
    if overview is None or overview.empty:
        return None
    columns = [c for c in OVERVIEW_HEADERS if c in overview.columns]
    rows, needs = [], []
    for _, record in overview.iterrows():
        why = _missing_reasons(record.get("missing"))
        cells = []
        for column in columns:
            value = record[column]
            if column == "verdict":
                severity = str(record.get("severity", ""))
                rank = str(SEVERITIES.index(severity)) if severity in SEVERITIES else ""
                cells.append(OverviewCell(str(value), rank, severity))
            elif column in why or (column != "site" and _missing(value)):
                text = why.get(column) or reason(column, record.get("kind", ""), meta)
                cells.append(OverviewCell(text, "", missing=True))
            else:
                cells.append(OverviewCell(*_cell(value, digits=3), name=column == "site"))
        rows.append(cells)
        needs.append(record.get("severity") in ATTENTION)
    if len(rows) <= FOLD_AFTER:
        return Overview([OVERVIEW_HEADERS[c] for c in columns], rows, [], len(rows))
    shown = [row for row, flag in zip(rows, needs) if flag]
    folded = [row for row, flag in zip(rows, needs) if not flag]
    return Overview([OVERVIEW_HEADERS[c] for c in columns], shown, folded, len(rows))


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _missing_reasons(text: object) -> dict[str, str]:
    """``{column: reason}`` from the overview's ``missing`` column (``"a_crit: not measured: budget; ..."``)."""
    if not isinstance(text, str) or not text:
        return {}
    return {column: why for column, _, why in (part.partition(": ") for part in text.split("; "))}


def backticks(text: object) -> Markup:
    """Escaped text whose `quoted` commands are set as code (findings write commands in backticks)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def dotted(name: object) -> Markup:
    """A dotted name that may wrap only after its dots (``model.<wbr>layers.<wbr>0...``), escaped."""
    return Markup(".<wbr>".join(escape(part) for part in str(name).split(".")))


def environment() -> jinja2.Environment:
    """The Jinja2 environment of every normscope report (templates in ``reports/templates``)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("normscope.reports", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["dotted"] = dotted
    env.filters["backticks"] = backticks
    return env


def _section(spec: SectionSpec, result: AnalysisResult, tables: dict[str, pd.DataFrame], records: pd.DataFrame) -> Section:
    own = {name: t for name, t in tables.items() if name.startswith(spec.key + "_")}
    meta = result.meta or {}
    ran = bool(own) or spec.key in result.findings or spec.key in result.headline or spec.key in meta.get("analyzers", ())
    error = (meta.get("analyzer_errors") or {}).get(spec.key)
    section = Section(spec.key, spec.title, spec.intro, ran, str(error) if error else spec.how_to_run)
    if not ran:
        return section
    severity = dict(zip(records["sentence"], records["severity"])) if len(records) else {}
    sentences = [str(s) for s in result.findings.get(spec.key, [])] or derived_findings(spec.key, tables)
    section.findings = [(severity.get(s, "note"), s) for s in sentences]
    section.cuts = [f"not measured: {cut['what']}{_qualifier(cut['analyzer'])} ({cut['why']})" for cut in cuts_by_analyzer(meta).get(spec.key, [])]
    section.headline = [headline_card(str(k), v, tables) for k, v in result.headline.get(spec.key, {}).items()]
    section.figures = render_figures(spec.key, tables)
    section.tables = [html_table(name, own[name], spec.views.get(name, "")) for name in spec.tables if name in own and not own[name].empty]
    section.other_tables = [(name, len(t)) for name, t in sorted(own.items()) if name not in spec.tables or t.empty]
    return section


def _qualifier(analyzer: str) -> str:
    """``" (train mode)"`` from the budget's ``"descent (train mode)"``."""
    _, _, rest = analyzer.partition(" ")
    return f" {rest}" if rest else ""


def headline_card(key: str, value: object, tables: dict[str, pd.DataFrame]) -> tuple[str, str, str]:
    """A headline card ``(label, value, interval)``; a bias card says whether the bias is
    measurable and carries its 95% interval from ``bias_estimators``."""
    label, text, interval = headline_label(key), _text(value), ""
    prefix = "bias_batchnorm_b"
    bias = tables.get("bias_estimators")
    if key.startswith(prefix) and key[len(prefix):].isdigit() and bias is not None and "rel_bias_lo" in bias.columns:
        row = bias[(bias["estimator"] == "batchnorm") & (bias["batch_size"] == int(key[len(prefix):])) & (bias["group"] == "total")]
        if len(row):
            row = row.iloc[0]
            interval = f"95% interval {percent(row['rel_bias_lo'])} to {percent(row['rel_bias_hi'])}"
            measured = bool(row["measurable"]) if "measurable" in row else row["rel_bias_lo"] > 0
            text = percent(row["rel_bias"]) if measured else "not measurable"
    elif key == "bias_batchnorm_slope" and bias is not None:
        slopes = tables.get("bias_slopes")
        row = slopes[(slopes["estimator"] == "batchnorm") & (slopes["group"] == "total")] if slopes is not None else []
        if len(row) and "slope_lo" in row.columns:
            interval = (f"95% interval {_cell(row['slope_lo'].iloc[0])[0]} to {_cell(row['slope_hi'].iloc[0])[0]}"
                        if math.isfinite(row["slope"].iloc[0]) else f"needs 3 measurable batch sizes, has {int(row['n_points'].iloc[0])}")
            text = text if math.isfinite(row["slope"].iloc[0]) else "no slope"
    return label, text, interval


def html_table(name: str, table: pd.DataFrame, view: str = "") -> HtmlTable:
    """The first ``MAX_ROWS`` rows of ``table``, of those that match the pandas query ``view``
    (when the table has rows that match)."""
    shown = table
    if view:
        try:
            shown = table.query(view)
        except (KeyError, ValueError, SyntaxError, pd.errors.UndefinedVariableError):
            shown = table.iloc[:0]
        if shown.empty:
            shown, view = table, ""
    rows = [[_cell(v) for v in record] for record in shown.head(MAX_ROWS).itertuples(index=False, name=None)]
    return HtmlTable(name, [str(c) for c in table.columns], rows, len(table), view)


def _cell(value: object, digits: int = 4) -> tuple[str, str]:
    """Display text and sort key of one value (numbers sort numerically, missing values last)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–", ""
    if isinstance(value, (bool,)) or type(value).__name__ == "bool_":
        return ("yes", "1") if value else ("no", "0")
    if isinstance(value, numbers.Integral):
        return str(int(value)), str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isinf(value):
            return ("∞" if value > 0 else "−∞"), ("Infinity" if value > 0 else "-Infinity")
        return f"{value:.{digits}g}", repr(value)
    return str(value), str(value)


def _text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)[0]}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v)[0] for v in value)
    return _cell(value)[0]


def _model_name(meta: dict) -> str:
    model = meta.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("spec") or model.get("class")
    return str(model) if model else "model"


def _overview(meta: dict) -> list[tuple[str, str]]:
    """The metadata entries shown as (label, text) pairs; lists of sites and analyzer errors are
    shown elsewhere."""
    elsewhere = {"sites", "unrecognized", "analyzer_errors"}
    meta = {k: v for k, v in meta.items() if k != "seed"} | ({"random seed": meta["seed"]} if "seed" in meta else {})
    return [(str(k).replace("_", " "), _text(v)) for k, v in meta.items() if k not in elsewhere and v not in (None, "", [], {})]


def _rows_table(name: str, rows: object) -> HtmlTable | None:
    """A list of dicts (or of names) from the metadata as a table; ``None`` when empty."""
    if not isinstance(rows, (list, tuple)) or not rows:
        return None
    return html_table(name, pd.DataFrame([r if isinstance(r, dict) else {"name": r} for r in rows]))
