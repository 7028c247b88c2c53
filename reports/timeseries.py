"""The report of a monitored run folder: what happened to each normalization layer, and when.

Reads the Parquet rows of :class:`normscope.Monitor` (``step, rank, site, metric, value``) and
renders them with the template and styling of ``analyze``'s report (``run.html.j2`` extends
``base.html.j2``). The first screen has one row per site: the variance ratio, mean drift, eps
share and R² at the first and the last recorded step, what crossed ``analyze``'s thresholds and
over which steps, and the state at the last step; below it lr against the curvature.

Findings over time reuse ``analyze``'s rules, not copies of them: at each recorded step the
per-site figures go through :func:`normscope.rules.stats_findings` (variance ratio outside 0.5–2,
mean drift from 0.5, eps share from 10%, NaN/Inf) and each curvature step through
:func:`normscope.rules.descent_verdict` (lr against ``a_crit`` and ``2/λ_max``). A finding that
holds over consecutive recorded steps is one record ``(site, step, last_step, label, ...)``; a
fall or rise of R² by more than :data:`R2_CHANGE` is one more (the monitor's own rule: ``analyze``
sees one step). Records are written to ``_findings.csv`` next to the page (names starting with
``_`` are skipped by Parquet readers of the run folder). Parts are read and checked by
:mod:`normscope.monitor.parts`; both files are written through :mod:`normscope.safe_io`.

``compare``: an ``analyze`` output folder (say, of the run's final checkpoint) shown side by side:
per site the run's last recorded figures beside the analysis's overview, and a link to its report.
"""

from __future__ import annotations

import base64
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from normscope.errors import OutputError
from normscope.monitor.parts import read_rows
from normscope.findings import SEVERITIES, number, percent
from normscope.reports.figures import DPI, WIDTH, RenderedFigure, quiet
from normscope.reports.glossary import GLOSSARY, REFERENCES
from normscope.reports.render import HtmlTable, Overview, OverviewCell, environment, html_table
from normscope.rules import DRIFT_WARNING, EPS_NOTE, VAR_RATIO_BAND, descent_verdict, stats_findings
from normscope.safe_io import write_csv, write_text

REPORT_FILE = "_report.html"
FINDINGS_FILE = "_findings.csv"
MODEL_SITE = "model"
R2_CHANGE = 0.25
STATS_INPUTS = {"var_ratio_median": math.nan, "mean_drift_mean": math.nan, "eps_fraction_max": math.nan,
                "eps_dominated_fraction": math.nan, "relu_zero_fraction": math.nan, "nonfinite": 0.0}
"""The columns :func:`normscope.rules.stats_findings` reads, with the value of one the monitor did not record."""
FINDING_COLUMNS = ["site", "step", "last_step", "severity", "label", "metric", "first_value", "last_value", "threshold", "finding"]
MAX_LISTED = 40
"""Findings over time listed in words; the rest are in the table below and in ``_findings.csv``."""
MAX_EVENTS = 3
"""Intervals named per site on the first screen; the rest are counted."""
SHOWN = {"var_ratio_median": "variance ratio (batch / running)", "mean_drift_mean": "mean drift (running std)",
         "eps_fraction_max": "eps share", "r2_median": "explained gradient (median R²)"}


# ---------------------------------------------------------------- reading


def is_run_folder(folder: Path) -> bool:
    """Does ``folder`` hold monitor rows (``part-*.parquet``)?"""
    return folder.is_dir() and any(folder.glob("part-*.parquet"))


def load_rows(folder: Path) -> pd.DataFrame:
    """The rows of rank 0 of a run folder (or of its lowest rank), sorted by step."""
    if not is_run_folder(folder):
        raise OutputError(f"{folder} has no part-*.parquet files: pass the out folder of a normscope.Monitor run")
    rows = read_rows(folder)
    ranks = rows.loc[rows["rank"] >= 0, "rank"]
    rows = rows[rows["rank"] == (ranks.min() if len(ranks) else rows["rank"].min())]
    return rows.sort_values("step", kind="stable").reset_index(drop=True)


def series(rows: pd.DataFrame, site: str, metric: str) -> pd.Series:
    """``value`` by ``step`` of one (site, metric)."""
    part = rows[(rows["site"] == site) & (rows["metric"] == metric)]
    return part.set_index("step")["value"]


def norm_sites(rows: pd.DataFrame) -> list[str]:
    """The normalization sites of a run, in order of first appearance (those with norm statistics)."""
    stats = rows[(rows["site"] != MODEL_SITE) & (rows["metric"] == "eps_fraction_max")]
    return list(dict.fromkeys(stats["site"]))


def site_steps(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, site) of the normalization sites, one column per metric, with the
    columns :func:`normscope.rules.stats_findings` reads (unrecorded ones at their neutral value)."""
    sites = norm_sites(rows)
    part = rows[rows["site"].isin(sites)]
    table = part.pivot_table(index=["step", "site"], columns="metric", values="value", aggfunc="last").reset_index()
    table.columns.name = None
    for column, value in STATS_INPUTS.items():
        table[column] = table[column].fillna(value) if column in table.columns else value
    return table


# ---------------------------------------------------------------- findings over time


def states(rows: pd.DataFrame) -> pd.DataFrame:
    """``analyze``'s per-site findings at every recorded step: ``step, site, label, severity,
    metric, value, threshold`` from :func:`normscope.rules.stats_findings` of that step's figures."""
    records = []
    for step, frame in site_steps(rows).groupby("step", sort=True):
        for found in stats_findings(frame):
            if found.site and found.severity in SEVERITIES[:3]:
                records.append({"step": int(step), "site": found.site, "label": found.label, "severity": found.severity,
                                "metric": found.metric, "value": found.value, "threshold": found.threshold})
    return pd.DataFrame(records, columns=["step", "site", "label", "severity", "metric", "value", "threshold"])


def _runs(steps: list[int], held: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive recorded ``steps`` that are in ``held``, as (first, last)."""
    out: list[tuple[int, int]] = []
    start = previous = None
    for step in steps:
        if step in held:
            start = step if start is None else start
            previous = step
        elif start is not None:
            out.append((start, previous))
            start = None
    if start is not None:
        out.append((start, previous))
    return out


def _interval_text(site: str, label: str, first: int, last: int, final: int) -> str:
    if first == last:
        when = f"at step {first}"
    elif last == final:
        when = f"from step {first} to the last recorded step ({last})"
    else:
        when = f"from step {first} to step {last}"
    return f"{site}: {label} {when}"


def stats_intervals(rows: pd.DataFrame) -> list[dict]:
    """Each ``analyze`` finding about a site over the consecutive recorded steps it held."""
    found = states(rows)
    if found.empty:
        return []
    out = []
    for (site, label), part in found.groupby(["site", "label"], sort=False):
        steps = sorted(int(s) for s in rows.loc[(rows["site"] == site) & (rows["metric"] == "eps_fraction_max"), "step"].unique())
        for first, last in _runs(steps, set(part["step"])):
            held = part[(part["step"] >= first) & (part["step"] <= last)]
            metric = str(held["metric"].iloc[0])
            worst = held.sort_values("severity", key=lambda s: s.map(SEVERITIES.index), kind="stable").iloc[0]
            a, b = float(held["value"].iloc[0]), float(held["value"].iloc[-1])
            text = _interval_text(site, label, first, last, steps[-1])
            text += f" ({SHOWN.get(metric, metric)} {number(a)}" + (f" at step {first}, {number(b)} at step {last}" if last != first else "")
            text += f"; threshold {number(float(held['threshold'].iloc[0]))}, as in normscope analyze)"
            out.append({"site": site, "step": first, "last_step": last, "severity": worst["severity"], "label": label,
                        "metric": metric, "first_value": a, "last_value": b, "threshold": float(held["threshold"].iloc[0]),
                        "finding": text})
    return out


def _change(s: pd.Series, site: str, name: str) -> list[dict]:
    """A fall or rise of more than R2_CHANGE between the first and the last value: from the first
    step after which every value stays on the far side of the midpoint (finite values only)."""
    s = s[s.map(math.isfinite)]
    if len(s) < 2 or abs(s.iloc[-1] - s.iloc[0]) <= R2_CHANGE:
        return []
    first, last = s.iloc[0], s.iloc[-1]
    middle = (first + last) / 2
    beyond = (s < middle) if last < first else (s > middle)
    tail = beyond[::-1].cummin()[::-1]
    step = int(tail[tail].index[0])
    verb = "fell" if last < first else "rose"
    return [{"site": site, "step": step, "last_step": int(s.index[-1]), "severity": "note", "label": f"R² {verb}",
             "metric": "r2_mean", "first_value": float(first), "last_value": float(last), "threshold": R2_CHANGE,
             "finding": f"{site}: {name} {verb} from {first:.2f} to {last:.2f} after step {step}"}]


def curvature(rows: pd.DataFrame) -> pd.DataFrame:
    """Per curvature step: lr, a_crit of the step, λ_max, 2/λ_max and ``analyze``'s descent verdict
    (:func:`normscope.rules.descent_verdict`; no parting step is measured during training)."""
    wide = rows[rows["site"] == MODEL_SITE].pivot_table(index="step", columns="metric", values="value", aggfunc="last")
    for column in ("lr", "a_crit", "lambda_max", "stability_limit"):
        if column not in wide.columns:
            wide[column] = math.nan
    wide = wide.dropna(subset=["lr"])
    wide = wide[wide["a_crit"].notna() | wide["stability_limit"].notna()]
    out = wide[["lr", "a_crit", "lambda_max", "stability_limit"]].reset_index()
    verdicts = [_verdict(r.lr, r.a_crit, r.lambda_max, r.stability_limit) for r in out.itertuples()]
    out["verdict"] = [v for v, _ in verdicts]
    out["severity"] = [s for _, s in verdicts]
    return out


def _verdict(lr: float, a_crit: float, lambda_max: float, limit: float) -> tuple[str, str]:
    """:func:`normscope.rules.descent_verdict` of one step; a step whose a_crit was not recorded
    is judged on 2/λ_max alone (the same rule, without the a_crit test)."""
    if np.isfinite(a_crit):
        return descent_verdict(lr, a_crit, lambda_max if np.isfinite(lambda_max) else 0.0, math.nan)
    return ("unstable along the top curvature direction", "critical") if lr > limit else ("stable", "ok")


def _curvature_findings(rows: pd.DataFrame) -> list[dict]:
    lr, limit = series(rows, MODEL_SITE, "lr"), series(rows, MODEL_SITE, "stability_limit")
    out = []
    both = pd.concat({"lr": lr, "limit": limit}, axis=1).dropna()
    exceeded = both[both["lr"] > both["limit"]]
    if not exceeded.empty:
        step = int(exceeded.index[0])
        stays = bool((both.loc[step:, "lr"] > both.loc[step:, "limit"]).all())
        out.append({"site": MODEL_SITE, "step": step, "last_step": int(both.index[-1]), "severity": "critical",
                    "label": "lr above 2/λ_max", "metric": "stability_limit", "first_value": float(exceeded["limit"].iloc[0]),
                    "last_value": float(both["limit"].iloc[-1]), "threshold": float(exceeded["lr"].iloc[0]),
                    "finding": f"lr exceeded 2/λ_max from step {step}" + ("" if stays else " (not at every later step)")})
    a_crit = pd.concat({"lr": lr, "a_crit": series(rows, MODEL_SITE, "a_crit")}, axis=1).dropna()
    over = a_crit[a_crit["lr"] >= a_crit["a_crit"]]
    if not over.empty:
        step = int(over.index[0])
        out.append({"site": MODEL_SITE, "step": step, "last_step": int(a_crit.index[-1]), "severity": "critical",
                    "label": "not a descent step", "metric": "a_crit", "first_value": float(over["a_crit"].iloc[0]),
                    "last_value": float(a_crit["a_crit"].iloc[-1]), "threshold": float(over["lr"].iloc[0]),
                    "finding": f"lr was at or above the step's a_crit from step {step}: not a descent step under the quadratic model"})
    return out


def findings(rows: pd.DataFrame) -> pd.DataFrame:
    """Findings over time as records (:data:`FINDING_COLUMNS`), in order of step."""
    out = stats_intervals(rows)
    for site in [s for s in dict.fromkeys(rows["site"]) if s != MODEL_SITE and "r2_mean" in set(rows.loc[rows["site"] == s, "metric"])]:
        out += _change(series(rows, site, "r2_mean"), site, "R²")
    out += _curvature_findings(rows)
    table = pd.DataFrame(out, columns=FINDING_COLUMNS)
    return table.sort_values("step", kind="stable", ignore_index=True)


# ---------------------------------------------------------------- the page


@dataclass
class RunPage:
    """What the run template shows."""

    steps: str
    overview: Overview | None
    curvature_line: str
    findings: list[tuple[str, str]]
    unlisted: int
    findings_table: HtmlTable | None
    curvature_figure: RenderedFigure
    curvature_table: HtmlTable | None
    site_figures: list[RenderedFigure]
    side_by_side: Overview | None = None
    analysis_report: str = ""


def _span(s: pd.Series, digits: int = 3) -> tuple[str, str]:
    """``"0.0236 → 0.819"`` (first → last recorded value) and the last value as sort key."""
    s = s.dropna()
    if s.empty:
        return "", ""
    text = number(s.iloc[0], digits) if len(s) == 1 else f"{number(s.iloc[0], digits)} → {number(s.iloc[-1], digits)}"
    return text, repr(float(s.iloc[-1]))


def first_screen(rows: pd.DataFrame, found: pd.DataFrame) -> Overview | None:
    """One row per site: first → last of each figure, what crossed a threshold and when, and the state at the last step."""
    sites = norm_sites(rows)
    if not sites:
        return None
    columns = ["site", *SHOWN.values(), "what happened, when", "at the last recorded step"]
    table: list[list[OverviewCell]] = []
    for site in sites:
        cells = [OverviewCell(site, site, name=True)]
        for metric in SHOWN:
            text, key = _span(series(rows, site, metric))
            if metric == "eps_fraction_max" and text:
                s = series(rows, site, metric).dropna()
                text, key = f"{percent(s.iloc[0])} → {percent(s.iloc[-1])} (max {percent(s.max())})", repr(float(s.max()))
            missing = not text
            cells.append(OverviewCell(text or ("not applicable" if metric in ("var_ratio_median", "mean_drift_mean") else "not recorded"),
                                      key, missing=missing))
        mine = found[found["site"] == site]
        events = "; ".join(f"{r.label} ({r.severity}) " + (f"steps {r.step}–{r.last_step}" if r.last_step != r.step else f"at step {r.step}")
                           for r in mine.head(MAX_EVENTS).itertuples())
        events += f"; and {len(mine) - MAX_EVENTS} more" if len(mine) > MAX_EVENTS else ""
        cells.append(OverviewCell(events or "nothing crossed analyze's thresholds", str(len(mine))))
        last_step = int(series(rows, site, "eps_fraction_max").index.max())
        now = mine[(mine["last_step"] == last_step) & (mine["severity"].isin(SEVERITIES[:3]))]
        if len(now):
            worst = now.sort_values("severity", key=lambda s: s.map(SEVERITIES.index), kind="stable").iloc[0]
            cells.append(OverviewCell(f"{worst['label']} (since step {int(worst['step'])})", str(SEVERITIES.index(worst["severity"])),
                                      str(worst["severity"])))
        else:
            cleared = mine[mine["severity"].isin(SEVERITIES[:3])]
            text = f"within thresholds since step {_next_step(rows, site, int(cleared['last_step'].max()))}" if len(cleared) else "within thresholds"
            cells.append(OverviewCell(text, str(SEVERITIES.index("ok")), "ok"))
        table.append(cells)
    return Overview(columns, table, [], len(table))


def _next_step(rows: pd.DataFrame, site: str, step: int) -> int:
    steps = sorted(series(rows, site, "eps_fraction_max").index)
    later = [s for s in steps if s > step]
    return int(later[0]) if later else step


def _curvature_line(table: pd.DataFrame) -> str:
    if table.empty:
        return "No curvature was recorded in this run (Monitor every_curvature=N records lr against a_crit and 2/λ_max)."
    parts = []
    for verdict, part in table.groupby("verdict", sort=False):
        steps = [int(s) for s in part["step"]]
        shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
        parts.append(f"{verdict} at {len(steps)} of {len(table)} curvature steps ({shown})")
    return "Learning rate against the curvature (normscope analyze's descent rule at each curvature step): " + "; ".join(parts) + "."


def _png(fig: Figure) -> tuple[str, int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    return base64.b64encode(buffer.getvalue()).decode("ascii"), width, height


def site_figure(rows: pd.DataFrame, site: str) -> RenderedFigure:
    """Four panels over the recorded steps with ``analyze``'s thresholds: variance ratio (band
    0.5–2), mean drift (0.5), eps share (10%), R²."""
    low, high = VAR_RATIO_BAND
    panels = [("variance ratio (batch / running)", ["var_ratio_median"], "log"),
              ("mean drift (running std)", ["mean_drift_mean"], "linear"),
              ("eps share", ["eps_fraction_max", "eps_dominated_fraction"], "linear"),
              ("R² of the gradient regression", ["r2_median", "r2_mean", "r2_pooled"], "linear")]
    with quiet():
        fig = Figure(figsize=(WIDTH, 2.5), dpi=DPI, layout="constrained")
        for ax, (title, metrics, scale) in zip(fig.subplots(1, 4), panels):
            drawn = False
            for metric in metrics:
                s = series(rows, site, metric).dropna()
                if not s.empty:
                    ax.plot(s.index, s.values, marker=".", label=metric)
                    drawn = True
            if metrics[0] == "var_ratio_median" and drawn:
                ax.axhspan(low, high, color="#1e7b3c", alpha=0.12, label=f"{low:g}–{high:g}")
            if metrics[0] == "mean_drift_mean" and drawn:
                ax.axhline(DRIFT_WARNING, color="#9a5b13", linestyle="--", linewidth=1, label=f"{DRIFT_WARNING:g}")
            if metrics[0] == "eps_fraction_max" and drawn:
                ax.axhline(EPS_NOTE, color="#9a5b13", linestyle="--", linewidth=1, label=f"{EPS_NOTE:.0%}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if drawn:
                ax.set_yscale(scale)
                ax.legend(fontsize=6)
            else:
                ax.text(0.5, 0.5, "not recorded for this site", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        png, width, height = _png(fig)
    return RenderedFigure(f"run_{site}", site, "Recorded steps of this site; shaded band and dashed lines: the thresholds of "
                          "normscope analyze (variance ratio 0.5–2, mean drift 0.5 running std, eps share 10%).", png, width, height)


def curvature_figure(rows: pd.DataFrame) -> RenderedFigure:
    """lr against a_crit of the step and 2/λ_max, on a log axis."""
    title = "Learning rate against a_crit and 2/λ_max"
    caption = ("At each curvature step: a_crit = 2||d||²/dᵀHd along the step and the stability limit 2/λ_max; "
               "a step with lr below both is a descent step of the local quadratic model.")
    lr, a_crit, limit = (series(rows, MODEL_SITE, m) for m in ("lr", "a_crit", "stability_limit"))
    if a_crit.dropna().empty and limit.dropna().empty:
        return RenderedFigure("run_curvature", title, caption, skipped="no curvature recorded (Monitor every_curvature=N)")
    with quiet():
        fig = Figure(figsize=(WIDTH, 3.0), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        for s, name, marker in ((a_crit, "a_crit (whole step)", "o"), (limit, "2 / λ_max", "s")):
            finite = s[np.isfinite(s)]
            if not finite.empty:
                ax.plot(finite.index, finite.values, marker=marker, linestyle="-", label=name)
        if not lr.empty:
            ax.plot(lr.index, lr.values, label="lr", color="black", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        png, width, height = _png(fig)
    return RenderedFigure("run_curvature", title, caption, png, width, height)


def _table(name: str, frame: pd.DataFrame) -> HtmlTable | None:
    return html_table(name, frame) if len(frame) else None


def side_by_side(rows: pd.DataFrame, screen: Overview | None, analysis) -> Overview:
    """Per site the run's last recorded figures beside the analysis's ``sites_overview``; the
    run's state at its last step from its first ``screen``."""
    overview = analysis.overview.set_index("site") if len(analysis.overview) else pd.DataFrame()
    pairs = [("var_ratio_median", "var_ratio"), ("mean_drift_mean", "mean_drift"), ("eps_fraction_max", "eps_share"), ("r2_median", "r2_median")]
    columns = ["site"] + [f"{label}: {who}" for metric, _ in pairs for label in [SHOWN[metric]] for who in ("run, last step", "analysis")]
    columns += ["run: at the last recorded step", "analysis: verdict"]
    by_site = {row[0].text: row for row in (screen.shown if screen is not None else [])}
    table = []
    for site in list(dict.fromkeys([*norm_sites(rows), *overview.index])):
        cells = [OverviewCell(site, site, name=True)]
        for metric, column in pairs:
            run = series(rows, site, metric).dropna()
            cells.append(OverviewCell(number(run.iloc[-1]), repr(float(run.iloc[-1]))) if len(run) else
                         OverviewCell("not in the run" if site not in by_site else "not recorded", "", missing=True))
            value = overview[column].get(site, math.nan) if column in overview.columns else math.nan
            cells.append(OverviewCell(number(value), repr(float(value))) if pd.notna(value) else
                         OverviewCell("not in the analysis" if site not in overview.index else "not measured", "", missing=True))
        cells.append(by_site[site][-1] if site in by_site else OverviewCell("not in the run", "", missing=True))
        if site in overview.index:
            severity = str(overview.loc[site].get("severity", ""))
            cells.append(OverviewCell(str(overview.loc[site]["verdict"]), str(SEVERITIES.index(severity)) if severity in SEVERITIES else "", severity))
        else:
            cells.append(OverviewCell("not in the analysis", "", missing=True))
        table.append(cells)
    return Overview(columns, table, [], len(table))


def render_run(folder: Path, out: Path | None = None, compare: Path | None = None) -> Path:
    """Write the run's report (``folder/_report.html`` by default) and ``_findings.csv``; with
    ``compare`` (an ``analyze`` output folder), the analysis side by side. Return the page's path."""
    folder = Path(folder)
    rows = load_rows(folder)
    found = findings(rows)
    write_csv(folder / FINDINGS_FILE, found)
    target = Path(out) if out else folder / REPORT_FILE
    analysis = None
    if compare is not None:
        from normscope.result import REPORT_FILE as ANALYSIS_REPORT, AnalysisResult

        analysis = AnalysisResult.load(compare)
        link = Path(compare) / ANALYSIS_REPORT
    curve = curvature(rows)
    sites = norm_sites(rows)
    steps = sorted(int(s) for s in rows["step"].unique())
    page = RunPage(
        steps=(f"{len(steps)} recorded steps ({steps[0]}–{steps[-1]}), {len(sites)} normalization sites, "
               f"curvature at {len(curve)} steps." if steps else "No recorded steps."),
        overview=first_screen(rows, found),
        curvature_line=_curvature_line(curve),
        findings=[(str(r.severity), str(r.finding)) for r in found.head(MAX_LISTED).itertuples()],
        unlisted=max(0, len(found) - MAX_LISTED),
        findings_table=_table("findings_over_time", found.drop(columns=["finding"])),
        curvature_figure=curvature_figure(rows),
        curvature_table=_table("curvature", curve),
        site_figures=[site_figure(rows, site) for site in sites],
    )
    if analysis is not None:
        page.side_by_side = side_by_side(rows, page.overview, analysis)
        page.analysis_report = os.path.relpath(link, target.parent) if link.exists() else ""
    html = environment().get_template("run.html.j2").render(
        kind="run report", heading="Training run report", title=folder.name or str(folder),
        nav=[("summary", "At a glance", True), ("findings", "Findings over time", True), ("curvature", "Learning rate and curvature", True),
             ("sites", "Sites", True), *([("analysis", "Run and analysis side by side", True)] if analysis is not None else [])],
        run=page, compare_name=str(compare) if compare is not None else "",
        glossary=GLOSSARY, references=[text for _, text in REFERENCES])
    return write_text(target, html)
