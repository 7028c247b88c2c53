"""The report's figures: one function per figure, each declaring the table columns it needs.

Every figure is registered with :func:`figure` together with its section, title, caption and
``requires`` (table name -> columns, see ``docs/tables.md``). :func:`render_figures` draws the
figures of a section whose data is present and, for the others, says what is missing, the way
Cockpit's plots skip themselves. Figures are drawn on ``matplotlib.figure.Figure`` objects
(the Agg canvas, no pyplot state) and embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

Tables = dict[str, pd.DataFrame]
DrawFn = Callable[[Tables, Figure], None]

DPI = 100
PALETTE = "colorblind"
WIDTH = 10.4
MAX_LABEL = 28
SHORT_ENOUGH = 16
ESTIMATOR_ORDER = ("batchnorm", "per_example", "microbatch", "two_stage", "batch_renorm", "control")
ESTIMATOR_COLORS = dict(zip(ESTIMATOR_ORDER, sns.color_palette(PALETTE, len(ESTIMATOR_ORDER))))
MODE_COLORS = {"train": sns.color_palette(PALETTE)[0], "eval": sns.color_palette(PALETTE)[1]}
ZERO_MARKER = dict(marker="v", mfc="white", ms=6, ls="none")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No matplotlib, seaborn, pandas or numpy warning reaches the terminal while drawing."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def short_names(names: list[str]) -> list[str]:
    """Site names without the dotted prefix they all share (``model.encoder.layer.0.ln`` ->
    ``layer.0.ln`` when every name starts with ``model.encoder.``), and names still longer than
    :data:`MAX_LABEL` characters cut in the middle (``…``), kept distinct."""
    names = [str(n) for n in names]
    if not names or max(len(n) for n in names) <= SHORT_ENOUGH:
        return names
    parts = [n.split(".") for n in names]
    common = os.path.commonprefix(parts) if len(parts) > 1 else parts[0][:-1]
    common = common[: min(len(p) for p in parts) - 1]
    stripped = [".".join(p[len(common):]) for p in parts]
    out = []
    for name in stripped:
        if len(name) > MAX_LABEL:
            keep = MAX_LABEL - 1
            name = name[: keep // 2] + "…" + name[-(keep - keep // 2):]
        out.append(name)
    return out if len(set(out)) == len(out) else stripped


def _shared_prefix(names: list[str]) -> str:
    """The dotted prefix :func:`short_names` strips, for an axis label (empty when none)."""
    parts = [str(n).split(".") for n in names]
    if len(parts) < 2 or max(len(n) for n in map(str, names)) <= SHORT_ENOUGH:
        return ""
    common = os.path.commonprefix(parts)[: min(len(p) for p in parts) - 1]
    return ".".join(common) + "." if common else ""


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure: where it goes, what it needs and how it is drawn."""

    key: str
    section: str
    title: str
    caption: str
    requires: dict[str, tuple[str, ...]]
    size: tuple[float, float]
    draw: DrawFn


@dataclass(frozen=True)
class RenderedFigure:
    """A figure ready for the template: a base64 PNG, or the reason it was skipped."""

    key: str
    title: str
    caption: str
    png_base64: str | None = None
    width: int = 0
    height: int = 0
    skipped: str | None = None


FIGURES: list[FigureSpec] = []


def figure(
    section: str, title: str, caption: str, requires: dict[str, tuple[str, ...]], size: tuple[float, float] = (WIDTH, 3.6)
) -> Callable[[DrawFn], DrawFn]:
    """Register ``draw(tables, fig)`` as a figure of ``section`` that needs ``requires``."""

    def register(draw: DrawFn) -> DrawFn:
        FIGURES.append(FigureSpec(draw.__name__, section, title, caption, requires, size, draw))
        draw.__doc__ = f"Draw '{title}' on ``fig``: {caption}"
        return draw

    return register


def missing_data(tables: Tables, requires: dict[str, tuple[str, ...]]) -> list[str]:
    """What of ``requires`` is absent from ``tables``: ``"name (no table)"``, ``"name (empty)"``
    or ``"name.column"``."""
    missing: list[str] = []
    for name, columns in requires.items():
        table = tables.get(name)
        if table is None:
            missing.append(f"{name} (no table)")
        elif table.empty:
            missing.append(f"{name} (empty)")
        else:
            missing += [f"{name}.{c}" for c in columns if c not in table.columns]
    return missing


def render_figures(section: str, tables: Tables) -> list[RenderedFigure]:
    """Draw every figure of ``section`` whose required columns are present; skip the others."""
    return [_render(spec, tables) for spec in FIGURES if spec.section == section]


def _render(spec: FigureSpec, tables: Tables) -> RenderedFigure:
    missing = missing_data(tables, spec.requires)
    if missing:
        return RenderedFigure(spec.key, spec.title, spec.caption, skipped="needs " + ", ".join(missing))
    with quiet(), sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=spec.size, dpi=DPI, layout="constrained")
        try:
            spec.draw(tables, fig)
        except _NoData as reason:
            return RenderedFigure(spec.key, spec.title, spec.caption, skipped=str(reason))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return RenderedFigure(spec.key, spec.title, spec.caption, encoded, width, height)


class _NoData(Exception):
    """Raised by a draw function whose tables are present but hold no usable rows."""


def _by_depth(table: pd.DataFrame) -> list[str]:
    """Site names in forward order (by ``depth`` when present, else first appearance)."""
    if "depth" in table.columns:
        return table.sort_values("depth", kind="stable")["site"].drop_duplicates().tolist()
    return table["site"].drop_duplicates().tolist()


def _finite(table: pd.DataFrame, columns: list[str], positive: bool = False, empty: str | None = None) -> pd.DataFrame:
    """The rows whose ``columns`` are finite (and > 0 if ``positive``); with ``empty``, raise
    :class:`_NoData` with that reason when none is left."""
    values = table[columns].apply(pd.to_numeric, errors="coerce")
    keep = np.isfinite(values).all(axis=1)
    if positive:
        keep &= (values > 0).all(axis=1)
    if empty is not None and not keep.any():
        raise _NoData(empty)
    return table[keep]


def _total(table: pd.DataFrame) -> pd.DataFrame:
    """The ``group == "total"`` rows when there are any, else the whole table."""
    total = table[table["group"].astype(str) == "total"]
    return total if not total.empty else table


def _batch_axis(ax, sizes) -> None:
    """A log2 x axis with one labelled tick per batch size."""
    sizes = sorted({int(v) for v in sizes})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in sizes])


def _legend_right(ax, *args, **kwargs) -> None:
    """A frameless legend outside the axes, to the right."""
    ax.legend(*args, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5), **kwargs)


def _site_axis(fig: Figure, ax, sites: list[str]) -> None:
    """Sites on the y axis, first at the top, shortened by :func:`short_names`; the figure grows
    with the number of sites."""
    ax.set_yticks(range(len(sites)), short_names(sites))
    ax.set_ylim(len(sites) - 0.5, -0.5)
    prefix = _shared_prefix(sites)
    ax.set_ylabel(f"site ({prefix}…)" if prefix else "site")


def _site_height(sites: list[str], per_site: float = 0.28, base: float = 1.6) -> float:
    return min(14.0, base + per_site * len(sites))


def _mark_zeros(ax, x, y, color) -> None:
    """Points whose value is zero or not finite, drawn as open triangles on the bottom of a log axis."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    bad = ~(np.isfinite(y) & (y > 0))
    if bad.any():
        ax.plot(x[bad], np.full(bad.sum(), ax.get_ylim()[0]), color=color, clip_on=False, **ZERO_MARKER)


@figure(
    "stats",
    "Drift of the running statistics",
    "Per channel, batch moments against the running moments used in eval mode: mean drift = |batch mean − running mean| / "
    "running std (left) and variance ratio = batch variance / running variance (right, log axis; dashed: 1, shaded: the band "
    "0.5–2 outside which a finding is raised; MATH.md §1). Stale statistics show as drift far from 0 or ratios outside the band.",
    {"stats_channels": ("site", "mean_drift", "var_ratio")},
)
def stats_drift(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["stats_channels"], ["mean_drift", "var_ratio"], positive=False)
    table = table[table["var_ratio"] > 0]
    if table.empty:
        raise _NoData("no site keeps running statistics (only BatchNorm-style layers do), so there is no drift to show")
    sites = _by_depth(table)
    fig.set_size_inches(fig.get_figwidth(), _site_height(sites))
    left, right = fig.subplots(1, 2, sharey=True)
    table = table.assign(y=table["site"].map({s: i for i, s in enumerate(sites)}))
    common = dict(y="site", order=sites, orient="h", color="#4c72b0", fliersize=1.5, linewidth=0.8)
    sns.boxplot(data=table, x="mean_drift", ax=left, **common)
    sns.boxplot(data=table, x="var_ratio", ax=right, log_scale=True, **common)
    right.axvspan(0.5, 2.0, color="#55a868", alpha=0.12, lw=0)
    right.axvline(1.0, color="0.3", lw=1, ls="--")
    left.set(xlabel="mean drift (in running std)")
    right.set(xlabel="batch var / running var (log)", ylabel="")
    _site_axis(fig, left, sites)
    right.tick_params(labelleft=False)


@figure(
    "stats",
    "Where eps dominates the variance",
    "Per partition: eps share = eps / (batch variance + eps), log axis. Above 0.5 (dashed) eps outweighs the variance and the "
    "output variance σ²/(σ² + eps) falls well below 1 (MATH.md §2).",
    {"stats_channels": ("site", "eps_fraction")},
)
def stats_eps(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["stats_channels"], ["eps_fraction"], positive=True, empty="stats_channels has no positive finite eps_fraction")
    sites = _by_depth(table)
    fig.set_size_inches(fig.get_figwidth(), _site_height(sites))
    ax = fig.subplots()
    sns.stripplot(data=table, y="site", x="eps_fraction", order=sites, orient="h", ax=ax, size=3, alpha=0.6, jitter=0.25,
                  log_scale=True, color="#4c72b0")
    ax.axvline(0.5, color="#c44e52", lw=1, ls="--", label="eps = batch variance")
    ax.set(xlabel="eps / (batch var + eps) (log)")
    _site_axis(fig, ax, sites)
    _legend_right(ax, fontsize="small")


@figure(
    "gls",
    "Gradient explained by the least-squares fit, by depth and kind",
    "Per site: median (dot) and 10–90% range (bar) over partitions of R² = 1 − ||g − α − βz||² / ||g||², g = dL/dz (\"Normalization "
    "Gradients are Least-Squares Residuals\", Theorem 1; MATH.md §2). The backward pass removes the explained part; the findings "
    "rank sites by this median.",
    {"gls_sites": ("site", "kind", "depth", "r2_median", "r2_q10", "r2_q90")},
)
def gls_r2_depth(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_sites"].sort_values("depth", kind="stable"), ["r2_median"], empty="gls_sites has no finite r2_median")
    table = table.reset_index(drop=True)
    sites = table["site"].tolist()
    fig.set_size_inches(fig.get_figwidth(), _site_height(sites))
    ax = fig.subplots()
    kinds = sorted(table["kind"].astype(str).unique())
    colors = dict(zip(kinds, sns.color_palette(PALETTE)))
    for kind, rows in table.groupby(table["kind"].astype(str), sort=True):
        err = np.vstack([rows["r2_median"] - rows["r2_q10"], rows["r2_q90"] - rows["r2_median"]]).clip(min=0)
        ax.errorbar(rows["r2_median"], rows.index, xerr=np.nan_to_num(err), fmt="o", capsize=3, color=colors[kind], label=kind)
    top = float(np.nanmax(table[["r2_median", "r2_q90"]].to_numpy()))
    ax.set(xlabel="R² of g on z (share of the gradient explained)", xlim=(min(0.0, float(table["r2_q10"].min())), min(1.02, max(0.05, 1.15 * top))))
    _site_axis(fig, ax, sites)
    _legend_right(ax, title="kind")


@figure(
    "gls",
    "Gradient against normalized activation for one partition",
    "Each point is one element i of a partition: (z_i, g_i = dL/dz_i); the line is the fit α + βz whose residual, divided by s, "
    "is dL/dx (\"Normalization Gradients are Least-Squares Residuals\", Figure 1 and Theorem 1; MATH.md §2).",
    {"gls_scatter": ("site", "partition", "z", "g", "fit")},
    size=(WIDTH, 3.4),
)
def gls_scatter(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_scatter"], ["z", "g", "fit"], empty="gls_scatter has no finite (z, g) pairs")
    columns = [c for c in ("site", "record", "partition") if c in table.columns]
    keys = table[columns].drop_duplicates()
    picks = keys.iloc[np.unique(np.linspace(0, len(keys) - 1, min(3, len(keys))).round().astype(int))]
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    names = dict(zip(table["site"].drop_duplicates(), short_names(table["site"].drop_duplicates().tolist())))
    for ax, (_, key) in zip(axes, picks.iterrows()):
        rows = table[np.logical_and.reduce([table[c] == key[c] for c in columns])].sort_values("z")
        if len(rows) <= 200:
            ax.vlines(rows["z"], rows["fit"], rows["g"], color="0.75", lw=0.6, label="residual")
        ax.scatter(rows["z"], rows["g"], s=9 if len(rows) <= 200 else 3, alpha=1.0 if len(rows) <= 200 else 0.35,
                   color="#4c72b0", zorder=3, lw=0, label="(z, g)")
        ax.plot(rows["z"], rows["fit"], color="#c44e52", lw=1.6, zorder=4, label="α + βz")
        ax.set_title(f"{names[key['site']]}, partition {key['partition']}", fontsize="small")
        ax.set(xlabel="z", ylabel="g = dL/dz" if ax is axes[0] else "")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False, fontsize="small")


@figure(
    "gls",
    "Error of the naive gradient",
    "Per site: ||naive − true|| / ||true|| with naive = (γ / s) dL/dy, the expression that ignores that the batch moments "
    "depend on x; the difference is the explained part (α + βz)/s (MATH.md §2).",
    {"gls_sites": ("site", "depth", "naive_gap")},
)
def gls_naive_gap(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_sites"].sort_values("depth", kind="stable"), ["naive_gap"], empty="gls_sites has no finite naive_gap")
    sites = table["site"].tolist()
    fig.set_size_inches(fig.get_figwidth(), _site_height(sites))
    ax = fig.subplots()
    ax.barh(range(len(sites)), table["naive_gap"].to_numpy(float), color="#55a868")
    ax.set(xlabel="relative error of the naive gradient")
    _site_axis(fig, ax, sites)


@figure(
    "gls",
    "Explained fraction against batch size",
    "Mean over partitions of R² for each site, on the same data split into batches of each size (at batch size 2 the fit of two "
    "points is exact; MATH.md §2).",
    {"gls_batch_sweep": ("site", "batch_size", "r2_mean")},
)
def gls_batch_sweep(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_batch_sweep"], ["batch_size", "r2_mean"], empty="gls_batch_sweep has no finite rows")
    sites = _by_depth(table)
    names = dict(zip(sites, short_names(sites)))
    ax = fig.subplots()
    colors = sns.color_palette(PALETTE, len(sites))
    for color, site in zip(colors, sites):
        rows = table[table["site"] == site].groupby("batch_size", as_index=False)["r2_mean"].mean()
        ax.plot(rows["batch_size"], rows["r2_mean"], "o-", color=color, ms=4, label=names[site])
    _batch_axis(ax, table["batch_size"])
    ax.set(xlabel="batch size", ylabel="mean R²")
    if len(sites) <= 12:
        _legend_right(ax, title="site", fontsize="small")


@figure(
    "gls",
    "Small-batch regularization",
    "Relative distance of each site's input gradient at batch size B to its gradient at the largest batch (thin: one line per "
    "site; bold: mean over sites), for the plain backward pass and the regularized one of \"Normalization Gradients are "
    "Least-Squares Residuals\" (two virtual items at z = +1 and −1 with running α*, β*; its Appendix C, MATH.md §2). "
    "Open triangles on the bottom edge: a distance of zero.",
    {"gls_regularization": ("site", "batch_size", "dist_plain", "dist_regularized")},
)
def gls_regularization(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_regularization"], ["batch_size", "dist_plain", "dist_regularized"],
                    empty="gls_regularization has no finite distances")
    if not (table[["dist_plain", "dist_regularized"]] > 0).any().any():
        raise _NoData("every distance in gls_regularization is zero")
    ax = fig.subplots()
    series = (("dist_plain", "plain", "#4c72b0"), ("dist_regularized", "regularized", "#dd8452"))
    for column, label, color in series:
        rows = table[table[column] > 0]
        for _, site in rows.groupby("site"):
            ax.plot(site["batch_size"], site[column], "-", color=color, alpha=0.25, lw=0.8)
        mean = rows.groupby("batch_size")[column].mean()
        ax.plot(mean.index, mean.to_numpy(), "o-", color=color, lw=2, label=f"{label} (mean over sites)")
    ax.set(yscale="log", xlabel="batch size", ylabel="distance to large-batch gradient")
    for column, _, color in series:
        _mark_zeros(ax, table["batch_size"], table[column], color)
    _batch_axis(ax, table["batch_size"])
    _legend_right(ax, fontsize="small")


@figure(
    "bias",
    "Estimator bias against batch size",
    "Relative bias ||E ĝ − g*|| / ||g*|| of each estimator (all parameters), Monte-Carlo noise removed, bars: 95% interval; "
    "log-log axes (MATH.md §4). Filled: measurable (interval above 0 and above the control's estimate, the noise floor); open: "
    "not measurable; triangles on the bottom edge: an estimate of zero. \"Extreme Normalization\" expects roughly 1/B for BatchNorm.",
    {"bias_estimators": ("estimator", "batch_size", "group", "rel_bias", "rel_bias_lo", "rel_bias_hi")},
)
def bias_loglog(tables: Tables, fig: Figure) -> None:
    table = _finite(_total(tables["bias_estimators"]), ["batch_size"], empty="bias_estimators has no rows")
    positive = table[np.isfinite(table["rel_bias"]) & (table["rel_bias"] > 0)]
    if positive.empty and not (table["rel_bias_hi"] > 0).any():
        raise _NoData("bias_estimators has no positive relative bias or interval")
    ax = fig.subplots()
    names = [n for n in ESTIMATOR_ORDER if n in set(table["estimator"])] + sorted(set(table["estimator"]) - set(ESTIMATOR_ORDER))
    offsets = np.exp(np.linspace(-0.08, 0.08, len(names))) if len(names) > 1 else [1.0]
    handles = []
    floor_values = pd.concat([positive["rel_bias"], table.loc[table["rel_bias_hi"] > 0, "rel_bias_hi"]])
    bottom = float(floor_values.min()) / 3
    for offset, name in zip(offsets, names):
        color = ESTIMATOR_COLORS.get(name, "0.4")
        rows = table[table["estimator"] == name].sort_values("batch_size")
        x = rows["batch_size"].to_numpy(float) * offset
        y = rows["rel_bias"].to_numpy(float)
        good = np.isfinite(y) & (y > 0)
        shown = rows["measurable"].to_numpy(bool) if "measurable" in rows.columns else (rows["rel_bias_lo"] > 0).to_numpy()
        ax.plot(x[good], y[good], "-", color=color, lw=1, alpha=0.8)
        ax.plot(x[good & shown], y[good & shown], "o", color=color, ms=5)
        ax.plot(x[good & ~shown], y[good & ~shown], "o", mfc="white", color=color, ms=5)
        handles.append(Line2D([], [], color=color, marker="o", lw=1, label=name))
        low = np.clip(y - rows["rel_bias_lo"].to_numpy(float), 0, None)
        high = np.clip(rows["rel_bias_hi"].to_numpy(float) - y, 0, None)
        ax.errorbar(x[good], y[good], yerr=[np.nan_to_num(low[good]), np.nan_to_num(high[good])], fmt="none", ecolor=color,
                    alpha=0.5, capsize=2, lw=0.9)
        zero = ~good
        if zero.any():
            ax.plot(x[zero], np.full(zero.sum(), bottom), color=color, clip_on=False, **ZERO_MARKER)
    ax.set(yscale="log", xlabel="batch size B", ylabel="relative bias")
    ax.set_ylim(bottom=bottom * 0.9)
    _batch_axis(ax, table["batch_size"])
    handles += [Line2D([], [], color="0.4", marker="o", ls="none", label="measurable"),
                Line2D([], [], color="0.4", marker="o", mfc="white", ls="none", label="not measurable"),
                Line2D([], [], color="0.4", **ZERO_MARKER, label="estimate 0")]
    _legend_right(ax, handles=handles, title="estimator", fontsize="small")


@figure(
    "bias",
    "Variance and direction of the estimators",
    "Left: tr(Cov ĝ) over R minibatches, relative to ||g*||²; right: cosine between the mean estimate and g* (all parameters; "
    "MATH.md §4). Each estimator has the same colour in every figure.",
    {"bias_estimators": ("estimator", "batch_size", "group", "variance", "cosine")},
)
def bias_variance(tables: Tables, fig: Figure) -> None:
    table = _finite(_total(tables["bias_estimators"]), ["batch_size", "variance", "cosine"], empty="bias_estimators has no finite variance / cosine")
    left, right = fig.subplots(1, 2)
    names = [n for n in ESTIMATOR_ORDER if n in set(table["estimator"])] + sorted(set(table["estimator"]) - set(ESTIMATOR_ORDER))
    for name in names:
        rows = table[table["estimator"] == name].groupby("batch_size", as_index=False)[["variance", "cosine"]].mean()
        color = ESTIMATOR_COLORS.get(name, "0.4")
        left.plot(rows["batch_size"], rows["variance"], "o-", color=color, ms=4)
        right.plot(rows["batch_size"], rows["cosine"], "o-", color=color, ms=4, label=name)
    logscale = bool((table["variance"] > 0).all())
    left.set(yscale="log" if logscale else "linear", xlabel="batch size B", ylabel="tr(Cov ĝ) / ||g*||²")
    right.set(xlabel="batch size B", ylabel="cosine to g*")
    for ax in (left, right):
        _batch_axis(ax, table["batch_size"])
    _legend_right(right, title="estimator", fontsize="small")


@figure(
    "descent",
    "Critical step against the learning rate",
    "a_crit = 2 (−gᵀd) / dᵀHd along each direction d (the update per unit learning rate; 2 ||d||² / dᵀHd for d = −g), per "
    "layer block of H and in total, in train (batch statistics) and eval (running statistics) mode; the step lr·d lowers the "
    "quadratic model when lr < a_crit (MATH.md §5). Dashed: the learning rate; dotted: 2 / λ_max of the whole model, above "
    "which gradient descent is unstable along the top curvature direction.",
    {"descent_directions": ("mode", "group", "a_crit", "lr")},
)
def descent_acrit(tables: Tables, fig: Figure) -> None:
    every = tables["descent_directions"]
    table = _finite(every, ["a_crit"], positive=True,
                    empty="descent_directions has no positive finite a_crit (dᵀHd <= 0 everywhere)")
    groups = ["total"] + [g for g in table["group"].drop_duplicates() if g != "total"]
    fig.set_size_inches(fig.get_figwidth(), _site_height(groups, 0.3, 1.9))
    ax = fig.subplots()
    labels = dict(zip(groups, ["total"] + short_names(groups[1:]) if len(groups) > 1 else ["total"]))
    position = {g: i for i, g in enumerate(groups)}
    if "direction" not in table.columns:
        table = table.assign(direction="gradient")
    directions = table["direction"].drop_duplicates().tolist()
    markers = dict(zip(directions, "osD^v"))
    for (mode, direction), rows in table.groupby(["mode", "direction"], sort=False):
        ax.scatter(rows["a_crit"], rows["group"].map(position), s=40, color=MODE_COLORS.get(mode, "0.4"), marker=markers[direction],
                   label=mode + (f" · {direction}" if len(directions) > 1 else ""), zorder=3)
    for lr in pd.to_numeric(table["lr"], errors="coerce").dropna().unique():
        ax.axvline(lr, color="0.3", ls="--", lw=1, label=f"lr = {lr:.3g}")
    spectrum = tables.get("descent_spectrum")
    if spectrum is not None and {"mode", "group", "rank", "stability_limit"} <= set(spectrum.columns):
        for _, row in spectrum[(spectrum["group"] == "total") & (spectrum["rank"] == 1)].iterrows():
            if np.isfinite(row["stability_limit"]) and row["stability_limit"] > 0:
                ax.axvline(row["stability_limit"], color=MODE_COLORS.get(row["mode"], "0.4"), ls=":", lw=1.2,
                           label=f"2/λ_max ({row['mode']})")
    ax.set_yticks(range(len(groups)), [labels[g] for g in groups])
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set(xscale="log", xlabel="a_crit (log)", ylabel="parameter block")
    dropped = every.drop(index=table.index)
    if not dropped.empty:
        names = ", ".join(sorted({f"{m} · {g}" for m, g in zip(dropped["mode"], dropped["group"])})[:4])
        ax.set_title(f"not shown (dᵀHd <= 0 or gᵀd >= 0, no critical step): {names}", fontsize="small", loc="left", color="0.35")
    _legend_right(ax, fontsize="small")


@figure(
    "descent",
    "Top Hessian eigenvalues",
    "Largest eigenvalues of the Hessian of the loss by Lanczos on Hessian-vector products (scipy eigsh); plain gradient descent "
    "is stable for lr < 2 / λ_max; dashed: 2 / lr (MATH.md §5).",
    {"descent_spectrum": ("mode", "group", "rank", "eigenvalue")},
)
def descent_spectrum(tables: Tables, fig: Figure) -> None:
    table = _finite(_total(tables["descent_spectrum"]), ["rank", "eigenvalue"], empty="descent_spectrum has no finite eigenvalues")
    ax = fig.subplots()
    for (mode, group), rows in table.groupby(["mode", "group"], sort=False):
        label = mode + (f" · {group}" if table["group"].nunique() > 1 else "")
        ax.plot(rows["rank"], rows["eigenvalue"], "o-", color=MODE_COLORS.get(mode, "0.4"), label=label)
    directions = tables.get("descent_directions")
    if directions is not None and "lr" in directions.columns:
        for lr in pd.to_numeric(directions["lr"], errors="coerce").dropna().unique():
            if lr > 0:
                ax.axhline(2 / lr, color="0.3", ls="--", lw=1, label="2 / lr")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="rank", ylabel="eigenvalue")
    _legend_right(ax, fontsize="small")


@figure(
    "descent",
    "Quadratic model against the real loss",
    "L(θ + a d) on a grid of step sizes a (solid) against the quadratic model L + a gᵀd + a²/2 dᵀHd (dashed), one panel per "
    "mode, log step axis; dotted: the step from which they part (relative error above 10%), where the second-order model stops "
    "describing the step; dashed grey: the learning rate (MATH.md §5).",
    {"descent_quadratic": ("mode", "step", "loss", "quadratic")},
)
def descent_quadratic(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["descent_quadratic"], ["step", "loss", "quadratic"], empty="descent_quadratic has no finite rows")
    modes = sorted(table["mode"].unique(), reverse=True)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    directions = tables.get("descent_directions")
    for ax, mode in zip(axes, modes):
        rows = table[table["mode"] == mode].sort_values("step")
        ax.plot(rows["step"], rows["loss"], ".-", color="#4c72b0", ms=3, label="loss")
        ax.plot(rows["step"], rows["quadratic"], "--", color="#dd8452", label="quadratic model")
        step = _parting_step(rows)
        if np.isfinite(step):
            ax.axvline(step, color="0.35", ls=":", lw=1.2, label=f"parting at {step:.3g}")
        if directions is not None and "lr" in directions.columns:
            for lr in pd.to_numeric(directions.loc[directions["mode"] == mode, "lr"], errors="coerce").dropna().unique():
                ax.axvline(lr, color="0.6", ls="--", lw=1, label=f"lr = {lr:.3g}")
        if (rows["step"] > 0).all():
            ax.set_xscale("log")
        ax.set(title=f"{mode} mode", xlabel="step size a", ylabel="loss")
        ax.legend(frameon=False, fontsize="small", loc="best")


def _parting_step(rows: pd.DataFrame) -> float:
    """The descent analyzer's parting step of one mode (NaN without a ``rel_error`` column)."""
    if "rel_error" not in rows.columns:
        return float("nan")
    from normscope.analyzers.descent import parting_step

    return float(parting_step(rows))


@figure(
    "compare",
    "Training curves of the normalization ops",
    "Loss per step of a short run of each op on the same data and initial weights, one panel per batch size "
    "(\"Normalization Gradients are Least-Squares Residuals\" and \"Extreme Normalization\" compare these variants at small batches).",
    {"compare_curves": ("op", "batch_size", "step", "split", "loss")},
    size=(WIDTH, 3.4),
)
def compare_curves(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["compare_curves"], ["step", "loss"], empty="compare_curves has no finite losses")
    sizes = sorted(table["batch_size"].unique())[:4]
    axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
    ops = sorted(table["op"].unique())
    colors = dict(zip(ops, sns.color_palette(PALETTE)))
    for ax, size in zip(axes, sizes):
        rows = table[table["batch_size"] == size]
        for op, run in rows.groupby("op", sort=True):
            train, test = run[run["split"] == "train"], run[run["split"] != "train"]
            ax.plot(train["step"], train["loss"], "-", color=colors[op], lw=1.2, label=f"{op} (train)")
            ax.plot(test["step"], test["loss"], "o--", color=colors[op], ms=5, lw=1, label=f"{op} (test)")
        ax.set(title=f"batch size {size}", xlabel="step", ylabel="loss")
    handles, labels = axes[-1].get_legend_handles_labels()
    _legend_right(axes[-1], handles, labels, fontsize="small")


@figure(
    "compare",
    "Final test accuracy",
    "Test accuracy at the end of each op's run, by batch size (compare_summary).",
    {"compare_summary": ("op", "batch_size", "final_test_accuracy")},
    size=(WIDTH, 3.0),
)
def compare_accuracy(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["compare_summary"], ["final_test_accuracy"], empty="compare_summary has no finite accuracy")
    ax = fig.subplots()
    sns.barplot(data=table, x="batch_size", y="final_test_accuracy", hue="op", ax=ax, palette=PALETTE)
    ax.set(xlabel="batch size", ylabel="test accuracy", ylim=(0, 1))
    _legend_right(ax, fontsize="small")
