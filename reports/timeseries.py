"""The report of a monitored run folder: time series per site and findings over time.

Reads the Parquet rows of :class:`normscope.Monitor` (``step, rank, site, metric, value``) and
renders one self-contained HTML page (figures inline as base64 PNG): per normalization site,
R^2 of the gradient regression, running-statistic drift and variance ratio, and the eps share of
the normalizer over steps; for the model, a_crit of the step against the lr, and lambda_max's
stability limit 2/lambda_max against the lr. Findings over time are records ``(site, step,
finding)``, also written to ``_findings.csv`` next to the page (names starting with ``_`` are
skipped by Parquet readers of the run folder). Parts are read and checked by
:mod:`normscope.monitor.parts`; both files are written through :mod:`normscope.safe_io`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from normscope.errors import OutputError  # noqa: E402
from normscope.monitor.parts import read_rows  # noqa: E402
from normscope.safe_io import write_csv, write_text  # noqa: E402

REPORT_FILE = "_report.html"
FINDINGS_FILE = "_findings.csv"
MODEL_SITE = "model"
R2_CHANGE = 0.25
EPS_SHARE = 0.5
DRIFT = 0.5


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


def _change(s: pd.Series, site: str, name: str) -> list[tuple[str, int, str]]:
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
    return [(site, step, f"{site}: {name} {verb} from {first:.2f} to {last:.2f} after step {step}")]


def _first_above(s: pd.Series, threshold: float, site: str, text: str) -> list[tuple[str, int, str]]:
    above = s[s > threshold]
    if above.empty:
        return []
    step = int(above.index[0])
    return [(site, step, text.format(step=step, value=float(above.iloc[0])))]


def findings(rows: pd.DataFrame) -> pd.DataFrame:
    """Findings over time as records ``(site, step, finding)``, in order of step."""
    out: list[tuple[str, int, str]] = []
    for site in [s for s in dict.fromkeys(rows["site"]) if s != MODEL_SITE and "r2_mean" in set(rows.loc[rows["site"] == s, "metric"])]:
        out += _change(series(rows, site, "r2_mean"), site, "R²")
        out += _first_above(series(rows, site, "eps_fraction_max"), EPS_SHARE, site,
                            f"{site}: eps is more than half of the normalizer from step {{step}} (up to {{value:.0%}})")
        out += _first_above(series(rows, site, "mean_drift_mean"), DRIFT, site,
                            f"{site}: batch means sit more than {DRIFT} running std from the running means from step {{step}}")
    lr, limit = series(rows, MODEL_SITE, "lr"), series(rows, MODEL_SITE, "stability_limit")
    both = pd.concat({"lr": lr, "limit": limit}, axis=1).dropna()
    exceeded = both[both["lr"] > both["limit"]]
    if not exceeded.empty:
        step = int(exceeded.index[0])
        stays = bool((both.loc[step:, "lr"] > both.loc[step:, "limit"]).all())
        out.append((MODEL_SITE, step, f"lr exceeded 2/λ_max from step {step}" + ("" if stays else " (not at every later step)")))
    a_crit = pd.concat({"lr": lr, "a_crit": series(rows, MODEL_SITE, "a_crit")}, axis=1).dropna()
    over = a_crit[a_crit["lr"] >= a_crit["a_crit"]]
    if not over.empty:
        out.append((MODEL_SITE, int(over.index[0]), f"lr was at or above the step's a_crit from step {int(over.index[0])}: "
                    "not a descent step under the quadratic model"))
    table = pd.DataFrame(out, columns=["site", "step", "finding"])
    return table.sort_values("step", kind="stable", ignore_index=True)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _site_figure(rows: pd.DataFrame, site: str) -> str:
    panels = [("R² of the gradient regression", ["r2_mean", "r2_pooled"]),
              ("drift and variance ratio", ["mean_drift_mean", "var_ratio_median"]),
              ("eps share of the normalizer", ["eps_fraction_max", "eps_dominated_fraction"])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
    for ax, (title, metrics) in zip(axes, panels):
        drawn = False
        for metric in metrics:
            s = series(rows, site, metric)
            if not s.empty:
                ax.plot(s.index, s.values, marker=".", label=metric)
                drawn = True
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not recorded for this kind", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    return _png(fig)


def _model_figure(rows: pd.DataFrame) -> str | None:
    lr, a_crit, limit = (series(rows, MODEL_SITE, m) for m in ("lr", "a_crit", "stability_limit"))
    if a_crit.empty and limit.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
    for ax, (s, name) in zip(axes, ((a_crit, "a_crit (whole step)"), (limit, "2 / λ_max"))):
        finite = s[s.map(math.isfinite)]
        ax.plot(finite.index, finite.values, marker="o", label=name)
        if not lr.empty:
            ax.plot(lr.index, lr.values, label="lr", color="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(f"{name} against the lr", fontsize=9)
        ax.legend(fontsize=7)
    return _png(fig)


def render_run(folder: Path, out: Path | None = None) -> Path:
    """Write the run's report (``folder/_report.html`` by default) and ``_findings.csv``; return the page's path."""
    folder = Path(folder)
    rows = load_rows(folder)
    found = findings(rows)
    write_csv(folder / FINDINGS_FILE, found)
    sites = [s for s in dict.fromkeys(rows["site"]) if s != MODEL_SITE and "eps_fraction_max" in set(rows.loc[rows["site"] == s, "metric"])]
    parts = [f"<h1>normscope run: {html.escape(str(folder))}</h1>",
             f"<p>{rows['step'].nunique()} recorded steps ({int(rows['step'].min())}–{int(rows['step'].max())}), {len(sites)} sites.</p>",
             "<h2>Findings over time</h2>"]
    parts.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in found["finding"]) + "</ul>" if len(found)
                 else "<p>No change beyond the thresholds (R² by more than 0.25, eps above half, drift above 0.5, lr above 2/λ_max).</p>")
    model = _model_figure(rows)
    if model:
        parts += ["<h2>Curvature against the learning rate</h2>", f'<img alt="curvature" src="data:image/png;base64,{model}">']
    parts.append("<h2>Sites</h2>")
    for site in sites:
        parts += [f"<h3>{html.escape(site)}</h3>", f'<img alt="{html.escape(site)}" src="data:image/png;base64,{_site_figure(rows, site)}">']
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>normscope run</title>"
            "<style>body{font-family:sans-serif;max-width:1300px;margin:1em auto}img{max-width:100%}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    return write_text(Path(out) if out else folder / REPORT_FILE, page)
