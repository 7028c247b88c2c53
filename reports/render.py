"""One self-contained HTML page from an :class:`~normscope.result.AnalysisResult`.

:func:`render_html` lays out one section per analyzer (and one for the ops comparison): the
analyzer's findings in plain words, its headline figures, its figures (``reports/figures.py``)
as base64 PNG and its summary tables, sortable by a click on a header. CSS and JavaScript are
inline, so the page opens from disk with no network. Templates live in ``reports/templates``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import jinja2
import pandas as pd

from normscope.reports.figures import RenderedFigure, render_figures
from normscope.reports.findings import derived_findings
from normscope.result import AnalysisResult

MAX_ROWS = 200


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
        "g = dL/dz on z per partition (seed 002): how much of the incoming gradient each site explains away.",
        ("gls_sites", "gls_kinds", "gls_two_step", "gls_whatif"),
        "not run: select it with `normscope analyze --analyzers gls`.",
    ),
    SectionSpec(
        "bias",
        "Estimator bias",
        "How far minibatch and per-example gradient estimates are from the population gradient g*, "
        "the gradient with moments over the whole data set (seed 004).",
        ("bias_slopes", "bias_jacobian", "bias_estimators"),
        "not run: select it with `normscope analyze --analyzers bias`.",
        {"bias_slopes": "group == 'total'", "bias_estimators": "group == 'total'"},
    ),
    SectionSpec(
        "descent",
        "Second-order descent",
        "Whether the gradient step is a descent step of the local quadratic model, the curvature "
        "spectrum, and the scale invariance of the weights that feed a normalization (seeds 003 and 001).",
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


@dataclass
class Section:
    """One rendered section of the page."""

    key: str
    title: str
    intro: str
    ran: bool
    not_run: str
    findings: list[str] = field(default_factory=list)
    headline: list[tuple[str, str]] = field(default_factory=list)
    figures: list[RenderedFigure] = field(default_factory=list)
    tables: list[HtmlTable] = field(default_factory=list)
    other_tables: list[tuple[str, int]] = field(default_factory=list)


def render_html(result: AnalysisResult, compare: dict[str, pd.DataFrame] | None = None) -> str:
    """Render ``result`` (and the ``compare_*`` tables of ``normscope compare``, if given) as one
    self-contained HTML page: figures as base64 PNG, CSS and JavaScript inline."""
    tables = {**result.tables, **(compare or {})}
    meta = result.meta or {}
    sections = [_section(spec, result, tables) for spec in SECTIONS]
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=_model_name(meta),
        overview=_overview(meta),
        model_findings=[str(s) for s in result.findings.get("model", [])],
        sites=_rows_table("sites", meta.get("sites")),
        unrecognized=_rows_table("unrecognized", meta.get("unrecognized")),
        sections=sections,
    )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("normscope.reports", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env


def _section(spec: SectionSpec, result: AnalysisResult, tables: dict[str, pd.DataFrame]) -> Section:
    own = {name: t for name, t in tables.items() if name.startswith(spec.key + "_")}
    meta = result.meta or {}
    ran = bool(own) or spec.key in result.findings or spec.key in result.headline or spec.key in meta.get("analyzers", ())
    error = (meta.get("analyzer_errors") or {}).get(spec.key)
    section = Section(spec.key, spec.title, spec.intro, ran, str(error) if error else spec.how_to_run)
    if not ran:
        return section
    section.findings = [str(s) for s in result.findings.get(spec.key, [])] or derived_findings(spec.key, tables)
    section.headline = [(str(k), _text(v)) for k, v in result.headline.get(spec.key, {}).items()]
    section.figures = render_figures(spec.key, tables)
    section.tables = [_html_table(name, own[name], spec.views.get(name, "")) for name in spec.tables if name in own and not own[name].empty]
    section.other_tables = [(name, len(t)) for name, t in sorted(own.items()) if name not in spec.tables or t.empty]
    return section


def _html_table(name: str, table: pd.DataFrame, view: str = "") -> HtmlTable:
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


def _cell(value: object) -> tuple[str, str]:
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
        return f"{value:.4g}", repr(value)
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
    return [(str(k).replace("_", " "), _text(v)) for k, v in meta.items() if k not in elsewhere and v not in (None, "", [], {})]


def _rows_table(name: str, rows: object) -> HtmlTable | None:
    """A list of dicts (or of names) from the metadata as a table; ``None`` when empty."""
    if not isinstance(rows, (list, tuple)) or not rows:
        return None
    return _html_table(name, pd.DataFrame([r if isinstance(r, dict) else {"name": r} for r in rows]))
